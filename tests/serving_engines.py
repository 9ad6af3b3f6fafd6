"""What vLLM and SGLang do with the tensors of a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint, kept as data, and a
replay of their ``load_weights`` loops that says which tensor lands in which engine parameter (test helper).

Read (stored copies of the public repositories, Apache-2.0; facts taken, no code copied):

vLLM (vllm-project/vllm)
  - vllm/model_executor/models/mixtral.py    @ f0e26957c6af4d1ce3d0642120b011949da65885
  - vllm/model_executor/models/qwen2_moe.py  @ 8bbabf03350e7821e2ffc6a5b3d9931e5f6df4c0
  - vllm/model_executor/models/qwen3_moe.py  @ 2e0831b0ab951c8896d4dd5d6cb9c3350a4574de
  - vllm/model_executor/layers/fused_moe/layer.py @ c439a139790cafaecb54e8dea123b78049f1442b
    (``UnquantizedFusedMoEMethod.create_weights``: ``w13_weight`` (E, 2I, C), ``w2_weight`` (E, C, I);
    ``make_expert_params_mapping``: ``experts.{e}.{name}.`` -> ``experts.w13_`` / ``experts.w2_``, shard w1/w2/w3)
  - vllm/model_executor/models/utils.py ``AutoWeightsLoader`` (skips ``rotary_emb.inv_freq`` & co., raises on
    a name no module owns); the default loader raises when a parameter was never loaded.
SGLang (sgl-project/sglang)
  - python/sglang/srt/models/mixtral.py    @ 7f1f5bc113cea04dc96cdec553455d73879df04d
  - python/sglang/srt/models/qwen2_moe.py  @ d1a8de4b947a8d20b3413922c0a802876d5f913e
  - python/sglang/srt/models/qwen3_moe.py  @ e3d8e9aec2c7f120ad4d4c6e7ee08cc19346fdbd
    (same ``make_expert_params_mapping`` names; unknown names are skipped with at most a warning, and a
    parameter nobody loads stays uninitialised).

What differs between them, and matters for an export:

| | vLLM | SGLang |
|---|---|---|
| tied embeddings | ``lm_head.weight = embed_tokens.weight`` (all three) | never tied: ``lm_head`` must be in the checkpoint |
| Qwen3-MoE ``mlp_only_layers`` | honoured | ignored: every layer is a MoE block ("all layers are sparse") |
| head_dim | Mixtral, Qwen3-MoE: ``config.head_dim``; Qwen2-MoE: hidden / heads | Qwen3-MoE: config; Mixtral, Qwen2-MoE: hidden / heads |
| attention biases | Qwen2-MoE q/k/v always; Qwen3-MoE q/k/v if ``attention_bias`` | Qwen2-MoE q/k/v if ``qkv_bias``; Qwen3-MoE q/k/v and o if ``attention_bias`` |
| unknown tensor name | error | skipped |

A checkpoint passes for an engine when every tensor is consumed (none unknown, none dropped), every region of
every parameter the engine allocates is filled exactly once, and each tensor has the region's shape.  Shapes
are the logical ones at tensor-parallel size 1 (vocabulary padding is the loader's business).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

QKV = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
GATE_UP = (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))
ROTARY_SKIPS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class Rule:
    """One engine's model class for one architecture: its ``load_weights`` loop and what it allocates."""

    engine: str
    arch: str
    source: str  # file @ commit read
    stacked: tuple[tuple[str, str, Any], ...]  # stacked_params_mapping: (param, checkpoint substring, shard)
    expert_names: tuple[str, str, str]  # make_expert_params_mapping(gate=, down=, up=)
    block: str  # MoE block attribute of a decoder layer
    skips: tuple[str, ...] = ROTARY_SKIPS  # substrings dropped before anything else
    stacked_skips_experts: bool = False  # `if "mlp.experts" in name: continue` in the stacked loop
    stacked_skips_missing: bool = False  # `if name not in params_dict: continue` in the stacked loop
    unknown: str = "raise"  # a name that reaches the default branch and is no parameter: "raise" | "skip"
    expert_missing: str = "raise"  # an expert name whose fused parameter does not exist: "raise" | "skip"
    ties_lm_head: bool = True  # lm_head.weight is embed_tokens.weight when tie_word_embeddings
    honours_mlp_only_layers: bool = True
    head_dim_from_config: bool = True
    shared_expert: bool = False  # Qwen2-MoE: shared_expert + shared_expert_gate
    qkv_bias: str = "never"  # "never" | "always" | a config key
    o_bias: str = "never"
    qk_norm: bool = False


