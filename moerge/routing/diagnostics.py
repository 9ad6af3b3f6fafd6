"""Routing diagnostics: accuracy, per-expert precision/recall, confusion matrix, entropy, fallback rate.

:func:`routing_metrics` is pure (route probabilities and labels in, a JSON-ready dict out);
:func:`format_metrics` renders it as text and :func:`confusion_png` draws the confusion matrix (matplotlib
Agg backend, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .fit import entropy


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N,), (N,) -> (E, E) counts, rows = true expert, columns = routed expert."""
    flat = y.long() * n_experts + pred.long()  # (N,)
    return torch.bincount(flat, minlength=n_experts * n_experts).view(n_experts, n_experts)


def per_expert(conf: torch.Tensor, experts: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall and support per expert from an (E, E) confusion matrix (0 when undefined)."""
    out = {}
    for e, name in enumerate(experts):
        tp, routed, true = float(conf[e, e]), float(conf[:, e].sum()), float(conf[e].sum())
        out[name] = {"precision": tp / routed if routed else 0.0, "recall": tp / true if true else 0.0,
                     "support": int(true)}
    return out


def routing_metrics(probs: torch.Tensor, y: torch.Tensor | None, experts: list[str],
                    threshold: float | None = None) -> dict[str, Any]:
    """probs (N, E) route probabilities before top-k, y (N,) true experts (None / -1 = unlabelled).

    ``accuracy`` is the fraction of labelled rows whose top route is their expert; ``fallback_rate`` the
    fraction of rows whose top probability is below ``threshold``."""
    probs = probs.float()
    n, n_exp = probs.shape
    top = probs.max(-1)
    out: dict[str, Any] = {"n": n, "mean_entropy": float(entropy(probs).mean()) if n else 0.0,
                           "max_entropy": float(torch.log(torch.tensor(float(n_exp))))}
    falls = top.values < threshold if threshold is not None else torch.zeros(n, dtype=torch.bool)
    out["fallback_rows"], out["fallback_rate"] = int(falls.sum()), float(falls.float().mean()) if n else 0.0
    if y is None or n == 0 or bool((y < 0).any()):
        return out
    pred = top.indices
    conf = confusion_matrix(pred, y, n_exp)
    out["accuracy"] = float((pred == y).float().mean())
    routed = ~falls
    out["accuracy_routed"] = float((pred == y)[routed].float().mean()) if bool(routed.any()) else None
    out["per_expert"] = per_expert(conf, experts)
    out["confusion"] = conf.tolist()
    return out


def format_metrics(m: dict[str, Any], title: str) -> str:
    """A few lines of text for one :func:`routing_metrics` result."""
    lines = [f"{title}: {m['n']} examples"]
    if "accuracy" in m:
        lines.append(f"  routing accuracy   {m['accuracy']:.4f}")
    lines.append(f"  mean entropy       {m['mean_entropy']:.4f} nats (max {m['max_entropy']:.4f})")
    lines.append(f"  fallback rate      {m['fallback_rate']:.4f} ({m['fallback_rows']} of {m['n']})")
    if "per_expert" in m:
        width = max(8, *(len(name) for name in m["per_expert"]))
        lines.append(f"  {'expert':<{width}} {'precision':>9} {'recall':>7} {'support':>7}")
        for name, v in m["per_expert"].items():
            lines.append(f"  {name:<{width}} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['support']:>7d}")
    return "\n".join(lines)


def confusion_png(conf: list[list[int]], experts: list[str], out: Path, title: str) -> Path:
    """Write the confusion matrix (rows true, columns routed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.6 * len(experts)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(experts)), experts)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("true expert")
    peak = max((v for row in conf for v in row), default=0)
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out
