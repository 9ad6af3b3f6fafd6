"""New tasks on a built model (issue 14), on tiny models with separable synthetic tasks.

Contracts: ``remove-expert`` gives what a build without the expert gives (forced logits, shared: base) and a
remove + add round trip gives the original logits back; prompts of a task the router does not know take the
shared weights (the unknown-prompt detector) while known ones keep their route; ``calibrate --compose`` learns a
named route that ``force_route`` and the router pick, without changing any old route's output; bad inputs give
one line and leave the checkpoint byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moerge
from moerge.cli import main
from moerge.errors import CheckpointError, DataError, MoergeError, NotSupportedError
from moerge.recipe import recipe_from_dict
from moerge.routing.add_expert import add_expert
from moerge.routing.calibrate import CalibrateOptions, calibrate
from moerge.routing.compose import ComposeOptions, compose
from moerge.routing.data import Defaults
from moerge.routing.remove_expert import remove_expert
from moerge.routing.unknown import (
    auroc,
    choose_threshold,
    fit_unknown,
    out_of_fold_scores,
    route_thresholds,
    tail_quantile,
    with_route_thresholds,
)
from moerge.testing import tiny

TASKS = list(tiny.TASKS)  # sentiment, topic, math, code
IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
ANSWERS = {"sentiment": "good", "topic": "news", "math": "42", "code": "python"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """qwen2 (q/k/v biases, tied): 4 LoRA experts, per-task data (40 calibration + 25 fresh prompts) and
    prompt -> answer pairs for each task."""
    root = tmp_path_factory.mktemp("newtask")
    base = tiny.make_base(root / "base", family="qwen2", hidden=32, layers=2, tie=True, seed=0)
    loras = {t: tiny.make_lora_expert(base, root / f"lora_{t}", seed=40 + i, r=4, alpha=8, scale=0.3)
             for i, t in enumerate(TASKS)}
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 40, seed=1) for t in TASKS}
    fresh = {t: tiny.make_task_data(root / "fresh" / f"{t}.jsonl", t, 25, seed=2) for t in TASKS}
    pairs = {}
    for t in TASKS:
        rows = [json.loads(line) for line in data[t].read_text().splitlines()]
        pairs[t] = root / "pairs" / f"{t}.jsonl"
        pairs[t].parent.mkdir(exist_ok=True)
        pairs[t].write_text("".join(json.dumps({"prompt": r["prompt"], "answer": ANSWERS[t]}) + "\n" for r in rows))
    pool = {"root": root, "base": base, "lora": loras, "data": data, "fresh": fresh, "pairs": pairs}
    pool["three"] = _calibrated(pool, "three", TASKS[:3], unknown="shared")
    return pool


def _build(pool: dict, name: str, tasks: list[str], kind: str = "lora", shared: str = "base") -> Path:
    raw = {"base": str(pool["base"]), "experts": [{"name": t, "source": str(pool["lora"][t])} for t in tasks],
           "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": kind}, "shared": shared,
                       "router": {"level": "sequence", "init": "uniform"}}}
    out = pool["root"] / name
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def _mapping(pool: dict, tasks: list[str]) -> dict:
    return {t: {"data": str(pool["data"][t]), "chat_template": True} for t in tasks}


def _calibrated(pool: dict, name: str, tasks: list[str], **opts: str) -> Path:
    out = _build(pool, name, tasks)
    calibrate(out, _mapping(pool, tasks), options=CalibrateOptions(**opts))
    return out


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _forced(folder: Path, routes: list) -> dict[str, torch.Tensor]:
    model, out = _load(folder), {}
    for r in routes:
        model.force_route(r)
        with torch.no_grad():
            out[str(r)] = model(input_ids=IDS).logits
    return out


def _routed(folder: Path, pool: dict, tasks: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per task: the model's own routes (B, O) and logits for the fresh prompts (one batch per task)."""
    model, tok = _load(folder), AutoTokenizer.from_pretrained(folder)
    routes, logits = {}, {}
    for t in tasks:
        rows = [json.loads(line)["prompt"] for line in pool["fresh"][t].read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False)
                 for r in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits[t] = model(**enc).logits
        routes[t] = model.last_routes()
    return routes, logits


# ---------------------------------------------------------------- remove-expert

