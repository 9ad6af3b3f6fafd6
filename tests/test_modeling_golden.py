"""Golden outputs of the routed linears and of tiny built checkpoints, every expert kind, against a fixture.

The fixture ``golden/modeling.safetensors`` was recorded from the model code before the expert kinds became one class each
(issue 13); the refactor must not change a bit.  Covered: forced routes (one expert, a mix), a mixed-route batch
(one cached weight per route, or shared weight plus per-route deltas), many distinct routes (the per-row path),
token-level routes (few and many tokens: row kernels / dense Δ), with the weight cache (no grad, a first call and a
hit), under autograd (with the router trained and frozen, and the gradients), greedy decode steps, fp32 and bf16;
and ``RoutedLinear`` alone on route sums of 1, 0.5 and 0 (the `dense` special case of `combine`).

Where the fixture was recorded (same torch / transformers versions, CPU capability and CPU host, :func:`host`) the
outputs must be bit-identical; elsewhere they are compared with a tolerance (float rounding of other kernels).
Regenerate (only when a change of the numbers is intended): ``python tests/test_modeling_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from test_modeling import KINDS, build, left_pad, load, point_prototypes_at, prompts3, save
from torch import nn

from moerge.modeling.modeling_moerge import RoutedLinear, RouteSlot

FIXTURE = Path(__file__).resolve().parent / "golden" / "modeling.safetensors"
BASES = ("llama", "qwen2")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # across machines / versions only


@contextmanager
def one_thread() -> Iterator[None]:
    """CPU GEMMs may round differently with another thread count: record and compare on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def environment() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "host": host(),
    }


