"""``moerge add-expert`` anchors: a new full expert stored against ``W_s + Σ_i c_i Δ_i`` (its least-squares fit
by the stored experts' deltas) instead of ``W_s``.

Contracts: with an exact kind (wemoe) the anchored expert is still exact, which holds only if the model adds
``Σ_i c_i Δ_i`` whenever the expert is weighted (forced, routed, materialized for export); with a lossy kind
(bit1) the anchored expert's weight error is below the unanchored one's; old experts stay bit-identical;
remove-expert refuses to drop an expert an anchor uses (checkpoint untouched) and removing the anchored expert
gives back the original checkpoint's logits; malformed anchors in config.json are refused with their field.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moerge
from moerge.checkpoint import Manifest
from moerge.errors import CheckpointError, DataError
from moerge.modeling import RoutedLinear
from moerge.recipe import recipe_from_dict
from moerge.routing.add_expert import add_expert, anchor_weights
from moerge.routing.remove_expert import remove_expert
from moerge.testing import tiny

TASKS = ("sentiment", "topic", "math")
IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """qwen2 (q/k/v biases): three full fine-tunes that move attention and MLP (biases included), task data."""
    root = tmp_path_factory.mktemp("anchor")
    base = tiny.make_base(root / "base", family="qwen2", hidden=32, layers=2, tie=True, seed=0)
    fulls = [tiny.make_full_expert(base, root / f"full{i}", seed=80 + i, scale=0.5, modules=("self_attn", "mlp"))
             for i in range(3)]
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 24, seed=1) for t in TASKS}
    return {"root": root, "base": base, "full": fulls, "data": data}


def _build(pool: dict, kind: str) -> Path:
    """The first two experts, every unit routed as ``kind`` over the task-arithmetic merge."""
    raw = {"base": str(pool["base"]),
           "experts": [{"name": t, "source": str(s), "calibration": {"data": str(pool["data"][t]), "chat_template": True}}
                       for t, s in zip(TASKS[:2], pool["full"][:2])],
           "merge": {"method": "task_arithmetic", "lambda": 1.0},
           "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": kind}, "shared": "merge",
                       "router": {"level": "sequence", "init": "prototype"}}}
    out = pool["root"] / f"two-{kind}"
    if not out.is_dir():
        moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _add(pool: dict, src: Path, tmp_path: Path, name: str, anchor: bool = True) -> Path:
    ckpt = tmp_path / name
    shutil.copytree(src, ckpt)
    add_expert(ckpt, TASKS[2], pool["full"][2], {TASKS[2]: {"data": str(pool["data"][TASKS[2]]),
                                                            "chat_template": True}}, anchor=anchor)
    return ckpt


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _forced(folder: Path) -> dict[str, torch.Tensor]:
    model, out = _load(folder), {}
    names = model.expert_names
    for name in names:
        model.force_route(name)
        with torch.no_grad():
            out[name] = model(input_ids=IDS).logits
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _weight_error(folder: Path, expert: Path) -> float:
    """Σ over routed linears of |effective weight of the forced expert - the expert's own weight|², over the
    same for the shared weight (relative)."""
    model, ref = _load(folder), dict(_load(expert).named_parameters())
    model.force_route(TASKS[2])
    num = den = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, RoutedLinear):
            key = mod.expert_key(model._moerge.forced[1]) if mod.translates else model._moerge.forced[1]
            w = mod.impl.combine(mod, key[:len(mod.experts)])
            suffix = "layers." + name.split("layers.", 1)[1] + ".weight"  # the model's prefix may differ
            target = next(v for k, v in ref.items() if k.endswith(suffix))
            num += float((w.detach() - target.detach()).pow(2).sum())
            den += float((mod.weight.detach() - target.detach()).pow(2).sum())
    return num / den


def test_anchor_weights_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    c_true = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    target = c_true @ m
    c = anchor_weights(m @ m.T, m @ target)
    assert torch.allclose(c, c_true, atol=1e-4)
    zero = torch.zeros(2, 2, dtype=torch.float64)
    assert anchor_weights(zero, torch.zeros(2, dtype=torch.float64)).abs().sum() == 0  # nothing stored: no anchor


def test_anchored_exact_kind_stays_exact(pool: dict, tmp_path: Path) -> None:
    """wemoe stores W_e - ref exactly, so every forced expert must reproduce its checkpoint: the new one only if
    the model adds the anchor's Σ c_i Δ_i (without it the added expert is off by O(1))."""
    two = _build(pool, "wemoe")
    before = _forced(two)
    ckpt = _add(pool, two, tmp_path, "added")
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    anchors = plan["anchors"][TASKS[2]]
    assert set(anchors) == set(plan["units"]) and all(len(w) == 3 and w[2] == 0.0 for w in anchors.values())
    assert max(abs(v) for w in anchors.values() for v in w) > 0.5  # τ3 - τ1 - τ2 is fitted with c near 1
    forced = _forced(ckpt)
    for name in TASKS[:2]:
        assert torch.equal(forced[name], before[name]), name  # old experts bit-identical
    for name, src in zip(TASKS, pool["full"]):
        with torch.no_grad():
            ref = _load(src)(input_ids=IDS).logits
        assert (forced[name] - ref).abs().max() <= 1e-4, name
    model = _load(ckpt)  # a per-token route over all outputs takes the tensor path of the translation
    model.force_route({TASKS[2]: 0.5, TASKS[0]: 0.5})
    with torch.no_grad():
        mixed = model(input_ids=IDS).logits
    assert torch.isfinite(mixed).all() and (mixed - forced[TASKS[2]]).abs().max() > 1e-3


