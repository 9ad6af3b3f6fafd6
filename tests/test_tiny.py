"""Tests of moerge.tiny: offline tokenizer, tiny bases of every family, full and LoRA experts, task data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.testing.tiny import (
    FAMILIES,
    TASK_WORDS,
    TASKS,
    make_base,
    make_full_expert,
    make_task_data,
    make_tokenizer,
)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def test_tokenizer_round_trip_and_chat_template(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and 256 < len(tok) <= 1024
    assert (loaded.bos_token, loaded.unk_token) == ("<|endoftext|>", "<|endoftext|>")
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|pad|>")
    assert loaded.padding_side == "left"
    text = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.convert_tokens_to_ids("<|im_start|>") and loaded.eos_token_id in ids
    odd = "héllo 世界 🙂\ttabs  and   spaces"
    assert loaded.decode(loaded(odd)["input_ids"]) == odd
    assert make_tokenizer().get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_base_of_each_family_loads_and_generates(tmp_path: Path, family: str) -> None:
    base = make_base(tmp_path / family, family=family)
    assert (base / "model.safetensors").is_file() and (base / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert model.config.model_type == family and model.config.vocab_size == len(tok)
    enc = tok(["the movie was good", "what is 2 plus 3"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.05
    norms = [t for k, t in _tensors(base).items() if k.endswith("norm.weight")]
    assert norms and all(t.std() > 0.01 for t in norms)


def test_base_is_deterministic(tmp_path: Path) -> None:
    a = _tensors(make_base(tmp_path / "a", seed=3))
    b = _tensors(make_base(tmp_path / "b", seed=3))
    c = _tensors(make_base(tmp_path / "c", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_qwen2_base_has_nonzero_qkv_biases(qwen2_pool: dict[str, Any]) -> None:
    tensors = _tensors(qwen2_pool["base"])
    biases = [k for k in tensors if k.endswith("_proj.bias")]
    assert {k.split(".")[-2] for k in biases} == {"q_proj", "k_proj", "v_proj"}
    assert all(tensors[k].abs().min() > 0 for k in biases)


@pytest.mark.parametrize("pool_name", ["tied_llama_pool", "qwen2_pool"])
def test_tied_base_has_no_lm_head(pool_name: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(pool_name)
    for folder in (pool["base"], *pool["full"]):
        assert "lm_head.weight" not in _tensors(folder)
        assert _config(folder)["tie_word_embeddings"] is True


def test_untied_base_has_lm_head(llama_pool: dict[str, Any]) -> None:
    assert "lm_head.weight" in _tensors(llama_pool["base"])
    assert _config(llama_pool["base"])["tie_word_embeddings"] is False


def test_full_expert_differs_in_every_tensor(llama_pool: dict[str, Any]) -> None:
    base = _tensors(llama_pool["base"])
    experts = [_tensors(p) for p in llama_pool["full"]]
    for expert in experts:
        assert expert.keys() == base.keys()
        for name, tensor in base.items():
            assert tensor.shape == expert[name].shape and not torch.equal(tensor, expert[name]), name
    assert not torch.equal(experts[0]["lm_head.weight"], experts[1]["lm_head.weight"])
    assert {p.name for p in llama_pool["full"][0].iterdir()} == {p.name for p in llama_pool["base"].iterdir()}


def test_full_expert_modules_filter(llama_pool: dict[str, Any], tmp_path: Path) -> None:
    base = _tensors(llama_pool["base"])
    expert = _tensors(make_full_expert(llama_pool["base"], tmp_path / "e", seed=7, modules=["mlp"]))
    for name, tensor in base.items():
        assert torch.equal(tensor, expert[name]) != ("mlp" in name), name


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_adapter_changes_logits(llama_pool: dict[str, Any]) -> None:
    from peft import PeftModel

    lora = llama_pool["lora"][0]
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == llama_pool["base"].resolve()
    assert (lora / "adapter_model.safetensors").is_file()
    assert all(t.abs().sum() > 0 for k, t in _tensors(lora).items() if "lora_B" in k)
    model = AutoModelForCausalLM.from_pretrained(llama_pool["base"])
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        before = model(ids).logits
        after = PeftModel.from_pretrained(model, lora)(ids).logits
    assert (before - after).abs().max() > 1e-3


def test_sharded_base_writes_index(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", hidden=64, max_shard_size="100KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    expert = make_full_expert(base, tmp_path / "expert", seed=1)
    assert sorted(p.name for p in expert.glob("*.safetensors")) == shards
    assert (expert / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(expert)


def test_task_data_is_seeded_and_separable(tmp_path: Path) -> None:
    for task in TASKS:
        path = make_task_data(tmp_path / f"{task}.jsonl", task, n=20, seed=1)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 20 and all(r["task"] == task for r in rows)
        assert all(5 <= len(r["prompt"].split()) <= 20 for r in rows)
        assert any(w in TASK_WORDS[task] for w in rows[0]["prompt"].split())
        assert path.read_text() == make_task_data(tmp_path / "again.jsonl", task, n=20, seed=1).read_text()
    with pytest.raises(ValueError):
        make_task_data(tmp_path / "x.jsonl", "nope", n=1, seed=0)


def test_pool_layout(llama_pool: dict[str, Any]) -> None:
    assert set(llama_pool["experts"]) == {"expert_0", "expert_1", "lora_0"}
    assert set(llama_pool["tasks"].values()) == set(llama_pool["data"])
    assert all(p.is_file() for p in llama_pool["data"].values())
    assert llama_pool["base"] == llama_pool["root"] / "base"
