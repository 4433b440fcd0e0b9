"""``actpack bench``: strategies and their alternatives side by side, in one process.

For one built-in model and batch, every row is measured in the same process
on the same inputs:

* bytes autograd holds for backward (exact, :func:`actpack.measure`), and
  their ratio to plain fp32 training;
* time of a forward + backward step relative to ``none``: the median of
  ``--steps`` timed steps after warm-up, the rows interleaved round-robin so
  that drift of the machine hits them all alike;
* peak memory of the step and the largest batch that fits (binary search,
  CUDA only: an out-of-memory error is caught and cleaned up per trial).

Besides actpack's strategies it measures what a user would pick instead:
``autocast-bf16`` (bf16 autocast alone), ``checkpoint`` (non-reentrant
activation checkpointing of each block of the model's main block container)
and ``save_on_cpu`` (:func:`torch.autograd.graph.save_on_cpu`; GPU only).

Example::

    actpack bench --model resnet --size small --batch-size 32 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import actpack
from actpack.engine import DEFAULT_MIN_NUMEL
from actpack.tools.models import MODELS, build_model, loss_for
from actpack.tools.train import (
    default_device,
    environment,
    make_strategy,
    mib,
    progress,
    strategy_name,
    synchronize,
    write_json,
)

__all__ = [
    "ALTERNATIVES",
    "Variant",
    "add_parser",
    "block_container",
    "checkpointed",
    "format_table",
    "largest_batch",
    "run",
]

ALTERNATIVES = ("autocast-bf16", "checkpoint", "save_on_cpu")
#: Attribute names of the container of a model's repeated blocks, tried in order.
_CONTAINER_NAMES = ("stages", "blocks", "layers", "layer", "h", "encoder", "decoder")
#: Strategies measured by default.
DEFAULT_STRATEGIES = ("none", "fp16", "bf16", "int8", "actnn", "actnn-mixed", "division")
NA_CPU = "n/a (CPU)"
NA_GPU_ONLY = "n/a (GPU only)"


# --------------------------------------------------------------------------- #
# Checkpointing without touching the model for good
# --------------------------------------------------------------------------- #


def block_container(model: nn.Module) -> nn.Module:
    """The ``nn.Sequential``/``nn.ModuleList`` holding ``model``'s main blocks.

    Looks for a well-known attribute (``stages`` of the built-in ResNet,
    ``blocks`` of GPT/ViT, ``layers``, ``h``...), else takes the container
    child with the most parameters.
    """
    containers = (nn.Sequential, nn.ModuleList)
    for name in _CONTAINER_NAMES:
        child = getattr(model, name, None)
        if isinstance(child, containers) and len(child) > 0:
            return child
    candidates = [m for m in model.modules() if isinstance(m, containers) and len(m) > 1]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Sequential/ModuleList of blocks")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


@contextlib.contextmanager
def checkpointed(model: nn.Module, container: nn.Module | None = None) -> Iterator[list[nn.Module]]:
    """Run each child of ``container`` under non-reentrant activation checkpointing.

    Only the children's ``forward`` is patched, and only inside the ``with``
    block: parameters, hooks and ``state_dict`` are untouched, and the
    original ``forward`` is restored on exit.  Yields the checkpointed blocks.
    """
    container = block_container(model) if container is None else container
    blocks = list(container.children())
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for block in blocks:
            own = block.__dict__.get("forward", None)
            original = block.forward

            def forward(*args: Any, _fn: Callable = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _fn(*args, **kwargs)
                return checkpoint(_fn, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            patched.append((block, own))
        yield blocks
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


# --------------------------------------------------------------------------- #
# Variants
# --------------------------------------------------------------------------- #


@dataclass
class Variant:
    """One row: how a step runs, and how its saved bytes are measured."""

    name: str
    kind: str  # "actpack" or "alternative"
    #: Context the forward (and loss) runs in.
    forward_ctx: Callable[[], Any]
    #: Context around the whole step (forward and backward).
    step_ctx: Callable[[], Any] = contextlib.nullcontext
    #: ``strategy`` and context for :func:`actpack.measure`.
    measure_strategy: Any = "none"
    measure_ctx: Callable[[], Any] = contextlib.nullcontext
    available: bool = True
    note: str = ""
    engine: Any = None
    times: list[float] = field(default_factory=list)


def _variants(args: argparse.Namespace, model: nn.Module, device: torch.device) -> list[Variant]:
    out = []
    for name in args.strategies:
        engine = actpack.compress(
            make_strategy(name, args.seed), model=model, min_numel=args.min_numel
        )
        out.append(
            Variant(
                name,
                "actpack",
                forward_ctx=lambda e=engine: e,
                measure_strategy=make_strategy(name, args.seed),
                engine=engine,
            )
        )
    for name in args.alternatives:
        if name == "autocast-bf16":

            def bf16() -> Any:
                return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

            out.append(
                Variant(
                    name,
                    "alternative",
                    forward_ctx=bf16,
                    measure_ctx=bf16,
                    note="bf16 autocast, no actpack",
                )
            )
        elif name == "checkpoint":
            container = block_container(model)

            def ckpt(c: nn.Module = container) -> Any:
                return checkpointed(model, c)

            out.append(
                Variant(
                    name,
                    "alternative",
                    forward_ctx=ckpt,
                    measure_ctx=ckpt,
                    note=f"torch.utils.checkpoint (non-reentrant) per block of "
                    f"{type(container).__name__}[{len(container)}]",
                )
            )
        elif name == "save_on_cpu":
            gpu = device.type == "cuda"
            out.append(
                Variant(
                    name,
                    "alternative",
                    forward_ctx=contextlib.nullcontext,
                    step_ctx=lambda: torch.autograd.graph.save_on_cpu(pin_memory=True),
                    available=gpu,
                    note="saved tensors moved to pinned host memory"
                    if gpu
                    else "no-op on CPU (tensors already in host memory)",
                )
            )
        else:  # pragma: no cover - argparse restricts the choices
            raise ValueError(f"unknown alternative {name!r}")
    return out


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def _step(model: nn.Module, inputs: tuple, loss_fn: Callable, v: Variant) -> None:
    with v.step_ctx():
        with v.forward_ctx():
            out = model(*inputs)
            loss = loss_fn(out, inputs)
        loss.backward()
    model.zero_grad(set_to_none=True)


def _timed(model: nn.Module, inputs: tuple, loss_fn: Callable, v: Variant, device: Any) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    _step(model, inputs, loss_fn, v)
    synchronize(device)
    return time.perf_counter() - t0


def _peak(model: nn.Module, inputs: tuple, loss_fn: Callable, v: Variant, device: Any) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _step(model, inputs, loss_fn, v)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _fits(trial: Callable[[int], None], batch: int, device: torch.device) -> bool:
    """Whether ``trial(batch)`` runs without running out of GPU memory."""
    ok = True
    try:
        trial(batch)
    except torch.OutOfMemoryError:
        ok = False
    # The exception (and the frames holding the trial's tensors) is gone here.
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    return ok


def largest_batch(
    fits: Callable[[int], bool], start: int, limit: int, tolerance: float = 1 / 32
) -> tuple[int, bool]:
    """Largest ``b <= limit`` with ``fits(b)``, by doubling from ``start`` then bisecting.

    Returns ``(batch, capped)``; ``capped`` is True when ``limit`` itself fit.
    ``batch`` is 0 when not even one sample fits.  The bisection stops when the
    bracket is within ``tolerance`` of the lower end.
    """
    lo, hi = 0, None
    b = max(1, min(start, limit))
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return b, True
            b = min(limit, b * 2)
        else:
            hi = b
    if lo == 0:
        lo_, hi_ = 0, hi
        while hi_ - lo_ > 1:
            mid = (lo_ + hi_) // 2
            if fits(mid):
                lo_ = mid
            else:
                hi_ = mid
        return lo_, False
    while hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every row; returns the JSON payload (also written to ``--json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    model, make_inputs = build_model(args.model, args.size)
    model.to(device).train()
    loss_fn = loss_for(args.model)
    inputs = make_inputs(args.batch_size, device)
    variants = _variants(args, model, device)
    log(
        f"actpack bench: {args.model}-{args.size}, batch {args.batch_size}, device {device}, "
        f"{args.steps} timed step(s) after {args.warmup} warm-up, rows interleaved"
    )

    rows: list[dict[str, Any]] = []
    # Saved bytes.
    for v in variants:
        row: dict[str, Any] = {"name": v.name, "kind": v.kind, "note": v.note}
        if v.available and v.name != "save_on_cpu":
            with v.measure_ctx():
                rep = actpack.measure(
                    model,
                    *inputs,
                    strategy=v.measure_strategy,
                    loss_fn=lambda out: loss_fn(out, inputs),
                    min_numel=args.min_numel,
                )
            row.update(
                saved_bytes=rep.compressed_bytes,
                baseline_bytes=rep.baseline_bytes,
                weight_bytes=rep.weight_bytes,
                bits_per_element=rep.bits_per_element,
                passthrough_bytes=sum(rep.passthrough.values()),
            )
            if rep.weight_bytes and v.kind == "alternative":
                row["note"] += f"; plus {mib(rep.weight_bytes)} of weight casts held for backward"
        else:
            row.update(saved_bytes=None, baseline_bytes=None)
        rows.append(row)
    fp32 = next((r for r in rows if r["name"] == "none"), None)
    ref_bytes = fp32["baseline_bytes"] if fp32 else None
    for r in rows:
        r["ratio_vs_fp32"] = (
            ref_bytes / r["saved_bytes"] if ref_bytes and r["saved_bytes"] else None
        )
        r["fp32_bytes"] = ref_bytes

    # Step time, round-robin.
    live = [v for v in variants if v.available]
    for _ in range(args.warmup):
        for v in live:
            _step(model, inputs, loss_fn, v)
    for _ in progress(range(args.steps), enabled=args.progress, desc="timing", unit="round"):
        for v in live:
            v.times.append(_timed(model, inputs, loss_fn, v, device))
    ref_time = next((statistics.median(v.times) for v in live if v.name == "none"), None)
    for v, r in zip(variants, rows):
        if v.times:
            r["time_per_step_s"] = statistics.median(v.times)
            r["times_s"] = v.times
            r["time_vs_none"] = r["time_per_step_s"] / ref_time if ref_time else None
        else:
            r.update(time_per_step_s=None, times_s=[], time_vs_none=None)

    # Peak memory and largest batch (CUDA only).
    for v, r in zip(variants, rows):
        if not cuda:
            r["peak_bytes"] = NA_CPU if v.available else None
            r["max_batch"] = NA_GPU_ONLY if v.available else None
            continue
        r["peak_bytes"] = _peak(model, inputs, loss_fn, v, device)
        if args.max_batch_limit <= 0:
            r["max_batch"] = None
            continue

        def trial(b: int, v: Variant = v) -> None:
            x = make_inputs(b, device)
            _step(model, x, loss_fn, v)
            synchronize(device)

        state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        batch, capped = largest_batch(
            lambda b: _fits(trial, b, device), args.batch_size, args.max_batch_limit
        )
        model.load_state_dict(state)
        r["max_batch"] = batch
        r["max_batch_capped"] = capped
        log(f"  largest batch {v.name}: {batch}{'+' if capped else ''}")
    for v in variants:
        if v.engine is not None:
            v.engine.close()

    payload = {
        "command": "bench",
        "config": {
            k: (str(val) if isinstance(val, Path) else val)
            for k, val in vars(args).items()
            if k not in ("func", "progress")
        },
        "environment": environment(device),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def _fmt_batch(r: dict[str, Any]) -> str:
    value = r.get("max_batch")
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value}{'+' if r.get('max_batch_capped') else ''}"


def format_table(payload: dict[str, Any]) -> str:
    """Markdown table of a :func:`run` payload."""
    cfg = payload["config"]
    ref = next((r for r in payload["rows"] if r["name"] == "none"), None)
    ref_batch = ref.get("max_batch") if ref else None
    head = (
        "| variant | saved for backward | vs fp32 | time/step | vs none | peak memory "
        "| largest batch | vs none |"
    )
    out = [
        f"{cfg['model']}-{cfg['size']}, batch {cfg['batch_size']}, device {cfg['device']}, "
        f"forward + backward, median of {cfg['steps']} steps",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        if r["saved_bytes"] is None and r["time_per_step_s"] is None:
            na = "n/a (GPU only)"
            out.append(f"| {r['name']} | {na} | {na} | {na} | {na} | {na} | {na} | {na} |")
            continue
        saved = mib(r["saved_bytes"]) if r["saved_bytes"] is not None else "n/a"
        ratio = f"{r['ratio_vs_fp32']:.2f}x" if r["ratio_vs_fp32"] else "n/a"
        t = f"{1e3 * r['time_per_step_s']:.1f} ms" if r["time_per_step_s"] else "n/a"
        rel = f"{r['time_vs_none']:.2f}x" if r["time_vs_none"] else "n/a"
        peak = r["peak_bytes"]
        peak = peak if isinstance(peak, str) else mib(peak)
        batch = _fmt_batch(r)
        b_rel = "n/a"
        if isinstance(r.get("max_batch"), int) and isinstance(ref_batch, int) and ref_batch:
            b_rel = f"{r['max_batch'] / ref_batch:.2f}x"
        out.append(
            f"| {r['name']} | {saved} | {ratio} | {t} | {rel} | {peak} | {batch} | {b_rel} |"
        )
    notes = [f"- {r['name']}: {r['note']}" for r in payload["rows"] if r.get("note")]
    if notes:
        out += [""] + notes
    return "\n".join(out)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.size not in MODELS[args.model]:
        print(
            f"actpack bench: error: unknown size {args.size!r} for {args.model}; "
            f"choose from {list(MODELS[args.model])}",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1:
        print("actpack bench: error: --steps must be at least 1", file=sys.stderr)
        return 2
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]  # the reference row
    args.progress = not args.quiet and sys.stderr.isatty()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    payload = run(args, log=log)
    print(format_table(payload), flush=True)
    if args.json:
        log(f"wrote {args.json}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``actpack bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="bytes, step time, peak memory and largest batch per strategy and alternative",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="resnet")
    sizes = "; ".join(f"{m}: {', '.join(s)}" for m, s in MODELS.items())
    p.add_argument("--size", default="small", help=f"model size ({sizes}); default small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=default_device())
    p.add_argument(
        "--strategies", nargs="+", type=strategy_name,
        default=list(DEFAULT_STRATEGIES),
        metavar="NAME",
        help="actpack strategies (any name actpack.resolve accepts); 'none' is always measured",
    )  # fmt: skip
    p.add_argument(
        "--alternatives", nargs="*", choices=ALTERNATIVES, default=list(ALTERNATIVES),
        help="what a user would pick instead (default: all); give none to skip",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row first")
    p.add_argument(
        "--max-batch-limit", type=int, default=1 << 14, metavar="B",
        help="upper bound of the largest-batch search on CUDA (0 skips the search)",
    )  # fmt: skip
    p.add_argument("--min-numel", type=int, default=DEFAULT_MIN_NUMEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's choice)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)
    return p