def test_remove_expert_equals_a_build_without_it(pool: dict, tmp_path: Path) -> None:
    four = _copy(_calibrated(pool, "four", TASKS), tmp_path, "four")
    original = _forced(four, TASKS)
    result = remove_expert(four, "topic")
    assert result["what"] == "expert" and result["tensors_dropped"] > 0 and result["shards_rewritten"] >= 1
    without = _build(pool, "without_topic", ["sentiment", "math", "code"])
    rest = ["sentiment", "math", "code"]
    after, ref = _forced(four, rest), _forced(without, rest)
    for name in rest:
        assert torch.equal(after[name], ref[name]), name  # == a build without it (shared: base)
        assert torch.equal(after[name], original[name]), name  # and what that expert gave before
    plan = json.loads((four / "config.json").read_text())["moerge"]
    assert plan["experts"] == rest
    assert all(len(lin["experts"]) == 3 for u in plan["units"].values() for lin in u["linears"].values())
    index = json.loads((four / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(".experts.3." in n for n in index) and any(".experts.2." in n for n in index)
    report = json.loads((four / "calibration.json").read_text())
    assert "topic" not in report["data"]["sources"]  # later calibrations do not look for its data


def test_remove_then_add_gives_the_original_back(pool: dict, tmp_path: Path) -> None:
    four = _calibrated(pool, "four_rt", TASKS)
    work = _copy(four, tmp_path)
    remove_expert(work, "sentiment")
    add_expert(work, "sentiment", pool["lora"]["sentiment"], _mapping(pool, ["sentiment"]))
    assert json.loads((work / "config.json").read_text())["moerge"]["experts"] == [*TASKS[1:], "sentiment"]
    before, after = _forced(four, TASKS), _forced(work, TASKS)
    for name in TASKS:
        assert (before[name] - after[name]).abs().max() <= 1e-5, name
    r0, l0 = _routed(four, pool, TASKS)
    r1, l1 = _routed(work, pool, TASKS)
    order = [TASKS.index(n) for n in [*TASKS[1:], "sentiment"]]
    for t in TASKS:
        # the same routes (columns in the new expert order), up to float summation order in the router fit
        assert (r0[t][:, order] - r1[t]).abs().max() <= 1e-5, (t, (r0[t][:, order] - r1[t]).abs().max())
        one = r1[t].max(-1).values == 1.0  # a single expert: exactly its logits
        assert (l0[t][one] - l1[t][one]).abs().max() <= 1e-5, t
        assert (l0[t] - l1[t]).abs().max() <= 1e-3, t  # soft (fallback) mixes: the experts are summed in
        # another order


def test_remove_expert_refusals_leave_the_checkpoint_unchanged(pool: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(pool["three"], tmp_path)
    before = _snapshot(ckpt)
    with pytest.raises(DataError, match=r"no expert or route 'topc' \(did you mean 'topic'\?\)"):
        remove_expert(ckpt, "topc")
    one = _copy(_build(pool, "one", ["math"]), tmp_path, "one")
    one_before = _snapshot(one)
    with pytest.raises(DataError, match="last expert"):
        remove_expert(one, "math")
    assert main(["remove-expert", str(ckpt), "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no expert or route 'nope'" in err[0]
    assert main(["remove-expert", str(ckpt), "math", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "calibration data file not found" in capsys.readouterr().err
    assert _snapshot(ckpt) == before and _snapshot(one) == one_before


def test_remove_expert_cli_recalibrates(pool: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(pool["three"], tmp_path)
    data = tmp_path / "data.yaml"
    data.write_text(json.dumps(_mapping(pool, ["sentiment", "math"])))
    assert main(["remove-expert", str(ckpt), "topic", "--data", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "removed expert 'topic'" in out and "routing accuracy" in out
    report = json.loads((ckpt / "calibration.json").read_text())
    assert report["experts"] == ["sentiment", "math"] and report["heldout"]["accuracy"] >= 0.9
    assert report["unknown"] is not None  # the detector is kept (refitted)
    quantiles = report["unknown"]["out_of_fold_quantiles"]  # the thresholds other quantiles would choose
    assert list(quantiles) == ["0.9", "0.95", "0.98", "0.99", "0.995", "1"]
    from moerge.routing.cli import UNKNOWN_QUANTILE
    from moerge.routing.unknown import QUANTILE

    assert UNKNOWN_QUANTILE == QUANTILE == CalibrateOptions().unknown_quantile
    assert quantiles[f"{QUANTILE:g}"] == pytest.approx(report["unknown"]["threshold"], abs=1e-5)
    below = [v for q, v in quantiles.items() if q != "1"]  # "1": the largest score (an exponential tail's 0.995 may
    assert below == sorted(below)  # lie beyond it)


# ---------------------------------------------------------------- unknown prompts

def test_unknown_prompts_take_the_shared_weights(pool: dict) -> None:
    plan = json.loads((pool["three"] / "config.json").read_text())["moerge"]
    assert plan["unknown"]["score"] == "relative_mahalanobis" and plan["unknown"]["segments"] == 4
    model, tok = _load(pool["three"]), AutoTokenizer.from_pretrained(pool["three"])
    rates = {}
    for e, t in enumerate(TASKS):
        rows = [json.loads(line)["prompt"] for line in pool["fresh"][t].read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False)
                 for r in rows]
        model.reset_moerge_stats()
        with torch.no_grad():
            model(**tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        routes = model.last_routes()
        shared = routes.sum(-1) == 0  # the zero route: the shared weights only
        assert model.moerge_stats["unknown_rows"] == int(shared.sum())
        rates[t] = (float(shared.float().mean()), float((routes.argmax(-1) == e)[~shared].float().mean()))
    for t in TASKS[:3]:
        assert rates[t][0] <= 0.1 and rates[t][1] >= 0.9, rates  # known tasks keep their expert
    assert rates["code"][0] >= 0.5, rates  # most prompts of the unknown task fall back (0.64 here)


def test_unknown_detector_pure_pieces() -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 16, generator=gen) * 3
    y = torch.arange(3).repeat_interleave(40)
    x = means[y] + torch.randn(120, 16, generator=gen)
    det = fit_unknown(x, y, 3)
    far = torch.randn(40, 16, generator=gen) * 3 + 8
    near = means[torch.arange(3).repeat(10)] + torch.randn(30, 16, generator=gen)
    assert auroc(det.score(near), det.score(far)) >= 0.99
    threshold = choose_threshold(out_of_fold_scores(x, y, 3), 0.9)
    assert float((det.score(near) > threshold).float().mean()) <= 0.25
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 3.0])) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == pytest.approx(0.5)


def test_per_route_thresholds_give_each_route_its_share() -> None:
    """Routes of different spread: one global quantile makes the wide route lose far more than 1 - q of its
    prompts; per-route thresholds keep every route near its share, and the stored offsets decide exactly as the
    per-route rule (known iff some route o has d_o - back <= t_o)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 16, generator=gen) * 4
    spread = torch.tensor([0.5, 0.5, 2.0])  # route 2 is wide
    y = torch.arange(3).repeat_interleave(200)
    x = means[y] + torch.randn(600, 16, generator=gen) * spread[y, None]
    det = fit_unknown(x, y, 3)
    fresh = means[y] + torch.randn(600, 16, generator=gen) * spread[y, None]
    q = 0.9
    glob = choose_threshold(out_of_fold_scores(x, y, 3), q)
    lost_global = [float((det.score(fresh[y == o]) > glob).float().mean()) for o in range(3)]
    t = route_thresholds(out_of_fold_scores(x, y, 3, own=True), y, 3, q)
    per, top = with_route_thresholds(det, t)
    lost_route = [float((per.score(fresh[y == o]) > top).float().mean()) for o in range(3)]
    assert lost_global[2] > 0.2 and lost_global[0] < 0.02, lost_global  # the wide route pays for the global one
    assert max(lost_route) <= 0.15, lost_route  # ~1 - q each
    rule = (det.route_scores(fresh) > t).all(-1)  # unknown under the per-route rule
    assert torch.equal(per.score(fresh) > top, rule)
    assert float(t.max()) == pytest.approx(top) and float(per.offsets.max()) == 0.0
    # an output without prompts gets the quantile over all prompts
    assert route_thresholds(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), 3, 1.0).tolist() == [2.0, 3.0, 3.0]


def test_per_route_detector_in_the_checkpoint(pool: dict, tmp_path: Path) -> None:
    """A new detector is per-route by default (offsets stored, ``per_route`` in the manifest), the model's score
    is the library's formula with the offsets, ``keep`` keeps the choice and ``global`` drops the offsets."""
    from moerge.checkpoint.folder import Checkpoint
    from moerge.modeling.modeling_moerge import segment_pool

    def read_routers(folder: Path) -> dict:
        return Checkpoint.open(folder, routed=True).routers()

    plan = json.loads((pool["three"] / "config.json").read_text())["moerge"]
    assert plan["unknown"]["per_route"] is True
    ckpt = _copy(pool["three"], tmp_path)
    det = next(iter(read_routers(ckpt).values())).unknown
    assert det is not None and det.offsets is not None and det.offsets.shape == (3,)
    model = _load(ckpt)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, model.config.hidden_size, generator=gen)
    with torch.no_grad():
        got = model.moerge_router.unknown(x, None)
    want = det.score(segment_pool(x, None, plan["unknown"]["segments"]))
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # the offsets take part: without them the score differs
        model.moerge_router.unknown.offsets.zero_()
        assert not torch.allclose(model.moerge_router.unknown(x, None), want, atol=1e-5)
    bad = _copy(pool["three"], tmp_path, "bad")  # the offsets without the manifest's flag: refused, not ignored
    config = json.loads((bad / "config.json").read_text())
    del config["moerge"]["unknown"]["per_route"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="offsets.*present without"):
        read_routers(bad)
    calibrate(ckpt, _mapping(pool, TASKS[:3]))  # keep
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]["per_route"] is True
    calibrate(ckpt, _mapping(pool, TASKS[:3]), options=CalibrateOptions(unknown_thresholds="global"))
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert "per_route" not in plan["unknown"]
    assert next(iter(read_routers(ckpt).values())).unknown.offsets is None
    assert not hasattr(_load(ckpt).moerge_router.unknown, "offsets")


def test_router_scores_are_float32_under_autocast(pool: dict) -> None:
    """Routes and the detector are calibrated in float32; under bf16 autocast (how the bench and many users
    serve) the router's cosines and the detector's Mahalanobis distances must not drop to bf16 matmuls."""
    model = _load(pool["three"])
    router = model.moerge_router
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 9, model.config.hidden_size, generator=gen) * 4 + 1
    with torch.no_grad():
        want = (router.probs(x.mean(1)), router.unknown(x, None))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = (router.probs(x.mean(1)), router.unknown(x, None))
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16  # autocast is on here
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)


def test_tail_quantile_reaches_beyond_the_sample() -> None:
    """With 51 scores the empirical 0.995 quantile is about the sample maximum (new scores exceed it ~2% of the
    time); the exponential tail's estimate of exponential data is near the true quantile and exceeded less."""
    gen = torch.Generator().manual_seed(0)
    true = -torch.log(torch.tensor(0.005)).item()
    emp, tail = [], []
    for _ in range(200):
        s = -torch.log(torch.rand(51, generator=gen))  # Exp(1)
        emp.append(choose_threshold(s, 0.995, "empirical"))
        tail.append(choose_threshold(s, 0.995, "exponential"))
        assert tail[-1] == tail_quantile(s, 0.995)
    exceed = lambda ts: sum(torch.exp(-torch.tensor(ts))).item() / len(ts)  # P(new > t) for Exp(1)
    assert abs(sum(tail) / len(tail) - true) < 0.3 < true - sum(emp) / len(emp)
    assert exceed(tail) < 0.6 * exceed(emp)
    s = torch.arange(20.0)
    assert tail_quantile(s, 0.9) == pytest.approx(float(s.quantile(0.9)))  # at or below the tail's start: empirical
    assert tail_quantile(s, 1.0) == 19.0
    assert tail_quantile(s, 0.99) > 19.0  # beyond the largest score
    one = torch.tensor([0.0] * 19 + [5.0])  # one score above u: empirical
    assert tail_quantile(one, 0.99) == pytest.approx(float(one.quantile(0.99)))


def test_unknown_tail_in_the_checkpoint(pool: dict, tmp_path: Path) -> None:
    """A new detector's tail is exponential (written to the manifest), later calibrations keep the checkpoint's,
    `empirical` drops it (an absent tail reads as empirical); the exponential per-route thresholds reach beyond
    the empirical ones at q 0.998."""
    ckpt = _copy(pool["three"], tmp_path)
    data = _mapping(pool, TASKS[:3])
    calibrate(ckpt, data, options=CalibrateOptions(unknown="none"))
    calibrate(ckpt, data, options=CalibrateOptions(unknown="shared"))  # a new detector
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]["tail"] == "exponential"
    emp = calibrate(ckpt, data, options=CalibrateOptions(unknown_quantile=0.998, unknown_tail="empirical"))["unknown"]
    assert "tail" not in json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]
    calibrate(ckpt, data)  # keep: empirical stays
    assert "tail" not in json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]
    rep = calibrate(ckpt, data, options=CalibrateOptions(unknown_quantile=0.998, unknown_tail="exponential"))["unknown"]
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]["tail"] == "exponential"
    for name, t in rep["route_thresholds"].items():
        assert t["0.998"] >= t["0.9"] and t["1"] == emp["route_thresholds"][name]["1"]  # the maximum stays
    assert any(t["0.998"] > t["1"] for t in rep["route_thresholds"].values())
    calibrate(ckpt, data)  # keep
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]["tail"] == "exponential"
    calibrate(ckpt, data, options=CalibrateOptions(unknown_tail="empirical"))
    assert "tail" not in json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"]
    with pytest.raises(DataError, match="unknown_tail"):
        calibrate(ckpt, data, options=CalibrateOptions(unknown_tail="gumbel"))  # type: ignore[arg-type]
    config = json.loads((ckpt / "config.json").read_text())
    config["moerge"]["unknown"]["tail"] = "gumbel"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tail"):
        calibrate(ckpt, data)