def test_anchor_lowers_a_lossy_kinds_error(pool: dict, tmp_path: Path) -> None:
    two = _build(pool, "bit1")
    anchored = _add(pool, two, tmp_path, "anchored")
    plain = _add(pool, two, tmp_path, "plain", anchor=False)
    assert "anchors" not in json.loads((plain / "config.json").read_text())["moerge"]
    err_a, err_p = _weight_error(anchored, pool["full"][2]), _weight_error(plain, pool["full"][2])
    assert err_a < 0.7 * err_p, (err_a, err_p)  # bit1 of about τ3 instead of τ3 - τ1 - τ2: 0.20 vs 0.35 here
    with torch.no_grad():
        ref = _load(pool["full"][2])(input_ids=IDS).logits
    assert (_forced(anchored)[TASKS[2]] - ref).abs().mean() < (_forced(plain)[TASKS[2]] - ref).abs().mean()


def test_remove_expert_and_anchors(pool: dict, tmp_path: Path) -> None:
    two = _build(pool, "bit1")
    ckpt = _add(pool, two, tmp_path, "added")
    before = _snapshot(ckpt)
    with pytest.raises(DataError, match=r"math.*anchors.*remove math first"):
        remove_expert(ckpt, TASKS[0])
    assert _snapshot(ckpt) == before
    remove_expert(ckpt, TASKS[2])
    assert "anchors" not in json.loads((ckpt / "config.json").read_text())["moerge"]
    original, after = _forced(two), _forced(ckpt)
    assert all(torch.equal(original[n], after[n]) for n in TASKS[:2])
    again = _add(pool, ckpt, tmp_path, "again")
    first = _forced(_add(pool, two, tmp_path, "first"))
    assert all((first[n] - v).abs().max() <= 1e-5 for n, v in _forced(again).items())


def test_manifest_anchors_checked() -> None:
    raw = {"experts": ["a", "b"], "level": "sequence", "units": {}, "anchors": {"b": {"u": [0.5, 0.0]}}}
    m = Manifest.from_dict(raw, "config.json")
    assert m.anchors == {"b": {"u": (0.5, 0.0)}} and Manifest.from_dict(m.to_dict(), "c").anchors == m.anchors
    assert m.anchored_on(0) == ["b"] and m.anchored_on(1) == []
    assert m.without_expert(1).anchors == {} and m.with_expert("c", {}).anchors == {"b": {"u": (0.5, 0.0, 0.0)}}
    for bad, what in (({"c": {"u": [1.0, 0.0]}}, "no expert 'c'"), ({"a": {"u": [1.0, 0.0]}}, "on itself"),
                      ({"b": {"u": [1.0]}}, "expected 2 numbers")):
        with pytest.raises(CheckpointError, match=what) as err:
            Manifest.from_dict({**raw, "anchors": bad}, "config.json")
        assert "moerge.anchors" in str(err.value)


