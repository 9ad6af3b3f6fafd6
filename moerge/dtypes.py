"""The one dtype table: safetensors code <-> torch name <-> bytes per element <-> whether moerge may do float math
on it.

Every other dtype map in moerge should be a view of :data:`DTYPES`.  ``mergeable`` is True only for the IEEE
float types a merge can average (F64, F32, F16, BF16); 8-bit floats, integers and booleans are stored values
(quantized weights, ids, masks): merging them as numbers writes garbage, so they are refused where a float is
expected and copied as they are elsewhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DType:
    st: str  # safetensors header code, e.g. "BF16"
    name: str  # torch attribute name, e.g. "bfloat16"
    nbytes: int
    mergeable: bool

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.name)


DTYPES: tuple[DType, ...] = (
    DType("F64", "float64", 8, True), DType("F32", "float32", 4, True), DType("F16", "float16", 2, True),
    DType("BF16", "bfloat16", 2, True), DType("F8_E4M3", "float8_e4m3fn", 1, False),
    DType("F8_E5M2", "float8_e5m2", 1, False), DType("I64", "int64", 8, False), DType("I32", "int32", 4, False),
    DType("I16", "int16", 2, False), DType("I8", "int8", 1, False), DType("U64", "uint64", 8, False),
    DType("U32", "uint32", 4, False), DType("U16", "uint16", 2, False), DType("U8", "uint8", 1, False),
    DType("BOOL", "bool", 1, False),
)
BY_ST: dict[str, DType] = {d.st: d for d in DTYPES}
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
# names configs use for the float dtypes ("torch_dtype": "float", "half", ...)
_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16", "fp16": "float16",
            "fp32": "float32"}


def by_torch(dtype: torch.dtype) -> DType:
    """The table row of a torch dtype (KeyError when moerge does not know it)."""
    return BY_NAME[str(dtype).removeprefix("torch.")]


def st_code(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors code: ``torch.bfloat16`` -> ``"BF16"``."""
    return by_torch(dtype).st


def float_dtype_named(name: object) -> DType | None:
    """The mergeable float dtype a config or recipe names (``"bfloat16"``, ``"torch.float16"``, ``"half"``); None
    when the name is not one."""
    if not isinstance(name, str):
        return None
    key = name.removeprefix("torch.").strip().lower()
    row = BY_NAME.get(_ALIASES.get(key, key))
    return row if row is not None and row.mergeable else None


FLOAT_CODES = tuple(d.st for d in DTYPES if d.mergeable)  # what merges compute on


def from_st(code: str) -> torch.dtype:
    """``"BF16"`` -> ``torch.bfloat16`` (KeyError for an unknown code)."""
    return BY_ST[code].torch


def to_st(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``."""
    return st_code(dtype)


def itemsize(dtype: torch.dtype) -> int:
    return by_torch(dtype).nbytes


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * itemsize(dtype)


def name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of config.json and recipes)."""
    return str(dtype).removeprefix("torch.")


def float_dtype_of(config: dict, index: object) -> torch.dtype:
    """A model folder's float dtype: its config's ``dtype``, else its first floating tensor's, else float32."""
    row = float_dtype_named(config.get("dtype") or config.get("torch_dtype"))
    if row is not None:
        return row.torch
    for info in index.tensors.values():  # type: ignore[attr-defined]
        if info.dtype in FLOAT_CODES:
            return from_st(info.dtype)
    return torch.float32


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 GEMM instructions (x86 flags avx512_bf16 / amx_bf16; non-x86 or unknown: yes).
    Without them torch's bf16 GEMM is ~16x slower than fp32 (AVX2 only), so CPU autocast to bf16 is a loss."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    if "flags" not in flags:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags
