"""Native transformers MoE architectures (Mixtral, Qwen2-MoE, Qwen3-MoE) as data: their tensor names.

The names are the ones ``save_pretrained`` of the transformers class writes (transformers 5 keeps experts fused
in memory, ``experts.gate_up_proj (E, 2I, C)``, and splits them back to per-expert tensors on save through its
conversion mapping; vLLM, SGLang and llama.cpp's converter read the per-expert names):

| format | MoE MLP of layer i (prefix ``model.layers.{i}``) | router | dense (unrouted) MLP |
|---|---|---|---|
| mixtral | ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down) | ``block_sparse_moe.gate`` | none: every layer is MoE |
| qwen2_moe | ``mlp.experts.{e}.{gate,up,down}_proj`` + ``mlp.shared_expert.*`` + ``mlp.shared_expert_gate`` | ``mlp.gate`` | ``mlp.{gate,up,down}_proj`` (``mlp_only_layers``) |
| qwen3_moe | ``mlp.experts.{e}.{gate,up,down}_proj`` | ``mlp.gate`` | ``mlp.{gate,up,down}_proj`` (``mlp_only_layers``) |

What an export writes besides names (configs, which bases map exactly) is :mod:`moerge.export.formats`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RecipeError
from . import FAMILIES

LAYERS = FAMILIES["llama"].layer_prefix  # every native target keeps the llama layout outside its MoE block

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
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
        return f"{LAYERS}.{layer}.{self.block}"

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


MLP_UNIT = re.compile(rf"{re.escape(LAYERS)}\.(\d+)\.mlp")


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
    return FAMILIES["llama"].parse_mlp_weight(name)
