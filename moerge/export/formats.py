"""Native transformers MoE formats as data: tensor names, which bases map exactly, and the config to write.

Tensor names are the ones ``save_pretrained`` of the transformers class writes (transformers 5 keeps experts
fused in memory, ``experts.gate_up_proj (E, 2I, C)``, and splits them back to per-expert tensors on save through
its conversion mapping; engines such as vLLM and llama.cpp's converter read the per-expert names):

| format | MoE MLP of layer i (prefix ``model.layers.{i}``) | router | dense (unrouted) MLP |
|---|---|---|---|
| mixtral | ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down) | ``block_sparse_moe.gate`` | none: every layer is MoE |
| qwen2_moe | ``mlp.experts.{e}.{gate,up,down}_proj`` + ``mlp.shared_expert.*`` + ``mlp.shared_expert_gate`` | ``mlp.gate`` | ``mlp.{gate,up,down}_proj`` (``mlp_only_layers``) |
| qwen3_moe | ``mlp.experts.{e}.{gate,up,down}_proj`` | ``mlp.gate`` | ``mlp.{gate,up,down}_proj`` (``mlp_only_layers``) |

A format is exact for a base when its attention and norms are the base's: Mixtral has no attention biases and
no q/k norms (llama, mistral); Qwen2-MoE always has q/k/v biases (qwen2; llama and mistral get zero biases);
Qwen3-MoE has q/k norms (qwen3 only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import NotSupportedError, RecipeError

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ATTN_BIASES = ("q_proj", "k_proj", "v_proj")
# base config keys that mean the same thing in every target config
COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "initializer_range",
               "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


@dataclass(frozen=True)
class NativeFormat:
    name: str
    architecture: str
    bases: tuple[str, ...]  # base model_types this format represents exactly
    block: str  # module of the MoE block inside a layer, as save_pretrained names it
    expert_linears: dict[str, str]  # base MLP linear -> the expert's linear name
    every_layer_moe: bool  # Mixtral: yes (unrouted layers get the merged MLP as every expert)
    shared_expert: bool  # Qwen2-MoE: the merged MLP as shared expert (see moerge.export docstring)
    zero_qkv_bias: bool  # Qwen2-MoE: q/k/v always have biases

    @property
    def residual_experts(self) -> bool:
        """Experts stored as ``MLP_e - 0.5 * MLP_shared`` (2x intermediate), so the sigmoid(0) = 0.5 gated shared
        expert plus the routed experts give exactly ``sum_k r_k MLP_k``."""
        return self.shared_expert

    def prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}"

    def expert_name(self, layer: int, e: int, lin: str) -> str:
        return f"{self.prefix(layer)}.experts.{e}.{self.expert_linears[lin]}.weight"

    def router_name(self, layer: int) -> str:
        return f"{self.prefix(layer)}.gate.weight"

    def shared_name(self, layer: int, lin: str) -> str:
        return f"{self.prefix(layer)}.shared_expert.{lin}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"{self.prefix(layer)}.shared_expert_gate.weight"

    def moe_layers(self, n_layers: int, routed: set[int]) -> list[int]:
        return list(range(n_layers)) if self.every_layer_moe else sorted(routed)


_QWEN_LINEARS = {lin: lin for lin in MLP_LINEARS}
FORMATS: dict[str, NativeFormat] = {
    "mixtral": NativeFormat("mixtral", "MixtralForCausalLM", ("llama", "mistral"), "block_sparse_moe",
                            {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, True, False, False),
    "qwen2_moe": NativeFormat("qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "mlp",
                              _QWEN_LINEARS, False, True, True),
    "qwen3_moe": NativeFormat("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "mlp", _QWEN_LINEARS, False, False,
                              False),
}


def get_format(name: str, file: str, field: str) -> NativeFormat:
    if name not in FORMATS:
        raise NotSupportedError(file, field, f"unknown export format '{name}'; one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_base(fmt: NativeFormat, base_cfg: dict[str, Any], names: set[str], file: str) -> None:
    """Raise unless ``fmt`` reproduces the base's attention and MLP exactly (names: the base's tensor names)."""
    model_type = base_cfg.get("model_type", "?")
    if model_type not in fmt.bases:
        hint = ", ".join(f for f, nf in FORMATS.items() if model_type in nf.bases) or "none"
        raise NotSupportedError(file, "output.format", f"format {fmt.name} cannot represent a '{model_type}' base "
                                                       f"exactly (it takes {', '.join(fmt.bases)}; for "
                                                       f"{model_type}: {hint})")
    biased = sorted(n for n in names if n.endswith(".bias") and (".mlp." in n or ".o_proj." in n or (
        ".self_attn." in n and not fmt.zero_qkv_bias)))
    if biased:
        raise NotSupportedError(file, biased[0], f"format {fmt.name} has no bias for this linear")
    window = base_cfg.get("sliding_window")
    if fmt.name != "mixtral" and model_type == "mistral" and window and window < base_cfg.get(
            "max_position_embeddings", 0):
        raise NotSupportedError(file, "sliding_window", f"format {fmt.name} would drop the base's sliding window "
                                                        f"({window}); use mixtral")
    if model_type == "qwen2" and base_cfg.get("use_sliding_window"):
        raise NotSupportedError(file, "use_sliding_window", f"format {fmt.name}: sliding-window qwen2 bases are not "
                                                            "supported")


def native_config(fmt: NativeFormat, base_cfg: dict[str, Any], *, n_experts: int, top_k: int, routed: set[int],
                  dtype: str) -> dict[str, Any]:
    """The ``config.json`` of the export: the base's shared keys plus the format's MoE keys."""
    cfg: dict[str, Any] = {"architectures": [fmt.architecture], "model_type": fmt.name}
    cfg.update({k: base_cfg[k] for k in COMMON_KEYS if k in base_cfg})
    cfg["dtype"] = dtype
    # always untied, lm_head written: SGLang's Mixtral / Qwen2-MoE / Qwen3-MoE never tie it (see moerge.export)
    cfg["tie_word_embeddings"] = False
    inter, n_layers = int(base_cfg["intermediate_size"]), int(base_cfg["num_hidden_layers"])
    if fmt.name == "mixtral":
        window = base_cfg.get("sliding_window") if base_cfg.get("model_type") == "mistral" else None
        cfg.update(num_local_experts=n_experts, num_experts_per_tok=top_k, sliding_window=window,
                   router_jitter_noise=0.0, output_router_logits=False)
        return cfg
    cfg.update(num_experts=n_experts, num_experts_per_tok=top_k, decoder_sparse_step=1, norm_topk_prob=True,
               mlp_only_layers=sorted(set(range(n_layers)) - routed), output_router_logits=False,
               use_sliding_window=False, sliding_window=None,
               moe_intermediate_size=2 * inter if fmt.residual_experts else inter)
    if fmt.name == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=inter, qkv_bias=True, max_window_layers=n_layers)
    else:
        cfg["attention_bias"] = bool(base_cfg.get("attention_bias", False))
    return cfg


MLP_UNIT = re.compile(r"model\.layers\.(\d+)\.mlp")


def routed_layers(paths: list[str], file: str, field: str) -> set[int]:
    """The layers of routed MLP units; any other routed unit cannot be exported (one attention per layer)."""
    layers = set()
    for p in paths:
        m = MLP_UNIT.fullmatch(p)
        if not m:
            raise RecipeError(file, field, f"routed unit {p} cannot be exported: a native MoE format keeps one "
                                           "attention per layer (the static merge); route only MLPs (modules: mlp)")
        layers.add(int(m.group(1)))
    return layers


def mlp_linear(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, "up_proj")."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name)
    return (int(m.group(1)), m.group(2)) if m else None