def _rules() -> dict[tuple[str, str], Rule]:
    v, s = "vllm", "sglang"
    vm, sm = "vllm/model_executor/models/", "python/sglang/srt/models/"
    mix = {"stacked": QKV, "expert_names": ("w1", "w2", "w3"), "block": "block_sparse_moe"}
    qwen = {"stacked": QKV + GATE_UP, "expert_names": ("gate_proj", "down_proj", "up_proj"), "block": "mlp",
            "stacked_skips_experts": True, "stacked_skips_missing": True}
    rules = [
        Rule(v, "mixtral", vm + "mixtral.py @ f0e26957", **mix),
        Rule(s, "mixtral", sm + "mixtral.py @ 7f1f5bc1", unknown="skip", ties_lm_head=False,
             head_dim_from_config=False, **mix),
        Rule(v, "qwen2_moe", vm + "qwen2_moe.py @ 8bbabf03", head_dim_from_config=False, shared_expert=True,
             qkv_bias="always", **qwen),
        Rule(s, "qwen2_moe", sm + "qwen2_moe.py @ d1a8de4b", unknown="skip", ties_lm_head=False,
             head_dim_from_config=False, shared_expert=True, qkv_bias="qkv_bias", **qwen),
        Rule(v, "qwen3_moe", vm + "qwen3_moe.py @ 2e0831b0", qkv_bias="attention_bias", qk_norm=True, **qwen),
        Rule(s, "qwen3_moe", sm + "qwen3_moe.py @ e3d8e9ae", unknown="skip", expert_missing="skip",
             ties_lm_head=False, honours_mlp_only_layers=False, qkv_bias="attention_bias", o_bias="attention_bias",
             qk_norm=True, **qwen),
    ]
    return {(r.engine, r.arch): r for r in rules}


RULES = _rules()
ENGINES = ("vllm", "sglang")


# ----------------------------------------------------------------------------------------------------------------
# what an engine allocates for a config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Param:
    """An engine parameter and its regions: shard key -> (expert index | None, row offset, region shape)."""

    shape: tuple[int, ...]
    regions: dict[Any, tuple[int | None, int, tuple[int, ...]]]


def _whole(*shape: int) -> Param:
    return Param(tuple(shape), {None: (None, 0, tuple(shape))})


def _stacked(sizes: dict[Any, int], *rest: int) -> Param:
    """Rows concatenated by shard (fused qkv (q; k; v), gate_up (gate; up)): shard -> its row block."""
    regions, start = {}, 0
    for key, n in sizes.items():
        regions[key] = (None, start, (n, *rest))
        start += n
    return Param((start, *rest), regions)


def _experts(n: int, inter: int, hidden: int) -> dict[str, Param]:
    """FusedMoE: w13 (E, 2I, C) with w1 = rows [0, I), w3 = rows [I, 2I) of each expert; w2 (E, C, I)."""
    w13 = Param((n, 2 * inter, hidden), {})
    w2 = Param((n, hidden, inter), {})
    for e in range(n):
        w13.regions[(e, "w1")] = (e, 0, (inter, hidden))
        w13.regions[(e, "w3")] = (e, inter, (inter, hidden))
        w2.regions[(e, "w2")] = (e, 0, (hidden, inter))
    return {"experts.w13_weight": w13, "experts.w2_weight": w2}


def _flag(rule_value: str, cfg: dict[str, Any]) -> bool:
    if rule_value in ("never", "always"):
        return rule_value == "always"
    return bool(cfg.get(rule_value, False))


