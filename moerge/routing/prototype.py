"""Training-free router initialisation from calibration prompts (prototype routing).

Each expert's prototype is the mean pooled feature of its calibration prompts at the router's input,
after subtracting ``center`` (the mean over experts' prototypes), so that scores
``scale * cos(x - center, prototype_e) + bias_e`` compare what distinguishes the tasks rather than what all
prompts share.  Token-level routers get one prototype per unit, measured with the route forced to the
expert (the path its prompts take when routing is right).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..recipe import Recipe
from .data import load_texts
from .features import pooled_inputs

ROUTER_FILE = "moerge_router.safetensors"


def load_moe(folder: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import register

    register()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def router_prefixes(config: dict) -> dict[str, str]:
    """Router tensor prefix -> the unit whose input feeds it."""
    m = config["moerge"]
    if m["level"] == "sequence":
        return {"moerge_router": m["router_input"]}
    return {f"{u}.moerge_router": u for u in m["units"]}


def expert_features(model: Any, tok: Any, texts: list[str], e: int, config: dict) -> dict[str, torch.Tensor]:
    """Per router prefix: (N, C) features of one expert's prompts, routed to that expert."""
    prefixes = router_prefixes(config)
    model.force_route(config["moerge"]["experts"][e])
    try:
        feats = pooled_inputs(model, tok, texts, list(dict.fromkeys(prefixes.values())))
    finally:
        model.force_route(None)
    return {prefix: feats[unit] for prefix, unit in prefixes.items()}


def prototypes_from_features(per_expert: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(N_e, C)] -> prototypes (E, C) centred, and the center (C,)."""
    means = torch.stack([f.mean(0) for f in per_expert])  # (E, C)
    center = means.mean(0)  # (C,)
    return means - center, center


def write_router_tensors(folder: Path, updates: dict[str, torch.Tensor], *, dest: Path | None = None,
                         resize: bool = False) -> None:
    """Replace router tensors in the router shard (atomic file replace), keeping dtypes.

    ``dest``: write the new shard there instead (the caller swaps it in); ``resize``: the new values may
    change shape (a grown router)."""
    path = folder / ROUTER_FILE
    tensors = load_file(path)
    for name, value in updates.items():
        shape = value.shape if resize else tensors[name].shape
        tensors[name] = value.to(tensors[name].dtype).reshape(shape).contiguous()
    tmp = dest if dest is not None else path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    if dest is None:
        os.replace(tmp, path)


def set_initialized(folder: Path, value: bool = True) -> None:
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    config["moerge"]["initialized"] = value
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")


def init_prototypes(folder: Path, recipe: Recipe, *, progress: bool = True) -> bool:
    """Compute and store prototypes from the recipe's calibration blocks; False (uniform route) if any
    expert lacks calibration data."""
    missing = [e.name for e in recipe.experts if e.calibration is None]
    if missing:
        warnings.warn(f"experts {', '.join(missing)} have no calibration data: the router stays uniform",
                      stacklevel=2)
        return False
    config = json.loads((folder / "config.json").read_text())
    model, tok = load_moe(folder)
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in router_prefixes(config)}
    for e, spec in enumerate(recipe.experts):
        texts = load_texts(spec.calibration, tok, file=f"experts[{e}].calibration")  # type: ignore[arg-type]
        for prefix, f in expert_features(model, tok, texts, e, config).items():
            feats[prefix].append(f)
    updates = {}
    for prefix, per_expert in feats.items():
        protos, center = prototypes_from_features(per_expert)
        updates[f"{prefix}.prototypes"], updates[f"{prefix}.center"] = protos, center
    write_router_tensors(folder, updates)
    set_initialized(folder)
    return True
