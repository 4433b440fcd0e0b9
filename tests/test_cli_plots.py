"""What ``actpack train`` prints and draws: deltas with their standard error, a readable plot."""

from __future__ import annotations

import math

import pytest

from actpack.tools.train import format_summary, paired_delta, summarize

pytest.importorskip("matplotlib")


def _run(strategy: str, seed: int, correct: str, accs: list[float]) -> dict:
    return {
        "strategy": strategy,
        "seed": seed,
        "test_correct": correct,
        "final_test_acc": 100.0 * correct.count("1") / len(correct),
        "saved": {"baseline_bytes": 2**20, "compressed_bytes": 2**16, "ratio": 16.0},
        "time_per_step_s": 0.01,
        "peak_bytes": None,
        "epochs": [{"epoch": i + 1, "test_acc": a} for i, a in enumerate(accs)],
    }


def test_paired_delta_and_its_standard_error() -> None:
    # per image d = [0, -1, 1, 0]: mean 0, sample std sqrt(2/3), s.e. sqrt(2/3) / 2
    runs = [_run("none", 0, "1100", [50]), _run("actnn", 0, "1010", [50])]
    delta, se = paired_delta(runs, "actnn")
    assert delta == 0.0
    assert se == pytest.approx(100 * math.sqrt(2 / 3) / 2)
    # d = [-1, 0, 0, 0]: -25 points, sample std 0.5, s.e. 0.25
    runs = [_run("none", 0, "1111", [100]), _run("actnn", 0, "0111", [75])]
    assert paired_delta(runs, "actnn") == pytest.approx((-25.0, 25.0))
    # two seeds, d = [-1, 0, 0, 0] and [0, 0, 0, 0]: per image D = [-.5, 0, 0, 0] (variance
    # 1/16, over 4 images 1/64); per seed delta = [-1/4, 0] (variance 1/32, over 2 seeds 1/64)
    runs += [_run("none", 1, "1111", [100]), _run("actnn", 1, "1111", [100])]
    assert paired_delta(runs, "actnn") == pytest.approx((-12.5, 100 * math.sqrt(2 / 64)))
    with pytest.raises(ValueError, match="share no seed"):
        paired_delta([_run("none", 0, "1", [1]), _run("actnn", 1, "1", [1])], "actnn")


def test_summary_prints_the_standard_error() -> None:
    runs = [_run("none", 0, "1111", [100]), _run("actnn", 0, "0111", [75])]
    rows = summarize(runs, ["none", "actnn"])
    assert rows[1]["acc_delta_vs_none"] == pytest.approx(rows[1]["test_acc_mean"] - 100.0)
    text = format_summary(rows, cuda=False)
    assert "| actnn | 75.00 (n=1) | -25.00 ± 25.00 |" in text
    assert "| none | 100.00 (n=1) | 0 (reference) |" in text
    assert "standard error of the accuracy difference, over the 4 test images" in text


def _payload(seeds: int, epochs: int) -> dict:
    runs = [
        _run(name, seed, "1" * 30 + "0" * 21, [60 + 5 * e + seed for e in range(epochs)])
        for seed in range(seeds)
        for name in ("none", "actnn", "division")
    ]
    names = ["none", "actnn", "division"]
    config = {"model": "resnet", "size": "tiny", "batch_size": 64, "test_samples": 51}
    return {"runs": runs, "summary": summarize(runs, names), "config": config}


@pytest.mark.parametrize(("seeds", "epochs"), [(1, 3), (3, 7)])
def test_plot_is_readable(seeds: int, epochs: int) -> None:
    import matplotlib.pyplot as plt

    from actpack.tools.plots import figure

    fig = figure(_payload(seeds, epochs))
    fig.canvas.draw()
    ax_acc, ax_mem = fig.axes
    lo, hi = ax_acc.get_xlim()
    ticks = [t for t in ax_acc.get_xticks() if lo <= t <= hi]
    assert ticks and all(t == int(t) for t in ticks)  # whole epochs only
    title = ax_acc.get_title()
    if seeds == 1:
        assert "1 seed" in title and "min-max" not in title
    else:
        assert f"mean of {seeds} seeds, band: min-max" in title
    legend = ax_mem.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax_mem.patches]
    assert len(bars) == 6 and not any(legend.overlaps(b) for b in bars)
    plt.close(fig)
