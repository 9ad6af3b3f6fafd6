"""The one spelling of every file and tensor name of a moerge checkpoint (``docs/FORMAT.md``).

Everything that reads or writes a checkpoint asks this module; nothing else builds these names by hand.
"""

from __future__ import annotations

CONFIG = "config.json"
RECIPE = "moerge_recipe.yaml"
CARD = "README.md"
CONFLICT = "conflict.json"
WEIGHTS_PREFIX = "model"
SINGLE_SHARD = f"{WEIGHTS_PREFIX}.safetensors"
INDEX = f"{WEIGHTS_PREFIX}.safetensors.index.json"
ROUTER_PREFIX = "moerge_router"
ROUTER_SHARD = f"{ROUTER_PREFIX}.safetensors"
REPORT = "calibration.json"
CONFUSION = "calibration_confusion.png"
ROUTER_KEYS = ("prototypes", "center", "scale", "bias")
# files of a base folder that a built checkpoint never copies (weights are rewritten, the rest is moerge's own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_COPIED = {INDEX, "pytorch_model.bin.index.json", CARD, CONFIG, CONFLICT, "configuration_moerge.py",
              "modeling_moerge.py"}


def linear_path(unit: str, linear: str) -> str:
    """``model.layers.0.mlp`` + ``up_proj`` -> ``model.layers.0.mlp.up_proj``.  A unit that is itself one linear (the
    output head ``lm_head``, ``routing.head``) names that linear ``""``: ``lm_head`` + ``""`` -> ``lm_head``."""
    return f"{unit}.{linear}" if linear else unit


def expert_tensor(linear: str, e: int, key: str) -> str:
    """``model.layers.0.mlp.up_proj`` + 1 + ``U`` -> ``model.layers.0.mlp.up_proj.experts.1.U``."""
    return f"{linear}.experts.{e}.{key}"


def router_prefix(level: str, unit: str | None = None) -> str:
    """The sequence router's prefix, or the token router of ``unit``."""
    return ROUTER_PREFIX if level == "sequence" else f"{unit}.{ROUTER_PREFIX}"


def router_tensor(prefix: str, key: str) -> str:
    return f"{prefix}.{key}"


def expert_shard(name: str) -> str:
    """The shard that ``moerge add-expert`` writes for expert ``name``."""
    return f"moerge_expert_{name}.safetensors"


def is_moerge_only(name: str) -> bool:
    """Expert and router tensors (everything else has the base's name and shape)."""
    return ".experts." in name or f".{ROUTER_PREFIX}." in name or name.startswith(f"{ROUTER_PREFIX}.")


def is_router(name: str) -> bool:
    return f".{ROUTER_PREFIX}." in name or name.startswith(f"{ROUTER_PREFIX}.")


def is_side_file(name: str) -> bool:
    """Tokenizer, generation config and similar small files of a base that a built checkpoint copies."""
    return name not in NOT_COPIED and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith(".")
