"""Memory and step time of compressed training under torch.compile, side by side.

The model is the one of issue 13: six LayerNorm-MLP blocks (width 256,
hidden 1024, GELU, residual), batch 16 x 512 tokens, fp32, on the CPU, one
thread.  Compile modes: ``eager`` (no compile), ``model``
(``torch.compile(model)``) and ``block`` (``block.compile()`` for each block);
``off`` is the model without actpack, the other rows ``actpack.wrap(model, strategy)``.

* Memory: each configuration in its own process (``MALLOC_MMAP_THRESHOLD_=65536``
  so that freed tensors go back to the OS and RSS follows what is live).
  After compiling and warming up, one step gives the RSS held after the
  forward (minus the RSS before it) and the peak RSS of the step (``VmHWM``
  reset through ``/proc/self/clear_refs``), minus the same base.
* Time: per compile mode, one process holds both models (same weights) and
  alternates their steps, ``--steps`` pairs, the order flipped every pair;
  the time ratio is the median of the per-pair ratios, so drift from other
  jobs on the machine hits both alike.

    python benchmarks/bench_compiled.py --out benchmarks/results/compiled.json
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


def _build(args: argparse.Namespace, strategy: str):
    """(model, callable running it) for one configuration."""
    import actpack

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.width) for _ in range(args.depth)])
    run = model
    if args.compile == "model":
        # wrap(compile(model)), not compile(wrap(model)): both models share
        # Sequential's code, and Dynamo does not guard on module hooks
        # (torch._dynamo.config.skip_nnmodule_hook_guards), so the second
        # compile of one process could reuse the first one's graph, hooks and all.
        run = torch.compile(model, mode=args.mode)
    elif args.compile == "block":
        for block in model:
            block.compile(mode=args.mode)
    if strategy != "off":
        run = actpack.wrap(run, strategy)
    return model, run


def _step(model: nn.Module, run, x: torch.Tensor) -> float:
    for p in model.parameters():
        p.grad = None
    gc.collect()
    start = time.perf_counter()
    run(x).square().mean().backward()
    return time.perf_counter() - start


def run_memory(args: argparse.Namespace) -> dict:
    """Held-after-forward and peak RSS of one configuration, in this process."""
    model, run = _build(args, args.strategy)
    x = torch.randn(args.batch, args.tokens, args.width)
    for _ in range(2):
        _step(model, run, x)  # compile, warm up
    for p in model.parameters():
        p.grad = None
    gc.collect()
    base = _status()["VmRSS"]
    _reset_peak()
    loss = run(x).square().mean()
    held = _status()["VmRSS"] - base
    loss.backward()
    return {"held": held, "peak": _status()["VmHWM"] - base}


def run_time(args: argparse.Namespace) -> dict:
    """Step times of ``off`` and ``args.strategy``, alternated, in this process."""
    pair = [_build(args, "off"), _build(args, args.strategy)]
    x = torch.randn(args.batch, args.tokens, args.width)
    for model, run in pair * 2:
        _step(model, run, x)  # compile, warm up
    times: list[tuple[float, float]] = []
    for i in range(args.steps):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        got = {k: _step(*pair[k], x) for k in order}
        times.append((got[0], got[1]))
    return {
        "off": statistics.median(t[0] for t in times),
        "on": statistics.median(t[1] for t in times),
        "ratio": statistics.median(t[1] / t[0] for t in times),
    }


def _spawn(args: argparse.Namespace, what: str, strategy: str, compile_mode: str) -> dict:
    cmd = [sys.executable, __file__, f"--{what}", "--strategy", strategy, "--compile", compile_mode]
    for name in ("depth", "width", "batch", "tokens", "steps", "mode"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="actnn", help="actpack strategy compared with 'off'")
    p.add_argument("--compile", default="model", choices=["eager", "model", "block"])
    p.add_argument("--modes", default="eager,model,block", help="compile modes to compare")
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--steps", type=int, default=8, help="timed step pairs per compile mode")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.memory or args.time:
        print(json.dumps(run_memory(args) if args.memory else run_time(args)))
        return

    mib = 2.0**20
    rows = []
    print(f"{'strategy':>8} {'compile':>7} {'held MiB':>9} {'peak MiB':>9} {'step s':>7}"
          f" {'held /':>7} {'peak /':>7} {'time x':>7}")  # fmt: skip
    for mode in args.modes.split(","):
        base = _spawn(args, "memory", "off", mode)
        mine = _spawn(args, "memory", args.strategy, mode)
        times = _spawn(args, "time", args.strategy, mode)
        cases = (("off", base, times["off"]), (args.strategy, mine, times["on"]))
        for strategy, mem, step in cases:
            row = {
                "strategy": strategy,
                "compile": mode,
                "held_mib": mem["held"] / mib,
                "peak_mib": mem["peak"] / mib,
                "step_s": step,
                "held_less": base["held"] / mem["held"],
                "peak_less": base["peak"] / mem["peak"],
                "time_ratio": 1.0 if strategy == "off" else times["ratio"],
            }
            rows.append(row)
            print(f"{strategy:>8} {mode:>7} {row['held_mib']:9.1f} {row['peak_mib']:9.1f}"
                  f" {row['step_s']:7.3f} {row['held_less']:6.1f}x {row['peak_less']:6.1f}x"
                  f" {row['time_ratio']:6.2f}x", flush=True)  # fmt: skip
    if args.out:
        meta = {k: getattr(args, k) for k in ("depth", "width", "batch", "tokens", "mode", "steps")}
        meta.update(torch=torch.__version__)
        with open(args.out, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
