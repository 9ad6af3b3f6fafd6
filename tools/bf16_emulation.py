"""bf16 matrix products at fp32 speed on CPUs without native bf16 (AVX2 only: no AVX512-BF16, no AMX).

On such a CPU torch's bf16 GEMM falls back to a scalar-ish path, about 16x slower than fp32 (measured here: one
thread, ``(1024, 576) @ (576, 1536)`` forward + backward, fp32 0.091 s, bf16 autocast 1.416 s).  That makes the
pool's full-expert generator (bf16 autocast) and every bf16-autocast scoring run 10x slower than on the machine
that recorded them.

:func:`enable` registers CPU kernels (``torch.library``) that run each bf16 ``mm`` / ``addmm`` / ``bmm`` /
``baddbmm`` (forward and backward, as autocast, autograd and ``linear``'s decomposition issue them) as an fp32
GEMM of the same bf16 values and round the result to bf16.  That is the arithmetic of a native bf16 GEMM (oneDNN on AVX512-BF16 / AMX): products of bf16
values are exact in fp32, they are accumulated in fp32, and the output is rounded once to bf16 (a bias, when
there is one, is added in fp32 before the rounding).  Only the summation order differs, as it does between any
two CPU kinds.  Nothing else changes: every other op, dtype and the autocast policy are untouched.

Use::

    python tools/bf16_emulation.py SCRIPT [ARGS...]   # runs SCRIPT with the emulation on in it and in its children
    import bf16_emulation; bf16_emulation.enable()    # in-process, for good
    with bf16_emulation.emulated(not bf16_emulation.native_bf16()): ...   # in-process, for a block

The wrapper puts a ``sitecustomize`` on ``PYTHONPATH`` so that subprocesses the script starts with
``sys.executable`` (the generator runs one per task) get the emulation too.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LIB = None  # the torch.library registration while the emulation is on
ENV = "MOERGE_BF16_EMULATION"


def native_bf16() -> bool:
    """Whether this CPU has bf16 GEMM instructions (x86 flags avx512_bf16 / amx_bf16; non-x86: assume yes)."""
    from moerge.dtypes import cpu_bf16_native

    return cpu_bf16_native()


def note() -> str:
    """How this machine runs bf16 GEMMs under the benches' scoring (for a result's machine line)."""
    return "bf16 GEMMs native" if native_bf16() else "no native bf16: bf16 GEMMs as fp32 GEMMs rounded to bf16"


_OPS = ("mm", "addmm", "bmm", "baddbmm")


def _kernel(name: str):
    """CPU kernel for ``aten::<name>``: bf16 operands as an fp32 GEMM rounded once to bf16, others as before.

    Both paths call the op's ``out=`` overload, whose CPU kernel is the one this registration shadows (bitwise
    the same GEMM; ``out=`` calls themselves are left alone)."""
    import torch

    op = getattr(torch.ops.aten, name)

    def kernel(*args, **kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return op.out(*up, **kwargs, out=torch.empty(0)).to(torch.bfloat16)
        first = next(a for a in args if isinstance(a, torch.Tensor))
        return op.out(*args, **kwargs, out=first.new_empty(0))

    return kernel


def _register():
    """A ``torch.library`` registration of the four kernels on the CPU dispatch key (``_destroy()`` undoes it).

    A kernel, not a ``TorchDispatchMode``: a mode sees every op in Python (6x slower scoring here) and, under
    ``inference_mode``, sees ``aten::linear`` before it decomposes into ``mm``, so it never ran there."""
    import warnings

    import torch

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel": the point
        for name in _OPS:
            lib.impl(name, _kernel(name), "CPU")
    return lib


def is_enabled() -> bool:
    """Whether the emulation is on in this process."""
    return _LIB is not None


def enable() -> None:
    """Turn the emulation on for the rest of this process (idempotent)."""
    global _LIB
    if _LIB is None:
        _LIB = _register()


@contextmanager
def emulated(active: bool = True) -> Iterator[None]:
    """The emulation for the duration of a ``with`` block (``active=False``, or already on: a no-op)."""
    global _LIB
    if not active or _LIB is not None:
        yield
        return
    _LIB = _register()
    try:
        yield
    finally:
        lib, _LIB = _LIB, None
        lib._destroy()


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
    sys.modules.setdefault("bf16_emulation", sys.modules[__name__])  # the script's import finds this state
    os.environ[ENV] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_sitecustomize_dir(), os.environ.get("PYTHONPATH")) if p)
    enable()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
