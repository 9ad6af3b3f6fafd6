"""``moerge calibrate`` and ``moerge add-expert`` on tiny models with separable synthetic tasks.

Contracts: supervised calibration from <= 32 examples per task routes held-out prompts (and fresh prompts,
through the real model forward) to their expert; entropy calibration lowers the routing entropy; add-expert
keeps every old expert's forced logits bit-identical and the new one exact; bad data gives one clear error
and leaves the checkpoint untouched; two accelerate processes reach the single-process accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import moerge
from moerge.errors import DataError, MoergeError, SourceError
from moerge.recipe import recipe_from_dict
from moerge.routing.add_expert import add_expert
from moerge.routing.calibrate import CalibrateOptions, calibrate
from moerge.routing.data import Defaults, holdout_split, load_examples
from moerge.routing.fit import fallback_threshold, fit_temperature
from moerge.testing import tiny

TASKS = list(tiny.TASKS)  # sentiment, topic, math, code
N_PER_TASK = 40  # holdout 0.2 -> 32 training + 8 held-out examples per task
IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """qwen2 (q/k/v biases, tied): 5 LoRA experts, 3 full experts, per-task data and two routed builds."""
    root = tmp_path_factory.mktemp("calib")
    base = tiny.make_base(root / "base", family="qwen2", hidden=32, layers=2, tie=True, seed=0)
    loras = [tiny.make_lora_expert(base, root / f"lora{i}", seed=40 + i, r=4, alpha=8, scale=0.3) for i in range(5)]
    fulls = [tiny.make_full_expert(base, root / f"full{i}", seed=50 + i, scale=0.5, modules=("self_attn", "mlp"))
             for i in range(3)]
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, N_PER_TASK, seed=1) for t in TASKS}
    fresh = {t: tiny.make_task_data(root / "fresh" / f"{t}.jsonl", t, 25, seed=2) for t in TASKS}
    (root / "data.yaml").write_text(yaml.safe_dump({t: {"data": f"data/{t}.jsonl", "chat_template": True}
                                                    for t in TASKS}))
    pool = {"root": root, "base": base, "lora": loras, "full": fulls, "data": data, "fresh": fresh}
    pool["moe"] = _build(pool, "moe", [(t, loras[i]) for i, t in enumerate(TASKS)], "lora")
    return pool


def _build(pool: dict, name: str, experts: list[tuple[str, Path]], kind: str, level: str = "sequence",
           calib: bool = False) -> Path:
    specs = [{"name": n, "source": str(s)} for n, s in experts]
    if calib:
        for spec in specs:
            spec["calibration"] = {"data": str(pool["data"][spec["name"]]), "chat_template": True}
    raw = {"base": str(pool["base"]), "experts": specs,
           "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": kind},
                       "router": {"level": level, "init": "prototype" if calib else "uniform"}}}
    out = pool["root"] / name
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _fresh_accuracy(pool: dict, folder: Path) -> tuple[float, dict]:
    """Route fresh prompts through the calibrated model's real forward (one batch per task)."""
    model, tok = _load(folder), AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "right"
    hits = total = 0
    for e, task in enumerate(TASKS):
        rows = [json.loads(line)["prompt"] for line in pool["fresh"][task].read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False)
                 for r in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            model(**enc)
        hits += int((model.last_routes().argmax(-1) == e).sum())
        total += len(rows)
    return hits / total, dict(model.moerge_stats)


# ---------------------------------------------------------------- pure pieces

def test_threshold_temperature_and_split() -> None:
    conf = torch.tensor([0.3, 0.5, 0.9, 0.95])
    assert fallback_threshold(conf, torch.tensor([False, False, True, True]), 4) == pytest.approx(0.7)
    assert fallback_threshold(conf, torch.tensor([True, True, True, True]), 4) == pytest.approx((0.25 + 0.3) / 2)
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [3.0, 1.0]])
    t = fit_temperature(logits, torch.tensor([0, 1, 1]))
    assert 1.0 < t <= 20.0  # one confident mistake: softer than the raw logits
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train, held = holdout_split(labels, 0.2, seed=3)
    assert sorted(train + held) == list(range(17))
    assert [sum(labels[i] == y for i in held) for y in range(3)] == [2, 1, 1]
    assert holdout_split(labels, 0.2, seed=3) == (train, held)


