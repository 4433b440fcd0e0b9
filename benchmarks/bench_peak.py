"""Peak memory and step time of a CPU training step, uncompressed and compressed.

Usage (from the repository root, actpack installed or ``PYTHONPATH=src``)::

    python benchmarks/bench_peak.py                          # 6-block model, compiled codecs
    python benchmarks/bench_peak.py --model cnn --rounds 9   # conv-BN-ReLU ResNet, 128x28x28
    python benchmarks/bench_peak.py --codecs reference,compiled --rounds 3   # both (slow)
    python benchmarks/bench_peak.py --compile model          # torch.compile the model too

Models (float32, one thread):

* ``mlp6``: 6 pre-LN blocks ``x + Linear(GELU(Linear(LayerNorm(x))))``,
  width 256, hidden 1024, on 16 x 512 tokens: 480 MiB saved for backward.
* ``cnn``: actpack's built-in ResNet ``tiny`` (conv-BN-ReLU basic blocks,
  width 16) on Fashion-MNIST-sized inputs, batch 128 x 1 x 28 x 28.

Configurations: ``none`` (plain PyTorch, no actpack), ``actnn``
(``actpack.ActNN()``, 2 bits) and ``division`` (``actpack.Division()``), the
compressed ones with the reference codecs and/or the compiled CPU codecs
(``--codecs``; ``ACTPACK_BACKEND=reference`` / ``compiled``).
``--strategies`` adds ``engine`` (actpack's lossless ``"none"`` strategy:
what the engine costs by itself) and ``bf16`` (a plain bfloat16 cast).

Memory: each configuration runs in its own process with
``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps every large block and
unmaps it when freed, and RSS follows the live tensors.  After one warm-up
step (which also compiles, or loads, the compiled codecs), the process
records its RSS before the step, resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), runs one step and reports

* ``held``: RSS after the forward minus RSS before it (what autograd keeps);
* ``peak``: the high-water mark during the step minus the RSS before it;
* ``ru_maxrss``: ``getrusage``'s lifetime high-water mark minus the RSS
  measured before the model and inputs were built (it includes the warm-up,
  and so the compiler's memory for compiled configurations).

Time: all configurations run in one process (default malloc), interleaved:
every round runs each configuration once, after one warm-up step each.
The table reports the median step time (wall clock) and its ratio to
``none``, and the same ratio of thread CPU time, which is less sensitive to
other processes on a shared machine.

``--compile model`` wraps the model in ``torch.compile``; ``--compile
blocks`` compiles each block (``mlp6``: each residual block; ``cnn``: each
stage).  A configuration that fails reports the error instead of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # run from a checkout without installing

import actpack  # noqa: E402
from actpack.tools.models import MLP, build_model  # noqa: E402

MiB = 2**20
#: "engine": actpack with its lossless "none" strategy (the engine's own cost);
#: "bf16": actpack's bfloat16 cast (no codec arithmetic to speak of).
STRATEGIES = ("none", "engine", "bf16", "actnn", "division")
#: Strategies whose codecs differ between the reference and compiled backends.
CODEC_STRATEGIES = ("actnn", "division")


class Block(nn.Module):
    """Pre-LN residual MLP block: ``x + mlp(ln(x))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def build(name: str, compile_mode: str) -> tuple[nn.Module, Any]:
    """(model, make_input) for ``name``, compiled as ``compile_mode`` asks."""
    torch.manual_seed(0)
    if name == "mlp6":
        model: nn.Module = nn.Sequential(*[Block(256) for _ in range(6)])
        blocks = list(model)

        def make_input() -> torch.Tensor:
            return torch.randn(16, 512, 256)

    else:
        model, inputs = build_model("resnet", "tiny", in_channels=1, num_classes=10, image_size=28)
        blocks = [m for m in model.children() if isinstance(m, nn.Sequential)]

        def make_input() -> torch.Tensor:
            return inputs(128)[0]

    if compile_mode == "model":
        model = torch.compile(model)
    elif compile_mode == "blocks":
        for block in blocks:
            block.compile()
    return model, make_input


def strategy(name: str) -> actpack.Strategy | str | None:
    if name == "none":
        return None
    return {"engine": "none", "bf16": "bf16", "actnn": actpack.ActNN(),
            "division": actpack.Division()}[name]  # fmt: skip


