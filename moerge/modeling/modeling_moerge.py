"""``MoergeForCausalLM``: a base causal LM whose routed linears mix per-expert deltas chosen by a router.

This file is copied next to every built checkpoint and loaded as Hugging Face remote code, so it imports only
torch, transformers and the standard library.  The checkpoint format is described in ``docs/FORMAT.md``.

Structure:

* the base's causal LM is built with ``AutoModelForCausalLM.from_config(base_config)``; its children (``model``,
  ``lm_head``, ...) are registered on the wrapper under the same names, so tensor names on disk equal the base's;
  ``forward`` delegates to the (unregistered) inner causal LM so family specifics stay right;
* every routed linear of ``config.moerge["units"]`` is replaced by a :class:`RoutedLinear` holding the shared
  weight ``W_s`` and per-expert buffers ``experts.{e}.<name>``; it keeps what every kind shares (route groups,
  the LRU cache of effective weights and its signature, the per-token path);
* what an expert kind stores and how its Δ_e is formed and applied is one :class:`ExpertKind` class per kind
  (:class:`Dense`, :class:`WEMoE`, :class:`Twin`, :class:`Bit1`, :class:`LoRA`, :class:`Sparse`), registered in
  ``KIND_IMPLS`` by ``@expert_kind(name)`` where it is defined and chosen once per routed linear (``impl``);
  adding a kind is one class;
* routes come from forward pre-hooks on the routed units (and on ``router_input`` at sequence level) and are
  kept in :class:`RouteSlot` objects that the routed linears read;
* device maps (accelerate): a decoder layer with its routed linears and token-level routers stays on one device;
  routers and expert tensors are reached through module calls so that offloading hooks load them; the sequence
  router runs on its own device and a route is copied once per device (:meth:`RouteSlot.on`); offloaded routed
  linears cache nothing.

Shapes in comments: B batch, T tokens, C hidden size, E experts, O/I a linear's out/in features.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_moerge import AUTO_MAP, MoergeConfig

REMOTE_CODE_FILES = ("configuration_moerge.py", "modeling_moerge.py")


# --------------------------------------------------------------------------------------------------------------
# router math in float32 under autocast
# --------------------------------------------------------------------------------------------------------------
def _autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context without autocast on ``t``'s device when autocast is on there (else a no-op)."""
    dev = t.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else dev == "cuda" and torch.is_autocast_enabled()
    return torch.autocast(dev, enabled=False) if on else contextlib.nullcontext()


def float32_math(fn: Callable) -> Callable:
    """Run ``fn`` (its first argument a tensor) with autocast off on that tensor's device.  Router scores are
    calibrated in float32; under bf16 autocast their matmuls would run in bf16 (a Mahalanobis distance ~4% off,
    cosines ~1e-2 off: enough to move prompts across a route's or the unknown detector's threshold)."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        with _autocast_off(x):
            return fn(x, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------------------------
# kernels: Δ_e of a bit1 / sparse expert applied without forming it (see FORMAT.md for the stored layout)
# --------------------------------------------------------------------------------------------------------------
def unpack_bits(signs: torch.Tensor, in_features: int) -> torch.Tensor:
    """(O, ceil(I/8)) uint8 -> (O, I) {0, 1}; bit j of byte k is column 8k+j (little-endian bit order)."""
    shifts = torch.arange(8, device=signs.device, dtype=torch.uint8)
    bits = (signs.unsqueeze(-1) >> shifts) & 1  # (O, ceil(I/8), 8)
    return bits.flatten(-2)[..., :in_features]  # (O, I)


# at most this many tokens (rows of x), x @ Δ_e^T of bit1 / sparse takes its kernel rather than the dense Δ_e
SMALL_ROWS = 32


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """(256, 8) float32: bit j of byte value p (one per device, kept)."""
    bits = _BYTE_BITS.get(device)
    if bits is None:
        p = torch.arange(256, device=device)
        bits = _BYTE_BITS[device] = ((p[:, None] >> torch.arange(8, device=device)) & 1).float()
    return bits


def bit1_lookup_index(signs: torch.Tensor) -> torch.Tensor:
    """(O, nb) uint8 signs -> (O, nb) int32: row ``256 k + byte`` of `bit1_apply`'s table, for byte column k."""
    offsets = torch.arange(signs.shape[1], dtype=torch.int32, device=signs.device) * 256  # (nb,)
    return signs.to(torch.int32) + offsets


