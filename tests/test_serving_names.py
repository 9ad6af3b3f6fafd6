"""Native exports against the serving engines' loaders: every tensor of a Mixtral / Qwen2-MoE / Qwen3-MoE export
is consumed by vLLM's and SGLang's ``load_weights`` rules, every parameter they allocate is filled exactly once,
with the shape they allocate (rules and sources: ``tests/serving_engines.py``).

Negative controls show the check can fail: transformers 5's in-memory fused layout (``mlp.experts.gate_up_proj``,
what a writer that saves ``state_dict()`` produces) loads in neither engine; a tied head is missing in SGLang; a
transposed or dropped tensor, or a head_dim the engine recomputes, is caught.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from folders import tensors
from serving_engines import ENGINES, check, layers_of
from serving_engines import checkpoint_config as config
from serving_engines import checkpoint_shapes as shapes
from transformers import AutoModelForCausalLM, LlamaConfig

import moerge
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

# (format, base family, tied embeddings, routed layers of 3; None = all)
EXPORTS = {
    "mixtral-llama": ("mixtral", "llama", False, [0, 2]),
    "mixtral-llama-tied": ("mixtral", "llama", True, [1]),
    "qwen2_moe-llama": ("qwen2_moe", "llama", False, [0, 2]),
    "qwen2_moe-qwen2-tied": ("qwen2_moe", "qwen2", True, [0, 2]),
    "qwen3_moe-qwen3-tied": ("qwen3_moe", "qwen3", True, None),
    "qwen3_moe-qwen3-dense1": ("qwen3_moe", "qwen3", False, [0, 2]),
}
SGLANG_QWEN3_DENSE = "qwen3_moe-qwen3-dense1"  # SGLang's Qwen3-MoE ignores mlp_only_layers (see below)
pytestmark = pytest.mark.filterwarnings("ignore:some experts have no calibration data")


def _pool(root: Path, family: str, tie: bool) -> tuple[Path, list[Path]]:
    base = tiny.make_base(root / "base", family=family, hidden=32, layers=3, tie=tie, seed=0)
    experts = [tiny.make_full_expert(base, root / f"full{i}", seed=10 + i, scale=0.5, modules=("mlp",))
               for i in range(2)]
    return base, experts


def _export(base: Path, experts: list[Path], fmt: str, layers: list[int] | None, out: Path) -> Path:
    select = {"layers": layers} if layers is not None else {"all": True}
    raw = {"base": str(base), "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(experts)],
           "routing": {"select": select, "modules": "mlp", "router": {"level": "token"}},
           "output": {"format": fmt, "experts_per_token": 2}}
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    pools: dict[tuple[str, bool], tuple[Path, list[Path]]] = {}
    out = {}
    for key, (fmt, family, tie, layers) in EXPORTS.items():
        if (family, tie) not in pools:
            pools[(family, tie)] = _pool(root / f"{family}-{tie}", family, tie)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero gates, Qwen3-MoE dense layers: tested below
            out[key] = _export(*pools[(family, tie)], fmt, layers, root / key)
    return out


@pytest.mark.parametrize("key,engine", [(k, e) for k in EXPORTS for e in ENGINES
                                        if (k, e) != (SGLANG_QWEN3_DENSE, "sglang")])  # that one: see below
def test_every_tensor_consumed_every_parameter_filled_once(exports: dict[str, Path], key: str, engine: str) -> None:
    report = check(engine, config(exports[key]), shapes(exports[key]))
    assert report.ok, report.summary()


def test_routed_and_unrouted_layers_are_both_covered(exports: dict[str, Path]) -> None:
    """The exports above do hold what the engine check is meant to see: MoE and dense layers, lm_head."""
    mix, qwen = shapes(exports["mixtral-llama-tied"]), shapes(exports["qwen2_moe-qwen2-tied"])
    assert "model.layers.0.block_sparse_moe.experts.1.w2.weight" in mix  # unrouted Mixtral layer: still MoE
    assert "model.layers.1.mlp.gate_proj.weight" in qwen and "model.layers.0.mlp.shared_expert_gate.weight" in qwen
    assert config(exports["qwen2_moe-qwen2-tied"])["mlp_only_layers"] == [1]
    for key in ("mixtral-llama-tied", "qwen2_moe-qwen2-tied", "qwen3_moe-qwen3-tied"):  # tied bases, untied exports
        sd = tensors(exports[key])
        assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        assert config(exports[key])["tie_word_embeddings"] is False


def test_sglang_qwen3_ignores_mlp_only_layers(exports: dict[str, Path], tmp_path: Path) -> None:
    """SGLang's Qwen3-MoE builds a MoE block in every layer: the dense layer's tensors are dropped and its experts
    stay empty.  vLLM honours ``mlp_only_layers``; the export warns."""
    folder = exports[SGLANG_QWEN3_DENSE]
    cfg, names = config(folder), shapes(folder)
    assert cfg["mlp_only_layers"] == [1]
    sglang = check("sglang", cfg, names)
    assert not sglang.ok and not sglang.errors
    assert sorted(sglang.skipped) == [f"model.layers.1.mlp.{lin}.weight" for lin in ("down_proj", "gate_proj",
                                                                                       "up_proj")]
    assert layers_of(sglang.missing) == {1} and len(sglang.missing) == 1 + 3 * 2  # gate + w1/w3/w2 of 2 experts
    assert check("vllm", cfg, names).ok
    base = folder.parent / "qwen3-False" / "base"
    experts = [folder.parent / "qwen3-False" / f"full{i}" for i in range(2)]
    with pytest.warns(UserWarning, match="SGLang's Qwen3-MoE makes every layer MoE"):
        _export(base, experts, "qwen3_moe", [0, 2], tmp_path / "again")


@pytest.mark.parametrize("key", ["mixtral-llama", "qwen3_moe-qwen3-tied"])
def test_fused_transformers5_layout_loads_in_no_engine(exports: dict[str, Path], key: str) -> None:
    """Negative control: transformers 5 keeps experts fused in memory (``mlp.experts.gate_up_proj`` (E, 2I, C),
    ``mlp.experts.down_proj`` (E, C, I)) and only splits them on ``save_pretrained``; a checkpoint written from
    ``state_dict()`` in that layout maps to no expert parameter in either engine."""
    model = AutoModelForCausalLM.from_pretrained(exports[key], dtype=torch.float32)
    fused = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    cfg = config(exports[key])
    for engine in ENGINES:
        report = check(engine, cfg, fused)
        assert not report.ok
        dropped = report.errors if engine == "vllm" else report.skipped  # vLLM raises, SGLang skips silently
        assert "model.layers.0.mlp.experts.gate_up_proj" in dropped, report.summary()
        assert "model.layers.0.mlp.experts.down_proj" in dropped
        expert_regions = [m for m in report.missing if ".experts.w" in m]
        assert len(expert_regions) == 3 * 3 * 2  # w1, w3, w2 of every expert of every layer
    assert check("vllm", cfg, shapes(exports[key])).ok  # the same model as written by moerge


def test_tied_head_is_missing_in_sglang_and_doubled_in_vllm_when_also_written(exports: dict[str, Path]) -> None:
    """Why exports are untied: with ``tie_word_embeddings: true`` and no ``lm_head.weight`` SGLang's head stays
    uninitialised; writing it while tied fills vLLM's (shared) embedding twice."""
    folder = exports["qwen2_moe-qwen2-tied"]
    cfg, names = {**config(folder), "tie_word_embeddings": True}, shapes(folder)
    without = {k: v for k, v in names.items() if k != "lm_head.weight"}
    assert check("vllm", cfg, without).ok
    assert check("sglang", cfg, without).missing == ["lm_head.weight"]
    assert check("vllm", cfg, names).doubled == ["model.embed_tokens.weight"]


