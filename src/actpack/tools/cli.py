"""Command-line interface: ``actpack report``, ``actpack train``, ``actpack bench``.

Run ``actpack COMMAND --help`` for a command's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Callable

import torch

from actpack.api import measure
from actpack.strategies import STRATEGY_NAMES
from actpack.tools import args as cli_args
from actpack.tools import bench, train
from actpack.tools.args import HelpFormatter, UsageError, plain, positive_int
from actpack.tools.common import autocast_context, progress_bar
from actpack.tools.models import MODELS
from actpack.tools.specs import ModelSpec, build, parse_spec

__all__ = ["CORE_STRATEGIES", "build_parser", "format_table", "main", "report_rows"]

# The report's default: one column per kind of encoding (levels are ActNN variants).
CORE_STRATEGIES = ("none", "fp16", "bf16", "int8", "actnn", "division", "actnn-rows")

REPORT_DOC = """Bytes autograd holds for backward in one training step, per model, dtype and
strategy, counted exactly by actpack.measure, as a Markdown table.

Models are built-in (resnet, gpt, vit, with a size: resnet:tiny) or come from
torchvision, timm or HuggingFace transformers when those are installed, with
random weights and nothing downloaded:

  torchvision:resnet50   timm:vit_small_patch16_224
  hf:gpt2 (GPT-2 small, 124M)   hf:llama:small   hf:bert:tiny   hf:vit:tiny

hf:TYPE[:SIZE] builds the config class of that model type: SIZE full (the
config's defaults; hf:llama is 7B), small or tiny.

Example:

  actpack report --models resnet:small hf:gpt2:small --dtype fp32 bfloat16
"""


def report_rows(
    spec: str | ModelSpec,
    batch_size: int,
    strategies: Sequence[str],
    device: str = "cpu",
    autocast: str | None = None,
    seed: int = 0,
    on_row: Callable[[], Any] = lambda: None,
) -> list[dict]:
    """Bytes saved for backward per strategy for one model spec (see :mod:`actpack.tools.specs`).

    ``autocast``: ``None``/``"fp32"`` or the autocast dtype name.  ``on_row``
    is called after each strategy is measured (progress).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "builtin" and spec.size is None:
        spec = ModelSpec("builtin", spec.name, "small")
    torch.manual_seed(seed)
    model, make_inputs, loss = build(spec)
    model.to(device).train()
    inputs = make_inputs(batch_size, device)
    rows = []
    for name in strategies:
        with autocast_context(torch.device(device), autocast):
            rep = measure(model, *inputs, strategy=name, loss_fn=lambda out: loss(out, inputs))
        rows.append(
            {
                "model": spec.label,
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
        on_row()
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`report_rows` rows."""
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
    total = len(args.models) * len(args.dtype) * len(args.strategies)
    bar = progress_bar(total, quiet=args.quiet, desc="measuring", unit="row")
    rows = []
    for spec in args.models:
        for dtype in args.dtype:
            bar.set_postfix_str(f"{spec} {dtype}")
            rows += report_rows(
                spec, args.batch_size, args.strategies, args.device, dtype, on_row=bar.update
            )
    bar.close()
    print(format_table(rows))
    return 0


def _add_report(sub: Any) -> None:
    rep = sub.add_parser(
        "report",
        help="bytes saved for backward per strategy, as a table",
        description=REPORT_DOC,
        formatter_class=HelpFormatter,
    )
    sizes = "; ".join(f"{n}: {', '.join(s)}" for n, s in MODELS.items())
    rep.add_argument(
        "--models", nargs="+", type=cli_args.model_spec,
        default=[parse_spec("resnet:small"), parse_spec("gpt:small")], metavar="SPEC",
        help=f"NAME[:SIZE] of a built-in model (SIZE small when omitted; {sizes}), "
        "torchvision:NAME, timm:NAME or hf:TYPE[:tiny|small|full]",
    )  # fmt: skip
    rep.add_argument(
        "--strategies", nargs="+", default=list(CORE_STRATEGIES), type=cli_args.strategy_name,
        metavar="NAME", help=f"one row each; from {', '.join(STRATEGY_NAMES)} (any case)",
    )  # fmt: skip
    rep.add_argument("--batch-size", type=positive_int, default=8, help="batch of the step")
    rep.add_argument("--device", type=cli_args.device, default="cpu", help="torch device")
    rep.add_argument(
        "--dtype", nargs="+", default=["fp32"], choices=["fp32", "bfloat16", "float16"],
        type=cli_args.dtype_spelling(["fp32", "bfloat16", "float16"]),
        metavar="DTYPE", help="fp32, or the autocast dtype (bfloat16, float16); rows for each",
    )  # fmt: skip
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=_cmd_report)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``actpack`` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(
        prog="actpack", description=plain(__doc__), formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_report(sub)
    train.add_parser(sub)
    bench.add_parser(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``actpack`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Bad input exits through argparse (status 2, one ``error:`` line).
    """
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    cli_args.check_optional(getattr(args, "quiet", False))
    if getattr(args, "strategies", None):
        args.strategies = list(dict.fromkeys(args.strategies))  # one row per strategy named
    try:
        return args.func(args)
    except UsageError as exc:
        commands[args.command].error(str(exc))
    except RuntimeError as exc:
        # Out of memory (torch.OutOfMemoryError on CUDA, the CPU allocator's
        # RuntimeError): the size asked for, not a bug; one line, no traceback.
        said = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and not any(
            m in said for m in ("not enough memory", "can't allocate memory", "out of memory")
        ):
            raise
        first = said.splitlines()[0] if said else type(exc).__name__
        print(
            f"actpack {args.command}: error: out of memory ({first}); "
            "use a smaller --batch-size or model size",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
