"""The moerge model classes (``model_type: "moerge"``) and helpers to ship them with a checkpoint.

``configuration_moerge.py`` and ``modeling_moerge.py`` import only torch, transformers and the standard library:
:func:`write_remote_code` copies them next to a built checkpoint, whose ``config.json`` carries
:func:`auto_map`, so the checkpoint loads with ``trust_remote_code=True`` where moerge is not installed.
:func:`register` (called by ``import moerge``) makes ``AutoModelForCausalLM.from_pretrained(dir)`` work
without remote code.
"""

from __future__ import annotations

import os

from .configuration_moerge import AUTO_MAP, MoergeConfig
from .modeling_moerge import (
    DELTAS,
    KIND_IMPLS,
    REMOTE_CODE_FILES,
    ExpertKind,
    MoergeForCausalLM,
    MoergeRouter,
    RoutedLinear,
    copy_remote_code,
    expert_kind,
    unpack_bits,
)

__all__ = [
    "DELTAS",
    "KIND_IMPLS",
    "REMOTE_CODE_FILES",
    "ExpertKind",
    "MoergeConfig",
    "MoergeForCausalLM",
    "MoergeRouter",
    "RoutedLinear",
    "auto_map",
    "expert_kind",
    "register",
    "unpack_bits",
    "write_remote_code",
]


def register() -> None:
    """Register ``moerge`` with AutoConfig / AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("moerge", MoergeConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoergeConfig, MoergeForCausalLM, exist_ok=True)


def auto_map() -> dict[str, str]:
    """The ``auto_map`` entry of a moerge ``config.json``."""
    return dict(AUTO_MAP)


def write_remote_code(out_dir: str | os.PathLike) -> list[str]:
    """Copy the two remote-code files into ``out_dir``; returns the written paths."""
    return copy_remote_code(out_dir)
