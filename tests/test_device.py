"""``--device``: builds, analysis and calibration computed on a device equal the CPU's within the math's tolerance.

Every test runs on the CPU and again on CUDA when ``torch.cuda.is_available()`` (skipped otherwise).  Tolerance
(stated in README): element-wise merges and masks (task arithmetic, TIES, DARE masks drawn on the CPU, bit1
signs, sparse indices) are equal; float reductions (bit1 scales, normalisation) within 1e-6 relative; SVD
factors (twin) within 1e-4 absolute on unit-scale weights (float32 LAPACK vs cuSOLVER rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from folders import tensors

import moerge
from moerge import device as devices
from moerge.cli import main
from moerge.errors import MoergeError
from moerge.recipe import recipe_from_dict

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="no CUDA device"))]


def _recipe(pool: dict[str, Any], merge: dict, expert: dict | None = None) -> Any:
    raw: dict[str, Any] = {"base": str(pool["base"]), "merge": merge,
                           "experts": [{"name": f"e{i}", "source": str(s)}
                                       for i, s in enumerate([*pool["full"][:2], pool["lora"][0]])]}
    if expert:
        raw["routing"] = {"select": {"all": True}, "modules": "both", "expert": expert, "router": {"init": "uniform"}}
    return recipe_from_dict(raw)


def test_resolve() -> None:
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(MoergeError, match="unknown device 'gpu'"):
        devices.resolve("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MoergeError, match="torch sees no CUDA device"):
            devices.resolve("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_one_line_before_work(llama_pool: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(llama_pool, {"method": "ties", "density": 0.5}).to_yaml())
    assert main(["build", str(recipe), str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device: 'cuda' asked for, but torch sees no CUDA device here\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge,expert,atol", [
    ({"method": "ties", "density": 0.5}, None, 0.0),
    ({"method": "dare_ties", "density": 0.5}, None, 1e-6),
    ({"method": "task_arithmetic"}, {"kind": "bit1"}, 1e-6),
    ({"method": "task_arithmetic"}, {"kind": "sparse", "density": 0.2}, 1e-6),
    ({"method": "ties", "density": 0.5}, {"kind": "twin", "rank": 4, "svd": "randomized"}, 1e-4),
], ids=["ties", "dare_ties", "bit1", "sparse", "twin-randomized"])
def test_build_on_device_equals_cpu(llama_pool: dict, tmp_path: Path, device: str, merge: dict, expert: dict | None,
                                    atol: float) -> None:
    recipe = _recipe(llama_pool, merge, expert)
    ref = tensors(moerge.build(recipe, tmp_path / "cpu", progress=False, device="cpu"))
    got = tensors(moerge.build(recipe, tmp_path / f"on-{device}", progress=False, device=device))
    assert sorted(ref) == sorted(got)
    for name, t in ref.items():
        if t.is_floating_point():
            assert torch.allclose(t, got[name], atol=atol, rtol=10 * atol), name
        else:
            assert torch.equal(t, got[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_analysis_on_device_equals_cpu(llama_pool: dict, device: str) -> None:
    from moerge.pipeline.analyze import unit_metrics
    from moerge.pipeline.context import BuildContext
    from moerge.pipeline.units import candidate_units

    recipe = _recipe(llama_pool, {"method": "ties", "density": 0.5})
    cpu, dev = BuildContext.open(recipe, device="cpu"), BuildContext.open(recipe, device=device)
    for unit in candidate_units(cpu.base.index, cpu.n_layers, cpu.family, "both"):
        assert unit_metrics(dev, unit, 0.2) == pytest.approx(unit_metrics(cpu, unit, 0.2), rel=1e-6, abs=1e-9)
