"""``actpack train``: train a built-in model on Fashion-MNIST under several strategies.

Every strategy is trained from the same initial weights on the same data
order (the seed is re-applied before the model is built, and shuffling uses its
own :class:`torch.Generator`), so differences in accuracy come from the
compression of the tensors saved for backward and nothing else.  The model is
wrapped with :func:`actpack.wrap`; the strategy's own random state is seeded
from the run seed too, so a run is reproducible.

Example::

    actpack train --model resnet --size tiny --strategies none actnn division \\
        --epochs 3 --seeds 0 1 2 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import actpack
from actpack.engine import DEFAULT_MIN_NUMEL
from actpack.tools import args as cli_args
from actpack.tools.args import HelpFormatter, UsageError, plain, positive_int, strategy_name
from actpack.tools.common import (
    autocast_context,
    default_device,
    environment,
    make_strategy,
    mib,
    progress,
    synchronize,
    write_json,
)
from actpack.tools.data import DatasetMissingError, load_fashion_mnist
from actpack.tools.models import MODELS, build_model
from actpack.tools.plots import plot_training

__all__ = ["add_parser", "format_summary", "run", "summarize"]

TRAIN_MODELS = ("resnet", "vit")
AUTOCAST_CHOICES = cli_args.AUTOCAST_CHOICES  # bench's too
DEFAULT_OPTIMIZER = {"resnet": "sgd", "vit": "adamw"}
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def build(args: argparse.Namespace) -> nn.Module:
    overrides: dict[str, Any] = {}
    if args.model == "resnet":
        overrides = dict(in_channels=1, num_classes=10, image_size=28)
        if args.width is not None:
            overrides["width"] = args.width
    elif args.width is not None:
        overrides["dim"] = args.width
    model, _ = build_model(args.model, args.size, **overrides)
    return model


def _optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def _schedule(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total: int) -> Any:
    warmup = int(round(args.warmup * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    device: torch.device,
    autocast: str,
    quiet: bool = True,
) -> tuple[float, float, Tensor]:
    """(mean loss, accuracy in %, bool per image: classified right) of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    right = []
    starts = range(0, len(x), batch_size)
    for i in progress(starts, quiet=quiet, desc="test", unit="batch"):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with autocast_context(device, autocast):
            out = model(xb)
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
        right.append(out.argmax(1) == yb)
    model.train(was_training)
    correct = torch.cat(right).cpu() if right else torch.zeros(0, dtype=torch.bool)
    n = max(1, len(x))
    return loss_sum.item() / n, 100.0 * correct.sum().item() / n, correct


def _saved(stats: Any) -> dict[str, Any]:
    return {
        "baseline_bytes": int(stats.baseline_bytes),
        "compressed_bytes": int(stats.compressed_bytes),
        "ratio": float(stats.ratio) if stats.compressed_bytes else None,
        "bits_per_element": float(stats.bits_per_element),
        "tensors": int(stats.tensors),
        "passthrough_bytes": int(sum(stats.passthrough.values())),
    }


