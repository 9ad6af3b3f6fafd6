"""One way to open a built checkpoint: :class:`Checkpoint` (config, manifest, index, recipe, routers, model).

Read by calibrate, add-expert, remove-expert, export, inspect and serve.  Models are always loaded with the
installed moerge classes and ``trust_remote_code=False``: moerge never runs code from a checkpoint folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..dtypes import float_dtype_of
from ..errors import CheckpointError
from ..io.files import read_json, read_text
from ..io.index import CheckpointIndex, read_safetensors_header
from ..io.loader import TensorLoader
from ..modeling import register
from ..recipe import Recipe
from . import names
from .manifest import Manifest
from .routers import RouterTensors, read_routers


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder (one-line errors for a missing, unreadable or malformed file)."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(folder, None, "not a model folder")
    return read_json(folder / names.CONFIG)


@dataclass
class Checkpoint:
    """A model folder written by moerge (a moerge MoE, or a plain merged model when ``manifest`` is None)."""

    folder: Path
    config: dict[str, Any]
    manifest: Manifest | None

    @classmethod
    def open(cls, folder: str | Path, *, routed: bool = False) -> Checkpoint:
        """Read config.json (and its manifest); ``routed``: require a routed moerge checkpoint with routers."""
        folder = Path(folder)
        config = read_config(folder)
        manifest = None
        if config.get("model_type") == "moerge" and "moerge" in config:
            manifest = Manifest.from_dict(config["moerge"], str(folder / names.CONFIG))
            if not isinstance(config.get("base_config"), dict):
                raise CheckpointError(folder / names.CONFIG, "base_config", "malformed moerge checkpoint (base_config "
                                                                            "is not an object)")
        ckpt = cls(folder, config, manifest)
        if routed:
            ckpt.require_routed()
        return ckpt

    def config_with(self, manifest: Manifest) -> dict[str, Any]:
        """config.json's content with ``manifest`` in place of the stored one."""
        return {**self.config, "moerge": manifest.to_dict()}

    def require_routed(self) -> Manifest:
        if self.manifest is None or not self.manifest.routed:
            raise CheckpointError(self.folder / names.CONFIG, "moerge.units",
                                  "not a routed moerge checkpoint (nothing to calibrate)")
        if not (self.folder / names.ROUTER_SHARD).is_file():
            raise CheckpointError(self.folder / names.ROUTER_SHARD, None, "router shard missing")
        read_safetensors_header(self.folder / names.ROUTER_SHARD)  # a corrupt router fails before any model loads
        return self.manifest

    # ---- what it holds
    @property
    def base_config(self) -> dict[str, Any]:
        """The base model's config (a moerge checkpoint's ``base_config``, else the config itself)."""
        return dict(self.config["base_config"]) if self.manifest is not None else dict(self.config)

    @property
    def hidden(self) -> int:
        return int(self.base_config["hidden_size"])

    def index(self) -> CheckpointIndex:
        return CheckpointIndex.from_folder(self.folder)

    def loader(self) -> TensorLoader:
        return TensorLoader(self.index())

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of its floating tensors (config ``dtype``, else the first floating tensor's)."""
        return float_dtype_of(self.config, self.index())

    def recipe(self) -> Recipe | None:
        """The recipe it was built from (``moerge_recipe.yaml``), or None when there is none."""
        path = self.folder / names.RECIPE
        if not path.is_file():
            return None
        try:
            return Recipe.model_validate(yaml.safe_load(read_text(path)))
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - yaml and pydantic errors alike: the stored recipe is unusable
            raise CheckpointError(path, None, f"cannot read the checkpoint's recipe ({' '.join(str(exc).split())})"
                                  ) from None

    def routers(self) -> dict[str, RouterTensors]:
        return read_routers(self.folder / names.ROUTER_SHARD, self.require_routed(), self.hidden)

    def router_dtype(self) -> torch.dtype:
        from safetensors import safe_open

        with safe_open(str(self.folder / names.ROUTER_SHARD), framework="pt") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype

    # ---- loading
    def tokenizer(self, padding_side: str | None = None) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types: all mean "cannot load this folder"
            raise CheckpointError(self.folder, None, f"cannot load the tokenizer ({why(exc)})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if padding_side is not None:
            tok.padding_side = padding_side
        return tok

    def load_model(self, dtype: torch.dtype | str | None = None, device_map: Any = None) -> Any:
        """The model in eval mode, built from the installed moerge classes (never the folder's code)."""
        return load_model(self.folder, dtype, device_map)


def load_model(folder: Path, dtype: torch.dtype | str | None = None, device_map: Any = None) -> Any:
    """``AutoModelForCausalLM`` of ``folder`` with ``trust_remote_code=False`` (moerge's classes registered)."""
    from transformers import AutoModelForCausalLM

    register()
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", "trust_remote_code": False}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    except Exception as exc:  # noqa: BLE001 - transformers raises many types: all mean "cannot load this folder"
        raise CheckpointError(folder, None, f"cannot load the model ({why(exc)})") from None


def why(exc: Exception) -> str:
    """One line saying why transformers could not load a folder."""
    if "trust_remote_code" in str(exc):
        return "it needs code from its own folder (auto_map), and moerge never runs code from a checkpoint"
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
