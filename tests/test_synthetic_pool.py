"""``bench/synthetic_pool.py``: the scale benchmark's pool writer, at tiny shapes.

* a sharded pool is a valid Hugging Face folder (moerge's index reads it, transformers loads the base) and the
  index matches the shards;
* the same seed writes the same bytes; expert deltas have the requested rank (+ noise when asked);
* a sparse pool has full-size files whose data region takes no disk, and ``moerge plan`` runs on it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from synthetic_pool import DeltaSpec, ModelShape, layer_shape, write_pool

from moerge.io.index import CheckpointIndex

SHAPE = ModelShape("unit", "mistral", 64, 96, 2, 4, 2, 40)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_sharded_pool_is_a_loadable_checkpoint(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "p", SHAPE, 2, shard_size=20_000)
    shards = sorted(pool.base.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((pool.base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in SHAPE.tensors()}
    idx = CheckpointIndex.from_folder(pool.base)
    assert idx.total_bytes == index["metadata"]["total_size"] == SHAPE.n_params * 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pool.experts[1], dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == SHAPE.n_params
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 96)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_pool(tmp_path / "a", SHAPE, 1, seed=3)
    b = write_pool(tmp_path / "b", SHAPE, 1, seed=3)
    c = write_pool(tmp_path / "c", SHAPE, 1, seed=4)
    assert _digest(a.experts[0]) == _digest(b.experts[0]) != _digest(c.experts[0])


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_deltas_have_the_requested_spectrum(tmp_path: Path, noise: float) -> None:
    from safetensors import safe_open

    spec = DeltaSpec(rank=5, decay=1.0, scale=1e-2, noise=noise)
    pool = write_pool(tmp_path / "p", SHAPE, 2, dtype=torch.float32, delta=spec)
    name = "model.layers.0.mlp.gate_proj.weight"
    with safe_open(str(pool.base / "model.safetensors"), "pt") as hb, \
            safe_open(str(pool.experts[0] / "model.safetensors"), "pt") as he:
        delta = he.get_tensor(name) - hb.get_tensor(name)  # (96, 64)
    s = torch.linalg.svdvals(delta)
    assert s[spec.rank] < 1e-4 * s[0] if noise == 0 else s[spec.rank] > 1e-2 * s[0]
    assert abs(float(delta.square().mean().sqrt()) - (spec.scale ** 2 + noise ** 2) ** 0.5) < 0.3 * spec.scale


def test_sparse_pool_takes_no_disk_and_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from moerge.cli import main

    shape = layer_shape(ModelShape("wide", "llama", 512, 1536, 2, 8, 2, 1000), layers=3, vocab=1000)
    pool = write_pool(tmp_path / "p", shape, 3, sparse=True, shard_size=2_000_000)
    files = sorted(pool.experts[2].glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    used = sum(f.stat().st_blocks * 512 for f in files)
    assert size > shape.n_params * 2 and used < size / 20
    recipe = {"base": str(pool.base), "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(pool.experts)],
              "routing": {"select": {"all": True}, "modules": "mlp", "expert": {"kind": "twin", "rank": 16},
                          "router": {"init": "uniform"}}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(tmp_path / "r.yml")]) == 0
    assert "3/3 units routed" in capsys.readouterr().out
