"""Activation-weighted approximation error of expert deltas, and what each storage option recovers.  Pure math.

For a linear with shared weight W_s and expert weight W_e, Δ = W_e - W_s (O, I).  Over expert e's calibration
tokens X_e (N, I), the output error of storing an approximation Δ̂ instead of Δ is

    err(Δ̂) = ||(Δ - Δ̂) X_eᵀ||² = tr((Δ - Δ̂) C_e (Δ - Δ̂)ᵀ),    C_e = Σ_t x_t x_tᵀ = X_eᵀ X_e (I, I)

so every option is scored from the second moment C_e alone, without re-running the model:

* ``none``: Δ̂ = 0 (the unit is merged for this expert), err = tr(Δ C Δᵀ);
* ``twin`` rank r: with a factor L of the damped C (L Lᵀ = C + αI), the best rank-r Δ̂ in this metric is the
  truncated SVD of Δ L mapped back, Δ̂ = U_r S_r (V_rᵀ L⁻¹) (activation-aware SVD as in SVD-LLM, Wang et al. 2024,
  https://arxiv.org/abs/2403.07378; ASVD, https://arxiv.org/abs/2312.05821); err(r) = Σ_{i>r} s_i², one SVD
  gives every rank.  Stored as plain factors U (O, r), V (r, I): the model side is unchanged;
* ``bit1``: Δ̂ = diag(s) sign(Δ) with the per-row scale that minimises the activation error for those signs;
* ``sparse`` density d: the entries with the largest |Δ_ij|² C_jj kept exactly;
* ``dense``: exact, err = 0.

The damping α (a fraction of the mean diagonal of C, as GPTQ's ``percdamp``) keeps the whitening finite in
directions the calibration tokens never visit; the errors are reported in the undamped metric.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..linalg import dense_operator, randomized_factors
from ..merge.sparsify import keep_count

DAMP = 0.01  # damping of the whitening, as a fraction of mean(diag(C))


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """x (N, I) -> C = xᵀ x (I, I) in float64 (the product in float32, accumulated in float64 by the caller)."""
    x32 = x.reshape(-1, x.shape[-1]).float()  # (N, I)
    return (x32.T @ x32).double()  # (I, I)


def quad_error(r: torch.Tensor, c: torch.Tensor) -> float:
    """tr(R C Rᵀ) for R (O, I), C (I, I) (the product in float32, the sum in float64)."""
    r32 = r.float()
    return float(((r32 @ c.float()) * r32).sum(dtype=torch.float64))


def damped(c: torch.Tensor, damp: float) -> torch.Tensor:
    """C + αI with α = ``damp`` * mean(diag(C)) (float64)."""
    c = c.double()
    alpha = damp * float(c.diagonal().mean().clamp_min(1e-30))
    return c + alpha * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


@dataclass(frozen=True)
class Whitener:
    """The lower Cholesky factor L of C + αI (float64): ||R L||² = tr(R (C + αI) Rᵀ)."""

    chol: torch.Tensor

    @classmethod
    def of(cls, c: torch.Tensor, damp: float = DAMP) -> Whitener:
        return cls(torch.linalg.cholesky(damped(c, damp)))  # (I, I)

    def whiten(self, delta: torch.Tensor) -> torch.Tensor:
        """Δ (O, I) -> Δ L (O, I), float64."""
        return delta.double() @ self.chol

    def unwhiten(self, v: torch.Tensor) -> torch.Tensor:
        """A right factor in the whitened space V (r, I) -> V L⁻¹ (r, I): solves X L = V."""
        return torch.linalg.solve_triangular(self.chol, v.double(), upper=False, left=False)


def twin_spectrum(delta: torch.Tensor, wh: Whitener) -> torch.Tensor:
    """Squared singular values (k,) of Δ L, descending (the eigenvalues of its smaller Gram matrix): the damped
    error of the best rank-r factors is their sum beyond r."""
    m = delta.float() @ wh.chol.float()  # (O, I) Δ L in float32: the tail sums need ~6 digits, not 15
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m  # (k, k), k = min(O, I)
    return torch.linalg.eigvalsh(gram.double()).flip(0).clamp_min(0)


def twin_factors(delta: torch.Tensor, wh: Whitener, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-``rank`` factors of Δ (O, I): U (O, r) with singular values folded in, V (r, I).
    Small ranks use a randomized SVD (Halko et al. 2011, 4 power iterations; :func:`moerge.linalg.randomized_factors`
    in float64, seeded by its own generator, never the global RNG that the build's worker threads share), the
    others the full one."""
    m = wh.whiten(delta)  # (O, I) float64
    k = min(m.shape)
    if 4 * (rank + 8) <= k:  # a sketch from its own seeded generator: build threads share no RNG (same bytes)
        U, vh = randomized_factors(dense_operator(m, m.dtype), rank, oversample=8, niter=4)  # (O, r) with s, (r, I)
        return U.float().contiguous(), wh.unwhiten(vh).float().contiguous()
    if m.shape[0] >= m.shape[1]:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (O, k), (k,), (k, I)
    else:  # LAPACK is much faster on the tall orientation
        v, s, uh = torch.linalg.svd(m.T, full_matrices=False)
        u, vh = uh.T, v.T
    return (u[:, :rank] * s[:rank]).float().contiguous(), wh.unwhiten(vh[:rank]).float().contiguous()


