"""``tools/bf16_emulation.py``: bf16 GEMMs computed as fp32 GEMMs of the same values, rounded once to bf16.

What it must keep: the arithmetic of a native bf16 GEMM (exact products, fp32 accumulation, one rounding), every
other op and dtype untouched, and the mode reaching the subprocesses a wrapped script starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bf16_emulation


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_gemms_are_fp32_gemms_rounded_once() -> None:
    a, b, bias = _bf16(7, 33, seed=0), _bf16(33, 5, seed=1), _bf16(5, seed=2)
    a3, b3 = _bf16(3, 7, 33, seed=3), _bf16(3, 33, 5, seed=4)
    with bf16_emulation.emulated():
        assert bf16_emulation.is_enabled()
        got = {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "bmm": torch.bmm(a3, b3),
               "baddbmm": torch.baddbmm(bias.expand(3, 7, 5), a3, b3), "linear": torch.nn.functional.linear(a, b.T, bias)}
    want = {"mm": a.float() @ b.float(), "addmm": torch.addmm(bias.float(), a.float(), b.float()),
            "bmm": torch.bmm(a3.float(), b3.float()),
            "baddbmm": torch.baddbmm(bias.float().expand(3, 7, 5), a3.float(), b3.float()),
            "linear": torch.nn.functional.linear(a.float(), b.float().T, bias.float())}
    for name, out in got.items():
        assert out.dtype == torch.bfloat16, name
        assert torch.equal(out, want[name].bfloat16()), name


def test_inference_mode_linear_is_emulated() -> None:
    """Scoring's path (inference mode, bf16 autocast, fp32 weights): each linear as an fp32 GEMM of the
    bf16-cast operands, rounded once; a dispatch mode missed it (it saw ``aten::linear`` whole)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(96, 40)
    x = torch.randn(3, 11, 96)
    want = torch.nn.functional.linear(x.bfloat16().float(), net.weight.bfloat16().float(),
                                      net.bias.bfloat16().float()).bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), bf16_emulation.emulated():
        got = net(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_native_and_emulated_differ_by_summation_order_only() -> None:
    """Against torch's own bf16 GEMM: the same value except a rare one-ulp rounding flip."""
    a, b = _bf16(64, 256, seed=5), _bf16(256, 96, seed=6)
    native = a @ b
    with bf16_emulation.emulated():
        emu = a @ b
    flips = (native != emu).float().mean().item()
    assert flips < 0.01
    assert torch.allclose(native.float(), emu.float(), rtol=2 ** -7, atol=1e-6)


def test_other_ops_and_dtypes_untouched_and_mode_leaves() -> None:
    x, w = torch.randn(6, 10), torch.randn(10, 4)
    hb = _bf16(6, 10, seed=7)
    with bf16_emulation.emulated():
        fp32 = x @ w
        act = torch.nn.functional.silu(hb)
    assert torch.equal(fp32, x @ w)
    assert act.dtype == torch.bfloat16 and torch.equal(act, torch.nn.functional.silu(hb))
    assert not bf16_emulation.is_enabled()
    a, b = _bf16(64, 256, seed=8), _bf16(256, 96, seed=9)
    native = a @ b
    with bf16_emulation.emulated():
        assert not torch.equal(a @ b, native)  # on: these operands have flips (see the test above)
    assert torch.equal(a @ b, native)  # off again: torch's own kernel is back


def test_autocast_training_step_matches_native_within_bf16() -> None:
    """Forward and backward of a small MLP under bf16 autocast: loss and grads as torch's native bf16 path's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.SiLU(), torch.nn.Linear(48, 8))
    x = torch.randn(16, 24)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    loss_n, grads_n = step()
    with bf16_emulation.emulated():
        loss_e, grads_e = step()
    assert torch.allclose(loss_n, loss_e, rtol=1e-2)
    for gn, ge in zip(grads_n, grads_e):
        assert torch.allclose(gn, ge, rtol=5e-2, atol=5e-3 * gn.abs().max().item())


def test_wrapper_reaches_child_processes(tmp_path: Path) -> None:
    """``python tools/bf16_emulation.py SCRIPT``: the script and a child it starts with sys.executable run
    with the emulation on."""
    probe = ("import sys\n"
             "mod = sys.modules.get('bf16_emulation')\n"
             "print(bool(mod and mod.is_enabled()))\n")
    child = tmp_path / "child.py"
    child.write_text(probe)
    parent = tmp_path / "parent.py"
    parent.write_text(probe + f"import subprocess; subprocess.run([sys.executable, {str(child)!r}], check=True)\n")
    env = {k: v for k, v in os.environ.items() if k != bf16_emulation.ENV}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bf16_emulation.py"), str(parent)],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == ["True", "True"]


def test_wrapper_without_script_says_usage() -> None:
    with pytest.raises(SystemExit, match="usage"):
        bf16_emulation.main([])
