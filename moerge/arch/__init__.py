"""Architecture families as data: where the layers, attention and MLP linears, norms and embeddings live.

Every tensor name moerge needs is spelled here, native MoE targets included (:mod:`.native`).

Every supported family (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text) uses the same Hugging Face
naming for what moerge touches; they differ in biases (qwen2 q/k/v), extra norms (qwen3 q/k norms, gemma2/3
pre/post feed-forward norms) and tied embeddings, which the code reads from the checkpoint itself.  A new
family with the same layout is one line in ``FAMILIES``.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    layer_prefix: str = "model.layers"
    groups: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=lambda: {
        "attention": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    })
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    # the RMSNorm in front of each group and the linears it feeds (a norm's scale can be folded into them)
    input_norms: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=lambda: {
        "attention": ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
        "mlp": ("post_attention_layernorm", ("gate_proj", "up_proj")),
    })
    final_norm: str = "model.norm.weight"  # the norm in front of the output head
    norm_offset: float = 0.0  # the norm multiplies by offset + weight (gemma: 1 + weight)
    mlp_norm: str = "post_attention_layernorm"

    @property
    def head_path(self) -> str:
        """The output head's module path (``lm_head``)."""
        return self.lm_head.removesuffix(".weight")

    def holder(self, name: str, stored: Container[str]) -> str:
        """The tensor of ``stored`` (a checkpoint's names) that holds ``name``: the input embedding for the output
        head of a model with tied embeddings (no ``lm_head.weight`` stored), else ``name`` itself."""
        if name == self.lm_head and name not in stored and self.embed in stored:
            return self.embed
        return name

    def input_norm(self, layer: int, group: str, linear: str) -> str | None:
        """The norm weight whose output is ``linear``'s input (None: its input is not a norm's output); the output
        head (group ``head``) reads the final norm."""
        if group == "head":
            return self.final_norm
        norm, fed = self.input_norms.get(group, ("", ()))
        return f"{self.layer_path(layer)}.{norm}.weight" if linear in fed else None

    def unit_path(self, layer: int, group: str) -> str:
        return f"{self.layer_path(layer)}.{self.groups[group][0]}"

    def linears(self, group: str) -> tuple[str, ...]:
        return self.groups[group][1]

    def layer_path(self, layer: int) -> str:
        return f"{self.layer_prefix}.{layer}"

    def layer_of(self, name: str) -> int | None:
        """``model.layers.3.mlp.up_proj.weight`` -> 3; None for a tensor outside the decoder layers."""
        m = re.match(rf"{re.escape(self.layer_prefix)}\.(\d+)\.", name + ".")
        return int(m.group(1)) if m else None

    def mlp_weight(self, layer: int, linear: str) -> str:
        """``(3, "up_proj")`` -> ``model.layers.3.mlp.up_proj.weight``."""
        return f"{self.unit_path(layer, 'mlp')}.{linear}.weight"

    def parse_mlp_weight(self, name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "up_proj")``; None for anything else."""
        layer = self.layer_of(name)
        if layer is None:
            return None
        lin = name.removeprefix(f"{self.unit_path(layer, 'mlp')}.").removesuffix(".weight")
        return (layer, lin) if lin in self.linears("mlp") and name == self.mlp_weight(layer, lin) else None

    def post_attention_norm(self, layer: int) -> str:
        """The norm whose output is the MLP's input (what a native router reads)."""
        return f"{self.layer_path(layer)}.{self.mlp_norm}.weight"


_GEMMA2_NORMS = {"attention": ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                 "mlp": ("pre_feedforward_layernorm", ("gate_proj", "up_proj"))}
FAMILIES: dict[str, Family] = {
    **{n: Family(n) for n in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma": Family("gemma", norm_offset=1.0),
    **{n: Family(n, input_norms=_GEMMA2_NORMS, norm_offset=1.0) for n in ("gemma2", "gemma3_text")},
}

# config keys that must agree between the base and a full expert checkpoint
COMPAT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
               "num_attention_heads", "num_key_value_heads")


def family_for(config: dict[str, Any], file: str) -> Family:
    model_type = config.get("model_type", "")
    if model_type not in FAMILIES:
        raise CheckpointError(file, "model_type", f"unsupported architecture '{model_type}'; supported: "
                                                  f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def check_compatible(base: dict[str, Any], other: dict[str, Any], other_file: str) -> None:
    """Raise naming the first config key where ``other`` disagrees with the base."""
    for key in COMPAT_KEYS:
        if key in base and base.get(key) != other.get(key):
            raise CheckpointError(other_file, key, f"does not match the base ({other.get(key)!r} vs {base.get(key)!r})")
    if base.get("architectures") and other.get("architectures") and base["architectures"] != other["architectures"]:
        raise CheckpointError(other_file, "architectures",
                              f"does not match the base ({other['architectures']} vs {base['architectures']})")