def test_unknown_keep_and_none(pool: dict, tmp_path: Path) -> None:
    ckpt = _copy(pool["three"], tmp_path)
    calibrate(ckpt, _mapping(pool, TASKS[:3]))  # default: keep (refit) the detector
    assert json.loads((ckpt / "config.json").read_text())["moerge"]["unknown"] is not None
    calibrate(ckpt, _mapping(pool, TASKS[:3]), options=CalibrateOptions(unknown="none"))
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    assert "unknown" not in plan
    model = _load(ckpt)
    assert "unknown_rows" not in model.moerge_stats and not hasattr(model.moerge_router, "unknown")


# ---------------------------------------------------------------- composed routes

def test_runtime_route_and_the_zero_route(pool: dict) -> None:
    model = _load(pool["three"])
    units = list(model.config.moerge["units"])
    logits = {}
    for route in ("sentiment", {}, None):
        model.force_route(route)
        with torch.no_grad():
            logits[str(route)] = model(input_ids=IDS).logits
    model.add_route("same", {u: [1.0, 0.0, 0.0] for u in units})
    model.add_route("none", {})
    assert model.route_names == [*TASKS[:3], "same", "none"]
    for name, ref in (("same", "sentiment"), ("none", "{}")):
        model.force_route(name)
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, logits[ref]), name
    with pytest.raises(ValueError, match="already an expert or route"):
        model.add_route("math", {})