def test_chat_template_and_messages(pool: dict, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(pool["moe"])
    rows = [{"messages": [{"role": "user", "content": "what is 2 plus 2"}], "expert": "math"},
            {"messages": [{"role": "user", "content": "good movie"}], "expert": "sentiment"}]
    table = tmp_path / "msgs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_examples(table, TASKS, tok, Defaults(field="messages"))
    assert ex.labels == [2, 0]
    assert ex.texts[0] == "<|im_start|>user\nwhat is 2 plus 2<|im_end|>\n<|im_start|>assistant\n"
    mapping = load_examples({"topic": {"data": str(pool["data"]["topic"]), "chat_template": True, "max_samples": 3}},
                            TASKS, tok)
    assert len(mapping) == 3 and all(t.startswith("<|im_start|>user\n") for t in mapping.texts)
    plain = load_examples({"topic": str(pool["data"]["topic"])}, TASKS, tok)
    assert not plain.texts[0].startswith("<|im_start|>") and len(plain) == N_PER_TASK


# ---------------------------------------------------------------- supervised

def test_supervised_sequence(pool: dict, tmp_path: Path) -> None:
    ckpt = _copy(pool["moe"], tmp_path)
    report = calibrate(ckpt, pool["root"] / "data.yaml")
    assert report["n_train"] == dict.fromkeys(TASKS, 32) and report["n_heldout"] == dict.fromkeys(TASKS, 8)
    assert report["heldout"]["accuracy"] >= 0.95, report["heldout"]
    assert set(report["heldout"]["per_expert"]) == set(TASKS)
    assert report["heldout"]["mean_entropy"] < report["before"]["mean_entropy"]
    saved = json.loads((ckpt / "calibration.json").read_text())
    assert saved["heldout"]["accuracy"] == report["heldout"]["accuracy"]
    assert (ckpt / "calibration_confusion.png").stat().st_size > 1000
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert plan["initialized"] is True and plan["fallback"]["mode"] == "soft"
    assert 0.25 < plan["fallback"]["threshold"] < 1.0
    acc, stats = _fresh_accuracy(pool, ckpt)
    assert acc >= 0.95
    assert stats["routed_rows"] == 100 and stats["fallback_rows"] <= 5


def test_table_form_into_copy(pool: dict, tmp_path: Path) -> None:
    """One table with a text column and an expert column; --out leaves the source checkpoint as it was."""
    rows = [{"text": json.loads(line)["prompt"], "expert": t}
            for t in TASKS for line in pool["data"][t].read_text().splitlines()]
    table = tmp_path / "table.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = _copy(pool["moe"], tmp_path, "src")
    before = _snapshot(src)
    opts = CalibrateOptions(fallback="shared", defaults=Defaults(field="text", max_samples=32, chat_template=True))
    report = calibrate(src, table, out=tmp_path / "out", options=opts)
    assert _snapshot(src) == before
    out = tmp_path / "out"
    # 24 held-out rows: over split seeds 0-5 the accuracy spreads 0.875-1.0 (chance 0.25), so the bound is 0.85
    assert report["n_train"] == dict.fromkeys(TASKS, 26) and report["heldout"]["accuracy"] >= 0.85
    assert json.loads((out / "config.json").read_text())["moerge"]["fallback"]["mode"] == "shared"
    shard = "model.safetensors" if (src / "model.safetensors").exists() else "model-00001-of-00001.safetensors"
    assert os.stat(out / shard).st_ino == os.stat(src / shard).st_ino  # big shards are hard-linked


def test_token_level(pool: dict, tmp_path: Path) -> None:
    moe = _build(pool, "moe_token", [(t, pool["lora"][i]) for i, t in enumerate(TASKS)], "lora", level="token")
    ckpt = _copy(moe, tmp_path)
    report = calibrate(ckpt, pool["root"] / "data.yaml")
    assert report["level"] == "token" and len(report["temperature"]) == 4  # one router per routed unit
    assert report["heldout"]["accuracy"] >= 0.95, report["heldout"]
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["fallback"] is None


# ---------------------------------------------------------------- entropy

def test_entropy_lowers_routing_entropy(pool: dict, tmp_path: Path) -> None:
    """Unlabelled prompts, an uninitialised (uniform) router: entropy minimisation starts near uniform (the
    random prototypes at scale 1) and sharpens the routes through the model's forward and backward."""
    ckpt = _copy(pool["moe"], tmp_path)
    unlabelled = tmp_path / "prompts.jsonl"
    unlabelled.write_text("".join(line + "\n" for t in TASKS for line in pool["data"][t].read_text().splitlines()))
    opts = CalibrateOptions(method="entropy", steps=50, defaults=Defaults(chat_template=True, max_samples=None))
    report = calibrate(ckpt, unlabelled, options=opts)
    assert "accuracy" not in report["heldout"]  # no labels: entropy and fallback only
    assert report["before"]["mean_entropy"] == pytest.approx(math.log(4))
    assert report["heldout"]["mean_entropy"] < report["before"]["mean_entropy"] - 0.2, report["heldout"]
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert plan["initialized"] is True and plan["fallback"] is None  # no labels: no threshold to choose
    _, stats = _fresh_accuracy(pool, ckpt)  # the written router is the one the model uses
    assert stats["routed_rows"] == 100 and stats["fallback_rows"] == 0


# ---------------------------------------------------------------- bad data

def _bad_cases(pool: dict, tmp: Path) -> list[tuple[object, str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    no_field = tmp / "no_field.jsonl"
    no_field.write_text(json.dumps({"text": "good movie"}) + "\n")
    bad_label = tmp / "bad_label.jsonl"
    bad_label.write_text("".join(json.dumps({"prompt": "x", "expert": e}) + "\n" for e in ("math", "maths")))
    return [
        ({"sentimnt": str(pool["data"]["sentiment"])}, "unknown expert 'sentimnt' (did you mean 'sentiment'?)"),
        ({t: str(empty) if t == "topic" else str(pool["data"][t]) for t in TASKS},
         f"{empty}: prompt: calibration source is empty"),
        ({"math": str(no_field)}, "prompt: no such field; columns: text"),
        (bad_label, "expert: row 1 names unknown expert 'maths'"),
    ]


def test_bad_data_one_clear_error_checkpoint_untouched(pool: dict, tmp_path: Path) -> None:
    ckpt = _copy(pool["moe"], tmp_path)
    before = _snapshot(ckpt)
    for data, message in _bad_cases(pool, tmp_path):
        with pytest.raises(DataError) as err:
            calibrate(ckpt, data)
        assert message in str(err.value), str(err.value)
        assert _snapshot(ckpt) == before
    from moerge.cli import main

    assert main(["calibrate", str(ckpt), "--data", str(tmp_path / "bad_label.jsonl")]) == 2
    assert _snapshot(ckpt) == before


def test_failed_write_rolls_back(pool: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _copy(pool["moe"], tmp_path)
    before = _snapshot(ckpt)
    real_replace = os.replace

    def flaky(src: object, dst: object) -> None:
        if str(dst).endswith("calibration.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(MoergeError, match="unchanged"):
        calibrate(ckpt, pool["root"] / "data.yaml")
    monkeypatch.undo()
    assert _snapshot(ckpt) == before


# ---------------------------------------------------------------- add-expert

def _forced_logits(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    model = _load(folder)
    out = {}
    for name in names:
        model.force_route(name)
        with torch.no_grad():
            out[name] = model(input_ids=IDS).logits
    return out


def _reference(pool: dict, source: Path) -> torch.nn.Module:
    if (source / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(_load(pool["base"]), source).merge_and_unload().eval()
    return _load(source)


@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_add_expert(pool: dict, tmp_path: Path, kind: str) -> None:
    old = TASKS[:3]
    sources = pool["lora"] if kind == "lora" else pool["full"]
    ckpt = _copy(_build(pool, f"moe3_{kind}", list(zip(old, sources)), kind), tmp_path)
    calibrate(ckpt, {t: {"data": str(pool["data"][t]), "chat_template": True} for t in old})
    before = _forced_logits(ckpt, old)
    new_source = pool["lora"][4]  # a LoRA source works for both kinds
    report = add_expert(ckpt, "code", new_source, {"code": {"data": str(pool["data"]["code"]), "chat_template": True}})
    assert report["experts"] == [*old, "code"] and report["n_train"]["sentiment"] == 32  # old data reused
    assert report["heldout"]["accuracy"] >= 0.95, report["heldout"]
    after = _forced_logits(ckpt, [*old, "code"])
    for name in old:
        assert torch.equal(before[name], after[name]), name
    with torch.no_grad():
        ref = _reference(pool, new_source)(input_ids=IDS).logits
    assert (after["code"] - ref).abs().max() <= 1e-5
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert plan["experts"][-1] == "code"
    assert all(len(lin["experts"]) == 4 for u in plan["units"].values() for lin in u["linears"].values())
    assert (ckpt / "moerge_expert_code.safetensors").is_file()


def test_add_expert_folds_the_new_experts_norms(pool: dict, tmp_path: Path) -> None:
    """Full fine-tunes that also move their layer norms: the build folds each expert's input-norm scale into its
    routed linears (``fold_norms``), and add-expert folds the new expert's the same way, against the stored
    (merged) norm, so forcing the added expert reproduces it."""
    fulls = [tiny.make_full_expert(pool["base"], tmp_path / f"normed{i}", seed=70 + i, scale=0.5,
                                   modules=("self_attn", "mlp", "layernorm")) for i in range(3)]
    ckpt = _build(pool, "moe_normed", [("sentiment", fulls[0]), ("topic", fulls[1])], "dense")
    ckpt = _copy(ckpt, tmp_path)
    calibrate(ckpt, {t: {"data": str(pool["data"][t]), "chat_template": True} for t in ("sentiment", "topic")})
    add_expert(ckpt, "math", fulls[2], {"math": {"data": str(pool["data"]["math"]), "chat_template": True}})
    forced = _forced_logits(ckpt, ["sentiment", "topic", "math"])
    for name, src in zip(("sentiment", "topic", "math"), fulls):
        with torch.no_grad():
            ref = _load(src)(input_ids=IDS).logits
        assert (forced[name] - ref).abs().max() <= 1e-4, name  # without folding "math" is off by O(0.1)


def test_add_expert_refusals(pool: dict, tmp_path: Path) -> None:
    ckpt = _copy(pool["moe"], tmp_path)
    before = _snapshot(ckpt)
    data = {"code": str(pool["data"]["code"])}
    with pytest.raises(DataError, match="already has an expert 'math'"):
        add_expert(ckpt, "math", pool["lora"][4], data)
    with pytest.raises(SourceError, match="must be a LoRA adapter"):
        add_expert(ckpt, "extra", pool["full"][0], data)
    with pytest.raises(DataError, match="no examples of the new expert 'extra'"):
        add_expert(ckpt, "extra", pool["lora"][4], {"math": str(pool["data"]["math"])})
    assert _snapshot(ckpt) == before


# ---------------------------------------------------------------- CLI and processes

def test_cli(pool: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moerge.cli import main

    ckpt = _copy(pool["moe"], tmp_path)
    assert main(["calibrate", str(ckpt), "--data", str(pool["root"] / "data.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "routing accuracy" in out and "calibration.json" in out
    code = main(["add-expert", str(ckpt), "--name", "x", "--source", str(pool["lora"][4]), "--data",
                 str(tmp_path / "missing.jsonl")])
    assert code == 2 and "calibration data file not found" in capsys.readouterr().err


def test_two_accelerate_processes(pool: dict, tmp_path: Path) -> None:
    """Feature extraction sharded over 2 CPU processes reaches the one-process held-out accuracy."""
    one = calibrate(_copy(pool["moe"], tmp_path, "one"), pool["root"] / "data.yaml")
    ckpt = _copy(pool["moe"], tmp_path, "two")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "moerge", "calibrate", str(ckpt), "--data", str(pool["root"] / "data.yaml"), "--quiet"]
    run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("routing accuracy") == 2  # the main process alone prints (before + after)
    two = json.loads((ckpt / "calibration.json").read_text())
    assert two["processes"] == 2
    n_held = sum(two["n_heldout"].values())
    assert abs(two["heldout"]["accuracy"] - one["heldout"]["accuracy"]) <= 1 / n_held + 1e-9


# ---------------------------------------------------------------- the real pool

REAL_BASE = Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge")) / "smollm2-135m-instruct"
REAL_POOL = Path(__file__).resolve().parents[2] / "shared" / "pool"


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not (REAL_BASE / "model.safetensors").is_file() or not REAL_POOL.is_dir(),
                    reason="real base model or pool absent (tools/get_base_model.py)")
def test_real_pool_heldout_accuracy(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from calibrate_speed import build_real, calibrate_real

    moe = build_real(REAL_BASE, REAL_POOL, tmp_path / "moe")
    report = calibrate_real(moe, REAL_POOL)
    assert max(report["n_train"].values()) <= 64
    assert report["heldout"]["accuracy"] >= 0.97, report["heldout"]
    assert report["timing"]["total_s"] < 180
