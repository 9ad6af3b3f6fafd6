"""Model folders and expert sources: what the executor reads, one tensor at a time.

* :class:`ModelFolder` - a base or full fine-tuned checkpoint: config + shard index + lazy loader.
* :class:`FullSource` - an expert given as a full checkpoint; its task vector is ``W_expert - W_base``.
* :class:`LoraSource` - an expert given as a PEFT LoRA adapter over the base; its task vector for a module
  is ``B @ A * scaling`` (rsLoRA, fan_in_fan_out, rank/alpha patterns, embedding LoRA and lora_bias
  honoured), computed only when that module is asked for.  DoRA is refused.

Both raise :class:`~moerge.errors.SourceError` naming the file and the tensor on missing tensors, shape
mismatches, NaN/Inf values, or an adapter made for another base.  Everything that can be checked from configs
and headers is checked when a source is opened: a quantized checkpoint (``quantization_config``) or a tensor
stored as an integer / 8-bit float where the base has a float is refused (merging those as numbers writes
garbage), and an adapter's ``r`` / ``lora_alpha`` / patterns must be usable numbers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..arch import check_compatible
from ..dtypes import float_dtype_named
from ..errors import CheckpointError, NotSupportedError, SourceError
from .files import read_json
from .index import CheckpointIndex
from .loader import TensorLoader, check_finite

PEFT_PREFIX = "base_model.model."
__all__ = ["FullSource", "LoraSource", "ModelFolder", "open_source", "read_json"]


def check_not_quantized(config: dict[str, Any], path: Path) -> None:
    """Refuse a quantized checkpoint (bitsandbytes, GPTQ, AWQ, FP8...): its stored numbers are not weights."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    quant = config.get("quantization_config") or text.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(path, "quantization_config", f"quantized checkpoint ({method}): its weights cannot be "
                                                           "merged as numbers; dequantize it to float first")


class ModelFolder:
    """A Hugging Face model folder read lazily."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, what: str = "model") -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            raise CheckpointError(self.folder, None, f"{what} path not found")
        self.config = read_json(self.folder / "config.json")
        check_not_quantized(self.config, self.folder / "config.json")
        self.index = CheckpointIndex.from_folder(self.folder, allow_pickle=allow_pickle)
        self.loader = TensorLoader(self.index)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.loader.get(name, rows)

    @property
    def names(self) -> list[str]:
        return self.index.names()

    @property
    def tied(self) -> bool:
        text = self.config.get("text_config", self.config)
        text = text if isinstance(text, dict) else self.config
        return bool(text.get("tie_word_embeddings", self.config.get("tie_word_embeddings", False)))

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the config names (default float32); an integer or unknown one is an error."""
        key = "dtype" if self.config.get("dtype") else "torch_dtype"
        name = self.config.get(key) or "float32"
        row = float_dtype_named(name)
        if row is None:
            raise CheckpointError(self.folder / "config.json", key, f"{name!r} is not a float dtype (float32, "
                                                                    "float16, bfloat16 or float64)")
        return row.torch


