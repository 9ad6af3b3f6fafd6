"""The one dtype table: safetensors codes, torch dtypes and their sizes.

Every module that maps a safetensors code to a torch dtype (or back), sizes a tensor, or decides whether a
tensor is merged as numbers asks this module.  Only F64/F32/F16/BF16 tensors are floating weights that merges
and routed kinds compute on; integer, bool and fp8 tensors are copied from the base untouched (and an expert
that stores a base float tensor in one of them is refused: it is quantized or relabelled, not a fine-tune).
"""

from __future__ import annotations

from typing import Any

import torch

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # what merges compute on
NAMES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                                 "bfloat16": torch.bfloat16}


def from_st(code: str) -> torch.dtype:
    """``"BF16"`` -> ``torch.bfloat16`` (KeyError for an unknown code)."""
    return ST_TO_TORCH[code]


def to_st(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``."""
    return TORCH_TO_ST[dtype]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def st_itemsize(code: str) -> int:
    return itemsize(ST_TO_TORCH[code]) if code in ST_TO_TORCH else 4


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * itemsize(dtype)


def name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of config.json and recipes)."""
    return str(dtype).replace("torch.", "")


def from_name(text: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A config's ``dtype`` / ``torch_dtype`` string -> torch dtype (``default`` when absent or not a float)."""
    return NAMES.get(str(text).replace("torch.", ""), default) if text else default


def float_dtype_of(config: dict[str, Any], index: Any) -> torch.dtype:
    """A model folder's float dtype: its config's ``dtype``, else its first floating tensor's, else float32."""
    text = config.get("dtype") or config.get("torch_dtype")
    if text and str(text).replace("torch.", "") in NAMES:
        return from_name(text)
    for info in index.tensors.values():
        if info.dtype in FLOAT_CODES:
            return ST_TO_TORCH[info.dtype]
    return torch.float32