def bit1_scale(delta: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Per-row scale (O,) of sign(Δ): the activation-optimal one with C (clamped at 0), else mean |Δ|
    (BitDelta's)."""
    if c is None:
        return delta.abs().mean(1)
    sign = torch.where(delta >= 0, 1.0, -1.0)  # (O, I), zeros count as + (the packed layout's rule)
    sc = sign @ c.float()  # (O, I)
    num = (delta.float() * sc).sum(1, dtype=torch.float64)
    return (num / (sign * sc).sum(1, dtype=torch.float64).clamp_min(1e-30)).clamp_min(0).float()


def bit1_error(delta: torch.Tensor, c: torch.Tensor) -> float:
    sign = torch.where(delta >= 0, 1.0, -1.0)
    return quad_error(delta.float() - bit1_scale(delta, c)[:, None] * sign, c)


def sparse_keep(delta: torch.Tensor, c_diag: torch.Tensor | None, density: float) -> torch.Tensor:
    """Sorted flat indices (k,) of the entries of Δ kept at ``density``: largest |Δ_ij|² C_jj (|Δ_ij| without C)."""
    score = delta.float().pow(2)
    if c_diag is not None:
        score = score * c_diag.float()[None, :]
    k = keep_count(delta.numel(), density)
    return torch.topk(score.reshape(-1), k, sorted=False).indices.sort().values


def sparse_error(delta: torch.Tensor, c: torch.Tensor, density: float, total: float | None = None) -> float:
    """tr(R C Rᵀ) for R = Δ minus its kept entries: tr(ΔCΔᵀ) - 2 tr(K C Δᵀ) + tr(K C Kᵀ) with K sparse, so the
    cost is the kept entries times I rather than O times I²."""
    keep = sparse_keep(delta, c.diagonal(), density)
    out_f, in_f = delta.shape
    vals = delta.reshape(-1)[keep].float()
    k = torch.sparse_coo_tensor(torch.stack([keep // in_f, keep % in_f]), vals, (out_f, in_f), check_invariants=False)
    kc = torch.sparse.mm(k, c.float())  # (O, I) dense
    total = quad_error(delta, c) if total is None else total
    cross = float((kc * delta.float()).sum(dtype=torch.float64))
    own = float((kc.reshape(-1)[keep] * vals).sum(dtype=torch.float64))
    return max(total - 2 * cross + own, 0.0)


# ---------------------------------------------------------------- the allocation (a multiple-choice knapsack)

@dataclass(frozen=True)
class Option:
    """One way to store one item (an expert's delta in one linear): its label, bytes and remaining error."""

    label: str
    nbytes: int
    error: float


def hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), from the cheapest: the options a marginal-gain greedy can take."""
    pts = sorted(options, key=lambda o: (o.nbytes, o.error))
    frontier: list[Option] = []
    for o in pts:  # Pareto first: strictly less error for more bytes
        if not frontier or o.error < frontier[-1].error:
            frontier.append(o)
    out: list[Option] = []
    for o in frontier:
        while len(out) >= 2 and _slope(out[-2], out[-1]) <= _slope(out[-1], o):
            out.pop()  # out[-1] lies above the chord: never the best gain per byte
        out.append(o)
    return out


def _slope(a: Option, b: Option) -> float:
    """Error removed per byte from a to b (positive)."""
    return (a.error - b.error) / max(b.nbytes - a.nbytes, 1)


Items = dict[str, list[Option]]  # item (e.g. "down_proj/2": a linear and an expert) -> its options


def fill(items: Items, budget: int) -> dict[str, Option]:
    """One option per item, maximising the total error removed within ``budget`` bytes: every item starts at its
    cheapest option (which must fit) and the step with the largest gain per byte along any item's convex hull is
    taken while it fits (the standard greedy of the multiple-choice knapsack).  A step without gain is never
    taken, so an item whose options all leave the same error stays at its cheapest."""
    hulls = {k: hull(v) for k, v in items.items()}
    chosen = dict.fromkeys(hulls, 0)
    room = budget - sum(h[0].nbytes for h in hulls.values())
    if room < 0:
        raise ValueError(f"the cheapest options need {budget - room} bytes, more than the budget {budget}")
    heap = [(-_slope(h[0], h[1]), k) for k, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        neg, k = heapq.heappop(heap)
        h, i = hulls[k], chosen[k]
        step = h[i + 1].nbytes - h[i].nbytes
        if -neg <= 0 or step > room:
            continue  # hull slopes only fall and the room only shrinks: this item is done
        room -= step
        chosen[k] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (-_slope(h[i + 1], h[i + 2]), k))
    return {k: hulls[k][i] for k, i in chosen.items()}


Groups = dict[str, dict[str, Items]]  # group (a unit) -> storage kind -> its items' options in that kind


def lagrangian_kinds(groups: Groups, price: float) -> tuple[dict[str, str], int]:
    """Per group, the kind minimising Σ_items min_option (error + price * bytes); and the bytes of that choice.
    Ties go to the kind listed first (list the zero-byte "merged" choice first)."""
    kinds, total = {}, 0
    for g, by_kind in groups.items():
        best = None
        for kind, items in by_kind.items():
            picks = [min(opts, key=lambda o: o.error + price * o.nbytes) for opts in items.values()]
            value = sum(o.error + price * o.nbytes for o in picks)
            if best is None or value < best[0]:
                best = (value, kind, sum(o.nbytes for o in picks))
        assert best is not None
        kinds[g], total = best[1], total + best[2]
    return kinds, total


def allocate(groups: Groups, budget: int, iters: int = 80) -> dict[str, tuple[str, dict[str, Option]]]:
    """Per group one kind and per item one option, within ``budget`` bytes: the kinds from the Lagrangian
    relaxation at the smallest price per byte whose choice fits (geometric bisection), then :func:`fill`
    within those kinds (which spends what the relaxation leaves)."""
    hi = 0.0
    if lagrangian_kinds(groups, 0.0)[1] > budget:
        hi = 1.0
        while lagrangian_kinds(groups, hi)[1] > budget and hi < 1e300:
            hi *= 1e3
        lo = hi * 1e-40
        for _ in range(iters):
            mid = (lo * hi) ** 0.5
            if lagrangian_kinds(groups, mid)[1] > budget:
                lo = mid
            else:
                hi = mid
            if hi <= lo * (1 + 1e-6):
                break
    kinds, _ = lagrangian_kinds(groups, hi)
    items = {f"{g}\x00{i}": opts for g, k in kinds.items() for i, opts in groups[g][k].items()}
    picked = fill(items, budget)
    out: dict[str, tuple[str, dict[str, Option]]] = {g: (k, {}) for g, k in kinds.items()}
    for key, opt in picked.items():
        g, i = key.split("\x00", 1)
        out[g][1][i] = opt
    return upgrade(groups, out, budget)


Choice = dict[str, tuple[str, dict[str, Option]]]  # group -> (kind, item -> option)


def _cost(picks: dict[str, Option]) -> tuple[float, int]:
    return sum(o.error for o in picks.values()), sum(o.nbytes for o in picks.values())


def upgrade(groups: Groups, choice: Choice, budget: int, max_steps: int = 10_000) -> Choice:
    """Spend what the relaxation left: while some group can switch to another kind (its items refilled within
    the room left plus its own bytes) and remove error, take the switch with the most error removed per extra
    byte (a switch that also saves bytes first)."""
    room = budget - sum(_cost(p)[1] for _, p in choice.values())
    for _ in range(max_steps):
        best: tuple[float, str, str, dict[str, Option]] | None = None
        for g, (kind, picks) in choice.items():
            err, nbytes = _cost(picks)
            for other, items in groups[g].items():
                if other == kind or sum(min(o.nbytes for o in v) for v in items.values()) > room + nbytes:
                    continue
                alt = fill(items, room + nbytes)
                a_err, a_bytes = _cost(alt)
                if a_err < err * (1 - 1e-9):
                    score = (err - a_err) / max(a_bytes - nbytes, 0.5)  # (0.5: a saving step beats any other)
                    if best is None or score > best[0]:
                        best = (score, g, other, alt)
        if best is None:
            return choice
        _, g, other, alt = best
        room -= _cost(alt)[1] - _cost(choice[g][1])[1]
        choice[g] = (other, alt)
    return choice