def _attention(rule: Rule, cfg: dict[str, Any]) -> dict[str, Param]:
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = (cfg.get("head_dim") or hidden // heads) if rule.head_dim_from_config else hidden // heads
    sizes = {"q": heads * d, "k": kv * d, "v": kv * d}
    out = {"qkv_proj.weight": _stacked(sizes, hidden), "o_proj.weight": _whole(hidden, heads * d)}
    if _flag(rule.qkv_bias, cfg):
        out["qkv_proj.bias"] = _stacked(sizes)
    if _flag(rule.o_bias, cfg):
        out["o_proj.bias"] = _whole(hidden)
    if rule.qk_norm:
        out.update({"q_norm.weight": _whole(d), "k_norm.weight": _whole(d)})
    return out


def _dense_mlp(inter: int, hidden: int) -> dict[str, Param]:
    return {"gate_up_proj.weight": _stacked({0: inter, 1: inter}, hidden), "down_proj.weight": _whole(hidden, inter)}


def is_moe_layer(rule: Rule, cfg: dict[str, Any], i: int) -> bool:
    if rule.arch == "mixtral" or not rule.honours_mlp_only_layers:
        return True
    step = int(cfg.get("decoder_sparse_step", 1))
    return i not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0 and (i + 1) % step == 0


def _mlp(rule: Rule, cfg: dict[str, Any], i: int) -> dict[str, Param]:
    hidden = cfg["hidden_size"]
    if not is_moe_layer(rule, cfg, i):
        return {f"mlp.{k}": p for k, p in _dense_mlp(cfg["intermediate_size"], hidden).items()}
    n = cfg["num_local_experts"] if rule.arch == "mixtral" else cfg["num_experts"]
    inter = cfg["intermediate_size"] if rule.arch == "mixtral" else cfg["moe_intermediate_size"]
    out = {"gate.weight": _whole(n, hidden), **_experts(n, inter, hidden)}
    if rule.shared_expert:
        out["shared_expert_gate.weight"] = _whole(1, hidden)
        if cfg.get("shared_expert_intermediate_size", 0) > 0:
            shared = _dense_mlp(cfg["shared_expert_intermediate_size"], hidden)
            out.update({f"shared_expert.{k}": p for k, p in shared.items()})
    return {f"{rule.block}.{k}": p for k, p in out.items()}


def allocate(rule: Rule, cfg: dict[str, Any]) -> tuple[dict[str, Param], dict[str, str]]:
    """(parameters by full name, aliases: a name that is another parameter's tensor) for ``cfg``."""
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    params = {"model.embed_tokens.weight": _whole(vocab, hidden), "model.norm.weight": _whole(hidden)}
    for i in range(cfg["num_hidden_layers"]):
        layer = {"input_layernorm.weight": _whole(hidden), "post_attention_layernorm.weight": _whole(hidden)}
        layer.update({f"self_attn.{k}": p for k, p in _attention(rule, cfg).items()})
        layer.update(_mlp(rule, cfg, i))
        params.update({f"model.layers.{i}.{k}": p for k, p in layer.items()})
    aliases = {}
    if rule.ties_lm_head and cfg.get("tie_word_embeddings", False):
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    else:
        params["lm_head.weight"] = _whole(vocab, hidden)
    return params, aliases


def config_errors(rule: Rule, cfg: dict[str, Any]) -> list[str]:
    """Config values the engine's model class refuses or silently replaces."""
    act = cfg.get("hidden_act", "silu")
    return [] if act == "silu" else [f"hidden_act {act!r}: {rule.engine} {rule.arch} computes silu experts"]


# ----------------------------------------------------------------------------------------------------------------
# where a checkpoint tensor goes: a replay of the engine's load_weights loop (names are rewritten in place,
# substring tests included, as the engines do)
# ----------------------------------------------------------------------------------------------------------------
def expert_mapping(rule: Rule, n_experts: int) -> list[tuple[str, str, int, str]]:
    """(param prefix, checkpoint substring, expert, shard) in make_expert_params_mapping's order."""
    gate, down, up = rule.expert_names
    out = []
    for e in range(n_experts):
        for shard, name in (("w1", gate), ("w2", down), ("w3", up)):
            prefix = "experts.w2_" if name == down else "experts.w13_"
            out.append((prefix, f"experts.{e}.{name}.", e, shard))
    return out


def route(rule: Rule, name: str, params: set[str], n_experts: int) -> tuple[str, str, Any]:
    """("load", param, shard) | ("skip", why, None) | ("error", why, None) for one checkpoint tensor.

    As in the engines, a ``continue`` inside the stacked loop moves on to the next mapping with the name already
    rewritten, and only the default branch (or, in SGLang Qwen3-MoE, an expert name) drops a tensor."""
    if any(s in name for s in rule.skips):
        return "skip", "rotary buffer", None
    for param, sub, shard in rule.stacked:
        if sub not in name or (rule.stacked_skips_experts and "mlp.experts" in name):
            continue
        name = name.replace(sub, param)
        if name in params:
            return "load", name, shard
        if not (name.endswith(".bias") or rule.stacked_skips_missing):
            return "error", f"no parameter {name}", None
    for prefix, sub, e, shard in expert_mapping(rule, n_experts):
        if sub in name:
            mapped = name.replace(sub, prefix)
            if mapped in params:
                return "load", mapped, (e, shard)
            return ("skip" if rule.expert_missing == "skip" else "error"), f"no parameter {mapped}", None
    if name.endswith(".bias") and name not in params:
        return "skip", f"extra bias {name}", None
    if name in params:
        return "load", name, None
    return ("skip" if rule.unknown == "skip" else "error"), f"no parameter {name}", None


@dataclass
class LoadReport:
    """What one engine would do with one checkpoint."""

    engine: str
    arch: str
    errors: dict[str, str] = field(default_factory=dict)  # tensor -> why the engine fails on it
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why the engine drops it
    shapes: dict[str, str] = field(default_factory=dict)  # tensor -> shape mismatch
    missing: list[str] = field(default_factory=list)  # "param[shard]" never filled
    doubled: list[str] = field(default_factory=list)  # "param[shard]" filled more than once
    config: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.errors or self.skipped or self.shapes or self.missing or self.doubled or self.config)

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in vars(self).items() if v and k not in ("engine", "arch")]
        return f"{self.engine}/{self.arch}: " + ("ok" if self.ok else "; ".join(parts))