def test_composed_routes_weigh_the_anchored_expert(pool: dict, tmp_path: Path) -> None:
    """A composed route's weight on an anchored expert means the whole expert (its anchor included): translation
    is mix first, then the anchor; fitting a route over an anchored checkpoint runs (LearnedMixLinear path)."""
    from moerge.routing.calibrate import CalibrateOptions
    from moerge.routing.compose import ComposeOptions, compose
    from moerge.routing.data import Defaults

    ckpt = _add(pool, _build(pool, "bit1"), tmp_path, "added")
    model = _load(ckpt)
    units = list(model.config.moerge["units"])
    model.add_route("only_math", {u: [0.0, 0.0, 1.0] for u in units})
    model.add_route("half", {u: [0.5, 0.0, 0.5] for u in units})
    out = {}
    for route in ("only_math", TASKS[2], "half", {TASKS[0]: 0.5, TASKS[2]: 0.5}):
        model.force_route(route)
        with torch.no_grad():
            out[str(route)] = model(input_ids=IDS).logits
    assert (out["only_math"] - out[TASKS[2]]).abs().max() <= 1e-5
    assert (out["half"] - out[str({TASKS[0]: 0.5, TASKS[2]: 0.5})]).abs().max() <= 1e-5
    rows = [json.loads(line)["prompt"] for line in pool["data"][TASKS[0]].read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r, "answer": "yes"}) + "\n" for r in rows))
    report = compose(ckpt, pairs, "yesno", options=CalibrateOptions(defaults=Defaults(chat_template=True)),
                     compose_options=ComposeOptions(steps=2, lr=0.2))
    assert report["compose"]["route"] == "yesno"
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert set(plan["routes"]) == {"yesno"} and TASKS[2] in plan["anchors"]


def test_compose_can_start_at_the_base(pool: dict) -> None:
    """Over a task-arithmetic shared weight the base model is a route of the experts (`base_route`): exact with an
    exact kind; none when an expert of the merge is left out of the mix."""
    from moerge.checkpoint import Checkpoint
    from moerge.routing.compose import base_route

    two = _build(pool, "wemoe")
    ckpt = Checkpoint.open(two)
    w = base_route(ckpt, ckpt.manifest, [0, 1])
    assert w is not None and torch.allclose(w, torch.tensor([1.0, 1.0]))  # lambda 1, two experts: 1 / (2 - 1)
    assert base_route(ckpt, ckpt.manifest, [0]) is None
    model = _load(two)
    model.add_route("base", {u: w.tolist() for u in model.config.moerge["units"]})
    model.force_route("base")
    with torch.no_grad():
        out, ref = model(input_ids=IDS).logits, _load(pool["base"])(input_ids=IDS).logits
    assert (out - ref).abs().max() <= 1e-4


def test_add_expert_rank_takes_more_bytes_for_a_closer_copy(pool: dict, tmp_path: Path) -> None:
    """``rank``: the added full expert's own rank in twin units.  At full rank (hidden 32) its forced logits are the
    expert's; at the stored rank (2) they are not; old experts stay bit-identical either way.  A LoRA source or a
    checkpoint without a ranked kind is refused before anything is written."""
    raw = {"base": str(pool["base"]),
           "experts": [{"name": t, "source": str(s), "calibration": {"data": str(pool["data"][t]), "chat_template": True}}
                       for t, s in zip(TASKS[:2], pool["full"][:2])],
           "merge": {"method": "task_arithmetic", "lambda": 1.0},
           "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": "twin", "rank": 2},
                       "shared": "merge", "router": {"level": "sequence", "init": "prototype"}}}
    two = tmp_path / "two"
    moerge.build(recipe_from_dict(raw), two, force=True, progress=False)
    before = _forced(two)
    data = {TASKS[2]: {"data": str(pool["data"][TASKS[2]]), "chat_template": True}}
    outs = {}
    for rank in (None, 32):
        outs[rank] = tmp_path / f"r{rank}"
        add_expert(two, TASKS[2], pool["full"][2], data, out=outs[rank], rank=rank)
    with torch.no_grad():
        ref = _load(pool["full"][2])(input_ids=IDS).logits
    errors = {}
    for rank, folder in outs.items():
        forced = _forced(folder)
        for name in TASKS[:2]:
            assert torch.equal(forced[name], before[name]), (rank, name)
        errors[rank] = float((forced[TASKS[2]] - ref).abs().max())
        plan = json.loads((folder / "config.json").read_text())["moerge"]
        lin = next(iter(plan["units"].values()))["linears"]
        shapes = next(iter(lin.values()))["experts"]
        assert shapes[2]["U"][1] == (rank or 2) and shapes[0]["U"][1] == 2
    assert errors[32] <= 1e-4 < errors[None], errors
    assert (outs[32] / f"moerge_expert_{TASKS[2]}.safetensors").stat().st_size > \
        (outs[None] / f"moerge_expert_{TASKS[2]}.safetensors").stat().st_size
    snap = _snapshot(two)
    lora = tiny.make_lora_expert(pool["base"], tmp_path / "lora", seed=5, r=4, alpha=8)
    with pytest.raises(DataError, match="rank"):
        add_expert(two, "lora", lora, data, out=tmp_path / "x", rank=8)
    with pytest.raises(DataError, match="ranked kind"):
        add_expert(_build(pool, "bit1"), TASKS[2], pool["full"][2], data, out=tmp_path / "y", rank=8)
    assert _snapshot(two) == snap and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
