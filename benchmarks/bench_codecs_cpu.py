"""CPU codec throughput, reference against compiled, next to a plain copy.

Usage (from the repository root, actpack installed or ``PYTHONPATH=src``)::

    python benchmarks/bench_codecs_cpu.py                    # 64 KiB .. 64 MiB, ~2 min
    python benchmarks/bench_codecs_cpu.py --sizes 1,16 --rounds 5 --json out.json
    python benchmarks/bench_codecs_cpu.py --sizes 16 --forms both    # AVX-512 and AVX2 forms

On one float32 tensor per size (``--sizes``, in MiB of float32 input) and one
thread, it times:

* ``clone``: ``torch.clone(x)``, the plain-copy yardstick;
* ActNN 2-bit (``actpack.ActNN``'s layout: one row per sample of 4096
  elements, or one row below that, groups of 256, stochastic rounding) and
  int8 (the same, 8 bits):
  encode = quantize + pack, decode = unpack + dequantize to float32;
* DIVISION (maps (N, 16, 32, 32), or (1, C, 32, 32) below 16 maps, 8x8
  blocks, 2 bits, stochastic): encode
  and decode, and the encoder's block means alone (compiled, as the encoder
  computes them, beside ATen's ``avg_pool2d`` to bfloat16, which computed
  them until the reference fixed its own summation order);
* the Hadamard-rotated 3-bit code of ``actpack.RowActNN``'s Linear inputs
  (token rows of 256 features, one group a row, 64-column blocks, adaptive,
  stochastic): its ``"reference"`` rows are the reference rotation, whose
  quantization takes the backend ``ACTPACK_BACKEND`` selects (unset: the
  compiled one at these sizes), i.e. what ``RowActNN`` ran before the
  rotation's row selection was compiled, its ``"compiled"`` rows what it
  runs now (:mod:`actpack.codecs.compiled.hadamard`);
* with ``--forms both``, the compiled 2-bit and int8 codecs again with the
  code forms of each vector width forced (the name ``avx512_vectors`` in
  ``actpack.codecs.compiled.groupquant``, which otherwise follows the CPU's
  vector capability printed in the header):
  the encoders' range reduction (lane split on AVX-512, plain
  ``amin``/``amax`` elsewhere), their passes over the input (two on
  AVX-512; elsewhere one per group, the group's extremes, scale and codes
  fused) and the int8 decoder's input (uint8 codes on AVX-512, pairs of the
  stream's int32 words elsewhere);

each through :mod:`actpack.codecs.backend` with ``backend="reference"`` (the
pure-PyTorch specification) and ``backend="compiled"`` (TorchInductor,
:mod:`actpack.codecs.compiled`).  Throughput is the float32 tensor's size
divided by the median time (1 GB = 1e9 bytes), for encode and decode alike,
so it compares directly with ``clone`` moving the same tensor; ``% copy`` is
the ratio to ``clone``'s throughput measured in the same rounds.  Rounds are
interleaved (every operation once per round, in turn) so that machine load
affects all alike; the table reports medians of wall-clock times
(``--clock cpu``: of the thread's CPU time, which other processes on a
shared machine disturb less).  A compiled function is called
once before timing; the first call's time (the compilation, or a load from
Inductor's on-disk cache) is reported separately.

A freshly allocated 64 MiB output is mapped from the OS and faults its pages
on first write (glibc serves large blocks with mmap), which ``clone`` pays on
every call; the encoders' outputs are small.  The ``copy_`` row (into a
preallocated tensor) shows the copy without that cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # run from a checkout without installing

from actpack.codecs import backend  # noqa: E402
from actpack.codecs.compiled import division as cdiv  # noqa: E402
from actpack.codecs.compiled import groupquant as cgq  # noqa: E402

BACKENDS = ("reference", "compiled")
GROUP_ROW = 4096  # elements per sample row for the ActNN layout
HADAMARD_ROW = 256  # features per token row for the rotated code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.0625,1,16,64", help="float32 MiB per tensor")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--budget", type=float, default=20.0, help="max seconds of timing per size")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: thread CPU time (steadier on a shared machine)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--forms", choices=["auto", "both"], default="auto",
                   help="both: also time the compiled group codecs with the code forms of "
                        "AVX-512 and of AVX2 forced, side by side")  # fmt: skip
    return p.parse_args(argv)


@contextlib.contextmanager
def forms_forced(avx512: bool) -> Iterator[None]:
    """The compiled group codecs' code forms forced to those of one vector
    width (the name ``avx512_vectors`` that ``actpack.codecs.compiled.
    groupquant`` reads; each form is its own compiled configuration).  Not
    thread-safe: it swaps a module attribute, for this benchmark only."""
    saved = cgq.avx512_vectors
    cgq.avx512_vectors = lambda: avx512
    try:
        yield
    finally:
        cgq.avx512_vectors = saved


def forced(fn: Callable, arg: object, avx512: bool) -> Callable[[], object]:
    """``fn(arg, "compiled")`` under :func:`forms_forced`."""

    def call() -> object:
        with forms_forced(avx512):
            return fn(arg, "compiled")

    return call


def codecs(numel: int) -> dict[str, tuple[Callable, Callable, Callable]]:
    """name -> (make input, encode(x, backend), decode(code, backend))."""
    gen = torch.Generator().manual_seed(0)

    def groups(bits: int):
        def make() -> torch.Tensor:
            row = min(numel, GROUP_ROW)  # below one row: a single row of numel
            return torch.randn(numel // row, row, generator=gen)

        def enc(x, name):
            return backend.quantize_groups(x, bits, 256, generator=gen, backend=name)

        def dec(code, name):
            return backend.dequantize_groups(code, torch.float32, backend=name)

        return make, enc, dec

    def division():
        def make() -> torch.Tensor:
            n, c = max(1, numel // (16 * 32 * 32)), min(16, numel // (32 * 32))
            return torch.randn(n, c, 32, 32, generator=gen)  # below 16 maps: fewer channels

        def enc(x, name):
            return backend.division_encode(x, 8, 2, generator=gen, backend=name)

        def dec(code, name):
            return backend.division_decode(code, torch.float32, backend=name)

        return make, enc, dec

    def hadamard():
        def make() -> torch.Tensor:
            return torch.randn(
                max(1, numel // HADAMARD_ROW), min(numel, HADAMARD_ROW), generator=gen
            )

        def enc(x, name):
            return backend.hadamard_encode(x, 3, 64, adaptive=True, generator=gen, backend=name)

        def dec(code, name):
            return backend.hadamard_decode(code, torch.float32, backend=name)

        return make, enc, dec

    return {
        "actnn-2bit": groups(2),
        "int8": groups(8),
        "division-2bit": division(),
        "hadamard-3bit": hadamard(),
    }


def measure(
    mib: float, rounds: int, budget: float, clock, forms: str = "auto"
) -> tuple[list[dict], dict[str, float]]:
    numel = int(mib * 2**20) // 4
    # Whole DIVISION maps (16 of 32x32 per sample), or below 16 maps whole maps.
    numel -= numel % (16 * 32 * 32 if numel >= 16 * 32 * 32 else 32 * 32)
    if numel == 0:
        raise SystemExit(f"--sizes: {mib} MiB is below one 32x32 map of float32 (4 KiB)")
    ops: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}
    x = torch.randn(numel)
    out = torch.empty_like(x)
    ops["clone"] = lambda: torch.clone(x)
    ops["copy_"] = lambda: out.copy_(x)
    for codec, (make, enc, dec) in codecs(numel).items():
        xc = make()
        for name in BACKENDS:
            t = time.perf_counter()
            code = enc(xc, name)
            dec(code, name)
            first[f"{codec} {name}"] = time.perf_counter() - t
            ops[f"{codec} encode {name}"] = lambda e=enc, xc=xc, n=name: e(xc, n)
            ops[f"{codec} decode {name}"] = lambda d=dec, c=code, n=name: d(c, n)
        if codec == "division-2bit":
            # The block means alone: the compiled body of the reference's
            # order against the ATen pooling kernel that computed them before.
            # As the encoder calls them: under no_grad (the standalone artifact).
            means = torch.no_grad()(cdiv._block_means)
            ops["division-2bit block means (compiled)"] = lambda xc=xc, m=means: m(xc, (8, 8))
            ops["division-2bit block means (ATen avg_pool2d)"] = lambda xc=xc: F.avg_pool2d(
                xc, 8, 8, 0, True, False
            ).to(torch.bfloat16)
        if forms == "both" and codec in ("actnn-2bit", "int8"):
            for avx512 in (True, False):
                what = "AVX-512 forms" if avx512 else "AVX2 forms"

                forced_enc = forced(enc, xc, avx512)
                forced_dec = forced(dec, code, avx512)
                t = time.perf_counter()
                forced_enc()
                forced_dec()
                first[f"{codec} compiled, {what}"] = time.perf_counter() - t
                ops[f"{codec} encode compiled, {what}"] = forced_enc
                ops[f"{codec} decode compiled, {what}"] = forced_dec
    times: dict[str, list[float]] = {k: [] for k in ops}
    start = time.perf_counter()
    for r in range(rounds):
        for k, fn in ops.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
        if r >= 2 and time.perf_counter() - start > budget:
            break  # big tensors on the reference: keep the run short
    gbytes = numel * 4 / 1e9
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {
            "MiB": round(numel * 4 / 2**20, 3),
            "op": k,
            "ms": med[k] * 1e3,
            "GB/s": gbytes / med[k],
            "% copy": 100 * med["clone"] / med[k],
            "rounds": len(times[k]),
        }
        for k in ops
    ]
    return rows, first


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = [float(s) for s in args.sizes.split(",")]
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"1 thread, {args.rounds} interleaved rounds, {args.clock} clock\n")  # fmt: skip
    print("| MiB | operation | ms | GB/s | % copy | compiled / reference |")
    print("|---:|---|---:|---:|---:|---:|")
    results, firsts = [], {}
    for mib in sizes:
        rows, first = measure(mib, args.rounds, args.budget, clock, args.forms)
        by_op = {r["op"]: r for r in rows}
        for r in rows:
            speedup = ""
            if r["op"].endswith(" compiled"):
                refop = by_op[r["op"].replace(" compiled", " reference")]
                speedup = f"{refop['ms'] / r['ms']:.1f}x"
            print(
                f"| {r['MiB']:g} | {r['op']} | {r['ms']:.3f} | {r['GB/s']:.2f} "
                f"| {r['% copy']:.0f}% | {speedup} |"
            )
        results += rows
        firsts = firsts or first
    print("\nfirst call (encode + decode; compiled: compilation or on-disk cache load), s:")
    for k, v in firsts.items():
        print(f"  {k}: {v:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "first_call_s": firsts}, indent=1))


if __name__ == "__main__":
    main()
