"""Memory and step time of compressed training under torch.compile, side by side.

The model is the one of issue 13: six LayerNorm-MLP blocks (width 256,
hidden 1024, GELU, residual), batch 16 x 512 tokens, fp32, on the CPU.  Each
configuration runs in its own process (``MALLOC_MMAP_THRESHOLD_=65536`` so
that freed tensors go back to the OS and RSS follows what is live):

* ``eager``: no compile; ``model``: ``torch.compile(model)``; ``block``:
  ``block.compile()`` for each block;
* ``off``: no actpack; any strategy name: ``actpack.wrap(model, strategy)``.

A process compiles and warms up, then measures one step: the RSS held after
the forward (minus the RSS before it), the peak RSS of the whole step (from
``VmHWM`` reset through ``/proc/self/clear_refs``) and, over ``--steps``
further steps, the median step time.  Rounds run the configurations in
turn, interleaved, one thread each; ratios are taken within a round against
the ``off`` run of the same compile mode, then the median over rounds.

    python benchmarks/bench_compiled.py --rounds 3 --out benchmarks/results/compiled.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    import actpack

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.width) for _ in range(args.depth)])
    x = torch.randn(args.batch, args.tokens, args.width)
    if args.strategy != "off":
        actpack.wrap(model, args.strategy)
    run = model
    if args.compile == "model":
        run = torch.compile(model, mode=args.mode)
    elif args.compile == "block":
        for block in model:
            block.compile(mode=args.mode)
    params = list(model.parameters())

    def step() -> float:
        for p in params:
            p.grad = None
        gc.collect()
        start = time.perf_counter()
        run(x).square().mean().backward()
        return time.perf_counter() - start

    for _ in range(2):
        step()  # compile, warm up
    for p in params:
        p.grad = None
    gc.collect()
    base = _status()["VmRSS"]
    _reset_peak()
    loss = run(x).square().mean()
    held = _status()["VmRSS"] - base
    loss.backward()
    peak = _status()["VmHWM"] - base
    del loss
    times = [step() for _ in range(args.steps)]
    return {"held": held, "peak": peak, "step": statistics.median(times)}


def _spawn(args: argparse.Namespace, strategy: str, compile_mode: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--strategy", strategy, "--compile", compile_mode]
    for name in ("depth", "width", "batch", "tokens", "steps", "mode"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="actnn", help="actpack strategy compared with 'off'")
    p.add_argument("--compile", default=None, choices=["eager", "model", "block"])
    p.add_argument("--modes", default="eager,model,block", help="compile modes to compare")
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    modes = args.modes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for mode in modes:
            for strategy in ("off", args.strategy):
                result = _spawn(args, strategy, mode)
                runs.setdefault((strategy, mode), []).append(result)
                print(f"round {r}: {strategy:>8} {mode:>6} {result}", file=sys.stderr)

    mib = 2.0**20
    rows = []
    print(f"{'strategy':>8} {'compile':>7} {'held MiB':>9} {'peak MiB':>9} {'step s':>7}"
          f" {'held /':>7} {'peak /':>7} {'time x':>7}")  # fmt: skip
    for mode in modes:
        for strategy in ("off", args.strategy):
            mine, base = runs[(strategy, mode)], runs[("off", mode)]
            row = {
                "strategy": strategy,
                "compile": mode,
                "held_mib": statistics.median(r["held"] for r in mine) / mib,
                "peak_mib": statistics.median(r["peak"] for r in mine) / mib,
                "step_s": statistics.median(r["step"] for r in mine),
                # Within-round ratios against the uncompressed run of that mode.
                "held_less": statistics.median(b["held"] / m["held"] for m, b in zip(mine, base)),
                "peak_less": statistics.median(b["peak"] / m["peak"] for m, b in zip(mine, base)),
                "time_ratio": statistics.median(m["step"] / b["step"] for m, b in zip(mine, base)),
            }
            rows.append(row)
            print(f"{strategy:>8} {mode:>7} {row['held_mib']:9.1f} {row['peak_mib']:9.1f}"
                  f" {row['step_s']:7.3f} {row['held_less']:6.1f}x {row['peak_less']:6.1f}x"
                  f" {row['time_ratio']:6.2f}x")  # fmt: skip
    if args.out:
        meta = {k: getattr(args, k) for k in ("depth", "width", "batch", "tokens", "mode")}
        meta.update(torch=torch.__version__, rounds=args.rounds, steps=args.steps)
        with open(args.out, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
