"""Native MoE exports (Mixtral, Qwen2-MoE, Qwen3-MoE): plain transformers loads them, names and bytes are what
``save_pretrained`` writes, and the routing invariants hold.

Invariants: experts identical to the base give the base logits; forcing every router to expert t reproduces
fine-tune t (experts that differ from the base only in MLPs, since attention is the static merge); LoRA experts
(dense kind) build and reproduce their merged adapter; calibrated routers send held-out prompts to their
expert.  Errors name the unit, key or base that cannot be exported.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from folders import tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

import moerge
from moerge.errors import MoergeError
from moerge.io.writer import TensorSpec
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

MLP = ("gate_proj", "up_proj", "down_proj")
FORMATS = [("mixtral", "llama"), ("qwen2_moe", "llama"), ("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen3")]
TASKS = ("sentiment", "topic", "math")


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per family: a base (hidden 32, 3 layers; qwen2 tied with q/k/v biases), two full experts and one LoRA
    expert that change only the MLPs, and calibration data for three tasks."""
    root = tmp_path_factory.mktemp("export")
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 24, seed=1) for t in TASKS}
    out: dict = {"root": root, "data": data}
    for family in ("llama", "qwen2", "qwen3"):
        r = root / family
        base = tiny.make_base(r / "base", family=family, hidden=32, layers=3, tie=family == "qwen2", seed=0)
        full = [tiny.make_full_expert(base, r / f"full{i}", seed=10 + i, scale=0.5, modules=("mlp",)) for i in range(2)]
        lora = tiny.make_lora_expert(base, r / "lora", seed=20, r=4, alpha=8, scale=0.3, target_modules=MLP)
        out[family] = {"base": base, "experts": [*full, lora]}
    return out


def _recipe(pools: dict, family: str, fmt: str, sources: list[Path] | None = None, *, layers: list[int] | None = None,
            calib: bool = True, top_k: int = 1, **routing: object) -> dict:
    pool = pools[family]
    sources = sources if sources is not None else pool["experts"]
    experts = [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)]
    if calib:
        for i, e in enumerate(experts):
            e["calibration"] = {"data": str(pools["data"][TASKS[i % 3]]), "chat_template": True, "max_samples": 16}
    select = {"layers": layers} if layers is not None else {"all": True}
    return {"base": str(pool["base"]), "experts": experts,
            "routing": {"select": select, "modules": "mlp", "router": {"level": "token"}, **routing},
            "output": {"format": fmt, "experts_per_token": top_k}}


def _build(pools: dict, raw: dict, name: str) -> Path:
    out = pools["root"] / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _load(folder: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


def _logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits


def _force(model: torch.nn.Module, t: int) -> None:
    """Pin every MoE router of a native model to expert t (top-1, weight 1)."""
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "num_experts"):
            continue

        def forced(h: torch.Tensor, gate: torch.nn.Module = gate) -> tuple:
            h = h.reshape(-1, gate.hidden_dim)  # (N, C)
            logits = torch.zeros(h.shape[0], gate.num_experts)  # (N, E)
            return logits, torch.ones(h.shape[0], 1), torch.full((h.shape[0], 1), t)

        gate.forward = forced


