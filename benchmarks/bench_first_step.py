"""First training steps on the CPU: what compiling the fused codecs costs.

The compiled CPU codecs (``actpack.codecs.compiled``) compile each
configuration the first time a saved tensor needs it: one standalone
Inductor artifact per configuration and shape class, verified against the
reference on a probe before its first result is used.  That work lands in
the first step of every new process.  This script runs each (model,
strategy) in a fresh Python process and reports the first, second and third
step's wall-clock time and how many standalone artifacts were compiled, with
Inductor's on-disk caches either warm (this machine's default cache
directory: its C++ builds are reused) or cold (an empty directory, as on a
new machine: every kernel goes through gcc too).

Run: ``python benchmarks/bench_first_step.py`` (a few minutes on a 2-core
CPU; ``--cold`` for an empty cache directory per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _one(model_name: str, size: str, strategy: str, batch: int) -> dict:
    """Three steps of one model under one strategy in this process."""
    import torch

    import actpack
    from actpack.codecs.compiled import standalone
    from actpack.tools.models import build_model, loss_for

    compiled: list[str] = []
    compile_ = standalone.Standalone._compile

    def counted(self, facts, args):
        compiled.append(self.name)
        return compile_(self, facts, args)

    standalone.Standalone._compile = counted
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, make_inputs = build_model(model_name, size)
    inputs = make_inputs(batch)
    loss_fn = loss_for(model_name)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with actpack.compress(strategy):
            loss = loss_fn(model(*inputs), inputs)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {"steps_s": times, "artifacts": len(compiled), "configurations": len(set(compiled))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet:tiny", "gpt:tiny"],
                   help="built-in model:size pairs")  # fmt: skip
    p.add_argument("--strategies", nargs="+", default=["actnn", "actnn-rows", "division"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cold", action="store_true", help="an empty Inductor cache per process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model_name, size, strategy = args.child.split(":")
        print(json.dumps(_one(model_name, size, strategy, args.batch_size)))
        return
    print(f"cache: {'cold (empty directory)' if args.cold else 'warm (default directory)'}")
    print(f"{'model':<12} {'strategy':<11} {'step 1':>8} {'step 2':>8} {'step 3':>8} artifacts")
    for spec in args.models:
        for strategy in args.strategies:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            with tempfile.TemporaryDirectory() as cache:
                if args.cold:
                    env["TORCHINDUCTOR_CACHE_DIR"] = cache
                child = [sys.executable, __file__, "--child", f"{spec}:{strategy}",
                         "--batch-size", str(args.batch_size)]  # fmt: skip
                out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            s1, s2, s3 = row["steps_s"]
            print(f"{spec:<12} {strategy:<11} {s1:7.1f}s {s2:7.3f}s {s3:7.3f}s "
                  f"{row['artifacts']} for {row['configurations']} configurations")  # fmt: skip


if __name__ == "__main__":
    main()
