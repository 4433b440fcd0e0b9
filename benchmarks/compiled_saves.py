"""Bytes compiled graphs save for backward under actpack, from the inlined hooks' decisions.

``actpack report`` and ``actpack.measure`` count eager saves only; inside
``torch.compile`` each saved node's decision is recorded in
``compiled_hooks(engine).decisions`` with the bytes autograd would hold
(``before``) and what the graph holds instead (``after``).  One training
step per model, strategy and partition, batch 8, CPU: ``aot_eager``
(AOTAutograd's graphs, no Inductor) and ``aot_eager_decomp_partition``
(Inductor's decompositions and partitioner, the graphs Inductor compiles,
without its compile time).  The last column sums the saves kept exact
because one product in backward reads them twice, or because a smooth
op's output recomputed from them is read outside its backward formula
(``graphreads.backward_reads``).

    python benchmarks/compiled_saves.py
    python benchmarks/compiled_saves.py --models hf:llama:tiny --strategies actnn

2-core CPU, torch 2.13.0: built-in gpt/vit/resnet (small) and hf:gpt2:tiny
lose nothing to the products rule; hf:llama:tiny keeps its 5 RMSNorm inputs
exact under AOTAutograd's partition (6.98x -> 4.58x under ``actnn``, 6.52x
-> 4.42x under ``actnn-rows``), unchanged under Inductor's (2.29x, 2.23x).
Recomputed smooth outputs: hf:llama:tiny also keeps its 2 gate projections
(SiLU's input, whose output is recomputed for the up projection's gradient)
under AOTAutograd's partition (4.58x -> 2.94x under ``actnn``); the rest is
unchanged.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # trace the hooks every time

import torch  # noqa: E402

import actpack  # noqa: E402
from actpack.engine import compiled  # noqa: E402
from actpack.tools.specs import build, parse_spec  # noqa: E402

MODELS = ["gpt:small", "vit:small", "resnet:small", "hf:gpt2:tiny", "hf:llama:tiny"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--strategies", nargs="+", default=["actnn", "actnn-rows"])
    parser.add_argument(
        "--backends", nargs="+", default=["aot_eager", "aot_eager_decomp_partition"]
    )
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print("| model | partition | strategy | saved | compiled | ratio | products, recomputed |")
    print("|---|---|---|---:|---:|---:|---:|")
    for spec in args.models:
        for backend in args.backends:
            for strategy in args.strategies:
                torch._dynamo.reset()
                torch.manual_seed(0)
                model, make_inputs, loss_fn = build(parse_spec(spec))
                inputs = make_inputs(args.batch_size, torch.device("cpu"))
                engine = actpack.compress(strategy)
                with engine:
                    loss = loss_fn(torch.compile(model, backend=backend)(*inputs), inputs)
                loss.backward()
                decisions = compiled.compiled_hooks(engine).decisions.values()
                before = sum(d.before for d in decisions)
                after = sum(d.after for d in decisions)
                twice = sum(
                    d.before
                    for d in decisions
                    if d.reason.startswith("read twice") or "outside its backward" in d.reason
                )
                mib = 2**20
                print(
                    f"| {spec} | {backend} | {strategy} | {before / mib:.2f} MiB | "
                    f"{after / mib:.2f} MiB | {before / after:.2f}x | {twice / mib:.2f} MiB |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