@pytest.mark.parametrize("fmt,family", FORMATS)
def test_loads_plainly_generates_and_matches_save_pretrained(pools: dict, fmt: str, family: str,
                                                           tmp_path: Path) -> None:
    out = _build(pools, _recipe(pools, family, fmt, layers=[0, 2], top_k=2), f"rt_{fmt}_{family}")
    assert "auto_map" not in (out / "config.json").read_text() and not (out / "modeling_moerge.py").exists()
    model = _load(out)
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                    "qwen3_moe": "Qwen3MoeForCausalLM"}[fmt]
    gen = model.generate(_ids(), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
    model.save_pretrained(tmp_path / "resaved")
    ours, theirs = tensors(out), tensors(tmp_path / "resaved")
    assert sorted(ours) == sorted(theirs)
    for name, t in ours.items():
        assert t.shape == theirs[name].shape and t.dtype == theirs[name].dtype, name
        assert torch.equal(t.view(-1).view(torch.uint8), theirs[name].view(-1).view(torch.uint8)), name
    if fmt != "mixtral":  # unrouted layer 1 stays a dense MLP
        assert "model.layers.1.mlp.gate_proj.weight" in ours and "model.layers.1.mlp.gate.weight" not in ours


@pytest.mark.parametrize("fmt,family", FORMATS)
def test_identical_experts_give_base_logits(pools: dict, fmt: str, family: str) -> None:
    base = pools[family]["base"]
    out = _build(pools, _recipe(pools, family, fmt, [base, base, base], layers=[1, 2], top_k=2), f"id_{fmt}_{family}")
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert (_logits(_load(out)) - _logits(ref)).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt,family", FORMATS)
def test_forced_expert_reproduces_fine_tune(pools: dict, fmt: str, family: str) -> None:
    sources = pools[family]["experts"]
    model = _load(_build(pools, _recipe(pools, family, fmt, calib=False), f"force_{fmt}_{family}"))
    base = AutoModelForCausalLM.from_pretrained(pools[family]["base"], dtype=torch.float32).eval()
    for t, src in enumerate(sources):
        if (src / "adapter_config.json").exists():  # LoRA expert: the merged adapter is fine-tune t
            from peft import PeftModel

            ref = PeftModel.from_pretrained(base, src).merge_and_unload().eval()
        else:
            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        _force(model, t)
        assert (_logits(model) - _logits(ref)).abs().max() <= 1e-4, (fmt, t)


def _held_out(task: str, n: int = 12) -> list[str]:
    rng = random.Random(f"held-out:{task}")
    return [tiny.make_prompt(task, rng) for _ in range(n)]


def _self_routing(model: torch.nn.Module, tok: object, n_experts: int) -> float:
    """Share of held-out prompts whose mean router probability (over tokens and MoE layers) picks their expert."""
    probs: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: probs.append(out[0].softmax(-1)))
             for layer in model.model.layers if hasattr(getattr(layer.mlp, "gate", None), "num_experts")]
    hits = total = 0
    for e in range(n_experts):
        for p in _held_out(TASKS[e]):
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            probs.clear()
            _logits(model, tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
            hits += int(torch.cat(probs).mean(0).argmax()) == e
            total += 1
    for h in hooks:
        h.remove()
    return hits / total


def test_calibrated_router_routes_held_out_prompts(pools: dict) -> None:
    out = _build(pools, _recipe(pools, "llama", "mixtral"), "routing_mixtral")
    model, tok = _load(out), AutoTokenizer.from_pretrained(out)
    assert _self_routing(model, tok, 3) >= 0.8


def test_supervised_calibration_fits_native_gates(pools: dict) -> None:
    from moerge.export import export_from_plan
    from moerge.pipeline.context import BuildContext
    from moerge.pipeline.plan import make_plan

    recipe = recipe_from_dict(_recipe(pools, "llama", "qwen2_moe"))
    plan = make_plan(BuildContext.open(recipe), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_from_plan(plan, pools["root"] / "supervised", force=True, progress=False, calibrate=True)
    model, tok = _load(out), AutoTokenizer.from_pretrained(out)
    assert _self_routing(model, tok, 3) >= 0.8


def test_no_calibration_data_warns_and_leaves_zero_gates(pools: dict) -> None:
    out = pools["root"] / "nocal"
    with pytest.warns(UserWarning, match="no calibration data"):
        moerge.build(recipe_from_dict(_recipe(pools, "llama", "mixtral", calib=False)), out, force=True,
                     progress=False)
    gates = {k: v for k, v in tensors(out).items() if k.endswith(".gate.weight")}
    assert len(gates) == 3 and all(not v.any() for v in gates.values())


def test_export_command_from_moerge_checkpoint(pools: dict) -> None:
    from moerge.cli import main

    raw = _recipe(pools, "llama", "mixtral")
    raw["output"] = {}
    raw["routing"]["router"]["top_k"] = 1
    src = _build(pools, raw, "moerge_ckpt")
    for fmt in ("mixtral", "qwen2_moe"):
        out = pools["root"] / f"exported_{fmt}"
        assert main(["export", str(src), "--to", fmt, str(out), "--force", "--quiet"]) == 0
        model, tok = _load(out), AutoTokenizer.from_pretrained(out)
        assert model.config.num_experts_per_tok == 1
        assert model.model.layers[1].mlp.gate.weight.abs().sum() > 0  # converted token prototypes
        assert _self_routing(model, tok, 3) >= 0.7
        moe = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        for t in range(3):
            moe.force_route(f"e{t}")
            _force(model, t)
            assert (_logits(model) - _logits(moe)).abs().max() <= 1e-4


@pytest.mark.parametrize("change,field", [
    ({"routing": {"modules": "both"}}, "model.layers.0.self_attn"),
    ({"routing": {"expert": {"kind": "twin", "rank": 2}}}, "routing.expert.kind"),
    ({"output": {"format": "qwen3_moe"}}, "cannot represent a 'llama' base"),
])
def test_recipe_errors_name_the_problem(pools: dict, change: dict, field: str) -> None:
    raw = _recipe(pools, "llama", "mixtral")
    for key, value in change.items():
        raw[key] = {**raw[key], **value}
    with pytest.raises(MoergeError, match=field.replace(".", r"\.").replace("(", r"\(")):
        moerge.build(recipe_from_dict(raw), pools["root"] / "bad", force=True, progress=False)
    assert not (pools["root"] / "bad").exists()


def test_export_refuses_non_dense_units(pools: dict) -> None:
    from moerge.export import export_checkpoint

    raw = _recipe(pools, "llama", "mixtral", calib=False, expert={"kind": "twin", "rank": 2})
    raw["output"] = {}
    src = _build(pools, raw, "twin_ckpt")
    with pytest.raises(MoergeError, match=r"moerge\.units\.model\.layers\.0\.mlp: kind 'twin'"):
        export_checkpoint(src, "mixtral", pools["root"] / "bad2", progress=False)


def test_sequence_level_checkpoint_routes_from_recipe_data(pools: dict) -> None:
    from moerge.export import export_checkpoint

    raw = _recipe(pools, "llama", "mixtral", layers=[0, 2])
    raw["output"], raw["routing"]["router"] = {}, {"level": "sequence", "top_k": 1}
    src = _build(pools, raw, "seq_ckpt")
    out = export_checkpoint(src, "mixtral", pools["root"] / "seq_export", force=True, progress=False)
    gates = {k: v for k, v in tensors(out).items() if k.endswith(".gate.weight")}
    assert [k for k, v in sorted(gates.items()) if v.any()] == [
        "model.layers.0.block_sparse_moe.gate.weight", "model.layers.2.block_sparse_moe.gate.weight"]
    assert _self_routing(_load(out), AutoTokenizer.from_pretrained(out), 3) >= 0.7


def test_executor_keeps_order_and_raises(tmp_path: Path) -> None:
    """Jobs computed ahead of the writer (several workers, a bounded queue each) are written in plan order,
    and a failing job's error reaches the caller (the executor behind every build and export)."""
    from moerge.io.writer import ShardedWriter
    from moerge.pipeline.execute import Job, run_jobs

    def job(i: int, fail: bool = False) -> Job:
        def run() -> object:
            if fail:
                raise ValueError(f"job {i}")
            yield f"t{i}", torch.full((2,), float(i))

        return Job(f"t{i}", [TensorSpec(f"t{i}", (2,), torch.float32)], run)

    got: list[str] = []

    class Recorder(ShardedWriter):
        def write(self, name: str, tensor: torch.Tensor) -> None:
            got.append(name)

    jobs = [job(i) for i in range(5)]
    run_jobs(jobs, Recorder(tmp_path, [s for j in jobs for s in j.specs], 1 << 20), progress=False, workers=3)
    assert got == [f"t{i}" for i in range(5)]
    got.clear()
    jobs = [job(0), job(1, fail=True), job(2)]
    with pytest.raises(ValueError, match="job 1"):
        run_jobs(jobs, Recorder(tmp_path, [s for j in jobs for s in j.specs], 1 << 20), progress=False, workers=2)
    assert got == ["t0"]