def bit1_apply(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (n, I) @ Δ^T with Δ = scale[:, None] * (2 * bits - 1) -> (n, O) float32, never forming Δ.

    A lookup table per 8 input columns: table[256 k + p, :] = Σ_{j: bit j of p} x[:, 8k + j] (nb * 256, n);
    x @ bits^T is then one embedding-bag sum of nb table rows per output (``index`` from `bit1_lookup_index`).
    """
    n, nb = x.shape[0], index.shape[1]
    xf = x.float()
    if nb * 8 != xf.shape[1]:
        xf = F.pad(xf, (0, nb * 8 - xf.shape[1]))  # pad bits are 0: padded columns add nothing
    table = torch.einsum("pj,nkj->kpn", _byte_bits(x.device), xf.view(n, nb, 8)).reshape(nb * 256, n)
    ones = F.embedding_bag(index, table, mode="sum")  # (O, n): x @ bits^T
    return ((2 * ones - xf.sum(-1)) * scale.float()[:, None]).T  # (n, O)


def sparse_rows(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor]:
    """Flat indices + values of an (O, I) sparse Δ -> (Δ as a float32 sparse CSR tensor,) for `sparse_apply`."""
    out_features, in_features = shape
    flat = indices.long()
    if flat.numel() > 1 and not bool((flat[1:] >= flat[:-1]).all()):
        order = flat.argsort()
        flat, values = flat[order], values[order]
    starts = torch.arange(out_features + 1, device=flat.device) * in_features  # (O + 1,)
    crow = torch.searchsorted(flat, starts)  # (O + 1,) row offsets
    itype = torch.int32 if flat.numel() < 2**31 else torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = torch.sparse_csr_tensor(crow.to(itype), (flat % in_features).to(itype), values.float(), shape)
    return (csr,)


def sparse_apply(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """x (n, I) @ Δ^T for a CSR Δ (O, I) -> (n, O) float32 (a sparse-dense product: reads ~nnz * 8 bytes)."""
    return (csr @ x.float().T).T


# --------------------------------------------------------------------------------------------------------------
# expert kinds: one class each, registered where it is defined, chosen once per routed linear
# --------------------------------------------------------------------------------------------------------------
KIND_IMPLS: dict[str, type[ExpertKind]] = {}


def expert_kind(name: str) -> Callable[[type[ExpertKind]], type[ExpertKind]]:
    """Class decorator: register an :class:`ExpertKind` under ``name`` (the ``kind`` of a unit in config.json)."""

    def register(cls: type[ExpertKind]) -> type[ExpertKind]:
        cls.name = name
        KIND_IMPLS[name] = cls
        return cls

    return register


def _cached(cache: dict[str, torch.Tensor] | None, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, kept in ``cache[name]`` (built without autograd) when there is a cache."""
    if cache is None:
        return make()
    if name not in cache:
        with torch.no_grad():
            cache[name] = make()
    return cache[name]


class ExpertKind:
    """How one kind of expert is stored and applied (docs/FORMAT.md, "Per kind").  Stateless: a
    :class:`RoutedLinear` picks its kind's class once (``self.impl``) and calls it with its tensors.

    A kind states: ``dtypes`` (stored tensors whose dtype is fixed; the others take W_s's), ``delta`` (Δ_e),
    ``apply`` (x @ Δ_e^T, without a dense Δ where it can), ``shared_plus_deltas`` (whether a mixed-route batch
    runs ``x W_s^T`` once plus each route's deltas instead of one effective weight per route), and may override
    ``combine`` (the effective weight of a route) and ``mix_tokens`` (the output under per-token routes).
    ``t`` is an expert's stored tensors by name, ``w`` the shared weight W_s (O, I).
    """

    name: ClassVar[str] = ""
    dtypes: ClassVar[dict[str, torch.dtype]] = {}

    @staticmethod
    def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        """Δ_e (O, I) in the expert's dtype."""
        raise NotImplementedError

    @classmethod
    def apply(
        cls, t: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor, cache: dict | None
    ) -> torch.Tensor:
        """x (..., I) @ Δ_e^T -> (..., O); ``cache`` (per expert, None with autograd) may keep what it builds."""
        return F.linear(x, cls.delta(t, w))

    @classmethod
    def shared_plus_deltas(cls, rows: int, caching: bool) -> bool:
        """Mixed-route batch with at most ``rows`` tokens per route: `W_s` for all rows + each route's deltas?"""
        return False

    @classmethod
    def combine(cls, lin: RoutedLinear, key: tuple[float, ...]) -> torch.Tensor:
        """Route weights r -> W_s + Σ_e r_e Δ_e (O, I) in float32 (no detach: gradients reach W_s)."""
        acc = lin.weight.float()
        for e, r in enumerate(key):
            if r != 0.0:
                acc = acc + r * lin.delta(e).float()
        return acc

    @classmethod
    def mix_tokens(
        cls, lin: RoutedLinear, x: torch.Tensor, r: torch.Tensor, active: list[int], caching: bool
    ) -> torch.Tensor:
        """x (B, T, I), r (B, T, E) or (B, 1, E) -> x W_s^T + b_s + Σ_e r_e (x Δ_e^T + bias_delta_e) (B, T, O)."""
        y = F.linear(x, lin.weight, lin.bias)  # (B, T, O)
        for e in active:
            y = y + r[..., e : e + 1] * lin.apply_delta(e, x, caching)  # (B, T, 1) * (B, T, O)
        return y


@expert_kind("dense")
class Dense(ExpertKind):
    """Full expert weights ``weight`` = W_e (Δ_e = W_e - W_s); a route applies Σ_e r_e W_e directly (upcycled
    experts, https://arxiv.org/abs/2212.05055)."""

    @staticmethod
    def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return t["weight"] - w

    @classmethod
    def combine(cls, lin: RoutedLinear, key: tuple[float, ...]) -> torch.Tensor:
        """Σ_e r_e W_e when Σ r = 1, so that forcing expert t gives exactly W_t; else W_s + Σ_e r_e Δ_e."""
        if abs(sum(key) - 1.0) >= 1e-6:
            return super().combine(lin, key)
        return sum(r * lin.expert(e)["weight"].float() for e, r in enumerate(key) if r != 0.0)

    @classmethod
    def mix_tokens(
        cls, lin: RoutedLinear, x: torch.Tensor, r: torch.Tensor, active: list[int], caching: bool
    ) -> torch.Tensor:
        """(1 - Σ r) (x W_s^T + b_s) + Σ_e r_e (x W_e^T + b_s + bias_delta_e): each expert applied in full."""
        y = F.linear(x, lin.weight, lin.bias)  # (B, T, O)
        y = y * (1 - r.sum(-1, keepdim=True))
        for e in active:
            t = lin.expert(e)
            y_e = F.linear(x, t["weight"], lin.bias)
            if "bias_delta" in t:
                y_e = y_e + t["bias_delta"]
            y = y + r[..., e : e + 1] * y_e
        return y


@expert_kind("wemoe")
class WEMoE(ExpertKind):
    """The dense delta ``delta`` = Δ_e (WEMoE, https://arxiv.org/abs/2402.00433)."""

    @staticmethod
    def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return t["delta"]


class Factored(ExpertKind):
    """Δ_e = L @ R with L (O, r), R (r, I): x @ Δ_e^T is (x @ R^T) @ L^T, never the dense Δ.  The factors are small,
    so a mixed-route batch always runs W_s once plus each route's factors."""

    left: ClassVar[str] = ""
    right: ClassVar[str] = ""

    @classmethod
    def delta(cls, t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return t[cls.left] @ t[cls.right]  # (O, r) @ (r, I)

    @classmethod
    def apply(
        cls, t: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor, cache: dict | None
    ) -> torch.Tensor:
        return (x @ t[cls.right].T) @ t[cls.left].T  # (..., I) -> (..., r) -> (..., O)

    @classmethod
    def shared_plus_deltas(cls, rows: int, caching: bool) -> bool:
        return True


@expert_kind("twin")
class Twin(Factored):
    """Rank-r SVD factors of Δ_e: ``U`` (O, r), ``V`` (r, I) (Twin-Merging, https://arxiv.org/abs/2406.15479)."""

    left, right = "U", "V"


@expert_kind("lora")
class LoRA(Factored):
    """LoRA factors ``A`` (r, I), ``B`` (O, r), scaling folded into B, r may be 0 (https://arxiv.org/abs/2106.09685)."""

    left, right = "B", "A"


class RowKernel(ExpertKind):
    """A kind with a kernel for x @ Δ_e^T that never forms Δ_e, used for at most SMALL_ROWS tokens (``prepare``
    builds what the kernel reads, once per expert); more tokens use the dense Δ_e, kept in the cache.  A cached
    effective weight beats the gather-bound kernels, so a mixed-route batch uses the kernels only when nothing is
    cached and the routes are small (batch 8 in 4 routes, ~110M llama, all MLPs routed, tokens/s over the base,
    1 / 2 CPU threads: bit1 0.50 -> 0.72 / 0.83, sparse 0.70 -> 0.68 / 0.89)."""

    @staticmethod
    def prepare(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def rows(x: torch.Tensor, t: dict[str, torch.Tensor], prepared: torch.Tensor) -> torch.Tensor:
        """x (n, I) @ Δ_e^T -> (n, O) float32."""
        raise NotImplementedError

    @classmethod
    def apply(
        cls, t: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor, cache: dict | None
    ) -> torch.Tensor:
        out_features, in_features = w.shape
        if x.numel() > SMALL_ROWS * in_features:
            return F.linear(x, _cached(cache, "delta", lambda: cls.delta(t, w)))

        def prepare() -> torch.Tensor:
            with torch.no_grad():
                return cls.prepare(t, w)

        y = cls.rows(x.reshape(-1, in_features), t, _cached(cache, "rows", prepare))  # (n, O)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)

    @classmethod
    def shared_plus_deltas(cls, rows: int, caching: bool) -> bool:
        return not caching and rows <= SMALL_ROWS


@expert_kind("bit1")
class Bit1(RowKernel):
    """1-bit deltas: ``signs`` uint8 (O, ceil(I/8)) little-endian bits, ``scale`` (O,); Δ_e = scale (2 bit - 1)
    (BitDelta, https://arxiv.org/abs/2402.10193).  Kernel: `bit1_apply` (a byte lookup table)."""

    dtypes: ClassVar[dict[str, torch.dtype]] = {"signs": torch.uint8}

    @staticmethod
    def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        signs = unpack_bits(t["signs"], w.shape[1]).to(t["scale"].dtype) * 2 - 1  # (O, I) in {-1, 1}
        return t["scale"][:, None] * signs

    @staticmethod
    def prepare(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return bit1_lookup_index(t["signs"])  # (O, nb) int32

    @staticmethod
    def rows(x: torch.Tensor, t: dict[str, torch.Tensor], prepared: torch.Tensor) -> torch.Tensor:
        return bit1_apply(x, prepared, t["scale"])


@expert_kind("sparse")
class Sparse(RowKernel):
    """A sparse residual: ``indices`` int32 (nnz,) into the flattened (O, I) Δ_e, ``values`` (nnz,) (as in
    Mediator, https://arxiv.org/abs/2502.04411).  Kernel: `sparse_apply` (a CSR product)."""

    dtypes: ClassVar[dict[str, torch.dtype]] = {"indices": torch.int32}

    @staticmethod
    def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(w.numel(), dtype=t["values"].dtype, device=w.device)
        flat[t["indices"].long()] = t["values"]
        return flat.view(w.shape)

    @staticmethod
    def prepare(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return sparse_rows(t["indices"], t["values"], tuple(w.shape))[0]  # (O, I) CSR

    @staticmethod
    def rows(x: torch.Tensor, t: dict[str, torch.Tensor], prepared: torch.Tensor) -> torch.Tensor:
        return sparse_apply(x, prepared)


# compatibility: kind name -> Δ_e function (build-side callers); KIND_IMPLS[kind].delta is the same
DELTAS: dict[str, Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]] = {
    name: impl.delta for name, impl in KIND_IMPLS.items()
}


# --------------------------------------------------------------------------------------------------------------
# cached effective weights on CPU: the product with a few rows
# --------------------------------------------------------------------------------------------------------------
# A product of a cached float32 effective weight W (O, I) with 2..SMALL_M rows on CPU is computed as W @ x^T
# (x^T a transposed view): MKL streams W once there, while ``F.linear`` / ``x @ W^T`` re-read it per row (issue 3:
# the decode steps of a mixed-route batch, a few rows per route).  One row takes ``F.linear``'s GEMV: on the AVX2
# EPYC of 2026-12-07 (`bench/small_gemm.py`, 1 thread, weights not cache resident) padding it to 2 rows cost
# 1.2-2.3x, and issue 3's 1024-column blocks 1.3-3.6x a GEMV of the whole W, with no gain over the whole W at 2-4
# rows (`bench/RESULTS.md`, "batch 1 on AVX2").  bf16 / fp16 (no MKL GEMM) and autocast keep ``F.linear``.
SMALL_M = 4


def _cpu_fp32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def cached_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x (..., I), w (O, I) -> (..., O), with 2..SMALL_M rows on CPU in fp32 as W @ x^T."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (2 <= rows <= SMALL_M and _cpu_fp32(x) and _cpu_fp32(w)) or _autocast_cpu():
        return F.linear(x, w, bias)
    xt = x.reshape(rows, x.shape[-1]).t()  # (I, N): a transposed view, not a copy
    y = torch.mm(w, xt) if bias is None else torch.addmm(bias[:, None], w, xt)  # (O, N)
    return y.t().reshape(*x.shape[:-1], w.shape[0])


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


# --------------------------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------------------------
class RouteSlot:
    """The current route of one or more routed units (one shared slot at sequence level, one per unit at
    token level).

    ``route`` is (B, E) (one route per row) or (B, T, E) (one per token).  For (B, E) routes ``groups`` lists
    ``(key, span)``: the route as a tuple of floats and the ``[start, end)`` of its rows in ``order`` (the batch
    rows sorted by route; ``span`` None = all rows, one group), so the routed linears can materialise and cache one
    effective weight per group; ``groups`` is None when there are too many distinct routes, and ``active`` lists
    the experts with a non-zero weight somewhere.
    """

    def __init__(self) -> None:
        self.decode = False  # set by the model for the forward of a decode step (the route is kept)
        self.shared = False  # set by the model during its pre-pass: routed linears apply W_s only
        self.clear()

    def clear(self) -> None:
        self._moved: dict[torch.device, tuple] = {}  # device -> (route, order, unorder) there
        self.route: torch.Tensor | None = None
        self.groups: list[tuple[tuple[float, ...], tuple[int, int] | None]] | None = None
        self.order: torch.Tensor | None = None  # (B,) rows sorted by group (several groups only)
        self.unorder: torch.Tensor | None = None  # (B,) its inverse permutation
        self.active: list[int] = []
        self.forced = False
        self.tokens = 1

    def set_rows(self, route: torch.Tensor, max_groups: int) -> None:
        """Route (B, E), one per row; groups rows that share a route (one host sync).  A route that requires
        grad (router parameters being trained) is not grouped: the routed linears then take the per-row
        tensor path, through which gradients reach the router."""
        self.route, self.forced, self._moved = route, False, {}
        if route.requires_grad:
            self.groups, self.active = None, list(range(route.shape[-1]))
            return
        uniq, inverse = torch.unique(route, dim=0, return_inverse=True)  # (G, E), (B,)
        keys = [tuple(row) for row in uniq.tolist()]
        self.active = [e for e in range(route.shape[-1]) if any(k[e] != 0.0 for k in keys)]
        if len(keys) == 1:
            self.groups = [(keys[0], None)]
        elif len(keys) <= max_groups:
            rows = [torch.nonzero(inverse == g).flatten() for g in range(len(keys))]
            self.order = torch.cat(rows)
            self.unorder = torch.argsort(self.order)
            ends = list(itertools.accumulate(len(r) for r in rows))
            self.groups = list(zip(keys, zip([0, *ends[:-1]], ends)))
        else:
            self.groups = None

    def set_forced(self, weights: torch.Tensor, key: tuple[float, ...], x: torch.Tensor) -> None:
        """A pinned route (E,) for every row of x (B, T, C); cheap when nothing changed."""
        batch = x.shape[0]
        self.tokens = x.shape[1] if x.dim() > 2 else 1
        r = self.route
        if self.forced and r is not None and r.shape[0] == batch:  # units on other devices: `on`
            return
        self.route, self._moved = weights.to(x.device).expand(batch, -1), {}  # (B, E)
        self.groups, self.forced = [(key, None)], True
        self.active = [e for e, w in enumerate(key) if w != 0.0]

    def set_tokens(self, route: torch.Tensor) -> None:
        """Route (B, T, E), one per token."""
        self.route, self.groups, self.forced, self._moved = route, None, False, {}
        self.tokens = route.shape[1]
        used = route.flatten(0, -2).ne(0).any(0)  # (E,)
        self.active = torch.nonzero(used).flatten().tolist()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(route, order, unorder) on ``device``: the units of one route may sit on several devices (a device
        map); each device gets one copy per route, not one per routed linear."""
        if self.route.device == device:
            return self.route, self.order, self.unorder
        moved = self._moved.get(device)
        if moved is None:
            parts = (self.route, self.order, self.unorder)
            moved = self._moved[device] = tuple(None if t is None else t.to(device) for t in parts)
        return moved

    def as_tokens(self) -> torch.Tensor | None:
        """The route as (B, T, E) (row routes are repeated over the T tokens of the last forward)."""
        r = self.route
        if r is None or r.dim() == 3:
            return r
        return r[:, None, :].expand(-1, self.tokens, -1)


@float32_math
def router_logits(
    x: torch.Tensor, prototypes: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """(..., C) -> (..., E) float32: ``scale * cos(x - center, prototypes[e]) + bias[e]``."""
    x = x.float() - center.float()  # (..., C)
    cos = F.normalize(x, dim=-1) @ F.normalize(prototypes.float(), dim=-1).T  # (..., E)
    return scale.float() * cos + bias.float()


class MoergeRouter(nn.Module):
    """logits = scale * cos(x - center, prototypes[o]) + bias[o]; probabilities = softmax (in float32).

    One output per route: the experts, then the composed routes (``config.moerge["routes"]``).  ``center`` (C,)
    is optional in a checkpoint (absent = 0).  ``unknown`` (sequence level, when the plan has an ``unknown``
    block): the :class:`UnknownDetector` whose score sends prompts of no known task to the shared weights."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device | None,
        unknown: dict | None = None,
    ) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.zeros(num_experts, hidden, dtype=dtype, device=device))  # (E, C)
        self.center = nn.Parameter(torch.zeros(hidden, dtype=dtype, device=device))  # (C,)
        self.scale = nn.Parameter(torch.ones((), dtype=dtype, device=device))  # ()
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=dtype, device=device))  # (E,)
        if unknown:
            self.unknown = UnknownDetector(num_experts, hidden, unknown, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`probs`, through the module call so that device-map hooks (accelerate) place and load the router."""
        return self.probs(x)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., E) float32."""
        return torch.softmax(router_logits(x, self.prototypes, self.center, self.scale, self.bias), dim=-1)

    def reset(self) -> None:
        _init_(self.prototypes, torch.zeros_like)
        _init_(self.center, torch.zeros_like)
        _init_(self.scale, torch.ones_like)
        _init_(self.bias, torch.zeros_like)

    @torch.no_grad()
    def grow(self) -> None:
        """One more output (a composed route added at run time): a zero prototype and a bias of -1e4, so that the
        router does not pick it before calibration; the detector's new mean (and offset) repeats the first one."""
        self.prototypes = nn.Parameter(torch.cat([self.prototypes, self.prototypes.new_zeros(1, self.prototypes.shape[1])]))
        self.bias = nn.Parameter(torch.cat([self.bias, self.bias.new_full((1,), -1e4)]))
        det = getattr(self, "unknown", None)
        if det is not None:
            det.means = nn.Parameter(torch.cat([det.means, det.means[:1]]))
            if getattr(det, "offsets", None) is not None:
                det.offsets = nn.Parameter(torch.cat([det.offsets, det.offsets[:1]]))


@float32_math
def segment_pool(x: torch.Tensor, mask: torch.Tensor | None, segments: int) -> torch.Tensor:
    """(B, T, C), mask (B, >=T) of 1 = real token -> (B, S * C) float32: the mean of each of S equal, consecutive
    segments of the real tokens (a coarse positional bag of features: where in the prompt a word is).  Token j
    of n real ones is in segment floor(j * S / n); an empty segment (n < S) pools to 0."""
    x = x.float()
    batch, tokens, hidden = x.shape
    if mask is None or mask.dim() != 2 or mask.shape[0] != batch:
        keep = torch.ones(batch, tokens, device=x.device)
    else:
        keep = mask[:, -tokens:].to(x.device).float()  # (B, T)
    n = keep.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
    seg = ((keep.cumsum(1) - 1).clamp_min(0) * segments / n).floor().long().clamp(0, segments - 1)  # (B, T)
    w = F.one_hot(seg, segments).float() * keep.unsqueeze(-1)  # (B, T, S)
    sums = torch.einsum("bts,btc->bsc", w, torch.where(keep.bool().unsqueeze(-1), x, 0.0))  # (B, S, C)
    return (sums / w.sum(1).clamp_min(1).unsqueeze(-1)).reshape(batch, segments * hidden)


@float32_math
def gaussian_distance(
    x: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, inv_var: torch.Tensor
) -> torch.Tensor:
    """Squared Mahalanobis distance per dimension under a shrunk covariance ``var * I + V diag(l) V^T``.

    x (B, D), mean (K, D) -> (B, K).  Its inverse is ``(I - V diag(l / (l + var)) V^T) / var``, so the detector
    stores ``factor`` = rows ``sqrt(l_i / (l_i + var)) v_i`` (r, D) and ``inv_var`` = 1 / var (), r << D."""
    d = x.float()[:, None, :] - mean.float()[None]  # (B, K, D)
    proj = d @ factor.float().T  # (B, K, r)
    return inv_var.float() * (d.pow(2).sum(-1) - proj.pow(2).sum(-1)) / x.shape[-1]


class UnknownDetector(nn.Module):
    """Relative Mahalanobis score of a prompt (Ren et al. 2021, https://arxiv.org/abs/2106.09022) on the
    segment-pooled router input: the distance to the nearest route's mean under the routes' shared covariance,
    minus the distance to the mean of all calibration prompts under their own covariance.  High = unlike every
    known task.  Shapes in ``plan["unknown"]``: ``segments`` S, ``rank`` r, ``background_rank`` r0; D = S * C."""

    def __init__(self, num_outputs: int, hidden: int, spec: dict, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.segments = int(spec.get("segments", 1))
        dim = self.segments * hidden

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

        self.means = param(num_outputs, dim)  # (E, D)
        self.factor = param(int(spec["rank"]), dim)  # (r, D)
        self.inv_var = param()  # ()
        self.background_mean = param(dim)  # (D,)
        self.background_factor = param(int(spec["background_rank"]), dim)  # (r0, D)
        self.background_inv_var = param()  # ()
        if spec.get("per_route"):  # per-route thresholds: route o's distance counts as d_o - offsets[o]
            self.offsets = param(num_outputs)  # (E,)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Router input (B, T, C) -> score (B,) float32."""
        pooled = segment_pool(x, mask, self.segments).to(self.means.device)  # (B, D)
        dist = gaussian_distance(pooled, self.means, self.factor, self.inv_var)  # (B, E)
        if getattr(self, "offsets", None) is not None:
            dist = dist - self.offsets.float()
        back = gaussian_distance(pooled, self.background_mean[None], self.background_factor, self.background_inv_var)
        return dist.min(-1).values - back[:, 0]

    def reset(self) -> None:
        for p in self.parameters():
            _init_(p, torch.zeros_like)


def top_k_route(probs: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the top_k probabilities of each route (..., E) and renormalise (None or k >= E: unchanged)."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, idx, vals)
    return kept / kept.sum(-1, keepdim=True)


@float32_math
def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C), mask (B, >=T) of 1 = real token -> (B, C) float32 mean over the real tokens."""
    x = x.float()
    if mask is None or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
        return x.mean(1)
    keep = mask[:, -x.shape[1] :].to(x.device).bool().unsqueeze(-1)  # (B, T, 1)
    total = torch.where(keep, x, 0.0).sum(1)  # (B, C); `where` so that NaN at padded positions stays out
    return total / keep.sum(1).clamp_min(1)


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A unit's input hidden states (B, T, C): positional arg 0 or kwarg ``hidden_states``."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise TypeError("moerge: a routed unit was called without hidden states (arg 0 or `hidden_states`)")
    return x


# --------------------------------------------------------------------------------------------------------------
# routed linear
# --------------------------------------------------------------------------------------------------------------
Effective = tuple[torch.Tensor, torch.Tensor | None]  # (weight (O, I), bias (O,))


class ExpertTensors(nn.Module):
    """The stored tensors of one expert of one routed linear, as persistent buffers (a kind's ``dtypes`` fix
    some; the others take the shared weight's dtype)."""

    def __init__(
        self,
        shapes: dict[str, list[int]],
        dtype: torch.dtype,
        device: torch.device | None,
        fixed: dict[str, torch.dtype],
    ) -> None:
        super().__init__()
        for name, shape in shapes.items():
            buf_dtype = fixed.get(name, dtype)
            self.register_buffer(name, torch.zeros(tuple(shape), dtype=buf_dtype, device=device))

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def forward(self) -> dict[str, torch.Tensor]:
        """The tensors, through the module call: an offloading hook (accelerate) loads them for the caller."""
        return dict(self._buffers)


class LearnedMixLinear(torch.autograd.Function):
    """``y = x (W_s + Σ_e w_e Δ_e)^T + b_s + Σ_e w_e bias_delta_e`` for learnable expert weights w (E,), the same for
    every row (fitting a composed route: `moerge calibrate --compose`).  Keeps only x and w for backward, as a
    frozen linear keeps x, and rebuilds the weight and each Δ_e there: ∂L/∂w_e = <∂L/∂W, Δ_e> + <∂L/∂b, bias_δ_e>
    with ∂L/∂W = gy^T x.  Three products per linear and step (forward, ∂x, ∂W), where autograd through
    ``Σ_e w_e (x Δ_e^T)`` runs 2 (E + 1) and keeps E outputs (B, T, O) per linear until backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, lin: RoutedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.lin = lin
        ctx.save_for_backward(x, w)
        weight, bias = lin.learned_weight(w)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        lin: RoutedLinear = ctx.lin
        gx = None
        if ctx.needs_input_grad[0]:
            weight, _ = lin.learned_weight(w)
            gx = (gy @ weight.to(gy.dtype)).to(x.dtype)  # (..., I)
        if not ctx.needs_input_grad[1]:
            return gx, None, None
        g2, x2 = gy.reshape(-1, gy.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()  # (N, O), (N, I)
        g_weight, g_bias = g2.t() @ x2, g2.sum(0)  # (O, I), (O,)
        gw = torch.zeros(len(lin.experts), dtype=torch.float32, device=w.device)
        for e in range(len(lin.experts)):
            gw[e] = (g_weight * lin.delta(e).float()).sum()
            bd = lin.expert(e).get("bias_delta")
            if bd is not None:
                gw[e] += (g_bias * bd.float()).sum()
        return gx, gw.to(w.dtype), None


class RoutedLinear(nn.Module):
    """A linear layer whose weight is ``W_s + Σ_e r_e Δ_e`` for the current route r (read from ``slot``); what a
    kind stores and how Δ_e is applied is its :class:`ExpertKind` (``self.impl``).

    (B, E) routes: rows are grouped by route, each group's effective weight is materialised once and kept in a
    small LRU cache (applied by `cached_linear`), so a decode step costs one dense
    matmul per group.  A mixed-route batch of a kind whose ``shared_plus_deltas`` says so instead runs
    ``x @ W_s^T`` once for all rows plus each group's ``x @ Δ_e^T``, reading W_s once rather than one full
    effective weight per route.  (B, T, E) routes: the kind's ``mix_tokens``, ``x @ W_s^T + Σ_e r_e (x @ Δ_e^T)``.

    Composed routes: a route is a vector over the router's outputs (E experts, then R composed routes); ``mix``
    (R, E) holds this unit's expert weights of each composed route, and a route r over the outputs means the
    expert weights ``r[:E] + r[E:] @ mix`` here (`expert_key`).  Anchored experts (``anchor`` (E, E), row e: the
    old experts' weights that expert e was stored against, `moerge add-expert`): expert weights w become
    ``w + w @ anchor``.  Without either (None) routes are used as they are.  A ``mix`` that requires grad (fitting
    composed routes) takes the per-row tensor path.
    """

    def __init__(
        self,
        linear: nn.Linear,
        kind: str,
        experts: list[dict[str, list[int]]],
        slot: RouteSlot,
        cache_size: int = 4,
        mix: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in KIND_IMPLS:
            raise ValueError(f"moerge: unknown expert kind {kind!r}; one of {sorted(KIND_IMPLS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.impl = kind, KIND_IMPLS[kind]
        self.weight = linear.weight  # (O, I) shared W_s (the base layer's own Parameter)
        self.register_parameter("bias", linear.bias)  # (O,) b_s, or None
        dtype, device = self.weight.dtype, self.weight.device
        self.experts = nn.ModuleList(ExpertTensors(s, dtype, device, self.impl.dtypes) for s in experts)
        self.slot = slot
        self.cache_size = cache_size
        self._weights: OrderedDict[tuple[float, ...], Effective] = OrderedDict()  # LRU: route key -> weight
        self._kind_cache: dict[int, dict[str, torch.Tensor]] = {}  # per expert: what its kind keeps (Δ_e, ...)
        self._signature: tuple = ()
        self.anchor = anchor
        self._anchor_rows = None if anchor is None else anchor.tolist()
        self.set_mix(mix)

    def set_mix(self, mix: torch.Tensor | None) -> None:
        """This unit's composed-route weights (R, E) float32, or None (no composed routes)."""
        self.mix = mix
        self._mix_keys: dict[tuple[float, ...], tuple[float, ...]] = {}
        self._mix_rows = None if mix is None else mix.detach().tolist()
        # cached effective weights are keyed by expert weights, so they stay valid when the mix changes

    @property
    def translates(self) -> bool:
        """Whether routes over the outputs need translating to this unit's stored expert weights."""
        return self.mix is not None or self.anchor is not None

    def expert_key(self, key: tuple[float, ...]) -> tuple[float, ...]:
        """A route over the outputs (O floats) -> expert weights here (E floats): ``w = r[:E] + r[E:] @ mix``,
        then ``w + w @ anchor``."""
        hit = self._mix_keys.get(key)
        if hit is None:
            n_exp, rows = len(self.experts), self._mix_rows or []
            hit = tuple(key[e] + sum(key[n_exp + j] * row[e] for j, row in enumerate(rows)) for e in range(n_exp))
            if self._anchor_rows is not None:
                hit = tuple(hit[e] + sum(hit[k] * row[e] for k, row in enumerate(self._anchor_rows) if hit[k])
                            for e in range(n_exp))
            if len(self._mix_keys) >= 64:
                self._mix_keys.clear()
            self._mix_keys[key] = hit
        return hit

    def translate(self, route: torch.Tensor) -> torch.Tensor:
        """Routes over the outputs (..., O) -> expert weights here (..., E) (`expert_key` for tensors)."""
        n_exp = len(self.experts)
        r = route[..., :n_exp]
        if self.mix is not None:
            mix = self.mix.to(route.device)
            r = r + route[..., n_exp:].to(mix.dtype) @ mix
        if self.anchor is not None:
            r = r + r @ self.anchor.to(device=r.device, dtype=r.dtype)
        return r

    def _forward_mixed(self, x: torch.Tensor, caching: bool) -> torch.Tensor:
        """Composed routes or anchored experts: the slot's route over the outputs translated to this unit's
        expert weights."""
        slot = self.slot
        one_route = slot.route.dim() == 2 and slot.groups is not None
        learning = self.mix is not None and self.mix.requires_grad
        if one_route and not learning:
            groups = [(self.expert_key(key), span) for key, span in slot.groups]
            return self._forward_groups(x, groups, caching)
        if one_route and len(slot.groups) == 1:  # fitting the mix: one learnable weight per expert for every row
            key = torch.tensor(slot.groups[0][0], dtype=self.mix.dtype, device=self.mix.device)  # (O,)
            return LearnedMixLinear.apply(x, self.translate(key), self)
        route = slot.on(x.device)[0]  # (B, O) or (B, T, O)
        n_exp = len(self.experts)
        r = self.translate(route)  # (B, E) or (B, T, E)
        if learning:  # every expert: a weight that is 0 now still needs its gradient
            active = list(range(n_exp))
        else:
            active = torch.nonzero(r.detach().reshape(-1, n_exp).ne(0).any(0)).flatten().tolist()
        return self._forward_tokens(x, r, active, caching)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.kind}, experts={len(self.experts)}"
        )

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Initialise what was not loaded: Δ = 0 (dense experts = W_s), zero bias."""
        if self.bias is not None:
            _init_(self.bias, torch.zeros_like)
        for ex in self.experts:
            for name, buf in ex.tensors().items():
                same = name == "weight" and buf.shape == self.weight.shape
                _init_(buf, (lambda b: self.weight.detach().to(b.dtype)) if same else torch.zeros_like)

    def clear_cache(self) -> None:
        self._weights.clear()
        self._kind_cache.clear()
        self._signature = ()

    def cache_bytes(self) -> int:
        """Bytes of the cached effective weights and of what the kinds keep (deltas, kernel indices)."""
        tensors = []
        for w, bias in self._weights.values():
            tensors += [w, *([] if bias is None else [bias])]
        for kept in self._kind_cache.values():
            for t in kept.values():  # a sparse CSR tensor counts its three parts
                csr = t.layout == torch.sparse_csr
                tensors += [t.crow_indices(), t.col_indices(), t.values()] if csr else [t]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def _all_tensors(self) -> list[torch.Tensor]:
        ts = [t for t in self._parameters.values() if t is not None]
        return ts + [b for ex in self.experts for b in ex._buffers.values()]

    def _caching(self) -> bool:
        """Whether cached weights may be used (not with autograd, nor where accelerate offloads the weights: the
        cache would keep in memory what offloading keeps out); drops them when any tensor moved or changed in
        place."""
        if torch.is_grad_enabled() and any(
            p.requires_grad for p in self._parameters.values() if p is not None
        ):
            return False
        if _offloaded(self):
            return False
        if self.slot.decode and self._signature:  # checked at this generation's prefill: skip the cost per step
            return True
        sig = tuple((t.data_ptr(), _version(t)) for t in self._all_tensors())
        if sig != self._signature:
            self.clear_cache()
            self._signature = sig
        return True

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / ...: cached tensors would be stale
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    # ---- effective weights (row routes) ------------------------------------------------------------------------
    def delta(self, e: int) -> torch.Tensor:
        """Δ_e (O, I) in the expert's dtype."""
        return self.impl.delta(self.expert(e), self.weight)

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's stored tensors by name: through the module call where accelerate hooks it (an offloading
        hook loads them), else directly (a call costs ~1 us more, and a decode step makes hundreds)."""
        ex = self.experts[e]
        return ex() if "_hf_hook" in ex.__dict__ else ex.tensors()

    def learned_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert weights w (E,) (a tensor: `LearnedMixLinear`) -> `combine` of their values, without autograd."""
        with torch.no_grad():
            return self.combine(tuple(w.tolist()))

    def combine(self, key: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Route weights r (E floats) -> (the kind's W_s + Σ r_e Δ_e (O, I), b_s + Σ r_e bias_delta_e (O,)), in
        float32 then cast."""
        acc = self.impl.combine(self, key)
        bias = None if self.bias is None else self.bias.float()
        for e, r in enumerate(key):
            bd = self.expert(e).get("bias_delta") if r != 0.0 else None
            if bd is not None:
                bias = bd.float() * r if bias is None else bias + r * bd.float()
        return acc.to(self.weight.dtype), None if bias is None else bias.to(self.weight.dtype)

    def effective(self, key: tuple[float, ...], caching: bool) -> Effective:
        """`combine` (weight, bias), through the LRU cache when allowed (no autograd)."""
        if not caching:
            return self.combine(key)
        hit = self._weights.get(key)
        if hit is not None:
            self._weights.move_to_end(key)
            return hit
        with torch.no_grad():
            hit = self.combine(key)
        self._weights[key] = hit
        while len(self._weights) > max(self.cache_size, 1):
            self._weights.popitem(last=False)
        return hit

    def _linear_route(self, x: torch.Tensor, key: tuple[float, ...], caching: bool) -> torch.Tensor:
        """x (..., I) through the effective weight of route ``key`` -> (..., O)."""
        return cached_linear(x, *self.effective(key, caching))

    def _forward_groups(self, x: torch.Tensor, groups: list, caching: bool) -> torch.Tensor:
        """One matmul per group of rows sharing a route, or (`_factored_groups`) one shared matmul plus each
        group's deltas. x (B, T, I) -> (B, T, O).  Rows are gathered once into route order (``slot.order``), each
        group is a slice, and the outputs are put back with one gather (``slot.unorder``)."""
        if len(groups) == 1:
            return self._linear_route(x, groups[0][0], caching)
        _, order, unorder = self.slot.on(x.device)
        xs = x.index_select(0, order)  # (B, T, I), groups contiguous
        if self._factored_groups(x, groups, caching):
            y = F.linear(x, self.weight, self.bias)  # (B, T, O): W_s for every row
            parts = []
            for key, (a, b) in groups:
                d = xs.new_zeros(b - a, *y.shape[1:])  # (b - a, T, O)
                for e, r in enumerate(key):
                    if r != 0.0:
                        d = d + r * self.apply_delta(e, xs[a:b], caching).to(d.dtype)
                parts.append(d)
            return y + torch.cat(parts).index_select(0, unorder).to(y.dtype)
        ys = [self._linear_route(xs[a:b], key, caching) for key, (a, b) in groups]
        return torch.cat(ys).index_select(0, unorder)  # autocast may have changed the dtype

    def _factored_groups(self, x: torch.Tensor, groups: list, caching: bool) -> bool:
        """Mixed-route batch: whether to run `W_s` for all rows + each group's `x @ Δ_e^T` rather than one
        effective weight per group (the kind's ``shared_plus_deltas``, given the tokens of the largest group)."""
        per_row = x[0].numel() // self.in_features  # tokens per row
        return self.impl.shared_plus_deltas(max(b - a for _, (a, b) in groups) * per_row, caching)

    # ---- token routes ----------------------------------------------------------------------------------------
    def apply_delta(self, e: int, x: torch.Tensor, caching: bool) -> torch.Tensor:
        """x @ Δ_e^T + bias_delta_e. x (..., I) -> (..., O)."""
        t = self.expert(e)
        y = self.impl.apply(t, x, self.weight, self._kind_cache.setdefault(e, {}) if caching else None)
        bd = t.get("bias_delta")
        return y if bd is None else y + bd

    def _forward_tokens(self, x: torch.Tensor, route: torch.Tensor, active: list[int], caching: bool):
        """x (B, T, I), route (B, T, E) or (B, E) -> (B, T, O)."""
        r = route.to(x.dtype)
        if r.dim() < x.dim():  # (B, E) -> (B, 1, E)
            r = r.view(r.shape[0], *([1] * (x.dim() - 2)), r.shape[-1])
        return self.impl.mix_tokens(self, x, r, active, caching)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.slot
        if slot.shared:  # the shared model's pass up to a router that reads a later layer (`_prepass`)
            return F.linear(x, self.weight, self.bias)
        if slot.route is None:
            raise RuntimeError(
                "moerge: RoutedLinear called with no route (was the unit's routing hook skipped?)"
            )
        if slot.route.shape[0] != x.shape[0] and not (slot.groups is not None and len(slot.groups) == 1):
            raise RuntimeError(
                f"moerge: input batch {x.shape[0]} does not match the route's {slot.route.shape[0]}"
            )
        caching = self._caching()
        if self.translates:
            return self._forward_mixed(x, caching)
        if slot.route.dim() == 2 and slot.groups is not None:
            return self._forward_groups(x, slot.groups, caching)
        return self._forward_tokens(x, slot.on(x.device)[0], slot.active, caching)


def _offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook loads the module's weights at each call (CPU or disk offload of a device map)."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


def _offload_gaps(module: nn.Module, seen: dict[int, frozenset[str]]) -> list[str]:
    """Names of the module's own tensors that an offloading accelerate hook would reload but cannot find (``seen``:
    the keys of each weights loader, read once)."""
    gaps = []
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        weights = getattr(h, "weights_map", None)
        if not getattr(h, "offload", False) or weights is None:
            continue
        names = [n for n, p in module._parameters.items() if p is not None]
        names += list(module._buffers) if h.offload_buffers else []
        loader, prefix = getattr(weights, "dataset", weights), getattr(weights, "prefix", "")
        keys = seen.get(id(loader))
        if keys is None:
            keys = seen[id(loader)] = frozenset(loader)
        gaps += [n for n in names if prefix + n not in keys]
    return gaps


def _init_(t: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Fill t with make(t) unless transformers marked it as loaded."""
    if getattr(t, "_is_hf_initialized", False) or t.device.type == "meta":
        return
    with torch.no_grad():
        t.copy_(make(t))


# --------------------------------------------------------------------------------------------------------------
# routing state and hooks
# --------------------------------------------------------------------------------------------------------------
class RoutingState:
    """Everything the hooks share: the plan, the forced route, the current phase and the slots.

    Routes are vectors over the router's outputs: the experts, then the composed routes of ``plan["routes"]``
    (each a per-unit mix of the experts, translated by every routed linear; see :class:`RoutedLinear`)."""

    def __init__(self, plan: dict, cache_size: int) -> None:
        self.plan = plan  # config.moerge: top_k, initialized, fallback and unknown are read live from it
        self.experts: list[str] = list(plan.get("experts", []))
        self.routes: dict[str, dict[str, list[float]]] = dict(plan.get("routes") or {})
        self.anchors: dict[str, dict[str, list[float]]] = dict(plan.get("anchors") or {})
        self.outputs: list[str] = [*self.experts, *self.routes]
        self.level: str = plan.get("level", "sequence")
        self.max_groups = cache_size
        self.forced: tuple[torch.Tensor, tuple[float, ...]] | None = None
        self.phase: str | None = None  # "prefill" | "decode" | None (a submodule called directly)
        self.mask: torch.Tensor | None = None
        self.sequence_slot = RouteSlot()
        self.slots: dict[str, RouteSlot] = {}
        self.stats = {"routed_rows": 0, "fallback_rows": 0}
        if plan.get("unknown"):
            self.stats["unknown_rows"] = 0
        # the sequence router reads a layer after some routed units: a pre-pass of the shared model computes the
        # route at prefill (`MoergeForCausalLM._prepass`); ``route_ready`` then keeps the router hook from redoing it
        self.prepass: bool = bool(plan.get("prepass", False)) and self.level == "sequence"
        self.route_ready = False
        self._uniform = self.weights({name: 1.0 for name in self.experts}) if self.experts else None

    def slot_for(self, unit: str) -> RouteSlot:
        if self.level == "sequence":
            return self.sequence_slot
        return self.slots.setdefault(unit, RouteSlot())

    def _unit_row(self, what: str, per_unit: dict[str, list[float]], unit: str) -> list[float]:
        """One weight per expert of ``per_unit[unit]`` (an absent unit: all 0), checked."""
        w = [float(v) for v in per_unit.get(unit, [0.0] * len(self.experts))]
        if len(w) != len(self.experts):
            raise ValueError(f"moerge: {what} has {len(w)} weights in {unit}, expected {len(self.experts)}")
        return w

    def mix_for(self, unit: str) -> torch.Tensor | None:
        """(R, E) float32: row r = composed route r's expert weights in ``unit`` (absent unit = 0); None when the
        plan has no composed routes."""
        if not self.routes:
            return None
        rows = [self._unit_row(f"route {name!r}", per, unit) for name, per in self.routes.items()]
        return torch.tensor(rows, dtype=torch.float32, device="cpu")

    def anchor_for(self, unit: str) -> torch.Tensor | None:
        """(E, E) float32: row e = the old experts' weights that expert e was stored against in ``unit`` (absent:
        0); None when no expert is anchored here."""
        if not any(unit in per for per in self.anchors.values()):
            return None
        unknown = [n for n in self.anchors if n not in self.experts]
        if unknown:
            raise ValueError(f"moerge: anchors of unknown expert(s) {unknown}; experts are {self.experts}")
        rows = [self._unit_row(f"anchor of {name!r}", self.anchors.get(name, {}), unit) for name in self.experts]
        return torch.tensor(rows, dtype=torch.float32, device="cpu")

    def weights(self, route: str | int | dict | None) -> tuple[torch.Tensor, tuple[float, ...]] | None:
        """force_route's argument -> ((O,) float32 weights over the outputs summing to 1, the same as floats)."""
        if route is None:
            return None
        names = self.outputs
        if isinstance(route, int) and not isinstance(route, bool):
            if not 0 <= route < len(names):
                raise ValueError(f"route index {route} out of range; routes are {names}")
            route = {names[route]: 1.0}
        if isinstance(route, str):
            route = {route: 1.0}
        if isinstance(route, dict) and not route:  # {}: the zero route, the shared weights only
            zero = torch.zeros(len(names), dtype=torch.float32, device="cpu")
            return zero, tuple(zero.tolist())
        unknown = [k for k in route if k not in names]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; valid names: {names}")
        raw = [float(route.get(name, 0.0)) for name in names]
        if min(raw) < 0 or sum(raw) <= 0:
            raise ValueError(f"route weights must be >= 0 with a positive sum, got {route}")
        # on the CPU explicitly: the model may be built under a meta-device context
        w = torch.tensor(raw, dtype=torch.float32, device="cpu")
        w = w / w.sum()
        return w, tuple(w.tolist())

    @property
    def top_k(self) -> int | None:
        return self.plan.get("top_k", 1)

    @property
    def initialized(self) -> bool:
        return bool(self.plan.get("initialized", True))

    @property
    def fallback(self) -> dict | None:
        return self.plan.get("fallback")

    @property
    def unknown(self) -> dict | None:
        return self.plan.get("unknown")

    def pinned(self) -> tuple[torch.Tensor, tuple[float, ...]] | None:
        """The forced route, or the uniform one for an uninitialised router."""
        if self.forced is not None:
            return self.forced
        return None if self.initialized else self._uniform

    def sequence_route(self, router: MoergeRouter, x: torch.Tensor) -> torch.Tensor:
        """Router input (B, T, C) -> route (B, O): mask-aware mean, softmax, top-k, fallback, unknown prompts."""
        mask = self.mask if self.phase == "prefill" else None
        pooled = masked_mean(x, mask)  # (B, C), on x's device
        if router.prototypes.device.type != "meta":  # else offloaded: its hook brings it and the input together
            pooled = pooled.to(router.prototypes.device)
        probs = router(pooled)  # (B, O), on the router's device
        route = top_k_route(probs, self.top_k)
        if self.fallback:
            low = probs.max(-1).values < float(self.fallback.get("threshold", 0.0))  # (B,)
            alt = probs if self.fallback.get("mode", "soft") == "soft" else torch.zeros_like(probs)
            route = torch.where(low[:, None], alt, route)
            self.stats["fallback_rows"] += int(low.sum())
        spec = self.unknown
        if spec and getattr(router, "unknown", None) is not None:
            far = router.unknown(x, mask).to(route.device) > float(spec["threshold"])  # (B,)
            route = torch.where(far[:, None], torch.zeros_like(route), route)  # the shared weights only
            self.stats["unknown_rows"] = self.stats.get("unknown_rows", 0) + int(far.sum())
        self.stats["routed_rows"] += route.shape[0]
        return route


class SequenceRouterHook:
    """Pre-hook on ``router_input``: computes the (B, E) route at prefill, keeps it for decode steps."""

    def __init__(self, state: RoutingState, router: MoergeRouter) -> None:
        self.state, self.router = state, router

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        if st.pinned() is not None or st.route_ready:
            return
        x = hidden_states_of(args, kwargs)  # (B, T, C)
        slot = st.sequence_slot
        if st.phase == "decode" and slot.route is not None and slot.route.shape[0] == x.shape[0]:
            return
        slot.set_rows(st.sequence_route(self.router, x), st.max_groups)
        slot.tokens = x.shape[1]


class _PrepassDone(Exception):
    """Raised at the router input to end the pre-pass."""


def _stop_prepass(module: nn.Module, args: tuple) -> None:
    raise _PrepassDone


class UnitHook:
    """Pre-hook on a routed unit: sets its slot's route (forced, sequence check, or per-token routing)."""

    def __init__(self, state: RoutingState, unit: str, router: MoergeRouter | None) -> None:
        self.state, self.unit, self.router = state, unit, router

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        if st.sequence_slot.shared:  # the pre-pass: routed linears apply W_s, no route needed
            return
        x = hidden_states_of(args, kwargs)  # (B, T, C)
        slot = st.slot_for(self.unit)
        pinned = st.pinned()
        if pinned is not None:
            slot.set_forced(*pinned, x)
        elif st.level == "token":
            slot.set_tokens(top_k_route(self.router(x), st.top_k))  # (B, T, E)
        elif slot.route is None or slot.route.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"moerge: no sequence route for unit {self.unit!r}; router_input must run before every routed unit"
            )


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
def _is_prefill(cache) -> bool:
    """No cache, or an empty one."""
    if cache is None:
        return True
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) == 0
    try:  # legacy tuple cache
        return len(cache) == 0 or cache[0][0].shape[-2] == 0
    except (TypeError, IndexError, AttributeError):
        return False


class MoergeForCausalLM(PreTrainedModel, GenerationMixin):
    """The base causal LM with routed expert deltas (see the module docstring and docs/FORMAT.md)."""

    config_class = MoergeConfig
    base_model_prefix = "model"
    # replaced in __init__ by the base causal LM class's own mapping (v5 format: {target: source})
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}
    # device maps: a routed linear's weight and expert buffers stay together (the base's decoder layer class,
    # added in __init__, keeps a layer's routed linears and token-level routers on one device)
    _no_split_modules: ClassVar[set[str]] = {"RoutedLinear", "MoergeRouter"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    cache_size = 4  # effective weights kept per routed linear

    def __init__(self, config: MoergeConfig) -> None:
        super().__init__(config)
        inner = AutoModelForCausalLM.from_config(config.base_config, dtype=torch.get_default_dtype())
        object.__setattr__(self, "_causal_lm", inner)  # not registered: its children are registered below
        config.base_config = inner.config
        config._attn_implementation_internal = inner.config._attn_implementation
        for name, child in inner.named_children():
            self.add_module(name, child)
        self._mirror_class_attributes(inner)
        self._forward_params = set(inspect.signature(inner.forward).parameters)
        self._moerge = RoutingState(config.moerge, self.cache_size)
        self._build_routing(config.moerge)
        optional = {r"moerge_router\.center$"}  # absent = 0
        if (
            not self._moerge.initialized
        ):  # an uninitialised router's tensors may be left out of the checkpoint
            optional.add(r"moerge_router\.")
        self._keys_to_ignore_on_load_missing = {*(self._keys_to_ignore_on_load_missing or ()), *optional}
        self.post_init()

    def _mirror_class_attributes(self, inner: PreTrainedModel) -> None:
        self._tied_weights_keys = dict(getattr(inner, "_tied_weights_keys", None) or {})
        self.base_model_prefix = inner.base_model_prefix
        for attr in (
            "_keep_in_fp32_modules",
            "_keep_in_fp32_modules_strict",
            "_no_split_modules",
            "_keys_to_ignore_on_load_unexpected",
            "_keys_to_ignore_on_load_missing",
        ):
            value = getattr(type(inner), attr, None)
            if value:
                setattr(self, attr, set(value) | set(getattr(type(self), attr, None) or []))

    # ---- construction --------------------------------------------------------------------------------------
    def _build_routing(self, plan: dict) -> None:
        st = self._moerge
        units: dict = plan.get("units", {})
        if not units:
            return
        n_out, hidden = len(st.outputs), self.config.get_text_config().hidden_size
        dtype, device = self._float_dtype_device()
        if st.level not in ("sequence", "token"):
            raise ValueError(f"moerge: level must be 'sequence' or 'token', got {st.level!r}")
        if st.level == "sequence":
            self.moerge_router = MoergeRouter(n_out, hidden, dtype, device, st.unknown)
            source = self.get_submodule(plan.get("router_input") or next(iter(units)))
            source.register_forward_pre_hook(SequenceRouterHook(st, self.moerge_router), with_kwargs=True)
        for unit_name, spec in units.items():
            for lin_name, lin_spec in spec["linears"].items():  # first: a unit may be one linear (the head)
                self._route_linear(unit_name, lin_name, spec["kind"], lin_spec)
            unit = self.get_submodule(unit_name)
            router = None
            if st.level == "token":
                router = unit.moerge_router = MoergeRouter(n_out, hidden, dtype, device)
            unit.register_forward_pre_hook(UnitHook(st, unit_name, router), with_kwargs=True)

    def _route_linear(self, unit_name: str, lin_name: str, kind: str, spec: dict) -> None:
        """Replace linear ``lin_name`` of unit ``unit_name`` (``""``: the unit is that linear, e.g. ``lm_head``)
        by a RoutedLinear holding the same weight Parameter (so tied weights stay tied)."""
        path = f"{unit_name}.{lin_name}" if lin_name else unit_name
        linear = self.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"moerge: {path} is a {type(linear).__name__}, not nn.Linear")
        experts = spec["experts"]
        if len(experts) != len(self._moerge.experts):
            raise ValueError(f"moerge: {path} has {len(experts)} experts, expected {len(self._moerge.experts)}")
        parent_name, _, attr = path.rpartition(".")
        slot = self._moerge.slot_for(unit_name)
        routed = RoutedLinear(linear, kind, experts, slot, self.cache_size, self._moerge.mix_for(unit_name),
                              self._moerge.anchor_for(unit_name))
        routed.unit = unit_name
        setattr(self.get_submodule(parent_name), attr, routed)
        if not parent_name:  # a child of the wrapped causal LM, registered on both: its forward reads its own
            setattr(self._causal_lm, attr, routed)

    def _float_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(p for p in self._causal_lm.parameters() if p.is_floating_point())
        return p.dtype, p.device

    def initialize_weights(self) -> None:
        """transformers' init, plus defaults for the moerge tensors that were not loaded."""
        for module in self.modules():
            if isinstance(module, (RoutedLinear, MoergeRouter, UnknownDetector)):
                module.reset()
        super().initialize_weights()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (RoutedLinear, MoergeRouter, UnknownDetector)):
            module.reset()
        else:
            self._causal_lm._init_weights(module)

    # ---- embeddings (delegated) -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self._causal_lm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._causal_lm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self._causal_lm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self._causal_lm.set_output_embeddings(value)
        if hasattr(self, "lm_head"):
            self.lm_head = self._causal_lm.lm_head

    # ---- routing API ----------------------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return list(self._moerge.experts)

    @property
    def route_names(self) -> list[str]:
        """The router's outputs: the experts, then the composed routes (the columns of `last_routes`)."""
        return list(self._moerge.outputs)

    @property
    def moerge_stats(self) -> dict[str, int]:
        """``routed_rows`` (sequence routes computed), ``fallback_rows`` (of those, how many fell back) and, with
        an ``unknown`` detector, ``unknown_rows`` (how many took the shared weights as unlike every known task)."""
        return self._moerge.stats

    def reset_moerge_stats(self) -> None:
        self._moerge.stats.update({k: 0 for k in self._moerge.stats})

    def force_route(self, route: str | int | dict[str, float] | None) -> None:
        """Pin every unit to route ``route`` (an expert or composed route, by name or index), to a mix ``{name:
        weight}`` (normalised to sum 1), to the shared weights alone with ``{}``, or release the pin with None."""
        self._moerge.forced = self._moerge.weights(route)
        for slot in [self._moerge.sequence_slot, *self._moerge.slots.values()]:
            slot.clear()
        self.clear_route_cache()

    def add_route(self, name: str, weights: dict[str, list[float]]) -> None:
        """Add a composed route at run time: ``weights[unit]`` = one weight per expert in that routed unit (a unit
        left out: all 0, the shared weights).  ``force_route(name)`` then selects it; the router gets one more
        output that it does not pick until calibrated (``moerge calibrate --compose`` fits and stores a route)."""
        st = self._moerge
        if name in st.outputs:
            raise ValueError(f"moerge: {name!r} is already an expert or route: {st.outputs}")
        units = list(self.config.moerge.get("units", {}))
        rows = {u: [float(v) for v in weights.get(u, [0.0] * len(st.experts))] for u in units}
        bad = [u for u, w in rows.items() if len(w) != len(st.experts)] + [u for u in weights if u not in rows]
        if bad:
            raise ValueError(f"moerge: route {name!r}: units {bad} are not routed units with {len(st.experts)} weights")
        st.routes[name] = rows
        st.outputs.append(name)
        self.config.moerge["routes"] = {**(self.config.moerge.get("routes") or {}), name: rows}
        st._uniform = st.weights({n: 1.0 for n in st.experts})
        self.force_route(None)
        for module in self.modules():
            if isinstance(module, MoergeRouter):
                module.grow()
            elif isinstance(module, RoutedLinear):
                module.set_mix(st.mix_for(module.unit))

    def clear_route_cache(self) -> None:
        """Drop the cached effective weights / deltas of every routed linear."""
        for module in self.modules():
            if isinstance(module, RoutedLinear):
                module.clear_cache()

    def route_cache_bytes(self) -> int:
        """Bytes held by the routed linears' caches (effective weights, deltas, kernel indices)."""
        return sum(m.cache_bytes() for m in self.modules() if isinstance(m, RoutedLinear))

    def last_routes(self) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """(B, O) at sequence level, {unit: (B, T, O)} at token level, from the last forward (O = `route_names`)."""
        st = self._moerge
        if st.level == "sequence":
            r = st.sequence_slot.route
            return None if r is None else r.detach().clone()
        return {u: s.as_tokens().detach().clone() for u, s in st.slots.items() if s.route is not None}

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """The base causal LM's forward; routes are set by the hooks (prefill = no or empty cache)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        self._begin(cache, attention_mask)
        st = self._moerge
        if st.prepass and st.phase == "prefill" and st.forced is None:
            self._prepass(input_ids, attention_mask, position_ids, inputs_embeds, kwargs)
        cache_arg = "cache" if "cache" in self._forward_params else "past_key_values"
        extra = {cache_arg: cache}
        if "logits_to_keep" in self._forward_params:
            extra["logits_to_keep"] = logits_to_keep
        try:
            return self._causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **extra, **kwargs)
        finally:
            self._moerge.phase, self._moerge.mask = None, None
            for slot in (self._moerge.sequence_slot, *self._moerge.slots.values()):
                slot.decode = False

    def _prepass(self, input_ids, attention_mask, position_ids, inputs_embeds, kwargs: dict) -> None:
        """The shared model (routed linears apply W_s) up to the sequence router's input, which sets the route;
        stopped there by a hook added after any the caller registered (so feature hooks see this pass).  Writes no
        KV cache; costs the layers before the router input once per prompt."""
        st = self._moerge
        tap = self.get_submodule(st.plan["router_input"])
        handle = tap.register_forward_pre_hook(_stop_prepass)
        st.sequence_slot.shared = True
        extra = {k: kwargs[k] for k in ("cache_position",) if k in kwargs}
        try:
            self._causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       inputs_embeds=inputs_embeds, use_cache=False, **extra)
        except _PrepassDone:
            pass
        finally:
            handle.remove()
            st.sequence_slot.shared = False
        st.route_ready = st.sequence_slot.route is not None

    def _begin(self, cache, attention_mask) -> None:
        st = self._moerge
        prefill = _is_prefill(cache)
        st.phase = "prefill" if prefill else "decode"
        st.route_ready = False
        for slot in (st.sequence_slot, *st.slots.values()):
            slot.decode = not prefill
        st.mask = (
            attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        )
        if prefill and st.pinned() is None:
            st.sequence_slot.clear()

    def adjust_generation_fn(self, *args, **kwargs):
        """transformers' generation-config loading, then unset special tokens taken from the base config (a
        checkpoint without generation_config.json would otherwise read them from the top of config.json)."""
        super().adjust_generation_fn(*args, **kwargs)
        text = self.config.get_text_config(decoder=True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, name, None) is None and getattr(text, name, None) is not None:
                setattr(self.generation_config, name, getattr(text, name))

    # ---- loading and saving ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained; with a device map that offloads, checks first that accelerate can reload
        every offloaded tensor (it reloads them from the checkpoint only)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        seen: dict[int, frozenset[str]] = {}
        gaps = [f"{name}.{t}" if name else t for name, m in model.named_modules() for t in _offload_gaps(m, seen)]
        if gaps:
            raise ValueError(
                f"moerge: the device map offloads {len(gaps)} tensor(s) that the checkpoint does not hold, e.g. "
                f"{gaps[:3]} (an omitted router `center`, or routers left out at `initialized: false`); accelerate "
                "reloads offloaded tensors from the checkpoint only.  Keep those modules on a device in the device "
                "map, or load once without offloading and save_pretrained the model (it writes every tensor)."
            )
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus the remote code files and the auto_map."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        copy_remote_code(save_directory)
        return result


def copy_remote_code(out_dir: str | os.PathLike) -> list[str]:
    """Copy configuration_moerge.py and modeling_moerge.py (this file's folder) into out_dir."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in REMOTE_CODE_FILES:
        src, dst = os.path.join(here, name), os.path.join(out_dir, name)
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)
        written.append(dst)
    return written


__all__ = [
    "DELTAS",
    "KIND_IMPLS",
    "ExpertKind",
    "MoergeForCausalLM",
    "MoergeRouter",
    "RouteSlot",
    "RoutedLinear",
    "copy_remote_code",
    "expert_kind",
    "unpack_bits",
]