def train_one(
    args: argparse.Namespace,
    strategy: str,
    seed: int,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    device: torch.device,
    log: Any,
) -> dict[str, Any]:
    """Train one model for one (strategy, seed); returns its JSON record."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    model = build(args).to(device).train()
    init_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    actpack.wrap(model, make_strategy(strategy, seed), min_numel=args.min_numel)
    engine = actpack.engine_of(model)
    optimizer = _optimizer(args, model)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    scheduler = _schedule(args, optimizer, steps_per_epoch * args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=args.autocast == "float16")
    order = torch.Generator().manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    record: dict[str, Any] = {
        "strategy": strategy,
        "strategy_repr": repr(engine.strategy),
        "seed": seed,
        "init_checksum": init_checksum,
        "first_losses": [],
        "data_order_head": [],
        "epochs": [],
    }
    try:
        for epoch in range(1, args.epochs + 1):
            perm = torch.randperm(len(train_x), generator=order)
            if epoch == 1:
                record["data_order_head"] = perm[:16].tolist()
            perm = perm.to(device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            step_times: list[float] = []
            saved: dict[str, Any] | None = None
            t_epoch = time.perf_counter()
            bar = progress(
                range(steps_per_epoch),
                quiet=args.quiet,
                desc=f"{strategy} s{seed} e{epoch}/{args.epochs}",
                unit="step",
            )
            for step in bar:
                idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
                xb, yb = train_x[idx], train_y[idx]
                synchronize(device)
                t0 = time.perf_counter()
                with autocast_context(device, args.autocast):
                    out = model(xb)
                    loss = F.cross_entropy(out.float(), yb)
                if saved is None:
                    saved = _saved(engine.stats)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                synchronize(device)
                step_times.append(time.perf_counter() - t0)
                if len(record["first_losses"]) < 4:
                    record["first_losses"].append(loss.item())
                loss_sum += loss.detach().double() * len(idx)
                correct += (out.detach().argmax(1) == yb).sum()
            epoch_time = time.perf_counter() - t_epoch
            train_loss = loss_sum.item() / len(train_x)
            if not math.isfinite(train_loss):
                log(f"[{strategy} seed {seed}] training diverged (loss {train_loss})")
            test_loss, test_acc, correct_images = evaluate(
                model, test_x, test_y, args.eval_batch_size, device, args.autocast, args.quiet
            )
            # A run's first step compiles the codecs (seconds): it is never
            # timed.  An epoch of one step has no other in the first epoch.
            times = step_times[1:] if len(step_times) > 1 or epoch == 1 else step_times
            ep = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": 100.0 * correct.item() / len(train_x),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "steps": len(step_times),
                "epoch_time_s": epoch_time,
                "time_per_step_s": statistics.median(times) if times else None,
                "time_per_step_mean_s": statistics.fmean(times) if times else None,
                "saved": saved,
                "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            }
            record["epochs"].append(ep)
            ratio = saved["ratio"] if saved else None
            log(
                f"[{strategy} seed {seed}] epoch {epoch}/{args.epochs}  "
                f"train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
                f"test acc {test_acc:.2f}%  step {_ms(ep['time_per_step_s'])}  "
                f"saved {mib(saved and saved['baseline_bytes'])} -> "
                f"{mib(saved and saved['compressed_bytes'])}"
                + (f" ({ratio:.2f}x)" if ratio else "")
                + (f"  peak {mib(ep['peak_bytes'])}" if cuda else "")
            )
    finally:
        actpack.unwrap(model)
    last = record["epochs"][-1]
    record.update(
        # Per test image, 1 if the final model got it right: differences
        # between strategies are paired on the same images (see summarize).
        test_correct="".join("1" if c else "0" for c in correct_images.tolist()),
        final_test_acc=last["test_acc"],
        final_test_loss=last["test_loss"],
        saved=record["epochs"][0]["saved"],
        time_per_step_s=_median(e["time_per_step_s"] for e in record["epochs"]),
        peak_bytes=last["peak_bytes"],
    )
    return record


def paired_delta(runs: list[dict[str, Any]], name: str, ref: str = "none") -> tuple[float, float]:
    """Accuracy of ``name`` minus that of ``ref`` (points) and its standard error.

    Both are evaluated on the same test images, so the difference is paired:
    per image ``i`` and seed ``j``, ``d_ij`` = 1 if only ``name`` classified it
    right, -1 if only ``ref`` did, else 0.  Over the ``k`` seeds both
    strategies ran, ``D_i`` is the mean of ``d_ij`` and ``delta_j`` the mean
    of ``d_ij`` over the ``n`` images.  The delta is ``100 mean(D)``; its
    standard error adds two variances:

    * ``var(D) / n``: how far the delta would move on another test set of
      that size (on 51 images, each image the two disagree on moves it by 2
      points);
    * ``var(delta_j) / k`` with several seeds: how far it would move with
      other seeds (this counts the test-set noise of each seed again, so the
      sum errs on the large side).

    Raises ``ValueError`` when the runs share no seed.
    """
    mine = {r["seed"]: r["test_correct"] for r in runs if r["strategy"] == name}
    refs = {r["seed"]: r["test_correct"] for r in runs if r["strategy"] == ref}
    seeds = sorted(set(mine) & set(refs))
    if not seeds:
        raise ValueError(f"{name} and {ref} share no seed")
    n, k = len(mine[seeds[0]]), len(seeds)
    d = [[int(mine[j][i]) - int(refs[j][i]) for i in range(n)] for j in seeds]
    per_image = [statistics.fmean(col) for col in zip(*d)]
    var = statistics.variance(per_image) / n if n > 1 else math.inf
    if k > 1:
        var += statistics.variance(statistics.fmean(row) for row in d) / k
    return 100.0 * statistics.fmean(per_image), 100.0 * math.sqrt(var)


def summarize(runs: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """One row per strategy: mean/std test accuracy over seeds, delta vs none, bytes, time."""
    rows = []
    for name in strategies:
        mine = [r for r in runs if r["strategy"] == name]
        if not mine:
            continue
        accs = [r["final_test_acc"] for r in mine]
        saved = mine[0]["saved"] or {}
        peaks = [r["peak_bytes"] for r in mine if r["peak_bytes"] is not None]
        rows.append(
            {
                "strategy": name,
                "seeds": [r["seed"] for r in mine],
                "test_acc_mean": statistics.fmean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "test_accs": accs,
                "test_images": len(mine[0]["test_correct"]),
                "baseline_bytes": saved.get("baseline_bytes"),
                "compressed_bytes": saved.get("compressed_bytes"),
                "ratio": saved.get("ratio"),
                "time_per_step_s": _median(r["time_per_step_s"] for r in mine),
                "peak_bytes": max(peaks) if peaks else None,
            }
        )
    ref = next((r for r in rows if r["strategy"] == "none"), None)
    for row in rows:
        row["acc_delta_vs_none"] = row["acc_delta_se"] = None
        if ref is not None and set(row["seeds"]) & set(ref["seeds"]):
            row["acc_delta_vs_none"], row["acc_delta_se"] = paired_delta(runs, row["strategy"])
        timed = ref and ref["time_per_step_s"] and row["time_per_step_s"] is not None
        row["time_vs_none"] = row["time_per_step_s"] / ref["time_per_step_s"] if timed else None
    return rows


def _median(values: Any) -> float | None:
    """Median of the values that are not None (steps timed); None if none is."""
    timed = [v for v in values if v is not None]
    return statistics.median(timed) if timed else None


def _ms(seconds: float | None) -> str:
    # None: one step in all, which compiled the codecs, so nothing was timed.
    return "n/a (1 step)" if seconds is None else f"{1e3 * seconds:.1f} ms"


def _ratio(value: float | None) -> str:
    return "n/a" if not value else f"{value:.2f}x"


def _accuracy(row: dict[str, Any]) -> str:
    if len(row["seeds"]) == 1:  # no spread to show: one seed says nothing about it
        return f"{row['test_acc_mean']:.2f} (n=1)"
    return f"{row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} (n={len(row['seeds'])})"


def _delta(row: dict[str, Any]) -> str:
    if row["acc_delta_vs_none"] is None:
        return "n/a"
    if row["strategy"] == "none":
        return "0 (reference)"
    return f"{row['acc_delta_vs_none']:+.2f} ± {row['acc_delta_se']:.2f}"


def format_summary(rows: list[dict[str, Any]], cuda: bool) -> str:
    """Markdown table of :func:`summarize` rows, and a line on the noise of the deltas."""
    head = (
        "| strategy | test acc (mean ± std) | Δ vs none ± s.e. | saved for backward | compressed "
        "| ratio | time/step | vs none |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if cuda:
        head += " peak memory |"
        sep += "---:|"
    out = [head, sep]
    for r in rows:
        rel = "n/a" if r["time_vs_none"] is None else f"{r['time_vs_none']:.2f}x"
        line = (
            f"| {r['strategy']} | {_accuracy(r)} | {_delta(r)} | {mib(r['baseline_bytes'])} | "
            f"{mib(r['compressed_bytes'])} | {_ratio(r['ratio'])} | "
            f"{_ms(r['time_per_step_s'])} | {rel} |"
        )
        if cuda:
            line += f" {mib(r['peak_bytes'])} |"
        out.append(line)
    if any(r["acc_delta_se"] is not None for r in rows):
        out += [
            "",
            f"s.e.: standard error of the accuracy difference, over the {rows[0]['test_images']} "
            "test images (paired: every strategy is tested on the same images) and the seeds. "
            "A delta within 2 s.e. of 0 is noise.",
        ]
    return "\n".join(out)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Train every (seed, strategy); returns the JSON payload (also written to --json)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_fashion_mnist(args.data, subset=args.subset, test_subset=args.test_subset)
    data = tuple(t.to(device) for t in data)
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    config.update(train_samples=len(data[0]), test_samples=len(data[2]))
    payload: dict[str, Any] = {
        "command": "train",
        "config": config,
        "environment": environment(device),
        "runs": [],
        "summary": [],
    }
    log(
        f"actpack train: {args.model}-{args.size} on Fashion-MNIST "
        f"({len(data[0])} train / {len(data[2])} test), strategies {', '.join(args.strategies)}, "
        f"seeds {args.seeds}, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr}, device {device}, autocast {args.autocast}"
    )
    for seed in args.seeds:
        for name in args.strategies:
            payload["runs"].append(train_one(args, name, seed, data, device, log))
            payload["summary"] = summarize(payload["runs"], args.strategies)
            if args.json:
                write_json(args.json, payload)
    if args.plot:
        plot_training(payload, args.plot)
    return payload


def _cmd_train(args: argparse.Namespace) -> int:
    if args.size not in MODELS[args.model]:
        raise UsageError(
            f"unknown size {args.size!r} for {args.model}; "
            f"choose from {', '.join(MODELS[args.model])}"
        )
    if args.plot is not None:
        cli_args.require("matplotlib", "--plot")
    cli_args.writable(args.json, "--json")
    cli_args.writable(args.plot, "--plot")
    if args.width is not None:
        try:  # a width the model cannot take (heads that do not divide it): before training
            build(args)
        except ValueError as exc:
            raise UsageError(f"--width {args.width}: {exc}") from None
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER[args.model]
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    log = (lambda *a, **k: None) if args.quiet else print
    try:
        payload = run(args, log=lambda msg: log(msg, flush=True))
    except DatasetMissingError as exc:
        print(f"actpack train: error: {exc}", file=sys.stderr)
        return 2
    log("")
    print(format_summary(payload["summary"], args.device.startswith("cuda")), flush=True)
    for path in (args.json, args.plot):
        if path is not None:
            log(f"wrote {path}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``actpack train`` on the CLI's subparsers."""
    p = sub.add_parser(
        "train",
        help="train a built-in model on Fashion-MNIST under several strategies",
        description=plain(__doc__),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", choices=TRAIN_MODELS, default="resnet", help="built-in model")
    sizes = "; ".join(f"{m}: {', '.join(MODELS[m])}" for m in TRAIN_MODELS)
    p.add_argument("--size", default="tiny", help=f"model size ({sizes})")
    p.add_argument(
        "--width", type=positive_int, default=None,
        help="override the model width (resnet: base channels, vit: embedding dim)",
    )  # fmt: skip
    p.add_argument(
        "--strategies", nargs="+", type=strategy_name,
        default=["none", actpack.DEFAULT_STRATEGY],
        metavar="NAME",
        help="strategies trained one after another from the same weights and data order "
        "(any name actpack.resolve accepts: " + ", ".join(actpack.STRATEGY_NAMES) + ", ...)",
    )  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch")
    p.add_argument("--eval-batch-size", type=positive_int, default=1000, help="test batch")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="default: sgd (momentum 0.9, nesterov) for resnet, "
                   "adamw for vit")  # fmt: skip
    p.add_argument("--lr", type=cli_args.positive_float, default=None,
                   help="peak learning rate; default: 0.1 for sgd, 1e-3 for adamw")  # fmt: skip
    p.add_argument("--weight-decay", type=cli_args.nonnegative_float, default=None,
                   help="default: 5e-4 for sgd, 0.05 for adamw")  # fmt: skip
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule after the warmup")  # fmt: skip
    p.add_argument("--warmup", type=cli_args.fraction, default=0.0,
                   help="fraction of the steps with a linear learning-rate warmup")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="one run per seed and strategy; accuracy is reported as "
                   "mean ± std")  # fmt: skip
    p.add_argument("--device", type=cli_args.device, default=default_device(),
                   help="torch device")  # fmt: skip
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="none",
                   type=cli_args.dtype_spelling(AUTOCAST_CHOICES),
                   help="autocast dtype of the forward, or none "
                   + cli_args.AUTOCAST_HELP)  # fmt: skip
    p.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training and N//5 test samples "
                   "(default: all 60000)")  # fmt: skip
    p.add_argument("--test-subset", type=positive_int, default=None, metavar="M",
                   help="evaluate on the first M test samples (default: all 10000, or N//5 "
                   "with --subset)")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="directory with the Fashion-MNIST IDX files (default: "
                   "$ACTPACK_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")  # fmt: skip
    p.add_argument("--min-numel", type=cli_args.nonnegative_int, default=DEFAULT_MIN_NUMEL,
                   help="smallest saved tensor (elements) that is compressed")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (default: leave torch's choice)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write every figure (per epoch and per run) as JSON")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="write a PNG of accuracy curves and bytes saved for backward "
                   "(needs matplotlib)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars, no per-epoch lines")
    p.set_defaults(func=_cmd_train)
    return p
