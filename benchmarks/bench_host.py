"""Host overhead of the eager engine: per torch call, per saved tensor, per step.

Where compute is negligible, what actpack costs is Python on the host: the op
tracker (a ``TorchFunctionMode`` seeing every torch call, needed only by
lossy strategies) and the bookkeeping of each saved tensor.  Three figures,
each measured side by side with plain PyTorch in interleaved rounds on one
thread (medians of the rounds):

* microseconds added per torch call (a loop of tiny no-grad ops),
* microseconds added per saved tensor (tiny multiplications, every operand
  saved, all below ``min_numel`` so no codec runs),
* the training-step ratio of a width-32 ``nn.TransformerEncoderLayer`` on 8
  tokens (issue goal: ``"none"`` <= 1.25x, ``"actnn"`` <= 2.0x), with a new
  ``compress()`` per step and with one engine (``wrap``).

Run: ``python benchmarks/bench_host.py`` (about a minute); ``--clock cpu`` times the
thread's CPU time instead of wall-clock time (a machine shared with other work).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import actpack
from actpack.engine.saved import Held, unpack


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


#: The clock of every timing: wall-clock, or (``--clock cpu``) this thread's
#: CPU time, which other processes on a shared machine disturb less.
_CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time(fn: Callable[[], None], repeat: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(repeat):
        fn()
    return (clock() - start) / repeat


def _rounds(
    cases: dict[str, Callable[[], None]], repeat: int, rounds: int, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each case, cases interleaved in every round."""
    for fn in cases.values():
        fn()  # warm up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for k in order:
            times[k].append(_time(cases[k], repeat, _CLOCK[clock]))
    return {k: statistics.median(v) for k, v in times.items()}


def per_call(rounds: int, clock: str) -> dict[str, float]:
    x = torch.randn(4)
    n = 200

    def loop():
        with torch.no_grad():
            for _ in range(n):
                x.add(1.0)

    def under(strategy):
        def run():
            with actpack.compress(strategy):
                loop()

        return run

    t = _rounds({"plain": loop, "none": under("none"), "actnn": under("actnn")}, 20, rounds, clock)
    return {k: (v - t["plain"]) / n * 1e6 for k, v in t.items() if k != "plain"}


def per_save(rounds: int, clock: str) -> dict[str, float]:
    xs = [torch.randn(16, requires_grad=True) for _ in range(2)]
    n = 100

    def loop():
        a, b = xs
        h = a * 1
        for _ in range(n):
            h = h * b  # saves both operands
        return h

    def under(strategy):
        def run():
            with actpack.compress(strategy):
                loop()

        return run

    t = _rounds({"plain": loop, "none": under("none"), "actnn": under("actnn")}, 10, rounds, clock)
    # Two saved tensors per multiplication (one is a leaf: the fast path).
    return {k: (v - t["plain"]) / n * 1e6 for k, v in t.items() if k != "plain"}


def _drop_batch(st, final: bool = False) -> None:
    st.unaccounted.clear()


def _uncounted() -> actpack.Engine:
    """``compress("none")`` with its accounting skipped (an instance attribute
    shadows ``Engine._account``): the engine's cost without the count."""
    engine = actpack.compress("none")
    engine._account = _drop_batch
    return engine


def step(rounds: int, clock: str) -> dict[str, float]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    x = torch.randn(2, 8, 32)

    def run(ctx_factory):
        def go():
            with ctx_factory():
                loss = layer(x).square().mean()
            loss.backward()

        return go

    def wrapped(strategy):
        # One engine for every step, entered by the model's forward hooks.
        model = actpack.wrap(copy.deepcopy(layer), strategy)

        def go():
            model(x).square().mean().backward()

        return go

    cases = {
        "plain": run(_Null),
        "none": run(lambda: actpack.compress("none")),
        "actnn": run(lambda: actpack.compress("actnn")),
        "division": run(lambda: actpack.compress("division")),
        # The floor of any saved-tensor hook pair that keeps autograd's
        # in-place check: a detached alias and its version per save.
        "held hooks": run(lambda: torch.autograd.graph.saved_tensors_hooks(Held, unpack)),
        # What the byte accounting of "none" costs: the same engine, its
        # batches of saves dropped uncounted.
        "none uncounted": run(_uncounted),
        "none/wrap": wrapped("none"),
        "actnn/wrap": wrapped("actnn"),
        "division/wrap": wrapped("division"),
    }
    t = _rounds(cases, 20, rounds, clock)
    return {k: v / t["plain"] for k, v in t.items() if k != "plain"} | {
        "plain_ms": t["plain"] * 1e3
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time (default) or this thread's CPU time (shared machines)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    call = per_call(args.rounds, args.clock)
    save = per_save(args.rounds, args.clock)
    ratios = step(args.rounds, args.clock)
    print(
        f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds (medians), "
        f"{args.clock} clock"
    )
    print("| measure | none | actnn | division |")
    print("|---|---:|---:|---:|")
    print(f"| us added per torch call | {call['none']:.2f} | {call['actnn']:.2f} | |")
    print(f"| us added per saving op (2 saves) | {save['none']:.2f} | {save['actnn']:.2f} | |")
    print(
        f"| TransformerEncoderLayer(32) step vs plain ({ratios['plain_ms']:.2f} ms), "
        f"`with compress()` per step | "
        f"{ratios['none']:.2f}x | {ratios['actnn']:.2f}x | {ratios['division']:.2f}x |"
    )
    print(
        f"| floor: a bare hook pair keeping a detached alias and its version | "
        f"{ratios['held hooks']:.2f}x | | |"
    )
    print(f'| `"none"` with its byte accounting skipped | {ratios["none uncounted"]:.2f}x | | |')
    print(
        "| the same, `wrap(model)` (one engine) | "
        f"{ratios['none/wrap']:.2f}x | {ratios['actnn/wrap']:.2f}x | "
        f"{ratios['division/wrap']:.2f}x |"
    )


if __name__ == "__main__":
    main()
