"""ActNN mixed precision vs uniform 2-bit ActNN vs DIVISION: gradient noise on real data.

Trains the built-in ResNet on Fashion-MNIST for a few steps under
``ActNNMixed(budget=2.0)`` (so its range and gradient-scale statistics are
warm), then measures with :func:`actpack.gradient_noise` the gradient bias and
variance of uniform ``"actnn"`` (2 bits), the warmed mixed strategy and
``"division"`` on one fixed batch, the mixed allocation's bits distribution,
and the step time of the mixed strategy relative to uniform ActNN (the same
training step, interleaved, ratios only).

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_mixed.py            # writes benchmarks/results/mixed.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import actpack
from actpack.tools.data import load_fashion_mnist
from actpack.tools.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "mixed.md"


def _step(model, x, y, strategy, opt=None):
    with actpack.compress(strategy, model=model):
        loss = F.cross_entropy(model(x), y)
    if opt is not None:
        opt.zero_grad()
    loss.backward()
    if opt is not None:
        opt.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=20, help="training steps before measuring")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    n_train = args.batch * (args.warmup + 1)
    xtr, ytr, _, _ = load_fashion_mnist(subset=n_train)
    model, _ = build_model("resnet", args.size, in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mixed = actpack.ActNNMixed(budget=2.0, refresh_every=5, seed=args.seed)
    losses = []
    for i in range(args.warmup):
        sl = slice(i * args.batch, (i + 1) * args.batch)
        losses.append(_step(model, xtr[sl], ytr[sl], mixed, opt))
    # One fixed, unseen batch for every measurement.
    x, y = xtr[-args.batch :], ytr[-args.batch :]

    def loss_fn(out):
        return F.cross_entropy(out, y)

    noise = {}
    strategies = {
        "actnn (uniform 2-bit)": actpack.ActNN(bits=2, seed=args.seed),
        "ActNNMixed(budget=2.0)": mixed,
        "division (B=8, 2-bit)": actpack.Division(seed=args.seed),
    }
    for name, strategy in strategies.items():
        noise[name] = actpack.gradient_noise(
            model, x, strategy=strategy, draws=args.draws, loss_fn=loss_fn, seed=args.seed
        )
        print(f"{name}: {noise[name]}", file=sys.stderr)

    # Bits of the mixed allocation on the measured batch (a copy: the
    # original strategy is not advanced).
    probe = mixed.fork(args.seed)
    with actpack.compress(probe, model=model) as ctx:
        model(x)
    dist = probe.last_bits
    total = sum(dist.values())
    by_op: dict[str, list[float]] = {}
    for key, layer in probe._layers.items():
        if layer.counts:
            op = key.rsplit("/", 1)[-1].split("#")[0]
            rows = sum(n for _, n in layer.counts)
            avg = sum(b * n for b, n in layer.counts) / rows
            by_op.setdefault(op, []).append(avg)
    del ctx

    # Step time, interleaved: uniform ActNN vs the mixed strategy (a fork, so
    # its refreshes run as in training: every refresh_every steps).
    timing = {"actnn": [], "mixed": []}
    tmixed = mixed.fork(args.seed + 1)
    tactnn = actpack.ActNN(bits=2, seed=args.seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(args.timing_rounds):
        for name, strategy in (("actnn", tactnn), ("mixed", tmixed)):
            t0 = time.perf_counter()
            _step(model, x, y, strategy)
            timing[name].append(time.perf_counter() - t0)
    model.load_state_dict(state)
    ratio = statistics.median(timing["mixed"]) / statistics.median(timing["actnn"])

    base = noise["actnn (uniform 2-bit)"]
    lines = [
        "# ActNN mixed precision: gradient noise at a 2-bit budget",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/bench_mixed.py{_argtext(argv)}`  ",
        f"Machine: 2-core CPU (shared), torch {torch.__version__}, 1 thread  ",
        "Date: 2026-11-23  ",
        f"Model: built-in ResNet `{args.size}` (1 input channel, 10 classes) on real "
        f"Fashion-MNIST images; {args.warmup} SGD steps of batch {args.batch} under "
        "`ActNNMixed(budget=2.0, refresh_every=5)` to warm its statistics (loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}); noise measured on one fixed unseen batch "
        f"of {args.batch} with `actpack.gradient_noise(..., draws={args.draws})`, "
        "relative to the exact squared gradient norm.",
        "",
        "| strategy | gradient bias | gradient variance | variance vs uniform 2-bit |",
        "|---|---|---|---|",
    ]
    for name, r in noise.items():
        lines.append(
            f"| {name} | {r.bias:.4f} | {r.variance:.4f} | {r.variance / base.variance:.2f}x |"
        )
    lines += [
        "",
        "Bias includes the draws' own noise, `variance / (draws - 1)`; bias corrected for it: "
        + ", ".join(f"{n.split(' ')[0]} {r.bias_corrected:.4f}" for n, r in noise.items())
        + ".",
        "",
        "Mixed allocation on the measured batch (share of saved code elements per width):",
        "",
        "| bits | " + " | ".join(str(b) for b in sorted(dist)) + " | average |",
        "|---|" + "---|" * len(dist) + "---|",
        "| share | "
        + " | ".join(f"{100 * dist[b] / total:.1f}%" for b in sorted(dist))
        + f" | {probe.average_bits:.3f} |",
        "",
        "Average width by op that saved the tensor (mean over tensors): "
        + ", ".join(f"{op} {statistics.mean(v):.2f}" for op, v in sorted(by_op.items()))
        + ".",
        "",
        f"Step time (forward + backward, batch {args.batch}, median of "
        f"{args.timing_rounds} interleaved steps, refresh every 5 steps included): "
        f"mixed / uniform actnn = **{ratio:.2f}x**.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


def _argtext(argv: list[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "".join(f" {a}" for a in argv)


if __name__ == "__main__":
    main()
