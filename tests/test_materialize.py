"""``moerge export --materialize``: twin / lora / bit1 / sparse / wemoe experts written as dense native experts, and
the ``export_report.json`` logit comparison with the moerge checkpoint.

Contract: the materialized export with every expert slot set to expert e gives the moerge checkpoint's
``force_route(e)`` logits (float32 checkpoints: max |d logit| <= 1e-4, KL <= 1e-9; bfloat16 ones: the rounding
of W_e = W_s + delta_e to bfloat16, max |d logit| <= 0.05 and KL <= 1e-5 on these pools); at full rank twin
materializes to the dense experts; the report sees a wrong export; routed attention and MLP bias deltas are
refused with one error line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from folders import tensors
from serving_engines import ENGINES, check
from serving_engines import checkpoint_config as config
from serving_engines import checkpoint_shapes as shapes
from transformers import AutoModelForCausalLM, LlamaConfig

import moerge
from moerge.cli import main
from moerge.export import REPORT_FILE, export_checkpoint
from moerge.export.report import logit_report
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

MLP = ("gate_proj", "up_proj", "down_proj")
KINDS = {  # name -> (routing.expert, expert sources)
    "dense": ({"kind": "dense"}, "full"),
    "twin4": ({"kind": "twin", "rank": 4}, "full"),
    "twin32": ({"kind": "twin", "rank": 32}, "full"),  # hidden 32: full rank
    "bit1": ({"kind": "bit1"}, "full"),
    "sparse": ({"kind": "sparse", "density": 0.3}, "full"),
    "wemoe": ({"kind": "wemoe"}, "full"),
    "lora": ({"kind": "lora"}, "lora"),
}
pytestmark = pytest.mark.filterwarnings("ignore:some experts have no calibration data")


def _build(base: Path, sources: list[Path], expert: dict, out: Path, *, modules: str = "mlp",
           dtype: str | None = None) -> Path:
    """A moerge checkpoint: token-level routers (uninitialised), layers 0 and 2 of 3 routed."""
    raw = {"base": str(base), "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)],
           "routing": {"select": {"layers": [0, 2]}, "modules": modules, "router": {"level": "token"},
                       "expert": expert}}
    if dtype:
        raw["dtype"] = dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _sources(root: Path, base: Path) -> dict[str, list[Path]]:
    full = [tiny.make_full_expert(base, root / f"full{i}", seed=10 + i, scale=0.5, modules=("mlp",))
            for i in range(2)]
    lora = [tiny.make_lora_expert(base, root / f"lora{i}", seed=20 + i, r=4, alpha=8, scale=0.3, target_modules=MLP)
            for i in range(2)]
    return {"full": full, "lora": lora}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One moerge checkpoint per expert kind over a llama base (hidden 32, 3 layers)."""
    root = tmp_path_factory.mktemp("materialize")
    base = tiny.make_base(root / "base", family="llama", hidden=32, layers=3, seed=0)
    sources = _sources(root, base)
    out = {name: _build(base, sources[src], expert, root / name) for name, (expert, src) in KINDS.items()}
    out["root"], out["base"] = root, base
    return out


def _export(ckpt: Path, fmt: str, out: Path, **kwargs: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_checkpoint(ckpt, fmt, out, force=True, progress=False, **kwargs)


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "dense"])
def test_materialized_export_matches_the_checkpoint(ckpts: dict[str, Path], kind: str, fmt: str) -> None:
    out = _export(ckpts[kind], fmt, ckpts["root"] / f"x_{kind}_{fmt}", materialize=True)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["materialized"] is True and report["format"] == fmt and report["stored_dtype"] == "float32"
    assert report["kinds"] == {"model.layers.0.mlp": KINDS[kind][0]["kind"], "model.layers.2.mlp": KINDS[kind][0]["kind"]}
    assert sorted(report["experts"]) == ["e0", "e1"] and len(report["prompts"]) == 4
    assert report["max_abs_logit_diff"] <= 1e-4 and report["mean_kl"] <= 1e-9, report["experts"]
    for engine in ENGINES:  # still a checkpoint the engines load
        assert check(engine, config(out), shapes(out)).ok


def test_dense_export_reports_no_difference(ckpts: dict[str, Path]) -> None:
    out = _export(ckpts["dense"], "qwen2_moe", ckpts["root"] / "x_dense")
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["materialized"] is False
    assert report["max_abs_logit_diff"] <= 1e-5 and report["mean_kl"] <= 1e-9


def test_full_rank_twin_materializes_to_the_dense_experts(ckpts: dict[str, Path]) -> None:
    """W_s + U V at full rank is the fine-tune's own MLP: the materialized twin export is the dense one."""
    twin = tensors(_export(ckpts["twin32"], "mixtral", ckpts["root"] / "m_twin32", materialize=True, report=False))
    dense = tensors(_export(ckpts["dense"], "mixtral", ckpts["root"] / "m_dense", report=False))
    assert sorted(twin) == sorted(dense)
    experts = [k for k in twin if ".experts." in k]
    assert len(experts) == 3 * 2 * 3  # every layer is MoE in Mixtral
    for name in twin:
        assert torch.allclose(twin[name], dense[name], atol=1e-5, rtol=0), name
    low = tensors(_export(ckpts["twin4"], "mixtral", ckpts["root"] / "m_twin4", materialize=True, report=False))
    assert max(float((low[k] - dense[k]).abs().max()) for k in experts) > 1e-2  # rank 4 is not the fine-tune


