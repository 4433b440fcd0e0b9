"""``actpack bench``: strategies and their alternatives side by side, in one process.

For one model and batch, every row is measured in the same process
on the same inputs:

* bytes autograd holds for backward (exact, :func:`actpack.measure`), and
  their ratio to plain fp32 training;
* time of a forward + backward step relative to ``none``, which is plain
  PyTorch (no actpack hooks: the user's training as it is; its bytes are
  counted by ``actpack.measure(strategy="none")``): the median of
  ``--steps`` timed rounds after warm-up, on one CPU thread by default; each
  round times every row once, in alternating order, so that drift of the
  machine hits them all alike.  A warning says when the timings vary too much
  between rounds to trust the ratios;
* peak memory of the step and the largest batch that fits (binary search,
  CUDA only: an out-of-memory error is caught and cleaned up per trial).

Besides actpack's strategies it measures what a user would pick instead:
``autocast-bf16`` (bf16 autocast alone), ``checkpoint`` (non-reentrant
activation checkpointing of each block of the model's main block container)
and ``save_on_cpu`` (:func:`torch.autograd.graph.save_on_cpu`; GPU only).

The model is a built-in one (``--model resnet --size small``) or any
model spec ``actpack report`` accepts: ``torchvision:resnet50``,
``timm:NAME``, ``hf:gpt2``, ``hf:llama:small``.

Example::

    actpack bench --model resnet --size small --batch-size 32 --steps 5
    actpack bench --model hf:gpt2 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
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
from actpack.tools import args as cli_args
from actpack.tools.args import HelpFormatter, UsageError, plain, positive_int, strategy_name
from actpack.tools.common import (
    default_device,
    environment,
    make_strategy,
    mib,
    progress,
    synchronize,
    write_json,
)
from actpack.tools.models import MODELS
from actpack.tools.specs import ModelSpec, build

__all__ = [
    "ALTERNATIVES",
    "Variant",
    "add_parser",
    "block_containers",
    "checkpointed",
    "format_table",
    "largest_batch",
    "run",
]

ALTERNATIVES = ("autocast-bf16", "checkpoint", "save_on_cpu")
#: Attribute names of the container of a model's repeated blocks, tried in order.
_CONTAINER_NAMES = ("stages", "blocks", "layers", "layer", "h", "encoder", "decoder")
#: Strategies measured by default.
DEFAULT_STRATEGIES = (
    "none", "fp16", "bf16", "int8", "actnn", "actnn-mixed", "division", "actnn-rows",
)  # fmt: skip
NA_CPU = "n/a (CPU)"
#: How a full GPU reads when a library other than PyTorch's allocator hits it.
_ALLOC_FAILED = re.compile(r"out of memory|ALLOC_FAILED|cudaErrorMemoryAllocation", re.I)
NA_GPU_ONLY = "n/a (GPU only)"


# --------------------------------------------------------------------------- #
# Checkpointing without touching the model for good
# --------------------------------------------------------------------------- #


def block_containers(model: nn.Module) -> list[nn.Module]:
    """The ``nn.Sequential``/``nn.ModuleList`` modules holding ``model``'s main blocks.

    A well-known attribute of ``model`` (``stages`` of the built-in ResNet,
    ``blocks`` of GPT/ViT, ``layers``, ``h``...), else, of the modules with
    containers of several blocks among their children, the one whose
    containers hold the most parameters, with all those containers
    (torchvision's ResNet: ``layer1`` .. ``layer4``; HuggingFace GPT-2:
    ``transformer.h``).  Raises ``ValueError`` when there is none.
    """
    containers = (nn.Sequential, nn.ModuleList)
    for name in _CONTAINER_NAMES:
        child = getattr(model, name, None)
        if isinstance(child, containers) and len(child) > 0:
            return [child]
    groups = [
        kids
        for parent in model.modules()
        if (kids := [c for c in parent.children() if isinstance(c, containers) and len(c) > 1])
    ]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no Sequential/ModuleList of blocks")
    return max(groups, key=lambda kids: sum(p.numel() for c in kids for p in c.parameters()))


@contextlib.contextmanager
def checkpointed(
    model: nn.Module, containers: list[nn.Module] | None = None
) -> Iterator[list[nn.Module]]:
    """Run each child of ``containers`` (default: :func:`block_containers`) under
    non-reentrant activation checkpointing.

    Only the children's ``forward`` is patched, and only inside the ``with``
    block: parameters, hooks and ``state_dict`` are untouched, and the
    original ``forward`` is restored on exit.  Yields the checkpointed blocks.
    """
    containers = block_containers(model) if containers is None else containers
    blocks = [block for c in containers for block in c.children()]
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
    kind: str  # "reference" (plain PyTorch), "actpack" or "alternative"
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


def _stacked(outer: Callable[[], Any], inner: Callable[[], Any]) -> Callable[[], Any]:
    """A context factory entering ``outer()`` then ``inner()``."""

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with outer(), inner():
            yield

    return both


def _under_autocast(variants: list[Variant], device: torch.device, dtype: str) -> list[Variant]:
    """Every row's forward and measurement under ``torch.autocast(dtype)``
    (``--autocast``): what a mixed-precision user compares.  The
    ``autocast-bf16`` alternative is then the ``none`` row, so it is dropped."""
    cast = getattr(torch, cli_args.dtype_spelling(cli_args.AUTOCAST_CHOICES)(dtype))
    label = cli_args.short_dtype(dtype)  # "bf16 autocast", as the autocast-bf16 row says

    def ctx() -> Any:
        return torch.autocast(device_type=device.type, dtype=cast)

    out = []
    for v in variants:
        if v.name == "autocast-bf16":
            continue
        v.forward_ctx = _stacked(ctx, v.forward_ctx)
        v.measure_ctx = _stacked(ctx, v.measure_ctx)
        v.note = "; ".join(n for n in (v.note, f"{label} autocast") if n)
        out.append(v)
    return out


def _variants(args: argparse.Namespace, model: nn.Module, device: torch.device) -> list[Variant]:
    out = []
    for name in args.strategies:
        if name == "none":
            # The reference row is the user's training as it is: no hooks,
            # no accounting (timed under compress("none") it carried the
            # engine's own host cost, 1.3x on a tiny layer, into every ratio).
            # Its bytes are still counted exactly by measure("none").
            out.append(
                Variant(
                    name,
                    "reference",
                    forward_ctx=contextlib.nullcontext,
                    measure_strategy=make_strategy(name, args.seed),
                    note="plain PyTorch, no actpack (bytes counted by actpack.measure)",
                )
            )
            continue
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
            found = block_containers(model)
            names = {id(m): n for n, m in model.named_modules()}
            where = ", ".join(f"{names[id(c)]}[{len(c)}]" for c in found)

            def ckpt(c: list[nn.Module] = found) -> Any:
                return checkpointed(model, c)

            out.append(
                Variant(
                    name,
                    "alternative",
                    forward_ctx=ckpt,
                    measure_ctx=ckpt,
                    note=f"torch.utils.checkpoint (non-reentrant) around each block of {where}",
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
    except RuntimeError as exc:
        # Libraries that allocate on their own report a full GPU as a plain
        # RuntimeError (cuBLAS/cuDNN workspaces: *_STATUS_ALLOC_FAILED; Triton
        # loading a module: "out of memory").  Anything else is a real error.
        if not _ALLOC_FAILED.search(str(exc)):
            raise
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


def spread(times: list[float]) -> float:
    """Relative spread of repeated timings: median absolute deviation / median.

    Robust to one outlier round (a median, not a range); 0.1 means half the
    rounds were more than 10% off the median.
    """
    mid = statistics.median(times)
    return statistics.median(abs(t - mid) for t in times) / mid if mid > 0 else 0.0


#: Largest spread (see :func:`spread`) under which step-time ratios are shown without a warning.
MAX_SPREAD = 0.05
#: Rows that do all the work of ``none`` and more: measured faster, the timings are off.
_NEVER_FASTER = ("actpack", "checkpoint", "save_on_cpu")


#: Times a timed step that compiled is timed again (see :func:`run`).
MAX_RETIMES = 5


def compile_count() -> int:
    """Compilations so far in this process: AOTAutograd's count, which every
    Inductor compile passes through (a compiled codec configuration, a
    model under ``torch.compile``); 0 where torch keeps no such counter."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - depends on the torch version
        return 0
    return int(counters["aot_autograd"]["total"])