def test_shape_and_coverage_errors_are_caught(exports: dict[str, Path]) -> None:
    folder = exports["qwen2_moe-llama"]
    cfg, names = config(folder), shapes(folder)
    down = "model.layers.2.mlp.experts.1.down_proj.weight"
    flipped = {**names, down: names[down][::-1]}  # (C, 2I) -> (2I, C)
    dropped = {k: v for k, v in names.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    for engine in ENGINES:
        assert list(check(engine, cfg, flipped).shapes) == [down]
        assert check(engine, cfg, dropped).missing == ["model.layers.0.self_attn.qkv_proj.weight[k]"]


def test_head_dim_the_engines_recompute(tmp_path: Path) -> None:
    """A base whose head_dim is not hidden / heads: vLLM's and SGLang's Qwen2-MoE and SGLang's Mixtral allocate
    q/k/v/o from hidden / heads; the export warns, the check shows the mismatch."""
    base = tmp_path / "base"
    tok = tiny.make_tokenizer(base)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    experts = [tiny.make_full_expert(base, tmp_path / f"full{i}", seed=i, scale=0.5, modules=("mlp",))
               for i in range(2)]
    for fmt, bad in (("qwen2_moe", ENGINES), ("mixtral", ("sglang",))):
        with pytest.warns(UserWarning, match="head_dim 16"):
            out = _export(base, experts, fmt, [0], tmp_path / fmt)
        for engine in ENGINES:
            report = check(engine, config(out), shapes(out))
            assert report.ok == (engine not in bad), report.summary()
            if engine in bad:
                assert {n.rsplit(".", 2)[-2] for n in report.shapes} == {"q_proj", "k_proj", "v_proj", "o_proj"}
