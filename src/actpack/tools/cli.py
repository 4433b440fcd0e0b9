"""Command-line interface: ``actpack report``, ``actpack train``, ``actpack bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from actpack.api import measure
from actpack.strategies import STRATEGY_NAMES
from actpack.tools import bench, train
from actpack.tools.models import MODELS, build_model, loss_for

# The report's default: one column per kind of encoding (levels are ActNN variants).
CORE_STRATEGIES = ("none", "fp16", "bf16", "int8", "actnn", "division")


def _autocast(device: str, dtype: str | None):
    if dtype in (None, "none", "fp32"):
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def report_rows(
    model_name: str,
    size: str,
    batch_size: int,
    strategies: Sequence[str],
    device: str = "cpu",
    autocast: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Bytes saved for backward per strategy for one built-in model."""
    torch.manual_seed(seed)
    model, make_inputs = build_model(model_name, size)
    model.to(device).train()
    inputs = make_inputs(batch_size, device)
    loss = loss_for(model_name)
    rows = []
    for name in strategies:
        with _autocast(device, autocast):
            rep = measure(model, *inputs, strategy=name, loss_fn=lambda out: loss(out, inputs))
        rows.append(
            {
                "model": f"{model_name}-{size}",
                "dtype": autocast or "fp32",
                "strategy": name,
                "baseline_bytes": rep.baseline_bytes,
                "compressed_bytes": rep.compressed_bytes,
                "ratio": rep.ratio,
                "bits_per_element": rep.bits_per_element,
                "passthrough_bytes": sum(rep.passthrough.values()),
                "peak_bytes": rep.peak_bytes,
                "baseline_peak_bytes": rep.baseline_peak_bytes,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| model | dtype | strategy | saved for backward | compressed | ratio | bits/element "
        "| passed through |"
    )
    out = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['dtype']} | {r['strategy']} | "
            f"{r['baseline_bytes'] / 2**20:.2f} MiB | {r['compressed_bytes'] / 2**20:.2f} MiB | "
            f"{r['ratio']:.2f}x | {r['bits_per_element']:.2f} | "
            f"{r['passthrough_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(out)


def _cmd_report(args: argparse.Namespace) -> int:
    rows = []
    for spec in args.models:
        name, _, size = spec.partition(":")
        for dtype in args.dtype:
            rows += report_rows(
                name, size or "small", args.batch_size, args.strategies, args.device, dtype
            )
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actpack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="bytes saved for backward per strategy, as a table")
    choices = "; ".join(f"{n}: {', '.join(sizes)}" for n, sizes in MODELS.items())
    rep.add_argument(
        "--models", nargs="+", default=["resnet:small", "gpt:small"],
        help=f"NAME[:SIZE] (default size small); {choices}",
    )  # fmt: skip
    rep.add_argument(
        "--strategies", nargs="+", default=list(CORE_STRATEGIES), choices=STRATEGY_NAMES
    )
    rep.add_argument("--batch-size", type=int, default=8)
    rep.add_argument("--device", default="cpu")
    rep.add_argument(
        "--dtype", nargs="+", default=["fp32"], choices=["fp32", "bfloat16", "float16"],
        help="fp32, or the autocast dtype",
    )  # fmt: skip
    rep.set_defaults(func=_cmd_report)
    train.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