@pytest.fixture(scope="module")
def composed(pool: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    ckpt = _copy(pool["three"], tmp_path_factory.mktemp("composed"))
    report = compose(ckpt, pool["pairs"]["code"], "code",
                     options=CalibrateOptions(defaults=Defaults(chat_template=True)),
                     compose_options=ComposeOptions(steps=8, lr=0.2))
    return ckpt, report


def test_compose_learns_a_named_route(pool: dict, composed: tuple[Path, dict]) -> None:
    ckpt, report = composed
    c = report["compose"]
    assert c["route"] == "code" and c["over"] == TASKS[:3] and c["n"] == 32
    assert c["final_loss"] < min(c["start_losses"].values())  # better than every simple route on the examples
    plan = json.loads((ckpt / "config.json").read_text())["moerge"]
    weights = plan["routes"]["code"]
    assert set(weights) == set(plan["units"]) and all(len(w) == 3 for w in weights.values())
    assert report["experts"] == [*TASKS[:3], "code"] and report["heldout"]["accuracy"] >= 0.9
    routes, _ = _routed(ckpt, pool, TASKS)
    assert float((routes["code"].argmax(-1) == 3).float().mean()) >= 0.9  # the router picks the route
    model = _load(ckpt)
    model.force_route("code")
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    # force_route("code") == the stored per-unit mix applied as a runtime route
    ref = _load(pool["three"])
    ref.add_route("again", weights)
    ref.force_route("again")
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=IDS).logits, out, atol=1e-6)


