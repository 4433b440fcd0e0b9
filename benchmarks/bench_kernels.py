"""Bandwidth of actpack's fused Triton kernels against a plain copy, on CUDA.

Usage (from the repository root, actpack installed or ``PYTHONPATH=src``)::

    python benchmarks/bench_kernels.py                      # 64x256x56x56, bf16 and fp32
    python benchmarks/bench_kernels.py --shape 32,64,112,112 --dtypes bf16 --reps 100
    python benchmarks/bench_kernels.py --compile-only --arch 90   # no GPU needed

What it measures, per dtype, on one activation-sized tensor ``x``:

* ``clone``: ``torch.clone(x)``, the plain-copy yardstick (reads and writes ``x``);
* ActNN groups (``actpack.ActNN``'s layout: one row per sample, groups of 256,
  2 bits, stochastic rounding): quantize + pack, and unpack + dequantize;
* DIVISION (8x8 blocks, 2 bits, stochastic): encode and decode;
* 1-bit masks (``x > 0``, as ReLU's sign pattern): pack and unpack.

For each operation: the median time of ``--reps`` runs (after warm-up) timed
with CUDA events; the bytes it must move (the input it reads plus what it
writes: the tensor, the packed codes, per-group/per-row ranges and LFC, as
counted by the codes' ``nbytes``); the effective bandwidth in GB/s
(1 GB = 1e9 bytes) and as a percentage of ``clone``'s bandwidth on the same
tensor; the pure-PyTorch reference path's median time side by side (forced with
``backend="reference"``; ``--no-reference`` skips it) and the speed-up; the GPU
kernels launched per call (``torch.profiler``; the stochastic encodes include a
one-element ``torch.randint`` that draws the Philox seed on the device); and
the host synchronisations per call, counted with
``torch.cuda.set_sync_debug_mode("warn")`` (one warning per synchronising
call) and cross-checked with the CUDA runtime calls the profiler records
(``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, blocking
``cudaMemcpy``).  Before timing, round-to-nearest codes of the kernels and the
reference are compared bit for bit on the first samples (a GPU-side check of
what the interpreter tests on the CPU).  The result is a markdown table.

Without CUDA it prints that it needs CUDA and exits with status 0 (the
kernels' correctness on the CPU is the job of ``tests/test_kernels.py``,
through Triton's interpreter).  ``--compile-only`` needs no GPU: it compiles
every kernel for a CUDA architecture (``--arch``, default 90) with the ptxas
bundled in Triton's wheel, which catches what the interpreter accepts but the
compiler rejects (non-constexpr globals, type errors); it relies on Triton
internals (a stand-in active driver), so it may need updating with Triton.

Needs PyTorch with CUDA (2.4+; written for 2.11) and Triton 3.x (3.6 tested
by design: no newer Triton API is used outside ``--compile-only``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # run from a checkout without installing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GROUP_SIZE = 256
BITS = 2
BLOCK = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64,256,56,56", help="N,C,H,W (default %(default)s)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--reps", type=int, default=50, help="timed runs per operation")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    p.add_argument("--no-reference", action="store_true", help="skip the reference path")
    p.add_argument("--compile-only", action="store_true", help="compile the kernels, no GPU")
    p.add_argument("--arch", type=int, default=90, help="CUDA arch for --compile-only")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def launches_and_syncs(fn: Callable[[], object]) -> tuple[int, int, int]:
    """(GPU kernels launched, syncs seen by the sync debug mode, sync runtime calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled and cached: nothing below is first-call work
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    debug_syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    kernels = 0
    runtime_syncs = 0
    for evt in prof.events():
        name = evt.name
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if not name.lower().startswith(("memcpy", "memset")):
                kernels += 1
        elif name in _SYNC_CALLS or name == "cudaMemcpy":
            runtime_syncs += 1
    return kernels, debug_syncs, runtime_syncs


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous(), b.contiguous()
    return bool(torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()])))


