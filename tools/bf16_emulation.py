"""bf16 matrix products at fp32 speed on CPUs without native bf16 (AVX2 only: no AVX512-BF16, no AMX).

On such a CPU torch's bf16 GEMM falls back to a scalar-ish path, about 16x slower than fp32 (measured here: one
thread, ``(1024, 576) @ (576, 1536)`` forward + backward, fp32 0.091 s, bf16 autocast 1.416 s).  That makes the
pool's full-expert generator (bf16 autocast) and every bf16-autocast scoring run 10x slower than on the machine
that recorded them.

:func:`enable` installs a ``TorchDispatchMode`` that runs each bf16 ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm``
(forward and backward, as autocast and autograd issue them) as an fp32 GEMM of the same bf16 values and rounds
the result to bf16.  That is the arithmetic of a native bf16 GEMM (oneDNN on AVX512-BF16 / AMX): products of bf16
values are exact in fp32, they are accumulated in fp32, and the output is rounded once to bf16 (a bias, when
there is one, is added in fp32 before the rounding).  Only the summation order differs, as it does between any
two CPU kinds.  Nothing else changes: every other op, dtype and the autocast policy are untouched.

Use::

    python tools/bf16_emulation.py SCRIPT [ARGS...]   # runs SCRIPT with the mode on in it and in its children
    import bf16_emulation; bf16_emulation.enable()    # in-process, for good
    with bf16_emulation.emulated(not bf16_emulation.native_bf16()): ...   # in-process, for a block

The wrapper puts a ``sitecustomize`` on ``PYTHONPATH`` so that subprocesses the script starts with
``sys.executable`` (the generator runs one per task) get the mode too.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_MODE = None
ENV = "MOERGE_BF16_EMULATION"


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 GEMM instructions (x86 flags avx512_bf16 / amx_bf16; non-x86: assume yes)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    if "flags" not in flags:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def note() -> str:
    """How this machine runs bf16 GEMMs under the benches' scoring (for a result's machine line)."""
    return "bf16 GEMMs native" if native_bf16() else "no native bf16: bf16 GEMMs as fp32 GEMMs rounded to bf16"


def _mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    class Bf16AsFp32(TorchDispatchMode):
        """bf16 GEMMs computed as fp32 GEMMs of the same values, rounded once to bf16."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in ops and "out" not in kwargs and any(
                    isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu" for a in args):
                up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
                return func(*up, **kwargs).to(torch.bfloat16)
            return func(*args, **kwargs)

    return Bf16AsFp32


def enable() -> None:
    """Turn the mode on for the rest of this process (idempotent)."""
    global _MODE
    if _MODE is None:
        _MODE = _mode_class()()
        _MODE.__enter__()


@contextmanager
def emulated(active: bool = True) -> Iterator[None]:
    """The mode for the duration of a ``with`` block (``active=False``, or already on: a no-op)."""
    if not active or _MODE is not None:
        yield
        return
    with _mode_class()():
        yield


def _sitecustomize_dir() -> str:
    folder = Path(tempfile.mkdtemp(prefix="bf16emu-"))
    here = Path(__file__).resolve().parent
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({ENV!r}) == '1':\n"
        f"    sys.path.insert(0, {str(here)!r})\n"
        "    import bf16_emulation\n"
        "    bf16_emulation.enable()\n")
    return str(folder)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python tools/bf16_emulation.py SCRIPT [ARGS...]")
    os.environ[ENV] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_sitecustomize_dir(), os.environ.get("PYTHONPATH")) if p)
    enable()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