def n_experts_of(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)


def check(engine: str, cfg: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> LoadReport:
    """Replay ``engine``'s loader for ``cfg['model_type']`` on a checkpoint given as {name: shape}."""
    rule = RULES[(engine, cfg["model_type"])]
    params, aliases = allocate(rule, cfg)
    report = LoadReport(engine, rule.arch, config=config_errors(rule, cfg))
    fills: Counter = Counter()
    names = set(params) | set(aliases)
    for name, shape in tensors.items():
        kind, target, shard = route(rule, name, names, n_experts_of(cfg))
        if kind != "load":
            (report.skipped if kind == "skip" else report.errors)[name] = target
            continue
        param = params[aliases.get(target, target)]
        if shard not in param.regions:
            report.errors[name] = f"{target} has no shard {shard!r}"
            continue
        want = param.regions[shard][2]
        if tuple(shape) != want:
            report.shapes[name] = f"{tuple(shape)} into {target}[{shard}] of shape {want}"
        fills[(aliases.get(target, target), shard)] += 1
    for pname, param in params.items():
        for key in param.regions:
            label = pname if key is None else f"{pname}[{key}]"
            if fills[(pname, key)] == 0:
                report.missing.append(label)
            elif fills[(pname, key)] > 1:
                report.doubled.append(label)
    return report


LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layers_of(labels: list[str] | dict[str, str]) -> set[int]:
    """Layer indices named in a report's labels (``model.layers.{i}.``)."""
    return {int(m.group(1)) for lab in labels if (m := LAYER.match(lab))}


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of every safetensors file in ``folder`` (headers only)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})  # noqa: SIM118
    return out


def checkpoint_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())
