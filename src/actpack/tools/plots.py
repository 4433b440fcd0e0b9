"""The PNG ``actpack train --plot`` writes: accuracy per epoch, and bytes saved for backward.

matplotlib is optional (``pip install 'actpack[cli]'``); ``actpack train``
checks for it before training starts.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

__all__ = ["figure", "plot_training"]


def _ratio(value: float | None) -> str:
    return "n/a" if not value else f"{value:.2f}x"


def _accuracy(ax: Any, payload: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    runs, rows, cfg = payload["runs"], payload["summary"], payload["config"]
    seeds = max(len(r["seeds"]) for r in rows)
    for row in rows:
        mine = [r for r in runs if r["strategy"] == row["strategy"]]
        epochs = [e["epoch"] for e in mine[0]["epochs"]]
        curves = [[e["test_acc"] for e in r["epochs"]] for r in mine]
        mean = [statistics.fmean(vals) for vals in zip(*curves)]
        (line,) = ax.plot(epochs, mean, marker="o", label=row["strategy"])
        if len(curves) > 1:
            lo = [min(vals) for vals in zip(*curves)]
            hi = [max(vals) for vals in zip(*curves)]
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15)
    spread = f"mean of {seeds} seeds, band: min-max" if seeds > 1 else "1 seed"
    ax.set(
        xlabel="epoch",
        ylabel=f"test accuracy (%, {cfg.get('test_samples', '?')} images)",
        title=f"Fashion-MNIST, {cfg['model']}-{cfg['size']} ({spread})",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def _saved_bytes(ax: Any, payload: dict[str, Any]) -> None:
    rows, cfg = payload["summary"], payload["config"]
    names = [r["strategy"] for r in rows]
    base = [(r["baseline_bytes"] or 0) / 2**20 for r in rows]
    comp = [(r["compressed_bytes"] or 0) / 2**20 for r in rows]
    xs = range(len(names))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], base, width, label="without actpack")
    bars = ax.bar([x + width / 2 for x in xs], comp, width, label="with the strategy")
    for bar, r in zip(bars, rows):
        ax.annotate(
            _ratio(r["ratio"]),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), names)
    ax.margins(y=0.08)  # room for the ratio above the tallest bar
    ax.set(ylabel="MiB", title=f"saved for backward per step (batch {cfg['batch_size']})")
    # The legend goes below the axes: inside, it would cover the tallest bars.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)


def figure(payload: dict[str, Any]) -> Any:
    """The matplotlib figure of an ``actpack train`` payload (its ``runs``, ``summary``,
    ``config``): test accuracy per epoch, and bytes saved for backward per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    _accuracy(ax_acc, payload)
    _saved_bytes(ax_mem, payload)
    return fig


def plot_training(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write :func:`figure` of ``payload`` to the PNG ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(payload)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
