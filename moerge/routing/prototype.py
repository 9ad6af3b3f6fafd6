"""Training-free router initialisation from calibration prompts (prototype routing).

Each expert's prototype is the mean pooled feature of its calibration prompts at the router's input, after
subtracting ``center`` (the mean over experts' prototypes), so that scores
``scale * cos(x - center, prototype_e) + bias_e`` compare what distinguishes the tasks rather than what all
prompts share.

Computed from the build's weight shards before any router or config is written:

* sequence level: the router reads the input of the first routed unit, which only the static (unrouted)
  layers before it shape; those layers are the base architecture's, so a base model truncated after the
  router's layer, loaded from the shards, gives the features (memory: those layers only);
* token level: every unit's router reads its own input with the route forced to the expert (the path its
  prompts take when routing is right), so the whole moerge model is loaded from the shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..arch import family_for
from ..checkpoint.manifest import Manifest
from ..checkpoint.routers import RouterTensors
from ..modeling import MoergeConfig, MoergeForCausalLM
from ..recipe import CalibrationData
from .data import load_texts
from .features import pooled_inputs


def read_state(files: Iterable[Path], keep: set[str] | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Tensors of the safetensors ``files`` (only ``keep`` when given), as ``dtype`` when floating."""
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if keep is None or key in keep:
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def truncated_base(base_config: dict[str, Any], files: list[Path], last_layer: int) -> Any:
    """The base architecture with layers ``0..last_layer`` only, its weights read from ``files`` (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in base_config.items() if k not in ("model_type", "transformers_version")}
    n_layers = int(fields["num_hidden_layers"])
    for key, value in fields.items():  # per-layer lists (layer_types, ...) keep their first layers
        if isinstance(value, list) and len(value) == n_layers:
            fields[key] = value[: last_layer + 1]
    fields["num_hidden_layers"] = last_layer + 1
    config = AutoConfig.for_model(base_config["model_type"], **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = set(model.state_dict())
    state = read_state(files, wanted)
    head = family_for(base_config, "config.json").lm_head
    missing = {k for k in wanted - set(state) if k != head}
    if missing:
        raise RuntimeError(f"internal: the build's shards lack {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def moerge_model(config: dict[str, Any], files: list[Path]) -> Any:
    """The whole moerge model of ``config`` (a config.json dict), its weights read from ``files`` (float32)."""

    cfg = MoergeConfig(**{k: v for k, v in config.items() if k not in ("model_type", "auto_map")})
    return MoergeForCausalLM.from_pretrained(None, config=cfg, state_dict=read_state(files),
                                             dtype=torch.float32).eval()


def feature_model(config: dict[str, Any], manifest: Manifest, files: list[Path]) -> Any:
    """What the routers' features are read from (see the module docstring)."""
    if manifest.level == "sequence":
        layer = family_for(config["base_config"], "config.json").layer_of(manifest.router_input or "")
        if layer is not None:
            return truncated_base(config["base_config"], files, layer)
    return moerge_model(config, files)


def expert_features(model: Any, tok: Any, texts: list[str], name: str, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per router prefix: (N, C) features of one expert's prompts, routed to that expert (when routable)."""
    forced = hasattr(model, "force_route")
    if forced:
        model.force_route(name)
    try:
        feats = pooled_inputs(model, tok, texts, list(dict.fromkeys(prefixes.values())))
    finally:
        if forced:
            model.force_route(None)
    return {prefix: feats[unit] for prefix, unit in prefixes.items()}


def prototypes_from_features(per_expert: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(N_e, C)] -> prototypes (E, C) centred, and the center (C,)."""
    means = torch.stack([f.mean(0) for f in per_expert])  # (E, C)
    center = means.mean(0)  # (C,)
    return means - center, center


def prototype_routers(model: Any, tok: Any, manifest: Manifest, calibration: list[CalibrationData],
                      scale: float) -> dict[str, RouterTensors]:
    """One router per prefix: centred prototypes of each expert's calibration prompts, bias 0."""
    prefixes = manifest.router_prefixes()
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in prefixes}
    for e, (name, source) in enumerate(zip(manifest.experts, calibration)):
        texts = load_texts(source, tok, file=f"experts[{e}].calibration")
        for prefix, f in expert_features(model, tok, texts, name, prefixes).items():
            feats[prefix].append(f)
    out = {}
    for prefix, per_expert in feats.items():
        protos, center = prototypes_from_features(per_expert)
        out[prefix] = RouterTensors(protos, center, torch.tensor(float(scale)), torch.zeros(len(manifest.experts)))
    return out