def check_rtn(x: torch.Tensor) -> dict[str, bool]:
    """Round-to-nearest codes and decodes of kernels and reference, bit for bit."""
    from actpack.codecs import backend as B

    small = x[: min(4, x.shape[0])]
    rows = small.reshape(small.shape[0], -1)
    out = {}
    kw = {"stochastic": False}
    ref = B.quantize_groups(rows, BITS, GROUP_SIZE, backend="reference", **kw)
    ker = B.quantize_groups(rows, BITS, GROUP_SIZE, backend="triton", **kw)
    out["actnn"] = (
        bitwise_equal(ref.packed, ker.packed)
        and bitwise_equal(ref.lo, ker.lo)
        and bitwise_equal(ref.hi, ker.hi)
        and bitwise_equal(
            B.dequantize_groups(ref, x.dtype, backend="reference"),
            B.dequantize_groups(ker, x.dtype, backend="triton"),
        )
    )
    ref = B.division_encode(small, BLOCK, BITS, backend="reference", **kw)
    ker = B.division_encode(small, BLOCK, BITS, backend="triton", **kw)
    out["division"] = (
        bitwise_equal(ref.lfc, ker.lfc)
        and bitwise_equal(ref.hfc.packed, ker.hfc.packed)
        and bitwise_equal(ref.hfc.lo, ker.hfc.lo)
        and bitwise_equal(ref.hfc.hi, ker.hfc.hi)
        and bitwise_equal(
            B.division_decode(ref, x.dtype, backend="reference"),
            B.division_decode(ker, x.dtype, backend="triton"),
        )
    )
    mask = small > 0
    packed = B.pack_mask(mask, backend="triton")
    out["mask"] = bitwise_equal(packed, B.pack_mask(mask, backend="reference")) and bool(
        torch.equal(B.unpack_mask(packed, mask.shape, backend="triton"), mask)
    )
    return out


def operations(x: torch.Tensor) -> list[tuple[str, str, int, Callable[[str], object]]]:
    """(codec, operation, bytes moved, fn(backend)) for tensor ``x``."""
    from actpack.codecs import backend as B

    dtype = x.dtype
    rows = x.reshape(x.shape[0], -1)
    gen = torch.Generator(x.device).manual_seed(0)
    xbytes = x.numel() * x.element_size()
    gcode = B.quantize_groups(rows, BITS, GROUP_SIZE, generator=gen, backend="triton")
    dcode = B.division_encode(x, BLOCK, BITS, generator=gen, backend="triton")
    mask = x > 0
    mbytes = mask.numel()  # bool: one byte per element
    packed = B.pack_mask(mask, backend="triton")
    pbytes = packed.numel()
    return [
        (
            "actnn",
            "quantize+pack",
            xbytes + gcode.nbytes,
            lambda b: B.quantize_groups(rows, BITS, GROUP_SIZE, generator=gen, backend=b),
        ),
        (
            "actnn",
            "unpack+dequantize",
            gcode.nbytes + xbytes,
            lambda b: B.dequantize_groups(gcode, dtype, backend=b),
        ),
        (
            "division",
            "encode",
            xbytes + dcode.nbytes,
            lambda b: B.division_encode(x, BLOCK, BITS, generator=gen, backend=b),
        ),
        (
            "division",
            "decode",
            dcode.nbytes + xbytes,
            lambda b: B.division_decode(dcode, dtype, backend=b),
        ),
        ("mask", "pack (1 bit)", mbytes + pbytes, lambda b: B.pack_mask(mask, backend=b)),
        (
            "mask",
            "unpack (1 bit)",
            pbytes + mbytes,
            lambda b: B.unpack_mask(packed, mask.shape, backend=b),
        ),
    ]


def bench_dtype(shape: tuple[int, ...], dtype: torch.dtype, args: argparse.Namespace) -> list:
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    checks = check_rtn(x)
    print(f"{name}: round-to-nearest kernel == reference, bit for bit: {checks}", flush=True)
    xbytes = x.numel() * x.element_size()
    clone_ms = median_ms(lambda: torch.clone(x), args.reps, args.warmup)
    clone_gbs = 2 * xbytes / clone_ms / 1e6
    rows = [[name, "clone", "copy", 2 * xbytes, clone_ms, clone_gbs, 100.0, None, None, 1, 0, 0]]
    mask_clone_ms = None
    for codec, op, nbytes, fn in operations(x):
        ker_ms = median_ms(lambda fn=fn: fn("triton"), args.reps, args.warmup)
        ref_ms = None
        if not args.no_reference:
            reps = max(3, args.reps // 5)  # the reference is slow and memory hungry
            ref_ms = median_ms(lambda fn=fn: fn("reference"), reps, 1)
        gbs = nbytes / ker_ms / 1e6
        yard = clone_gbs
        if codec == "mask":  # compare with a copy of the bool mask
            if mask_clone_ms is None:
                m = x > 0
                mask_clone_ms = median_ms(lambda m=m: torch.clone(m), args.reps, args.warmup)
            yard = 2 * x.numel() / mask_clone_ms / 1e6
        kernels, debug_syncs, runtime_syncs = launches_and_syncs(lambda fn=fn: fn("triton"))
        rows.append(
            [name, codec, op, nbytes, ker_ms, gbs, 100 * gbs / yard, ref_ms,
             None if ref_ms is None else ref_ms / ker_ms, kernels, debug_syncs, runtime_syncs]
        )  # fmt: skip
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list, device: str, shape: tuple[int, ...]) -> str:
    head = (
        "| dtype | codec | operation | MB moved | kernel ms | GB/s | % of copy GB/s "
        "| reference ms | speed-up | GPU kernels | syncs (debug mode) | syncs (runtime) |"
    )
    lines = [
        f"Device: {device}; tensor {tuple(shape)}; torch {torch.__version__}; "
        f"triton {_triton_version()}; medians of CUDA-event timings.",
        "",
        head,
        "|" + "---|" * 12,
    ]
    for r in rows:
        name, codec, op, nbytes, ms, gbs, pct, ref_ms, speed, kern, dsync, rsync = r
        ref = "-" if ref_ms is None else f"{ref_ms:.3f}"
        sp = "-" if speed is None else f"{speed:.1f}x"
        lines.append(
            f"| {name} | {codec} | {op} | {nbytes / 1e6:.1f} | {ms:.3f} | {gbs:.0f} | "
            f"{pct:.0f}% | {ref} | {sp} | {kern} | {dsync} | {rsync} |"
        )
    lines += [
        "",
        "MB moved: bytes the operation must read plus write (codes' nbytes + tensor); "
        "% of copy: against torch.clone of the same tensor (the bool mask for masks). "
        "GPU kernels per call include the one-element torch.randint of stochastic encodes.",
    ]
    return "\n".join(lines)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # report, do not fail
        return "not importable"


