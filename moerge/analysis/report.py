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


def gain_plot(rows: list[dict], out: Path) -> Path:
    """The allocation per unit (``rows``: unit, layer, group, before, after, bytes): the measured error with the
    unit merged and what the chosen storage leaves, one panel per group, and the bytes spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 6), squeeze=False)
    for j, group in enumerate(groups):
        rs = sorted((r for r in rows if r["group"] == group), key=lambda r: r["layer"])
        layers = [r["layer"] for r in rs]
        axes[0][j].semilogy(layers, [max(r["before"], 1e-12) for r in rs], "o-", label="merged")
        axes[0][j].semilogy(layers, [max(r["after"], 1e-12) for r in rs], "s-", label="after the allocation")
        axes[0][j].set_title(f"{group}: measured output error")
        axes[0][j].legend(fontsize=8)
        axes[1][j].bar(layers, [r["bytes"] / 1e6 for r in rs])
        axes[1][j].set_title(f"{group}: MB stored")
        axes[1][j].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

