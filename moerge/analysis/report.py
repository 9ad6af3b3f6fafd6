"""What ``moerge analyze`` shows: the conflict table and a heatmap PNG (layers x units, one panel per metric).

Pure rendering: metrics in, text or a PNG file out (the streaming pass is :mod:`moerge.pipeline.analyze`)."""

from __future__ import annotations

from pathlib import Path

from .conflict import METRICS


def conflict_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = [f"{'unit':<28}" + "".join(f"{m:>15}" for m in METRICS)]
    for path, vals in metrics.items():
        lines.append(f"{path:<28}" + "".join(f"{vals[m]:>15.4f}" for m in METRICS))
    return "\n".join(lines)


def heatmap(metrics: dict[str, dict[str, float]], layer_group: dict[str, tuple[int, str]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = sorted({g for _, g in layer_group.values()})
    n_layers = max(lg[0] for lg in layer_group.values()) + 1
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), max(3, 0.25 * n_layers + 1.5)))
    for ax, metric in zip(axes, METRICS):
        grid = np.full((n_layers, len(groups)), np.nan)
        for path, (layer, group) in layer_group.items():
            grid[layer, groups.index(group)] = metrics[path][metric]
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(metric)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("expert conflict per unit")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