# --------------------------------------------------------------------------------------
# Compile-only mode (no GPU)
# --------------------------------------------------------------------------------------


def compile_only(arch: int) -> int:
    """Compile every kernel configuration the wrappers launch, for ``sm_<arch>``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET for --compile-only", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _TargetOnly:  # the compiler asks the active driver for the target only
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_TargetOnly())
    done: list[str] = []

    def getitem(self, grid):  # launch -> compile only
        def launch(*a, **kw):
            self.warmup(*a, grid=grid, **kw)
            done.append(self.fn.__name__)

        return launch

    JITFunction.__getitem__ = getitem
    from actpack.codecs.division import DivisionCode
    from actpack.codecs.groupquant import GroupCode
    from actpack.codecs.kernels import bits as kbits
    from actpack.codecs.kernels import division as kdiv
    from actpack.codecs.kernels import groupquant as kgq

    def meta(*shape):
        return torch.zeros(shape, dtype=torch.bfloat16)

    for dt in DTYPES.values():
        x = torch.randn(4, 4096).to(dt)
        kgq.quantize_groups(x, 2, 256)
        kgq.quantize_groups(x, 2, 256, stochastic=False, zero_exact=True)
        g = GroupCode(torch.zeros(4096, dtype=torch.uint8), meta(4, 16), meta(4, 16),
                      4, 4096, 256, 2, False)  # fmt: skip
        kgq.dequantize_groups(g, dt)
        kdiv.division_encode(torch.randn(2, 8, 56, 56).to(dt), 8, 2)
        h = GroupCode(torch.zeros(16 * 3136 // 4, dtype=torch.uint8), meta(16, 1), meta(16, 1),
                      16, 3136, 3136, 2, False)  # fmt: skip
        kdiv.division_decode(DivisionCode(meta(2, 8, 7, 7), h, (2, 8, 56, 56), (8, 8)), dt)
    kgq.quantize_groups(torch.randn(3, 20), 2, 7)  # several groups per program
    kgq.quantize_groups(torch.randn(2, 300), 4, 256, meta_dtype=torch.float16)
    kgq.quantize_groups(torch.randn(2, 300), 8, 256, meta_dtype=torch.float32)
    kgq.quantize_groups(torch.randn(2, 300), 1, 256)
    kdiv.division_encode(torch.randn(2, 3, 50), 8, 2)
    kdiv.division_encode(torch.randn(1, 2, 5, 6, 7), 4, 4)
    kbits.pack_mask(torch.rand(1000) > 0.5)
    kbits.unpack_mask(torch.zeros(125, dtype=torch.uint8), torch.Size([1000]))
    kbits.unpack_bits(torch.zeros(1000, dtype=torch.uint8), 3, 2000)
    print(f"compiled {len(done)} kernel configurations for sm_{arch}: {sorted(set(done))}")
    return 0


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args.arch)
    if not torch.cuda.is_available():
        print(
            "bench_kernels needs CUDA (no CUDA device here): nothing measured. "
            "Kernel correctness on the CPU: pytest tests/test_kernels.py (Triton's "
            "interpreter); compilation without a GPU: --compile-only."
        )
        return 0
    from actpack.codecs.backend import triton_available

    if not triton_available():
        print("bench_kernels needs Triton (pip install triton): nothing measured.")
        return 0
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4:
        raise SystemExit(f"--shape must be N,C,H,W, got {args.shape!r}")
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]
    rows = []
    for dtype in dtypes:
        rows += bench_dtype(shape, dtype, args)
    print()
    print(markdown(rows, torch.cuda.get_device_name(), shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