def test_report_sees_a_different_model(ckpts: dict[str, Path]) -> None:
    """Negative control: the same comparison against another checkpoint (rank 32 vs rank 4 twin) is far off."""
    out = _export(ckpts["twin4"], "mixtral", ckpts["root"] / "neg_twin4", materialize=True, report=False)
    vocab = config(out)["vocab_size"]
    report = logit_report(ckpts["twin32"], out, ["e0", "e1"], vocab, {}, progress=False)
    assert report["max_abs_logit_diff"] > 1e-2 and report["mean_kl"] > 1e-6


def test_bfloat16_checkpoint_differs_by_rounding_only(ckpts: dict[str, Path]) -> None:
    root = ckpts["root"]
    base16 = tiny.make_base(root / "base16", family="llama", hidden=32, layers=3, seed=0, dtype=torch.bfloat16)
    sources = _sources(root / "bf16", base16)["full"]
    ckpt = _build(base16, sources, {"kind": "twin", "rank": 4}, root / "twin4_bf16")
    out = _export(ckpt, "mixtral", root / "x_twin4_bf16", materialize=True)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["stored_dtype"] == "bfloat16"
    assert report["max_abs_logit_diff"] <= 0.05 and report["mean_kl"] <= 1e-5, report["experts"]
    assert tensors(out)["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype \
        == torch.bfloat16


def _one_error_line(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    capsys.readouterr()  # what the set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_materializes_prints_the_report_and_refuses_without_the_flag(ckpts: dict[str, Path],
                                                                         capsys: pytest.CaptureFixture) -> None:
    out = ckpts["root"] / "cli_bit1"
    _one_error_line(capsys, ["export", str(ckpts["bit1"]), "--to", "mixtral", str(out), "--quiet"],
                    "moerge.units.model.layers.0.mlp: kind 'bit1' experts cannot be exported as stored")
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(ckpts["bit1"]), "--to", "mixtral", str(out), "--quiet", "--materialize"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("logit difference to the moerge checkpoint") and lines[1].startswith("  e0: max |d")
    assert (out / REPORT_FILE).is_file() and "materialized as dense" in (out / "README.md").read_text()


def test_routed_attention_is_refused(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    sources = [ckpts["root"] / f"full{i}" for i in range(2)]
    ckpt = _build(ckpts["base"], sources, {"kind": "twin", "rank": 4}, ckpts["root"] / "attn", modules="both")
    out = ckpts["root"] / "attn_out"
    _one_error_line(capsys, ["export", str(ckpt), "--to", "qwen2_moe", str(out), "--materialize"],
                    "moerge.units.model.layers.0.self_attn: routed attention")
    assert not out.exists()


def test_mlp_bias_deltas_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "base"
    tok = tiny.make_tokenizer(base)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, mlp_bias=True, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    sources = [tiny.make_full_expert(base, tmp_path / f"full{i}", seed=i, scale=0.5, modules=("mlp",))
               for i in range(2)]
    ckpt = _build(base, sources, {"kind": "twin", "rank": 4}, tmp_path / "biased")
    assert "bias_delta" in json.dumps(config(ckpt)["moerge"]["units"])
    _one_error_line(capsys, ["export", str(ckpt), "--to", "mixtral", str(tmp_path / "out"), "--materialize"],
                    "linears.gate_proj: MLP biases have no place in a native MoE format")


def test_materialized_export_of_an_anchored_expert(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """An expert add-expert stored against its anchor (W_s + Σ_i a_i Δ_i) exports as W_s + Δ_e + Σ_i a_i Δ_i: the
    report's forced-route comparison holds for it too (without the anchor term it is off by O(1))."""
    import shutil

    from moerge.routing.add_expert import add_expert
    from moerge.routing.calibrate import CalibrateOptions

    ckpt = tmp_path / "bit1_added"
    shutil.copytree(ckpts["bit1"], ckpt)
    new = tiny.make_full_expert(ckpts["base"], tmp_path / "full2", seed=12, scale=0.5, modules=("mlp",))
    data = tiny.make_task_data(tmp_path / "e2.jsonl", "math", 16, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_expert(ckpt, "e2", new, data, options=CalibrateOptions(method="entropy"))
    assert "e2" in json.loads((ckpt / "config.json").read_text())["moerge"]["anchors"]
    out = _export(ckpt, "mixtral", tmp_path / "x_anchored", materialize=True)
    report = json.loads((out / REPORT_FILE).read_text())
    assert sorted(report["experts"]) == ["e0", "e1", "e2"]
    assert report["max_abs_logit_diff"] <= 1e-4 and report["mean_kl"] <= 1e-9, report["experts"]
