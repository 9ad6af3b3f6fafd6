"""Native transformers MoE formats: which bases each maps exactly, and the config to write (tensor names:
:mod:`moerge.arch.native`).

A format is exact for a base when its attention and norms are the base's: Mixtral has no attention biases and
no q/k norms (llama, mistral); Qwen2-MoE always has q/k/v biases (qwen2; llama and mistral get zero biases);
Qwen3-MoE has q/k norms (qwen3 only).
"""

from __future__ import annotations

from typing import Any

from ..arch.native import FORMATS, MLP_LINEARS, MLP_UNIT, NativeFormat, mlp_linear, routed_layers
from ..errors import NotSupportedError

__all__ = ["FORMATS", "MLP_LINEARS", "MLP_UNIT", "NativeFormat", "check_base", "get_format", "mlp_linear",
           "native_config", "routed_layers"]

ATTN_BIASES = ("q_proj", "k_proj", "v_proj")
# base config keys that mean the same thing in every target config
COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "initializer_range",
               "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


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