def test_compose_keeps_old_routes_and_survives_add_and_remove(pool: dict, composed: tuple[Path, dict],
                                                              tmp_path: Path) -> None:
    ckpt, _ = composed
    before = _forced(pool["three"], TASKS[:3])
    work = _copy(ckpt, tmp_path)
    after = _forced(work, [*TASKS[:3], "code"])
    for name in TASKS[:3]:
        assert torch.equal(before[name], after[name]), name  # old experts' outputs bit-identical
    add_expert(work, "extra", pool["lora"]["code"], {"extra": {"data": str(pool["data"]["code"]),
                                                               "chat_template": True}})
    plan = json.loads((work / "config.json").read_text())["moerge"]
    assert plan["experts"] == [*TASKS[:3], "extra"] and all(len(w) == 4 and w[3] == 0.0
                                                           for w in plan["routes"]["code"].values())
    grown = _forced(work, ["code", *TASKS[:3]])
    for name in ["code", *TASKS[:3]]:
        assert torch.equal(grown[name], after[name]), name  # the route ignores the new expert
    remove_expert(work, "code")
    assert "routes" not in json.loads((work / "config.json").read_text())["moerge"]
    assert _load(work).route_names == [*TASKS[:3], "extra"]


def test_compose_refusals_leave_the_checkpoint_unchanged(pool: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(pool["three"], tmp_path)
    before = _snapshot(ckpt)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "hi", "expert": "math"}) + "\n")
    empty_answer = tmp_path / "empty_answer.jsonl"
    empty_answer.write_text(json.dumps({"prompt": "hi", "answer": "  "}) + "\n")
    cases = [
        ({"data": pool["pairs"]["code"], "name": "math"}, DataError, "already has an expert 'math'"),
        ({"data": no_answer, "name": "x"}, DataError, "answer: no such answer field"),
        ({"data": empty_answer, "name": "x"}, DataError, "row 0: the answer must be a non-empty text"),
        ({"data": pool["pairs"]["code"], "name": "x", "over": []}, DataError, "no experts to compose"),
        ({"data": pool["pairs"]["code"], "name": "x", "over": ["maths"]}, DataError, "unknown expert 'maths'"),
        ({"data": pool["root"] / "data.yaml", "name": "x"}, DataError, "not a mapping of experts"),
    ]
    for kw, err, message in cases:
        with pytest.raises(err, match=message):
            compose(ckpt, kw["data"], kw["name"], compose_options=ComposeOptions(over=kw.get("over"), steps=0))
        assert _snapshot(ckpt) == before
    assert main(["calibrate", str(ckpt), "--data", str(no_answer), "--compose", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such answer field" in err[0]
    assert main(["calibrate", str(ckpt), "--data", str(pool["pairs"]["code"]), "--compose", "x",
                 "--compose-over", ","]) == 2
    assert "no experts to compose" in capsys.readouterr().err
    assert _snapshot(ckpt) == before


def test_compose_needs_a_sequence_router(pool: dict, tmp_path: Path) -> None:
    raw = {"base": str(pool["base"]), "experts": [{"name": t, "source": str(pool["lora"][t])} for t in TASKS[:2]],
           "routing": {"select": {"all": True}, "modules": "mlp", "expert": {"kind": "lora"},
                       "router": {"level": "token", "init": "uniform"}}}
    out = tmp_path / "token"
    moerge.build(recipe_from_dict(raw), out, progress=False)
    with pytest.raises(NotSupportedError, match="sequence-level router"):
        compose(out, pool["pairs"]["code"], "code")


def test_manifest_rejects_malformed_routes(pool: dict, tmp_path: Path) -> None:
    ckpt = _copy(pool["three"], tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    unit = next(iter(config["moerge"]["units"]))
    config["moerge"]["routes"] = {"bad": {unit: [1.0]}}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected 3 numbers"):
        calibrate(ckpt, _mapping(pool, TASKS[:3]))
    assert isinstance(CheckpointError(None, None, "x"), MoergeError)


def test_compose_autocasts_only_where_the_cpu_has_bf16_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bf16 GEMM instructions (AVX2 only) torch's CPU bf16 GEMM is ~16x slower than fp32: by default the
    composed route's forwards run in fp32 there, under bf16 autocast elsewhere; ``amp`` overrides both."""
    import moerge.dtypes
    from moerge.routing import compose as comp

    seen: list[bool] = []
    real = torch.autocast

    def spy(device: str, dtype: torch.dtype, enabled: bool = True) -> object:
        seen.append(enabled)
        return real(device, dtype=dtype, enabled=enabled)

    monkeypatch.setattr(comp.torch, "autocast", spy)
    model = torch.nn.Module()
    model.forward = lambda **kw: type("Out", (), {"logits": torch.zeros(1, 3, 5)})()  # type: ignore[method-assign]
    batch = {"attention_mask": torch.ones(1, 3, dtype=torch.long), "input_ids": torch.zeros(1, 3, dtype=torch.long),
             "keep": 3, "targets": torch.zeros(1, 2, dtype=torch.long)}
    for native in (False, True):
        monkeypatch.setattr(moerge.dtypes, "cpu_bf16_native", lambda native=native: native)
        for amp, want in ((None, native), (True, True), (False, False)):
            seen.clear()
            comp.answer_loss(model, batch, ComposeOptions(amp=amp).autocast())
            assert seen == [want], (native, amp)


@pytest.mark.parametrize(("kind", "amp"), [(k, False) for k in ("dense", "wemoe", "twin", "bit1", "lora", "sparse")]
                         + [("twin", True)])
def test_learned_mix_gradients_equal_autograd_through_each_delta(tmp_path: Path, kind: str, amp: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitting a composed route runs `LearnedMixLinear` (x kept, W and Δ_e rebuilt in backward); its loss and the
    gradients of every unit's mix equal plain autograd through x W_s^T + Σ_e w_e (x Δ_e^T + bias_delta_e)."""
    from test_modeling import build, ids_batch, load, save

    from moerge.modeling import modeling_moerge as mm

    config, sd, _, _ = build("qwen2", kind, "sequence", seed=3)  # qwen2: biases, so bias_delta's gradient too
    model = load(save(tmp_path / "m", config, sd)).requires_grad_(False)
    model.add_route("new", {})
    model.force_route("new")
    lins = [m for m in model.modules() if isinstance(m, mm.RoutedLinear)]
    ids = ids_batch(b=3, t=6)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        mixes = [torch.randn(1, len(lin.experts), generator=g).requires_grad_() for lin in lins]
        for lin, mix in zip(lins, mixes):
            lin.set_mix(mix)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # compose's amp: bf16 products
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [m.grad for m in mixes]

    calls = []
    real = mm.LearnedMixLinear.apply
    monkeypatch.setattr(mm.LearnedMixLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fast_loss, fast = loss_and_grads()
    assert len(calls) == len(lins)  # every routed linear took the fast path

    def reference(x: torch.Tensor, w: torch.Tensor, lin: mm.RoutedLinear) -> torch.Tensor:
        y = torch.nn.functional.linear(x, lin.weight, lin.bias)
        for e in range(len(lin.experts)):
            y = y + w[e] * lin.apply_delta(e, x, caching=False)
        return y

    monkeypatch.setattr(mm.LearnedMixLinear, "apply", reference)
    ref_loss, ref = loss_and_grads()
    assert all(r.abs().sum() > 0 for r in ref)  # the test has something to compare
    if amp:  # bf16: each path rounds its own products; compare the whole gradient
        a, b = torch.cat([g.flatten() for g in fast]), torch.cat([g.flatten() for g in ref])
        assert abs(float(fast_loss - ref_loss)) <= 1e-2 * float(ref_loss)
        assert float((a - b).norm() / b.norm()) <= 0.05
        return
    assert torch.allclose(fast_loss, ref_loss, atol=1e-5)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)


def test_bench_threshold_table_reads_per_route_thresholds() -> None:
    """bench.real.newtask's offline fallback rates follow the detector's rule: with per-route thresholds a prompt
    falls back only when it is beyond every route's own threshold."""
    from bench.real.newtask import detector_rates

    scores = {"a": [[0.0, 5.0], [3.0, 5.0]], "b": [[5.0, 1.0], [5.0, 5.0]]}  # (N, O) relative distances
    r = {"three": {"unknown": {"route_thresholds": {"x": {"0.9": 1.0, "1": 4.0}, "y": {"0.9": 2.0, "1": 2.0}}}},
         "detector_route_scores": scores}
    assert detector_rates(r, "three", ["a"]) == [0.5, 0.0]  # [3, 5] is beyond x (1) and y (2) at 0.9 only
    assert detector_rates(r, "three", ["b"]) == [0.5, 0.5]
    r = {"three": {"unknown": {"out_of_fold_quantiles": {"0.9": 2.5}}}, "detector_scores": {"a": [1.0, 3.0]}}
    assert detector_rates(r, "three", ["a"]) == [0.5] and detector_rates(r, "add", ["a"]) is None
