"""Router rows of a native MoE export, measured at the router's true input.

A native router scores token features ``x`` (the post-attention RMSNorm output of its layer, i.e. the MLP
input) as ``logits = W x`` with ``W`` (E, C) and no bias.  The rows come from calibration prompts:

1. **Features** (:func:`collect_stats`): the written export is run with the base's dense architecture, one
   forward per batch of prompts (experts mixed), each decoder layer read from the export right before it runs
   and dropped after (peak memory: one layer); in MoE layers each prompt goes through its own expert's MLP (the
   path it takes when routing is right).  Per routed layer and expert we keep the attention-mask-aware mean of
   every prompt, token moments, and a few hundred token samples.
2. **Prototype rows** (:func:`prototype_rows`): ``m_e`` = mean of expert e's prompt means, ``m`` = mean over
   experts.  With negatives (the default) the direction is ``p_e = m_e - m`` (what tells expert e apart from the
   others), projected orthogonal to ``m``: then ``W x = W (x - m)`` exactly, so the bias a native router lacks is
   not needed.  Rows are normalised to ``p_e / (|p_e| nu)`` with ``nu`` the RMS token distance to ``m``: a
   typical token's logits are then cosines in [-1, 1].
3. **Temperature** (:func:`fit_temperature`): one scalar for the layer, minimising the cross-entropy of the
   token samples' own expert (a log grid in [1, 200], evaluated in one batched op): the softmax is as confident as the data
   supports, and no more.
4. Optionally **supervised calibration** (:func:`fit_rows`): multinomial logistic regression of the rows on the
   token samples (L-BFGS from the prototype rows, L2 pull towards them), i.e. the router is trained in its native
   form on the same data.

:func:`rows_from_prototypes` converts a token-level moerge cosine router (``scale * cos(x - c, p_e) + b_e``) to
rows without data: ``scale * P(p_e) / (|p_e| nu)`` with ``P`` the projection orthogonal to ``c`` (so ``W x = W
(x - c)``) and ``nu = sqrt(|g|^2 - |c|^2)`` estimated from the layer's RMSNorm weight ``g`` (an RMS-normalised
token has norm about ``|g|``); the per-expert bias ``b_e`` (0 unless calibrated) is dropped.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling.configuration_moerge import build_base_config
from ..routing.fit import fit_temperature as fit_temperature_grid

MAX_TOKENS = 512  # token samples kept per expert and layer


@dataclass
class GateStats:
    """What one layer's router input looks like for each expert's prompts (C = hidden size)."""

    n_experts: int
    hidden: int
    prompt_sum: torch.Tensor = field(init=False)  # (E, C) sum of per-prompt masked means
    n_prompts: torch.Tensor = field(init=False)  # (E,)
    tok_sum: torch.Tensor = field(init=False)  # (E, C) sum over real tokens
    tok_sq: torch.Tensor = field(init=False)  # (E,) sum of squared token norms
    tok_n: torch.Tensor = field(init=False)  # (E,)
    samples: list[list[torch.Tensor]] = field(init=False)  # per expert: (k, C) chunks

    def __post_init__(self) -> None:
        e, c = self.n_experts, self.hidden
        self.prompt_sum, self.tok_sum = torch.zeros(e, c, dtype=torch.float64), torch.zeros(e, c, dtype=torch.float64)
        self.n_prompts, self.tok_sq, self.tok_n = (torch.zeros(e, dtype=torch.float64) for _ in range(3))
        self.samples = [[] for _ in range(e)]

    def add(self, e: int, x: torch.Tensor, mask: torch.Tensor, per_prompt: int) -> None:
        """x (B, T, C) router inputs of expert e's prompts, mask (B, T) 1 = real token."""
        x, m = x.float(), mask.float().unsqueeze(-1)  # (B, T, C), (B, T, 1)
        xm = x * m  # (B, T, C)
        self.prompt_sum[e] += (xm.sum(1) / m.sum(1).clamp_min(1)).sum(0).double()
        self.n_prompts[e] += x.shape[0]
        self.tok_sum[e] += xm.sum((0, 1)).double()
        self.tok_sq[e] += float((xm * x).sum())
        self.tok_n[e] += float(m.sum())
        for b in range(x.shape[0]):
            real = torch.nonzero(mask[b]).flatten()  # (L,)
            if len(real):
                pick = torch.linspace(0, len(real) - 1, min(per_prompt, len(real))).round().long()
                self.samples[e].append(x[b, real[pick]])  # (k, C)

    def means(self) -> torch.Tensor:
        """(E, C) mean of each expert's prompt means."""
        return (self.prompt_sum / self.n_prompts.clamp_min(1)[:, None]).float()

    def xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token samples (N, C) and their expert labels (N,)."""
        xs = [torch.cat(s) if s else torch.zeros(0, self.hidden) for s in self.samples]
        ys = [torch.full((len(x),), e, dtype=torch.long) for e, x in enumerate(xs)]
        return torch.cat(xs), torch.cat(ys)

    def rms_distance(self, center: torch.Tensor) -> float:
        """sqrt(E_tokens |x - center|^2) over every expert's tokens."""
        n = self.tok_n.sum().clamp_min(1)
        mean_sq = self.tok_sq.sum() / n
        mean = self.tok_sum.sum(0) / n  # (C,)
        c = center.double()
        return math.sqrt(max(float(mean_sq - 2 * mean @ c + c @ c), 1e-12))