def step(model: nn.Module, x: torch.Tensor, strat, mark=None) -> None:
    """One training step; ``mark("forward")`` runs between forward and backward."""
    if strat is None:
        loss = model(x).square().mean()
    else:
        with actpack.compress(strat, model=model):
            loss = model(x).square().mean()
    if mark is not None:
        mark("forward")
    loss.backward()
    model.zero_grad(set_to_none=True)


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def child(model_name: str, strat_name: str, compile_mode: str) -> dict[str, Any]:
    """Memory of one configuration, in this (fresh) process."""
    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    model, make_input = build(model_name, compile_mode)
    x = make_input()
    strat = strategy(strat_name)
    step(model, x, strat)  # warm-up: compiles or loads the compiled codecs
    marks: dict[str, int] = {}
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    step(model, x, strat, mark=lambda name: marks.setdefault(name, _status("VmRSS")))
    peak = _status("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "held": marks["forward"] - before,
        "peak": peak - before,
        "ru_maxrss": maxrss - baseline,
    }


def memory(args: argparse.Namespace, configs: list[tuple[str, str]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for strat_name, codec in configs:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        env["ACTPACK_BACKEND"] = codec
        cmd = [sys.executable, __file__, "--child", args.model, strat_name, args.compile]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        key = f"{strat_name} {codec}"
        if out.returncode != 0:
            results[key] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
        else:
            results[key] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  memory {key}: {results[key]}", file=sys.stderr, flush=True)
    return results


def timing(args: argparse.Namespace, configs: list[tuple[str, str]]) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, make_input = build(args.model, args.compile)
    x = make_input()
    runs: dict[str, tuple[list[float], list[float]]] = {}
    errors: dict[str, str] = {}

    def once(strat_name: str, codec: str) -> tuple[float, float]:
        os.environ["ACTPACK_BACKEND"] = codec  # read by the codecs at each call
        wall, cpu = time.perf_counter(), time.thread_time()
        step(model, x, strategy(strat_name))
        return time.perf_counter() - wall, time.thread_time() - cpu

    for strat_name, codec in configs:
        key = f"{strat_name} {codec}"
        try:
            once(strat_name, codec)  # warm-up: compiles or loads the compiled codecs
            runs[key] = ([], [])
        except Exception as exc:  # a configuration that cannot run is reported, not fatal
            errors[key] = f"{type(exc).__name__}: {exc}"[:200]
    for r in range(args.rounds):
        for strat_name, codec in configs:
            key = f"{strat_name} {codec}"
            if key in runs:
                wall, cpu = once(strat_name, codec)
                runs[key][0].append(wall)
                runs[key][1].append(cpu)
        print(f"  timing round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in runs.items()}
    return {"median_s": med, "errors": errors}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp6", "cnn"], default="mlp6")
    p.add_argument("--strategies", default="actnn,division",
                   help="engine, bf16, actnn, division (none always runs)")  # fmt: skip
    p.add_argument("--codecs", default="compiled", help="comma list: reference, compiled")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--compile", choices=["off", "model", "blocks"], default="off")
    p.add_argument("--skip", choices=["none", "memory", "timing"], default="none")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "STRATEGY", "COMPILE"),
                   help=argparse.SUPPRESS)  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    configs = [("none", "reference")]
    for name in args.strategies.split(","):
        name = name.strip()
        if name not in STRATEGIES[1:]:
            raise SystemExit(f"--strategies: unknown {name!r}; choose from {STRATEGIES[1:]}")
        configs += [(name, c) for c in (codecs if name in CODEC_STRATEGIES else ["reference"])]
    mem = memory(args, configs) if args.skip != "memory" else {}
    tim = timing(args, configs) if args.skip != "timing" else {"median_s": {}, "errors": {}}
    print(f"\nmodel {args.model}, compile {args.compile}, torch {torch.__version__}, 1 thread")
    print("| configuration | held after forward MiB | peak of step MiB | ru_maxrss MiB "
          "| step s | x none (wall) | x none (CPU) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = tim["median_s"].get("none reference")
    for strat_name, codec in configs:
        key = f"{strat_name} {codec}"
        label = key if strat_name in CODEC_STRATEGIES else strat_name
        m = mem.get(key, {})
        cells = [f"{m[k] / MiB:.0f}" if k in m else m.get("error", "") for k in
                 ("held", "peak", "ru_maxrss")]  # fmt: skip
        t = tim["median_s"].get(key)
        if t is not None and base is not None:
            cells += [f"{t[0]:.2f}", f"{t[0] / base[0]:.2f}", f"{t[1] / base[1]:.2f}"]
        else:
            cells += [tim["errors"].get(key, ""), "", ""]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        payload = {"args": vars(args), "memory": mem, "timing": tim}
        args.json.write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