class FullSource:
    """An expert stored as a full checkpoint of the base's architecture."""

    is_lora = False

    def __init__(self, name: str, folder: Path, base: ModelFolder, *, allow_pickle: bool = False) -> None:
        self.name, self.path = name, folder
        self.model = ModelFolder(folder, allow_pickle=allow_pickle, what=f"expert '{name}'")
        check_compatible(base.config, self.model.config, str(folder / "config.json"))
        self._check_dtypes(base)

    def _check_dtypes(self, base: ModelFolder) -> None:
        """Where the base stores a float, the expert must too (an int8 / relabelled tensor is not a weight)."""
        for tname, want in base.index.tensors.items():
            got = self.model.index.tensors.get(tname)
            if got is not None and want.mergeable and not got.mergeable:
                raise SourceError(got.file, tname, f"stored as {got.dtype} where the base has {want.dtype}: an "
                                                   "integer or quantized tensor cannot be merged as numbers "
                                                   "(dequantize the checkpoint to float first)")

    def weight(self, tname: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The expert's tensor (its rows ``[a, b)`` when ``base`` is that block of the base's), on base's device."""
        if tname not in self.model.index:
            raise SourceError(self.path, tname, f"tensor missing in expert '{self.name}'")
        info = self.model.index[tname]
        t = self.model.get(tname, rows)
        if tuple(t.shape) != tuple(base.shape):
            raise SourceError(info.file, tname, f"shape {list(info.shape)} does not match the base's {list(base.shape)}")
        return check_finite(t, info.file, tname).to(base.device)

    def delta(self, tname: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Task vector (fp32), or its rows ``[a, b)`` when ``base`` is that block of the base tensor."""
        return self.weight(tname, base, rows).float() - base.float()

    def lora_factors(self, tname: str, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraSource:
    """An expert stored as a PEFT LoRA adapter over the base."""

    is_lora = True

    def __init__(self, name: str, folder: Path, base: ModelFolder, *, allow_pickle: bool = False) -> None:
        self.name, self.path = name, folder
        cfg_path = folder / "adapter_config.json"
        self.cfg = read_json(cfg_path)
        if str(self.cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise NotSupportedError(cfg_path, "peft_type", f"'{self.cfg.get('peft_type')}' adapters are not supported "
                                                           "(only LoRA)")
        if self.cfg.get("use_dora"):
            raise NotSupportedError(cfg_path, "use_dora", "DoRA adapters are not supported yet")
        check_lora_config(self.cfg, cfg_path)
        self.index = CheckpointIndex.from_folder(folder, allow_pickle=allow_pickle, prefix="adapter_model")
        self.loader = TensorLoader(self.index)
        self.modules = self._collect(base)

    def _collect(self, base: ModelFolder) -> dict[str, dict[str, str]]:
        """Base tensor name -> {"A": key, "B": key, "bias": key, "full": key} for every adapted tensor."""
        out: dict[str, dict[str, str]] = {}
        for key in self.index.names():
            body = key.removeprefix(PEFT_PREFIX)
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.(weight|bias))?",
                             body)
            if m:
                module, part, attr = m.groups()
                role = {"lora_A": "A", "lora_embedding_A": "EA", "lora_embedding_B": "EB"}.get(part, "B")
                if role == "B" and attr == "bias":
                    out.setdefault(f"{module}.bias", {})["bias"] = key
                else:
                    out.setdefault(f"{module}.weight", {})[role] = key
                continue
            full = body.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            out.setdefault(full, {})["full"] = key
        for tname, parts in out.items():
            if tname not in base.index:
                raise SourceError(self.path, tname, f"LoRA adapter for a different base: module not in the base "
                                                    f"model {base.folder}")
            for key in parts.values():
                if not self.index[key].mergeable:
                    raise SourceError(self.index[key].file, key, f"stored as {self.index[key].dtype}: an integer or "
                                                                 "quantized adapter tensor cannot be merged")
            if "A" in parts and "B" in parts:
                self._check_shapes(tname, parts, base.index[tname].shape)
                self._check_rank(tname, parts)
        return out

    def _check_rank(self, tname: str, parts: dict[str, str]) -> None:
        """lora_A's rank is the ``r`` (or ``rank_pattern`` value) the config gives this module."""
        got = self.index[parts["A"]].shape[0]
        want, _ = self._scaling(tname.rsplit(".", 1)[0])
        if got != want:
            raise SourceError(self.index[parts["A"]].file, tname, f"lora_A has rank {got} but adapter_config.json "
                                                                  f"gives r {want} for this module")

    def _check_shapes(self, tname: str, parts: dict[str, str], base_shape: tuple[int, ...]) -> None:
        a, b = self.index[parts["A"]].shape, self.index[parts["B"]].shape  # (r, in), (out, r)
        out_dim, in_dim = (base_shape[1], base_shape[0]) if self.cfg.get("fan_in_fan_out") else base_shape[:2]
        if len(a) != 2 or len(b) != 2 or a[1] != in_dim or b[0] != out_dim or a[0] != b[1]:
            raise SourceError(self.index[parts["A"]].file, tname,
                              f"LoRA adapter for a different base: lora_A {list(a)} / lora_B {list(b)} do not fit "
                              f"the base weight {list(base_shape)}")

    def _scaling(self, module: str) -> tuple[int, float]:
        r = int(_pattern_value(self.cfg.get("rank_pattern") or {}, module, self.cfg.get("r", 8)))
        alpha = float(_pattern_value(self.cfg.get("alpha_pattern") or {}, module, self.cfg.get("lora_alpha", r)))
        return r, alpha / (math.sqrt(r) if self.cfg.get("use_rslora") else r)

    def _get(self, key: str, device: torch.device | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = check_finite(self.loader.get(key, rows), self.index[key].file, key)
        return (t if device is None else t.to(device)).float()

    def lora_factors(self, tname: str, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A (r, in), B (out, r) * scaling)`` in the base weight's orientation, or None."""
        parts = self.modules.get(tname, {})
        if "A" not in parts or "B" not in parts:
            return None
        _, scale = self._scaling(tname.rsplit(".", 1)[0])
        A, B = self._get(parts["A"], device), self._get(parts["B"], device) * scale  # (r, in), (out, r)
        if self.cfg.get("fan_in_fan_out"):
            A, B = B.T.contiguous(), A.T.contiguous()  # base weight is stored (in, out)
        return A, B

    def delta(self, tname: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Task vector (fp32) of ``tname``, or of its rows ``[a, b)`` when ``base`` is that block of the base."""
        parts = self.modules.get(tname)
        if not parts:
            return None
        dev, sl = base.device, slice(*rows) if rows else slice(None)
        if "full" in parts:
            return self._checked(tname, self._get(parts["full"], dev, rows), base) - base.float()
        _, scale = self._scaling(tname.rsplit(".", 1)[0])
        if "bias" in parts:
            return self._checked(tname, self._get(parts["bias"], dev, rows) * scale, base)
        if "EA" in parts:  # embedding LoRA: A (r, vocab), B (dim, r) -> (vocab, dim)
            ea = self._get(parts["EA"], dev)[:, sl]  # (r, rows)
            return self._checked(tname, (self._get(parts["EB"], dev) @ ea).T * scale, base)
        factors = self.lora_factors(tname, dev)
        if factors is None:
            raise SourceError(self.path, tname, "LoRA module has lora_A or lora_B but not both")
        A, B = factors
        return self._checked(tname, B[sl] @ A, base)  # (rows, r) @ (r, in) -> (rows, in)

    def weight(self, tname: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The expert's own fp32 tensor (or rows): base + its delta (the base where the adapter leaves it alone)."""
        delta = self.delta(tname, base, rows)
        return base.float() if delta is None else base.float() + delta

    def _checked(self, tname: str, delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if tuple(delta.shape) != tuple(base.shape):
            raise SourceError(self.path / "adapter_model.safetensors", tname,
                              f"LoRA adapter for a different base: delta shape {list(delta.shape)} vs base "
                              f"{list(base.shape)}")
        return delta


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_lora_config(cfg: dict[str, Any], path: Path) -> None:
    """``r`` a positive int, ``lora_alpha`` a finite number, patterns mappings of those, flags booleans."""
    if not _positive_int(cfg.get("r", 8)):
        raise SourceError(path, "r", f"must be a positive integer (the LoRA rank), got {cfg.get('r')!r}")
    if "lora_alpha" in cfg and not _finite_number(cfg["lora_alpha"]):
        raise SourceError(path, "lora_alpha", f"must be a finite number, got {cfg['lora_alpha']!r}")
    for key, ok, what in (("rank_pattern", _positive_int, "a positive integer"),
                          ("alpha_pattern", _finite_number, "a finite number")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise SourceError(path, key, f"must be a mapping of module pattern -> value, got {pattern!r}")
        for module, value in pattern.items():
            if not ok(value):
                raise SourceError(path, f"{key}.{module}", f"must be {what}, got {value!r}")
            try:
                re.compile(module)
            except re.error as exc:
                raise SourceError(path, f"{key}.{module}", f"not a valid module pattern ({exc})") from None
    for flag in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if flag in cfg and not isinstance(cfg[flag], bool) and cfg[flag] is not None:
            raise SourceError(path, flag, f"must be true or false, got {cfg[flag]!r}")


def open_source(name: str, path: Path, base: ModelFolder, *, allow_pickle: bool = False) -> FullSource | LoraSource:
    """A LoRA adapter folder if it has ``adapter_config.json``, else a full checkpoint."""
    path = Path(path)
    if not path.exists():
        raise SourceError(path, None, f"expert '{name}' path not found")
    if (path / "adapter_config.json").is_file():
        return LoraSource(name, path, base, allow_pickle=allow_pickle)
    return FullSource(name, path, base, allow_pickle=allow_pickle)