def host() -> str:
    """The CPU itself (model, cache size, instruction flags): the decode steps' one-row GEMMs are blocked by it, so
    greedy generation's fp32 logits differ in the last bits between two AVX512 hosts (measured 2026-12-07: 1e-7
    relative on 8 of the generations); between two AVX512 CPU models the full forwards differ too (2026-12-07)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "cache size", "flags")]
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def decoding(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in ("gen_ids", "gen_logits")


HEAD = 16


def keep(t: torch.Tensor | None) -> torch.Tensor:
    """A recorded output as 3 + HEAD float64 numbers: its size, a checksum (the sum of its elements times fixed
    random weights: any one-ulp change moves it), its L1 norm, and its last HEAD elements (zero-padded).  None
    (no gradient) is kept as size -1."""
    if t is None:
        return torch.cat([torch.tensor([-1.0, 0.0, 0.0]), torch.zeros(HEAD)]).double()
    flat = t.detach().double().flatten()
    g = torch.Generator().manual_seed(flat.numel())
    weights = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
    head = torch.zeros(HEAD, dtype=torch.float64)
    tail = flat[-HEAD:]
    head[: tail.numel()] = tail
    return torch.cat([torch.tensor([flat.numel(), (flat * weights).sum(), flat.abs().sum()]), head])


# --------------------------------------------------------------------------------------------------------------
# RoutedLinear alone
# --------------------------------------------------------------------------------------------------------------
IN, OUT = 37, 40  # I not a multiple of 8 (bit1 pad bits)
LINEAR_SHAPES = {
    "dense": lambda e: {"weight": [OUT, IN]},
    "wemoe": lambda e: {"delta": [OUT, IN]},
    "twin": lambda e: {"U": [OUT, 3], "V": [3, IN]},
    "bit1": lambda e: {"signs": [OUT, (IN + 7) // 8], "scale": [OUT]},
    "lora": lambda e: {"A": [(2, 0, 3)[e], IN], "B": [OUT, (2, 0, 3)[e]]},  # rank 0 is allowed
    "sparse": lambda e: {"indices": [(100, 7, 400)[e]], "values": [(100, 7, 400)[e]]},
}


def fill_expert(name: str, buf: torch.Tensor, g: torch.Generator) -> None:
    if name == "signs":
        signs = torch.randint(0, 256, buf.shape, generator=g, dtype=torch.uint8)
        signs[:, -1] &= (1 << (IN % 8)) - 1  # pad bits are 0
        buf.copy_(signs)
    elif name == "indices":
        idx = torch.randperm(OUT * IN, generator=g)[: buf.numel()]
        buf.copy_(idx.sort().values if buf.numel() % 2 else idx)  # sorted and shuffled
    else:
        buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)


def routed_linear(kind: str, dtype: torch.dtype) -> tuple[RoutedLinear, RouteSlot]:
    g = torch.Generator().manual_seed(KINDS.index(kind))
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(OUT, generator=g) * 0.2)
    shapes = [{**LINEAR_SHAPES[kind](e), "bias_delta": [OUT]} for e in range(3)]
    slot = RouteSlot()
    routed = RoutedLinear(lin, kind, shapes, slot)
    with torch.no_grad():
        for ex in routed.experts:
            for name, buf in ex.tensors().items():
                fill_expert(name, buf, g)
        if kind == "dense":  # W_e near W_s
            for ex in routed.experts:
                ex.weight.add_(routed.weight)
    return routed.to(dtype), slot


ROW_ROUTES = {
    "one": [[0.0, 1.0, 0.0]] * 2,
    "sum_half": [[0.3, 0.2, 0.0]] * 2,  # dense: W_s + Σ r_e (W_e - W_s)
    "zero": [[0.0, 0.0, 0.0]] * 2,
    "mixed": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]],
}


def token_route(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    """(B, T, E): top-2 of random probabilities, renormalised."""
    p = torch.softmax(torch.randn(b, t, 3, generator=g), -1)
    vals, idx = p.topk(2, -1)
    kept = torch.zeros_like(p).scatter(-1, idx, vals)
    return kept / kept.sum(-1, keepdim=True)


def linear_outputs(kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    routed, slot = routed_linear(kind, dtype)
    g = torch.Generator().manual_seed(100)
    out = {}
    for tokens in (3, 12):  # 12 tokens x 4 rows > 32: no row kernels
        routes = {name: torch.tensor(r) for name, r in ROW_ROUTES.items()}
        routes["tokens"] = token_route(4, tokens, g)
        for name, route in routes.items():
            x = torch.randn(route.shape[0], tokens, IN, generator=g).to(dtype)
            if route.dim() == 3:
                slot.set_tokens(route)
            else:
                slot.set_rows(route, max_groups=4)
            for grad in (False, True):
                out.update(linear_run(routed, x, grad, f"{kind}/{dtype}/{name}/T{tokens}/grad{int(grad)}"))
    return out


def linear_run(routed: RoutedLinear, x: torch.Tensor, grad: bool, key: str) -> dict:
    routed.weight.requires_grad_(grad)
    routed.weight.grad = None
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = routed(x)  # (B, T, O)
        again = routed(x)  # a cache hit without autograd
    out = {f"{key}/y": keep(y), f"{key}/again": keep(again)}
    if grad:
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        out[f"{key}/dx"], out[f"{key}/dw"] = keep(x.grad), keep(routed.weight.grad)
    routed.weight.requires_grad_(True)
    return out


# --------------------------------------------------------------------------------------------------------------
# tiny built checkpoints
# --------------------------------------------------------------------------------------------------------------
def logits_of(model, **kw) -> torch.Tensor:
    return model(**kw).logits


def model_outputs(tmp: Path, base: str, kind: str, level: str) -> dict[str, torch.Tensor]:
    config, sd, _, _ = build(base, kind, level, top_k=1 if level == "sequence" else 2)
    path = save(tmp / f"{base}_{kind}_{level}", config, sd)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load(path, dtype=dtype)
        runs = sequence_runs(model) if level == "sequence" else token_runs(model)
        out.update({f"{base}/{kind}/{level}/{dtype}/{k}": v for k, v in runs.items()})
    return out


def forced_runs(model, ids: torch.Tensor) -> dict:
    out = {}
    for name, route in (("forced1", "beta"), ("forced_mix", {"alpha": 3, "gamma": 1})):
        model.force_route(route)
        with torch.no_grad():
            out[name] = keep(logits_of(model, input_ids=ids))
            out[f"{name}_hit"] = keep(logits_of(model, input_ids=ids))
        out[f"{name}_grad"] = keep(logits_of(model, input_ids=ids))
    model.force_route(None)
    return out


def autograd_run(model, params: list[str], **kw) -> dict:
    model.zero_grad(set_to_none=True)
    y = logits_of(model, **kw)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    named = dict(model.named_parameters())
    out = {"logits": keep(y)}
    out.update({f"grad:{p}": keep(named[p].grad) for p in params if named[p].grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def greedy(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return {"gen_ids": keep(gen.sequences), "gen_logits": keep(torch.stack(gen.logits, 1))}  # (B, steps, V)


def first_linear(model) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, RoutedLinear))


def sequence_runs(model) -> dict:
    ids, mask = left_pad(prompts3())
    out = forced_runs(model, ids)
    point_prototypes_at(model, prompts3())  # three prompts, three routes
    with torch.no_grad():
        out["mixed"] = keep(logits_of(model, input_ids=ids, attention_mask=mask))
        out["mixed_hit"] = keep(logits_of(model, input_ids=ids, attention_mask=mask))
    params = [f"{first_linear(model)}.weight", "moerge_router.prototypes"]
    for k, v in autograd_run(model, params, input_ids=ids, attention_mask=mask).items():
        out[f"mixed_grad/{k}"] = v  # the route requires grad: per-row path
    model.moerge_router.requires_grad_(False)
    for k, v in autograd_run(model, params[:1], input_ids=ids, attention_mask=mask).items():
        out[f"mixed_frozen_router/{k}"] = v  # grouped rows, no weight cache
    model.moerge_router.requires_grad_(True)
    out.update(greedy(model, ids, mask))
    model._moerge.max_groups = 1  # 3 routes > 1: the per-row path
    with torch.no_grad():
        model.moerge_router.scale.fill_(3.0)  # soft: every expert weighs
    model.config.moerge["top_k"] = None
    with torch.no_grad():
        out["many_routes"] = keep(logits_of(model, input_ids=ids, attention_mask=mask))
    return out


def token_runs(model) -> dict:
    ids, mask = left_pad(prompts3())  # 3 x 10 = 30 tokens: row kernels
    g = torch.Generator().manual_seed(3)
    long_ids = torch.randint(3, 128, (3, 16), generator=g)  # 48 tokens: dense Δ
    out = forced_runs(model, ids)
    with torch.no_grad():
        out["tokens"] = keep(logits_of(model, input_ids=ids, attention_mask=mask))
        out["tokens_hit"] = keep(logits_of(model, input_ids=ids, attention_mask=mask))
        out["tokens_long"] = keep(logits_of(model, input_ids=long_ids))
    lin = first_linear(model)
    params = [f"{lin}.weight", f"{lin.rsplit('.', 1)[0]}.moerge_router.prototypes"]
    for k, v in autograd_run(model, params, input_ids=ids, attention_mask=mask).items():
        out[f"tokens_grad/{k}"] = v
    out.update(greedy(model, ids, mask))
    return out


def record() -> dict[str, torch.Tensor]:
    """Every golden output, keyed by case."""
    out = {}
    with one_thread(), tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            for dtype in (torch.float32, torch.bfloat16):
                out.update(linear_outputs(kind, dtype))
            for base in BASES:
                for level in ("sequence", "token"):
                    out.update(model_outputs(Path(tmp), base, kind, level))
    return out


def mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool,
               exact_decode: bool = True) -> list[str]:
    """Keys missing on either side, and outputs that differ: at all (``exact``; greedy generations only with
    ``exact_decode`` too, i.e. on the fixture's own host), or beyond float rounding."""
    bad = sorted(set(got) ^ set(want))
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        key_exact = exact and (exact_decode or not decoding(key))
        if not key_exact and chaotic(key):
            continue
        if key_exact:
            same = torch.equal(a, b)
        else:
            tol = TOL[torch.bfloat16 if "bfloat16" in key else torch.float32]
            same = a[0] == b[0] and torch.allclose(a[2:], b[2:], rtol=1e-2, atol=tol)
            same = same and abs(a[1] - b[1]) <= tol * max(float(a[0]), 1.0)
        if not same:
            bad.append(f"{key}: size, checksum, L1 {a[:3].tolist()} != {b[:3].tolist()}")
    return bad


def chaotic(key: str) -> bool:
    """Greedy generation in bfloat16 across CPUs: another GEMM kernel (AVX2 against the fixture's AVX512) rounds a
    near-tie the other way, one token flips and every later step differs (measured: 3 of the bf16 generations on an
    AVX2 machine).  Compared exactly on the fixture's own environment only; the bf16 forward outputs of every kind
    (forced, mixed, routed logits) stay compared within tolerance everywhere."""
    return "bfloat16" in key and key.rsplit("/", 1)[-1] in ("gen_ids", "gen_logits")


def load_fixture() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta, table = f.metadata(), f.get_tensor("outputs")  # (N, 3 + HEAD)
    keys = json.loads(meta.pop("keys"))
    return meta, dict(zip(keys, table))


def save_fixture(outputs: dict[str, torch.Tensor]) -> None:
    FIXTURE.parent.mkdir(exist_ok=True)
    meta = {**environment(), "keys": json.dumps(list(outputs))}
    save_file({"outputs": torch.stack(list(outputs.values()))}, str(FIXTURE), metadata=meta)


def test_outputs_match_the_golden_fixture() -> None:
    env, want = load_fixture()
    mine = environment()
    # bit for bit only on the fixture's own host: another CPU model of the same capability rounds full forwards
    # differently too (measured 2026-12-07: an "Intel Xeon Processor @ 2.80GHz" AVX512 host, 364 outputs ~1e-7
    # relative off); the fixture predates its ``host`` field, so it is compared within float rounding elsewhere
    exact = all(env.get(k) == mine[k] for k in ("torch", "transformers", "cpu", "host"))
    got = record()
    assert len(got) > 1000
    bad = mismatches(got, want, exact, exact)
    assert not bad, f"{len(bad)} outputs differ ({'exact' if exact else 'tolerance'}):\n" + "\n".join(
        bad[:40]
    )


def test_the_comparison_sees_a_one_ulp_change() -> None:
    t = torch.randn(3, 4, 128)
    bumped = t.clone()
    bumped[0, 0, 5] = torch.nextafter(bumped[0, 0, 5], torch.tensor(1e9))  # not in the kept head
    assert mismatches({"k": keep(bumped)}, {"k": keep(t)}, exact=True)
    assert not mismatches({"k": keep(t.clone())}, {"k": keep(t)}, exact=True)
    assert not mismatches({"k": keep(bumped)}, {"k": keep(t)}, exact=False)
    gen = "llama/dense/sequence/torch.float32/gen_logits"  # decoding: exact on the fixture's host only
    assert mismatches({gen: keep(bumped)}, {gen: keep(t)}, exact=True, exact_decode=True)
    assert not mismatches({gen: keep(bumped)}, {gen: keep(t)}, exact=True, exact_decode=False)
    assert mismatches({"k": keep(bumped)}, {"k": keep(t)}, exact=True, exact_decode=False)


if __name__ == "__main__":
    save_fixture(record())
    print(f"wrote {FIXTURE}")