# ------------------------------------------------------------------------------------------------ rows


def _orthogonal(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Rows p (E, C) projected orthogonal to c (C,)."""
    n2 = float(c @ c)
    return p if n2 == 0 else p - (p @ c)[:, None] * c[None, :] / n2


def _unit_rows(p: torch.Tensor, nu: float) -> torch.Tensor:
    return p / (p.norm(dim=-1, keepdim=True).clamp_min(1e-12) * max(nu, 1e-12))


def prototype_rows(stats: GateStats, negatives: bool = True) -> torch.Tensor:
    """(E, C) rows at unit temperature: a typical token's logits are cosines."""
    means = stats.means()  # (E, C)
    center = means.mean(0)  # (C,)
    if not negatives:
        return _unit_rows(means, stats.rms_distance(torch.zeros_like(center)))
    return _unit_rows(_orthogonal(means - center, center), stats.rms_distance(center))


def _nll(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(x @ rows.T, y)  # (N, C) @ (C, E) -> (N, E)


def fit_temperature(rows: torch.Tensor, stats: GateStats, lo: float = 1.0, hi: float = 200.0) -> float:
    """The scale s in [lo, hi] minimising the token samples' cross-entropy of ``s * rows``: one batched
    evaluation on a log grid (`moerge.routing.fit.fit_temperature` with T = 1 / s, no target smoothing)."""
    x, y = stats.xy()
    if len(x) == 0:
        return lo
    return 1.0 / fit_temperature_grid(x @ rows.T, y, smoothing=0.0, lo=1.0 / hi, hi=1.0 / lo)  # (N, E) logits


def fit_rows(rows: torch.Tensor, stats: GateStats, *, steps: int = 50, l2: float = 1e-3) -> torch.Tensor:
    """Supervised calibration: logistic regression of the rows on the token samples, from ``rows``."""
    x, y = stats.xy()
    if len(x) == 0:
        return rows
    w0 = rows.detach().clone()
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    scale = float(w0.norm()) ** 2 or 1.0

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(w, x, y) + l2 * ((w - w0) ** 2).sum() / scale
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def rows_from_prototypes(proto: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stored token-level cosine router (prototypes (E, C), center (C,), scale (), norm weight g (C,)) -> rows."""
    p, c = proto["prototypes"], proto.get("center", torch.zeros(proto["prototypes"].shape[1]))
    g2 = float(proto["norm"].double().pow(2).sum())
    nu = math.sqrt(max(g2 - float(c.double() @ c.double()), 0.05 * g2))
    return float(proto.get("scale", torch.tensor(1.0))) * _unit_rows(_orthogonal(p, c), nu)


# ------------------------------------------------------------------------------------------------ features


class _Stop(Exception):
    pass


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc): layer-sized buffers below malloc's mmap threshold would
    otherwise pile up as fragmented heap between layers."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


LayerWeights = Callable[[int, int, list[str]], dict[str, torch.Tensor]]


def _skeleton(base_cfg: dict[str, Any], embed: torch.Tensor) -> Any:
    """The base's dense causal LM on the meta device, with real embeddings and rotary tables, in embed's dtype."""
    from transformers import AutoModelForCausalLM

    cfg = build_base_config(base_cfg)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=embed.dtype)
    inner = model.model
    inner.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg)
    return inner


def _load(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    module.load_state_dict(state, strict=strict, assign=True)


def _drop(module: nn.Module) -> None:
    module.to("meta")
    release_memory()


class _Batch:
    """The batch in flight: its attention mask (B, T) and each expert's rows."""

    mask: torch.Tensor
    rows: dict[int, torch.Tensor]


class _ExpertSwitch(nn.Module):
    """Stands in for a MoE layer's MLP: feeds its input to the statistics, then runs each row through its own
    expert's MLP, loading one expert at a time.  Raises _Stop after the last layer the statistics need."""

    def __init__(self, mlp: nn.Module, layer: int, weights: LayerWeights, batch: _Batch,
                 sink: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None, last: bool) -> None:
        super().__init__()
        self.mlp, self.layer, self.weights, self.batch, self.sink, self.last = mlp, layer, weights, batch, sink, last
        self.keys = [f"mlp.{k}" for k in mlp.state_dict()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        for e, rows in self.batch.rows.items():
            if self.sink is not None:
                self.sink(self.layer, e, x[rows], self.batch.mask[rows])
        if self.last:
            raise _Stop
        y = torch.zeros_like(x)  # padded positions stay 0: right padding, so no real token reads them
        real = self.batch.mask.bool()  # (B, T)
        for e, rows in self.batch.rows.items():
            _load(self.mlp, {k[4:]: v for k, v in self.weights(self.layer, e, self.keys).items()})
            pick = torch.zeros_like(real)
            pick[rows] = real[rows]  # expert e's real tokens
            y[pick] = self.mlp(x[pick]).to(y.dtype)  # (n, C) -> (n, C)
            _drop(self.mlp)
        return y


@contextmanager
def _streamed(inner: Any, weights: LayerWeights, moe: set[int], batch: _Batch, routed: list[int],
              sink: Callable[[int, int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Make ``inner`` load each decoder layer right before it runs and drop it after (MoE layers: the MLP is an
    :class:`_ExpertSwitch`); the forward stops inside the last routed layer's MLP."""
    last = max(routed)
    handles, swapped = [], []

    def pre(layer: nn.Module, args: tuple, i: int) -> None:
        keys = [k for k in layer.state_dict() if not (i in moe and k.startswith("mlp."))]
        _load(layer, weights(i, 0, keys), strict=i not in moe)  # a MoE layer's switch loads its MLP itself

    for i, layer in enumerate(inner.layers[: last + 1]):
        if i in moe:
            swapped.append((layer, layer.mlp))
            layer.mlp = _ExpertSwitch(layer.mlp, i, weights, batch, sink if i in routed else None, i == last)
        handles.append(layer.register_forward_pre_hook(lambda mod, args, i=i: pre(mod, args, i)))
        handles.append(layer.register_forward_hook(lambda mod, args, out: _drop(mod)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer, mlp in swapped:
            layer.mlp = mlp
            _drop(layer)


def _fast_matmuls(dtype: torch.dtype) -> Any:
    """bf16 autocast for a float32 pass on CPUs with native bf16 matmuls (about 3x faster there); the router
    statistics do not need more than bf16's precision."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32 and bool(native))


@torch.no_grad()
def collect_stats(base_cfg: dict[str, Any], embed: torch.Tensor, weights: LayerWeights, texts: list[list[str]],
                  tokenizer: Any, moe: set[int], routed: list[int], *, batch_size: int = 32, max_length: int = 512,
                  max_tokens: int = MAX_TOKENS) -> dict[int, GateStats]:
    """Per routed layer: the statistics of every expert's prompts (``texts[e]``) at the MLP input.

    One forward per batch of prompts (experts mixed), in ``embed``'s dtype (float32: bf16 autocast where the CPU
    has native bf16 matmuls); each decoder layer is read right
    before it runs and dropped after, and in the layers stored as MoE (``moe``) each prompt goes through its own
    expert's MLP.  ``weights(layer, expert, keys)`` gives a decoder layer's tensors (``expert`` only matters for
    MoE layers' ``mlp.*`` keys)."""
    inner = _skeleton(base_cfg, embed)
    stats = {i: GateStats(len(texts), int(base_cfg["hidden_size"])) for i in routed}
    per_prompt = [max(1, max_tokens // max(len(t), 1)) for t in texts]
    items = sorted(((e, p) for e, prompts in enumerate(texts) for p in prompts), key=lambda ep: len(ep[1]))
    batch = _Batch()

    def sink(i: int, e: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        stats[i].add(e, x, mask, per_prompt[e])

    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        with _streamed(inner, weights, moe, batch, routed, sink), _fast_matmuls(embed.dtype):
            for b in range(0, len(items), batch_size):
                chunk = items[b:b + batch_size]
                enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length, add_special_tokens=False)
                labels = torch.tensor([e for e, _ in chunk])  # (B,)
                batch.mask = enc["attention_mask"]
                batch.rows = {e: torch.nonzero(labels == e).flatten() for e in labels.unique().tolist()}
                try:
                    inner(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                except _Stop:
                    pass
    finally:
        tokenizer.padding_side = side
    return stats