def timing_warnings(rows: list[dict[str, Any]], compiled: int = 0) -> list[str]:
    """Why the step times of a :func:`run` cannot be trusted, if they cannot (a few lines).

    Three signs: timed steps that compiled however often they were timed
    again (``compiled``, see :func:`compile_count`); rows whose timings vary
    between rounds by more than :data:`MAX_SPREAD`; a row that does all the
    work of ``none`` and more (every actpack strategy, checkpointing,
    ``save_on_cpu``) measured faster than ``none`` by more than the spread of
    the two.
    """
    ref = next((r for r in rows if r["name"] == "none"), None)
    timed = [r for r in rows if r.get("time_spread") is not None]
    noisy = [
        f"{r['name']} {100 * r['time_spread']:.0f}%" for r in timed if r["time_spread"] > MAX_SPREAD
    ]
    faster = []
    for r in timed:
        extra_work = r["kind"] in _NEVER_FASTER or r["name"] in _NEVER_FASTER
        if ref is None or r is ref or not extra_work or not r.get("time_vs_none"):
            continue
        noise = max(r["time_spread"], ref.get("time_spread") or 0.0)
        if r["time_vs_none"] < 1 - 2 * noise - 0.02:
            faster.append(f"{r['name']} {r['time_vs_none']:.2f}x")
    out = []
    if compiled:
        out.append(
            f"{compiled} timed step(s) compiled, each timed {1 + MAX_RETIMES} times (codecs or "
            "graphs compiled on first use): their time is in the step times; raise --warmup"
        )
    if noisy:
        out.append(
            f"step times vary between rounds (median absolute deviation): {', '.join(noisy)}; "
            f"over {100 * MAX_SPREAD:.0f}% the time ratios are not to be trusted"
        )
    if faster:
        out.append(
            f"measured faster than none although they do all of its work and more: "
            f"{', '.join(faster)}"
        )
    if noisy or faster:
        out.append("the machine's load changed while timing: rerun on an idle machine, or with "
                   "more --steps")  # fmt: skip
    return out


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every row; returns the JSON payload (also written to ``--json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    spec = ModelSpec("builtin", args.model, args.size) if args.model in MODELS else args.model
    model, make_inputs, loss_fn = build(spec)
    model.to(device).train()
    inputs = make_inputs(args.batch_size, device)
    variants = _variants(args, model, device)
    if getattr(args, "autocast", "none") != "none":
        variants = _under_autocast(variants, device, args.autocast)
    log(
        f"actpack bench: {spec}, batch {args.batch_size}, device {device}, "
        f"{torch.get_num_threads()} thread(s), {args.steps} timed round(s) after "
        f"{args.warmup} warm-up"
    )

    rows: list[dict[str, Any]] = []
    # Saved bytes.
    for v in progress(variants, quiet=args.quiet, desc="saved bytes", unit="row"):
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

    # Step time: every row once per round; the order alternates between rounds
    # so that no row always runs right after the same other one.
    live = [v for v in variants if v.available]
    for _ in progress(range(args.warmup), quiet=args.quiet, desc="warm-up", unit="round"):
        for v in live:
            _step(model, inputs, loss_fn, v)
    # A timed step that compiled (a codec configuration on its first use:
    # mixed precision compiles those of the bit widths it picked only after
    # its first steps) is timed again, at most MAX_RETIMES times; steps that
    # still compile are counted and warned of.
    compiled_while_timing = 0
    for k in progress(range(args.steps), quiet=args.quiet, desc="timing", unit="round"):
        for v in live if k % 2 == 0 else live[::-1]:
            for _ in range(1 + MAX_RETIMES):
                before = compile_count()
                took = _timed(model, inputs, loss_fn, v, device)
                if compile_count() == before:
                    break
            else:
                compiled_while_timing += 1
            v.times.append(took)
    ref_time = next((statistics.median(v.times) for v in live if v.name == "none"), None)
    for v, r in zip(variants, rows):
        if v.times:
            r["time_per_step_s"] = statistics.median(v.times)
            r["times_s"] = v.times
            r["time_spread"] = spread(v.times)
            r["time_vs_none"] = r["time_per_step_s"] / ref_time if ref_time else None
        else:
            r.update(time_per_step_s=None, times_s=[], time_spread=None, time_vs_none=None)

    # Peak memory and largest batch (CUDA only).
    pairs = list(zip(variants, rows))
    for v, r in progress(pairs, quiet=args.quiet or not cuda, desc="peak memory", unit="row"):
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

    config = {
        k: (str(val) if isinstance(val, (Path, ModelSpec)) else val)
        for k, val in vars(args).items()
        if k != "func"
    }
    config.update(label=spec.label)
    payload = {
        "command": "bench",
        "config": config,
        "environment": environment(device),
        "rows": rows,
        "warnings": timing_warnings(rows, compiled_while_timing),
        "compiled_while_timing": compiled_while_timing,
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
    cast = cli_args.short_dtype(cfg.get("autocast", "none"))  # bf16 in files before 2026-12
    head = (
        f"| variant | saved for backward | vs {'fp32' if cast == 'none' else 'none'} "
        "| time/step | vs none | peak memory "
        "| largest batch | vs none |"
    )
    out = [
        f"{cfg['label']}, batch {cfg['batch_size']}, device {cfg['device']}, "
        + (f"every row under {cast} autocast, " if cast != "none" else "")
        + f"forward + backward, median of {cfg['steps']} rounds",
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
    spec = args.model
    if spec.source == "builtin" and spec.size is None:
        spec = ModelSpec("builtin", spec.name, args.size or "small")
        if spec.size not in MODELS[spec.name]:
            raise UsageError(
                f"unknown --size {spec.size!r} for {spec.name}; "
                f"choose from {', '.join(MODELS[spec.name])}"
            )
    elif args.size is not None:
        raise UsageError(f"--size is for a built-in model given without a size, not {spec}")
    args.model, args.size = (spec.name, spec.size) if spec.source == "builtin" else (spec, None)
    cli_args.writable(args.json, "--json")
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]  # the reference row
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    payload = run(args, log=log)
    print(format_table(payload), flush=True)
    for line in payload["warnings"]:
        print(f"actpack bench: warning: {line}", file=sys.stderr, flush=True)
    if args.json:
        log(f"wrote {args.json}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``actpack bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="bytes, step time, peak memory and largest batch per strategy and alternative",
        description=plain(__doc__),
        formatter_class=HelpFormatter,
    )
    sizes = "; ".join(f"{m}: {', '.join(s)}" for m, s in MODELS.items())
    p.add_argument(
        "--model", type=cli_args.model_spec, default="resnet", metavar="SPEC",
        help="built-in model (resnet, gpt, vit; or NAME:SIZE), torchvision:NAME, timm:NAME or "
        "hf:TYPE[:tiny|small|full]",
    )  # fmt: skip
    p.add_argument("--size", default=None,
                   help=f"size of a built-in model ({sizes}); default: small")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch of the step")
    p.add_argument("--device", type=cli_args.device, default=default_device(),
                   help="torch device")  # fmt: skip
    p.add_argument(
        "--strategies", nargs="+", type=strategy_name,
        default=list(DEFAULT_STRATEGIES),
        metavar="NAME",
        help="actpack strategies (any name actpack.resolve accepts); none is always measured",
    )  # fmt: skip
    p.add_argument(
        "--alternatives", nargs="*", choices=ALTERNATIVES, default=list(ALTERNATIVES),
        help="what a user would pick instead; give the option alone to skip them",
    )  # fmt: skip
    p.add_argument(
        "--autocast", choices=cli_args.AUTOCAST_CHOICES, default="none",
        type=cli_args.dtype_spelling(cli_args.AUTOCAST_CHOICES),
        help="run every row's forward under torch.autocast of this dtype; bytes and "
        "times are then relative to the none row under the same autocast "
        + cli_args.AUTOCAST_HELP,
    )  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=5,
                   help="timed rounds (each row's median is reported)")  # fmt: skip
    p.add_argument("--warmup", type=cli_args.nonnegative_int, default=1,
                   help="untimed rounds first")  # fmt: skip
    p.add_argument(
        "--max-batch-limit", type=cli_args.nonnegative_int, default=1 << 14, metavar="B",
        help="upper bound of the largest-batch search on CUDA (0 skips the search)",
    )  # fmt: skip
    p.add_argument("--min-numel", type=cli_args.nonnegative_int, default=DEFAULT_MIN_NUMEL,
                   help="smallest saved tensor (elements) that is compressed")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch.set_num_threads: one thread keeps timings comparable "
                   "on a shared machine")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write every figure as JSON")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the table")
    p.set_defaults(func=_cmd_bench)
    return p
