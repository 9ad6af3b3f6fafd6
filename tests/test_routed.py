"""Routed builds end to end: recipe -> moerge.build -> transformers load -> logits / generate.

Invariants: experts identical to the base give the base's logits (every kind, both levels); forcing the
route to expert t reproduces fine-tune t where the kind is exact (bit1: the dense model its formula
predicts); a mixed-route batch equals its rows alone; a fresh process loads the same logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from isolation import HIDE_MOERGE
from transformers import AutoModelForCausalLM

import moerge
from moerge.kinds.bit1 import unpack_signs
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

KINDS = ["dense", "wemoe", "twin", "bit1", "lora", "sparse"]
PROMPTS = ["good movie loved the acting", "the election market report", "what is 3 plus 4"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """qwen2 (q/k/v biases, tied): experts differ from the base only in attention and MLP linears."""
    root = tmp_path_factory.mktemp("routed")
    base = tiny.make_base(root / "base", family="qwen2", hidden=32, layers=2, tie=True, seed=0)
    full = [tiny.make_full_expert(base, root / f"full{i}", seed=10 + i, scale=0.5, modules=("self_attn", "mlp"))
            for i in range(2)]
    loras = [tiny.make_lora_expert(base, root / f"lora{i}", seed=20 + i, r=4, alpha=8, scale=0.3) for i in range(2)]
    zero_lora = tiny.make_lora_expert(base, root / "lora_zero", seed=30, r=2, alpha=4, scale=0.0)
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 16, seed=1) for t in ("sentiment", "topic", "math")}
    return {"root": root, "base": base, "full": full, "lora": loras, "zero_lora": zero_lora, "data": data}


def _recipe(pool: dict, sources: list[Path], kind: str, level: str = "sequence", calib: bool = False, **expert) -> dict:
    tasks = list(pool["data"])
    experts = [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)]
    if calib:
        for i, e in enumerate(experts):
            e["calibration"] = {"data": str(pool["data"][tasks[i % 3]]), "max_samples": 16, "chat_template": True}
    return {"base": str(pool["base"]), "experts": experts, "merge": {"method": "ties", "density": 0.5},
            "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": kind, **expert},
                        "router": {"level": level, "init": "prototype" if calib else "uniform"}}}


def _build(pool: dict, raw: dict, name: str) -> Path:
    out = pool["root"] / name
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


def _expert_reference(pool: dict, source: Path) -> torch.nn.Module:
    if (source / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=torch.float32)
        return PeftModel.from_pretrained(base, source).merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("kind", KINDS)
def test_identical_experts_give_base_logits(pool: dict, kind: str, level: str) -> None:
    sources = [pool["zero_lora"]] * 2 if kind == "lora" else [pool["base"], pool["base"]]
    out = _build(pool, _recipe(pool, sources, kind, level, rank=4 if kind == "twin" else None,
                               density=0.5 if kind == "sparse" else None), f"ident_{kind}_{level}")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=torch.float32).eval()
    assert (_logits(moe, _ids()) - _logits(base, _ids())).abs().max() <= 1e-5


def _clean(raw: dict) -> dict:
    raw["routing"]["expert"] = {k: v for k, v in raw["routing"]["expert"].items() if v is not None}
    return raw


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("kind,extra", [("dense", {}), ("wemoe", {}), ("twin", {"rank": 64}),
                                        ("sparse", {"density": 1.0}), ("lora", {})])
def test_force_route_reproduces_expert(pool: dict, kind: str, extra: dict, level: str) -> None:
    sources = pool["lora"] if kind == "lora" else [pool["full"][0], pool["full"][1], pool["lora"][0]]
    out = _build(pool, _clean(_recipe(pool, sources, kind, level, **extra)), f"force_{kind}_{level}")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for t, src in enumerate(sources):
        moe.force_route(f"e{t}")
        ref = _expert_reference(pool, src)
        assert (_logits(moe, _ids()) - _logits(ref, _ids())).abs().max() <= 1e-4, (kind, t)


def test_bit1_matches_its_formula(pool: dict) -> None:
    sources = [pool["full"][0], pool["full"][1]]
    out = _build(pool, _recipe(pool, sources, "bit1"), "force_bit1")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd = moe.state_dict()
    for t in range(2):
        ref = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=torch.float32).eval()
        ref_sd = ref.state_dict()
        for unit in moe.config.moerge["units"]:
            for lin, spec in moe.config.moerge["units"][unit]["linears"].items():
                p = f"{unit}.{lin}"
                w_s = sd[f"{p}.weight"]
                signs = unpack_signs(sd[f"{p}.experts.{t}.signs"], w_s.shape[1])
                ref_sd[f"{p}.weight"].copy_(w_s + sd[f"{p}.experts.{t}.scale"][:, None] * signs)
                if spec["bias"]:
                    ref_sd[f"{p}.bias"].copy_(sd[f"{p}.bias"] + sd[f"{p}.experts.{t}.bias_delta"])
        moe.force_route(f"e{t}")
        assert (_logits(moe, _ids()) - _logits(ref, _ids())).abs().max() <= 1e-4
        moe.force_route(None)


def test_fresh_process_and_no_moerge_on_path(pool: dict, tmp_path: Path) -> None:
    out = _build(pool, _recipe(pool, [pool["full"][0], pool["lora"][0]], "twin", calib=True, rank=4), "fresh")
    assert json.loads((out / "config.json").read_text())["moerge"]["initialized"] is True
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = _logits(moe, _ids())
    torch.save(_ids(), tmp_path / "ids.pt")
    code = HIDE_MOERGE + (
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()\n"
        "assert type(m).__module__ != 'moerge.modeling.modeling_moerge'\n"
        "torch.save(m(input_ids=torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-I", "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "got.pt")],
                   check=True, cwd=tmp_path, env=env)
    assert (torch.load(tmp_path / "got.pt") - want).abs().max() <= 1e-5


def test_mixed_route_batch_equals_rows_alone(pool: dict) -> None:
    out = _build(pool, _recipe(pool, [pool["full"][0], pool["full"][1], pool["lora"][0]], "twin", calib=True, rank=4),
                 "mixed")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = moe.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    routes = moe.last_routes()
    assert routes.shape == (3, 3)
    assert len({int(r.argmax()) for r in routes}) == 3, routes  # the prompts really take different routes
    for i, text in enumerate(texts):
        one = tok([text], return_tensors="pt", add_special_tokens=False)
        alone = moe.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert batch[i, enc["input_ids"].shape[1]:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist()


def test_selection_rules_and_plan(pool: dict) -> None:
    from moerge.pipeline import plan_text

    sources = [pool["full"][0], pool["full"][1]]
    raw = _recipe(pool, sources, "twin", rank=4)
    raw["routing"]["select"] = {"metric": "sign_conflict", "top_fraction": 0.5}
    text = plan_text(recipe_from_dict(raw))
    assert text.count(" routed ") == 2 and text.count(" merged ") == 2
    raw["routing"]["select"] = {"layers": [1]}
    text = plan_text(recipe_from_dict(raw))
    decisions = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("model.")}
    assert decisions == {"model.layers.0.self_attn": "merged", "model.layers.0.mlp": "merged",
                         "model.layers.1.self_attn": "routed", "model.layers.1.mlp": "routed"}
    raw["routing"]["select"] = {"metric": "cancellation", "threshold": 2.0}
    assert not [line for line in plan_text(recipe_from_dict(raw)).splitlines() if " routed " in line]
    raw["routing"]["select"] = {"budget": "1.0x"}
    assert "0/4 units routed" in plan_text(recipe_from_dict(raw))
    raw["routing"]["select"] = {"budget": "100x"}
    assert "4/4 units routed" in plan_text(recipe_from_dict(raw))


def test_analysis_cache_reuses_and_invalidates(pool: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second plan over the same inputs reads the cached metrics (no unit is streamed again) and gets the same
    routed units; changing an expert's file or the merge recomputes; MOERGE_NO_CACHE turns the cache off."""
    import shutil

    import moerge.pipeline.analyze as analyze_mod
    import moerge.pipeline.plan as plan_mod
    from moerge.pipeline.context import BuildContext

    monkeypatch.setenv("MOERGE_ANALYSIS_CACHE", str(tmp_path / "cache"))
    expert = tmp_path / "expert"
    shutil.copytree(pool["full"][1], expert)
    raw = _recipe(pool, [pool["full"][0], expert], "twin", rank=4)
    raw["routing"]["select"] = {"metric": "sign_conflict", "top_fraction": 0.5}
    calls: list[str] = []
    real = analyze_mod.unit_metrics
    monkeypatch.setattr(analyze_mod, "unit_metrics", lambda ctx, u, d: calls.append(u.path) or real(ctx, u, d))

    def plan(raw: dict) -> tuple[dict, list[str]]:
        p = plan_mod.make_plan(BuildContext.open(recipe_from_dict(raw)), progress=False)
        return p.metrics, [ru.unit.path for ru in p.routed]

    first, routed = plan(raw)
    assert len(calls) == 4 and len(list((tmp_path / "cache").glob("*.json"))) == 1
    again, routed_again = plan(raw)
    assert len(calls) == 4 and again == first and routed_again == routed  # all from the cache
    raw["routing"]["select"] = {"budget": "1.5x"}  # another rule over the same inputs: still cached
    plan(raw)
    assert len(calls) == 4
    raw["merge"] = {"method": "ties", "density": 0.3, "lambda": 1.0}  # merge_error / trimming change
    plan(raw)
    assert len(calls) == 8
    weights = next(expert.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: the key changes
    plan(raw)
    assert len(calls) == 12
    monkeypatch.setenv("MOERGE_NO_CACHE", "1")
    plan(raw)
    assert len(calls) == 16


def test_analyze_writes_json_and_png(pool: dict, tmp_path: Path) -> None:
    from moerge.cli import main

    raw = _recipe(pool, [pool["base"], pool["base"]], "dense")
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(raw))
    assert main(["analyze", str(recipe), "--out", str(tmp_path / "an"), "--quiet"]) == 0
    data = json.loads((tmp_path / "an" / "conflict.json").read_text())
    assert len(data["units"]) == 4
    for u in data["units"]:  # identical-to-base experts: every metric defined
        assert u["sign_conflict"] == 0 and u["cancellation"] == 0 and u["cosine"] == 1 and u["merge_error"] == 0
    assert (tmp_path / "an" / "conflict.png").stat().st_size > 1000


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text"])
def test_families_route_and_reproduce(family: str, tmp_path: Path) -> None:
    """Every supported family: a routed build loads, and forcing each expert reproduces it."""
    base = tiny.make_base(tmp_path / "base", family=family, hidden=32, layers=2, tie=family.startswith("gemma"))
    experts = [tiny.make_full_expert(base, tmp_path / f"e{i}", seed=i, scale=0.5, modules=("q_proj", "k_proj", "v_proj",
                                                                                            "o_proj", "mlp"))
               for i in range(2)]
    raw = {"base": str(base), "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(experts)],
           "merge": {"method": "task_arithmetic", "lambda": 0.5},
           "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": "dense"},
                       "router": {"init": "uniform"}}}
    moerge.build(recipe_from_dict(raw), tmp_path / "moe", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    for t, src in enumerate(experts):
        moe.force_route(f"e{t}")
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        assert (_logits(moe, _ids()) - _logits(ref, _ids())).abs().max() <= 1e-4, (family, t)
