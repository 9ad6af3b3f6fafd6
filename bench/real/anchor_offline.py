"""Offline check of add-expert anchors on the full pool (issue 14): one left-out task T added as bit1 to the other
three, its routed linears rebuilt in plain tensors and scored on T's dev prompts, without building checkpoints.

    python -m bench.real.anchor_offline [--task tweets] [--n 200] [--variants plain,anchored,...]

The three-expert shared weight S is the task-arithmetic (lambda 1) merge of the others; each old expert's stored
delta is bit1 of its (optionally norm-folded) weight minus S.  Variants of T's 210 routed linears, every other
tensor T's own unless said:

* ``plain``: S + bit1(W_T - S) (add-expert before anchors);
* ``anchored``: ref + bit1(W_T - ref), ref = S + Σ_i c_i Δ_i, c the per-unit least-squares fit (add-expert now);
* ``anchored+static``: the same with the embeddings and final norm merged (as in the checkpoint);
* ``expert+static``: T's own linears with the merged embeddings and final norm;
* ``fold`` / ``fold-c-unfolded-only``: anchored with every input-norm scale folded into q/k/v and gate/up against the
  merged norm (as the build and add-expert do) and the merged layer norms; c fitted on all linears / on o_proj and
  down_proj only.

Prints the relative residual energy of ``plain`` and ``anchored`` and T's dev accuracy per variant (bench/RESULTS.md,
"pool `full`, add-expert with anchors").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.real"

import torch

from . import evaluate as ev
from .methods import REPO
from .newtask import FULL_EXPERTS

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return {k: v.float() for k, v in out.items()}


def bit1(delta: torch.Tensor) -> torch.Tensor:
    """The dequantised bit1 of ``delta`` (O, I): the build-side kind, then the serve-side math (`DELTAS`)."""
    from moerge.kinds import KINDS, KindConfig
    from moerge.modeling import DELTAS

    zero = torch.zeros_like(delta)
    return DELTAS["bit1"](KINDS.get("bit1").build(zero, delta, None, KindConfig()), zero).float()


def fit(deltas: dict[str, list[torch.Tensor]], target: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Per-unit least-squares weights c (E,) of ``target`` by ``deltas`` over the linears ``names``."""
    from moerge.routing.add_expert import anchor_weights

    n = len(next(iter(deltas.values())))
    gram, b = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for k in names:
        m = torch.stack([d.flatten() for d in deltas[k]]).double()
        gram += m @ m.T
        b += m @ target[k].flatten().double()
    return anchor_weights(gram, b).float()


def variants(base_dir: Path, task: str, wanted: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    base = state(base_dir)
    experts = {t: state(FULL_EXPERTS / t) for t in ev.TASKS}
    others = [t for t in ev.TASKS if t != task]
    shared = {k: base[k] + sum(experts[o][k] - base[k] for o in others) for k in base}

    def folded(who: str, k: str, fold: bool) -> torch.Tensor:
        lin = k.split(".")[-2]
        if not fold or lin not in NORM_OF:
            return experts[who][k]
        norm = ".".join(k.split(".")[:3]) + f".{NORM_OF[lin]}.weight"
        return experts[who][k] * (experts[who][norm] / shared[norm])[None, :]

    units: dict[str, list[str]] = {}
    for k in base:
        if k.endswith(".weight") and k.split(".")[-2] in LINEARS:
            units.setdefault(k.rsplit(".", 2)[0], []).append(k)
    statics = {k: shared[k] for k in shared if "embed" in k or k == "model.norm.weight"}
    norms = {k: shared[k] for k in shared if "layernorm" in k}
    out: dict[str, dict[str, torch.Tensor]] = {v: {} for v in wanted}
    energy = {"plain": [0.0, 0.0], "anchored": [0.0, 0.0]}
    for ks in units.values():
        for fold in (False, True):
            if not any(v.startswith("fold") == fold for v in wanted):
                continue
            deltas = {k: [bit1(folded(o, k, fold) - shared[k]) for o in others] for k in ks}
            target = {k: folded(task, k, fold) - shared[k] for k in ks}
            fits = {"all": fit(deltas, target, ks),
                    "unfolded": fit(deltas, target, [k for k in ks if k.split(".")[-2] not in NORM_OF])}
            for k in ks:
                w_t = folded(task, k, fold)
                for v in wanted:
                    if v.startswith("fold") != fold or v == "expert+static":
                        continue
                    c = None if v == "plain" else fits["unfolded" if v.endswith("unfolded-only") else "all"]
                    ref = shared[k] if c is None else shared[k] + sum(ci * d for ci, d in zip(c, deltas[k]))
                    out[v][k] = ref + bit1(w_t - ref)
                    if v in energy:
                        energy[v][0] += float((out[v][k] - w_t).pow(2).sum())
                        energy[v][1] += float((w_t - base[k]).pow(2).sum())
    for v, (num, den) in energy.items():
        if den:
            print(f"{v}: residual energy {num / den:.3f} x |tau_T|^2", flush=True)
    for v in wanted:
        if "static" in v:
            out[v].update(statics)
        if v.startswith("fold"):
            out[v].update(norms)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweets", choices=ev.TASKS)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--variants", default="plain,anchored,anchored+static,expert+static,fold,fold-c-unfolded-only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool-dir", type=Path, default=REPO.parent / "shared" / "pool")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "tools"))
    from get_base_model import get_base_model

    base_dir = get_base_model()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    weights = variants(base_dir, args.task, wanted)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    task = ev.load_tasks(args.pool_dir, tok, args.n)[ev.TASKS.index(args.task)]
    model = AutoModelForCausalLM.from_pretrained(FULL_EXPERTS / args.task, dtype=torch.float32).eval()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    for v in ["expert", *wanted]:
        model.load_state_dict({**own, **weights.get(v, {})})
        print(f"{args.task} {v}: {ev.accuracy(task, ev.predict(model, tok, task)):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
