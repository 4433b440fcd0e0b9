"""Accuracy-parity table from one or more ``actpack train --json`` files.

Step times and bytes are left out on purpose: runs made one after another on
a shared machine do not time alike (``actpack bench`` interleaves them), and
bytes are ``actpack report``'s job.

Runs of several invocations (for example one for "none"/"actnn"/"division"
and one for "actnn-mixed", same model, seeds and data) are pooled per
strategy; accuracy is the mean and sample standard deviation over seeds, and
the delta is against the mean of "none" over the same seeds.

Example::

    actpack train --model resnet --size tiny --strategies none actnn division bf16 \\
        --epochs 2 --subset 10000 --test-subset 10000 --seeds 0 1 2 --json a.json
    python benchmarks/parity_table.py a.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict


def pooled(paths: list[str]) -> tuple[dict[str, list[dict]], dict]:
    runs: dict[str, list[dict]] = defaultdict(list)
    config = None
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        cfg = {k: payload["config"][k] for k in ("model", "size", "epochs", "batch_size")}
        if config is not None and cfg != config:
            raise SystemExit(f"{path}: config {cfg} differs from {config}; pool like with like")
        config = cfg
        for run in payload["runs"]:
            runs[run["strategy"]].append(run)
    return runs, config or {}


def table(runs: dict[str, list[dict]]) -> str:
    if "none" not in runs:
        raise SystemExit("no 'none' runs to compare with")
    base = {r["seed"]: r["final_test_acc"] for r in runs["none"]}
    out = [
        "| strategy | seeds | test accuracy (%) | per seed | delta vs none (points) |",
        "|---|---|---:|---|---:|",
    ]
    for name, rs in runs.items():
        accs = [r["final_test_acc"] for r in rs]
        deltas = [r["final_test_acc"] - base[r["seed"]] for r in rs if r["seed"] in base]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append(
            f"| {name} | {len(rs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(deltas):+.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="files written by actpack train --json")
    args = p.parse_args(argv)
    runs, config = pooled(args.json)
    print(f"model {config.get('model')}-{config.get('size')}, epochs {config.get('epochs')}, "
          f"batch {config.get('batch_size')}")  # fmt: skip
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
