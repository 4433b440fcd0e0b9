"""The reference codecs' arithmetic, written for Inductor to vectorise.

Every function here computes what a step of :mod:`actpack.codecs.groupquant`
computes, bit for bit, and is traced inside the compiled codec bodies of
:mod:`actpack.codecs.compiled.groupquant` and :mod:`~.division`.  What
differs is only how: Inductor's CPU code generator vectorises a loop only if
every step in it does, so

* finiteness is ``|x| < inf`` and NaN is ``x != x`` (``torch.isnan`` and
  ``torch.isfinite`` on float32 are emitted element by element);
* classes and codes are compared as float32: uint8 comparison masks are
  converted to float masks element by element (measured 40x slower);
* no int16 arithmetic: Inductor does not vectorise int16, and one int16 step
  would keep a whole fused loop scalar (see :func:`round_out`);
* ``levels`` is a 0-d float32 tensor, not a constant, so one compiled body
  serves every bit width from 2 to 8.

Group ranges and scales are returned from the compiled bodies rather than
kept inside: Inductor stores an output once, but recomputes an inner value
in every iteration of the loop that reads it.  The classes of poisoned
groups (non-finite values) are written eagerly after the body, on those
groups alone (:func:`fix_poisoned_codes_`): tested per element inside the
loop they cost a quarter of a 2-bit encode.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from actpack.codecs.groupquant import _round_out, _scale
from actpack.codecs.pack import pack_bits

__all__ = [
    "any_set",
    "avx512_vectors",
    "class_codes",
    "all_finite",
    "clamp_finite",
    "extremes_ranges",
    "finish_ranges_",
    "fix_poisoned_codes_",
    "fix_poisoned_packed_",
    "fix_poisoned_values_",
    "grid_values",
    "group_grid",
    "group_ranges",
    "group_scale",
    "poisoned_values",
    "round_out",
    "value_codes",
]


def round_out(v: Tensor, meta: torch.dtype, down: bool) -> Tensor:
    """The reference's ``_round_out`` (float32 ``v`` to ``meta``, outwards,
    saturating at ``meta``'s finite maximum) in int32 and float32 arithmetic
    whose every step is exact, so that no compiler can round it otherwise.

    The result is computed as a float32 value that ``meta`` represents, and
    only then cast: that cast is exact, and so is any ``.float()`` of it that
    Inductor elides.  A ``.to(meta).float()`` round trip is never used:
    Inductor's C++ backend drops it inside a fused loop (torch 2.11 caches the
    float32 value as the cast's inverse; only torch >= 2.13 keeps the rounding
    under ``emulate_precision_casts``), and the comparisons that decide the
    outward step then saw the unrounded value.

    A value is cut towards zero to ``meta``'s precision on its float32
    pattern (the mantissa bits ``meta`` lacks cleared) and, if that dropped
    anything and ``down`` points away from zero for its sign, moved one
    ``meta`` ulp outwards (+1 on the cut pattern's kept bits; a carry into
    the exponent is the next binade, as for the reference's ``+1`` on the
    16-bit pattern).  float16's subnormals (below 2**-14) are multiples of
    2**-24 whatever the exponent: cut there with an exact float ``trunc`` of
    ``v * 2**24``.  Zero stays zero (its sign may differ: either decodes
    alike); a tiny value pushed outwards becomes the smallest subnormal.
    """
    if meta not in (torch.bfloat16, torch.float16):
        return v.to(meta)  # float32 (float64) holds every float32 value exactly
    if meta == torch.bfloat16:
        return _round_out(v, meta, down)  # the reference is already bitwise (_round_out_bf16)
    b = v.view(torch.int32)
    negative = b < 0
    away = negative == down  # the outward direction is away from zero for this sign
    mag = b & 0x7FFFFFFF
    # Normal float16 range (|v| >= 2**-14, pattern >= 113 << 23): 13 mantissa bits dropped.
    cut = mag & -8192
    normal = torch.where(away & (cut != mag), cut + 8192, cut).view(torch.float32)
    # Subnormal range: multiples of 2**-24; |v| * 2**24 < 1024 and trunc are exact.
    scaled = mag.view(torch.float32) * 16777216.0
    whole = torch.trunc(scaled)
    sub = torch.where(away & (whole != scaled), whole + 1.0, whole) * 5.9604644775390625e-08
    m = torch.where(mag >= 113 << 23, normal, sub)
    big = torch.finfo(torch.float16).max
    m = torch.where(m > big, big, m)  # saturate (a float16 maximum); NaN is not compared
    return torch.where(negative, -m, m).to(torch.float16)


def split_extremes(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(amin, amax)`` of float32 ``g`` (groups, n) over its last dimension
    (kept), ``n`` a multiple of :data:`LANES`; NaN and infinities come out as
    non-finite extremes, as from ``amin``/``amax`` (a zero's sign may differ).

    Inductor's float ``amin``/``amax`` propagate NaN at four instructions
    per vector each and reduce each group across the vector's lanes (~0.55 ms
    for 16 MiB).  Here the float patterns become int32 keys ordered as the
    floats are (a negative float's magnitude bits flipped; a NaN's key lies
    beyond an infinity of its sign), reduced with one instruction each into
    (groups, LANES) lane-wise extremes, and only those LANES values per
    group are turned back into floats and reduced as floats (~0.38 ms).
    """
    keys = _ordered(g.view(torch.int32).view(g.shape[0], -1, LANES))
    kmin, kmax = keys.amin(1), keys.amax(1)
    lmin = _ordered(kmin).view(torch.float32)  # the map is its own inverse
    lmax = _ordered(kmax).view(torch.float32)
    return lmin.amin(1, keepdim=True), lmax.amax(1, keepdim=True)


LANES = 16  # an AVX-512 vector of float32 (two AVX2 vectors)


@functools.cache
def avx512_vectors() -> bool:
    """Whether this CPU's vectors are AVX-512's (ATen's vector capability,
    ``torch.backends.cpu.get_cpu_capability()``, which Inductor's generated
    code also targets there): the code forms that pay differ with the width.

    * The group encoders reduce their ranges with :func:`split_extremes`
      only there.  With AVX2's 8-lane vectors the (groups, LANES) lane-wise
      extremes are stored and reloaded as int32 vectors of a given lane
      count, which Inductor loads through a stack buffer (a store-forwarding
      stall per load, see :func:`lane_offsets`): a 2-bit stochastic encode
      of 16 MiB ran 9.0-10.2 ms with the split and 8.4-8.8 ms without on a
      2-core AMD EPYC with AVX2 (``benchmarks/bench_codecs_cpu.py --forms both``,
      BENCHMARKS.md "CPU codecs", round 7).
    * The group decoder reads 8-bit codes from pairs of the stream's int32
      words everywhere else (:func:`~actpack.codecs.compiled.groupquant.word_bits`).

    Every CPU without AVX-512 (AVX2, but also NEON, SVE, none) gets the
    other forms, measured on AVX2 only.  A machine fact, cached; a mismatch
    with Inductor's own choice of vector width costs speed, never values
    (every form is checked against the reference)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _ordered(bits: Tensor) -> Tensor:
    """int32 float patterns <-> keys whose signed order is the floats' order."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def group_ranges(g: Tensor, meta: torch.dtype, zero_exact: bool, dims=(-1,), split=False):
    """(lo, hi, poisoned) of float32 ``g`` reduced over ``dims`` (kept, size 1).

    The reference's statistics for every group whose values are all finite:
    lo/hi in ``meta``, rounded outwards, not yet marked poisoned
    (:func:`finish_ranges_`); the sign of a zero bound may differ (either
    decodes alike).  A poisoned group's lo/hi are left undefined here (NaN
    or infinite): :func:`finish_ranges_` overwrites them.  (Masking
    non-finite values out first, as the reference does, cost 10% of a 2-bit
    encode.)
    """
    if split:  # (groups, n) with n a multiple of LANES
        gmin, gmax = split_extremes(g)
    else:
        gmax = g.amax(dim=dims, keepdim=True)
        gmin = g.amin(dim=dims, keepdim=True)
    if zero_exact:
        poisoned = ~all_finite(gmin, gmax)
        gmin = torch.where(g > 0, g, math.inf).amin(dim=dims, keepdim=True)
        gmin = torch.where(gmin < math.inf, gmin, 0.0)  # no positive value
        return round_out(gmin, meta, down=True), round_out(gmax, meta, down=False), poisoned
    return extremes_ranges(gmin, gmax, meta)


def all_finite(gmin: Tensor, gmax: Tensor) -> Tensor:
    """Whether a group whose plain ``amin``/``amax`` are these is all finite:
    both propagate NaN, and an infinity is an extreme."""
    return (gmax.abs() < math.inf) & (gmin.abs() < math.inf)


def extremes_ranges(gmin: Tensor, gmax: Tensor, meta: torch.dtype):
    """:func:`group_ranges` from a group's plain ``amin``/``amax``."""
    poisoned = ~all_finite(gmin, gmax)
    return round_out(gmin, meta, down=True), round_out(gmax, meta, down=False), poisoned


def group_scale(lo: Tensor, hi: Tensor, poisoned: Tensor, levels: Tensor, per_group: bool = False):
    """Per-group ``(k, lok, step)`` of the reference's ``_scale``, except that
    ``step`` is +Inf where the reference's is 0 (a constant group) and in a
    poisoned group: :func:`value_codes` divides by it with no per-element test.

    The compiled bodies return these as outputs: Inductor stores an output
    once, where it would recompute an inner per-group value (two divisions)
    in every vector iteration of the loop over the group's elements.

    ``per_group=True`` computes them in a scalar loop over the groups (one
    int16 step, which Inductor does not vectorise, on the poisoned flag,
    exactly): every loop of a (groups, group_size) encoder body then steps
    one group at a time, and Inductor's outer-loop fusion runs the group's
    extremes, its scale and its codes in one pass over the group, while
    its values are in L1, instead of reading the whole input twice (the
    scale loop otherwise steps 8 or 16 groups per vector, and loops of other
    steps are not fused).  The group encoders use it on CPUs without
    AVX-512 (:func:`avx512_vectors`), where a 2-bit stochastic encode of 16
    MiB took 4.9 ms fused against 6.4 ms with the AVX-512 forms in two
    passes (``benchmarks/bench_codecs_cpu.py --forms both``, BENCHMARKS.md
    "CPU codecs", round 9); on AVX-512 a per-group fusion measured slower
    (round 4).
    """
    k, lok, step = _scale(lo.float(), hi.float(), levels)
    if per_group:
        poisoned = poisoned.to(torch.int16) != 0
    return k, lok, torch.where(poisoned | (step == 0), math.inf, step)


def lane_offsets(size: int, stride: int, index: torch.dtype, device: torch.device) -> Tensor:
    """``arange(size) * stride``, the noise counter's offsets along the
    vectorised dimension, as a compiled body's input: float32 where the
    offsets fit its 24-bit mantissa and the index dtype is int32 (the body
    converts them with ``.to(index)``), else in the index dtype.

    Inductor loads an int32 input on AVX2 through a stack buffer written in
    two halves and read whole (a store-forwarding stall: perf put a quarter
    of a 2-bit stochastic encode on the add after it); a float32 load is one
    instruction, and the conversion another."""
    exact = index == torch.int32 and (size - 1) * stride < 1 << 24
    with torch.inference_mode(False):  # never an inference tensor (see levels_tensor)
        offsets = torch.arange(size, device=device, dtype=index) * stride
        return offsets.to(torch.float32) if exact else offsets


def to_uint8(v: Tensor) -> Tensor:
    """Integer values ``v`` in [0, 255] (an int32 or int64 tensor) as uint8,
    converted through float32 (exact below 2**24).

    Inductor's int32 -> uint8 vector conversion on AVX2 has no intrinsic: it
    goes lane by lane through a buffer whose uint8 reload fills a whole
    32-byte vector one byte at a time (~160 instructions per 8 lanes; perf
    put half of a 2-bit encode there); float32 -> uint8 is a few shuffles.
    ``benchmarks/bench_codecs_cpu.py`` measures the difference."""
    return v.to(torch.float32).to(torch.uint8)


def value_codes(g, k, lok, step, u, levels: Tensor, zero_exact: bool) -> Tensor:
    """uint8 codes of float32 ``g`` against its group's grid (``step`` from
    :func:`group_scale`); arbitrary in a poisoned group, whose classes
    :func:`fix_poisoned_codes_` writes afterwards.

    ``u``: the rounding offset (0.5, or uniform noise).  The reference's
    ``floor(t + u).clamp(0, levels)`` in 4 vector instructions instead of 13:

    * a constant group's step is +Inf, so ``t`` is +-0 there, as the
      reference's ``where(step > 0, t, 0)`` gives (its numerator is finite);
    * the upper clamp is an int32 minimum of the float32 patterns (``v``
      and ``levels`` are never both negative, and a non-negative float
      orders as its pattern), so that ``v`` is below 2**31 for the
      conversion, however far a value lies beyond a saturated range (a
      float16 range saturates at 65504);
    * the conversion truncates towards zero where ``floor`` rounds down:
      they differ only below 0, which the int32 clamp to 0 erases (an
      out-of-range negative converts to -2**31).

    Float ``minimum``/``maximum`` would propagate NaN (four instructions per
    vector each) and a float ``where`` converts its mask twice.  Inductor
    emits the pattern views as a scalar loop that the C++ compiler removes.
    """
    # Divide rather than multiply by 1/step: a subnormal step would make 1/step Inf.
    t = (g * k - lok) / step
    v = (t + u).view(torch.int32).minimum(levels.view(torch.int32)).clamp_min(0)
    q = v.view(torch.float32)
    if zero_exact:
        q = torch.where(g > 0, q + 1, 0.0)
    return q.to(torch.uint8)


def class_codes(g: Tensor, wide: bool) -> Tensor:
    """uint8 classes of a poisoned group's float32 values ``g``: 0 finite, then
    (``wide``, bits >= 2) 1 NaN, 2 +Inf, 3 -Inf, or 1 for any non-finite.

    Four eager ops (a finite value minus itself is 0), where tests of
    ``isfinite``/``isnan`` and nested ``where`` made twelve: they run on
    every encode, on an empty selection when nothing is poisoned."""
    nan, pos, neg = (1.0, 2.0, 3.0) if wide else (1.0, 1.0, 1.0)
    cls = torch.nan_to_num(g, nan=nan, posinf=pos, neginf=neg)
    return (cls - torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)).to(torch.uint8)


def fix_poisoned_codes_(
    codes: Tensor, groups_of: Callable[[Tensor], Tensor], poisoned: Tensor, wide: bool
) -> None:
    """Write the classes of the poisoned groups into ``codes`` in place.

    Eager, after the compiled body, on the poisoned groups alone (rare: a
    non-finite activation; callers skip it where :func:`any_set` finds
    none); ``poisoned`` is a bool tensor over the leading dimensions of
    ``codes``, ``groups_of(mask)`` returns the float32 values of the groups
    it selects, shaped like ``codes[mask]``.
    """
    codes[poisoned] = class_codes(groups_of(poisoned), wide)


def fix_poisoned_packed_(
    packed: Tensor, groups_of: Callable[[Tensor], Tensor], poisoned: Tensor, bits: int
) -> None:
    """:func:`fix_poisoned_codes_` for codes already packed in the compiled
    body: ``packed`` holds one row of bytes per group (whole bytes)."""
    cls = class_codes(groups_of(poisoned), bits >= 2)
    if 8 % bits:
        out = pack_bits(cls, bits)
    else:  # the reference's packing of whole bytes, with its shifts cached: 2 ops, not 5
        out = (cls.view(-1, 8 // bits) << _byte_shifts(bits, cls.device)).sum(1, dtype=torch.uint8)
    packed[poisoned] = out.view(-1, packed.shape[1])


@functools.lru_cache(maxsize=16)
def _byte_shifts(bits: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def group_grid(lo: Tensor, hi: Tensor, levels: Tensor):
    """Per-group ``(lok, step, 1/k)`` of the reference's ``_scale``.

    ``k`` is 1 or 0.5, so multiplying by ``1/k`` (1 or 2) is exact and gives
    the reference's division by ``k`` bit for bit, without a division per
    element.  Returned from the compiled decoders so that they are stored
    once (see :func:`group_scale`).
    """
    k, lok, step = _scale(lo.float(), hi.float(), levels)
    return lok, step, 1.0 / k


def grid_values(q, lok, step, inv_k, zero_exact: bool) -> Tensor:
    """float32 grid values of uint8 codes ``q`` (NaN in a poisoned group)."""
    qf = q.float()
    if zero_exact:
        qf = torch.where(qf > 1, qf - 1, 0.0)
    # Scale by 1/k last: lo*k + q*step stays finite even when hi - lo overflows.
    return (lok + qf * step) * inv_k


def clamp_finite(v: Tensor, big: float) -> Tensor:
    """``v`` clamped to [-big, big] with comparisons (NaN passes through):
    ``torch.clamp`` adds NaN propagation, four instructions per vector."""
    return torch.where(v > big, big, torch.where(v < -big, -big, v))


def fix_poisoned_values_(
    out: Tensor, q: Tensor | Callable[[Tensor], Tensor], lo: Tensor, wide: bool
) -> None:
    """Write the decoded classes of poisoned groups (NaN ``lo``) into ``out``.

    ``out`` and ``q``: (groups, group_size), or ``q`` a function returning
    the uint8 codes of the groups a bool mask selects (a decoder that never
    unpacked them); ``lo``: (groups,).  Eager, after the compiled body, on
    the poisoned groups alone; the decoders call it only where their body's
    flag says there are any (see :func:`any_set`).
    """
    poisoned = torch.isnan(lo)
    if any_set(poisoned):
        codes = q(poisoned) if callable(q) else q[poisoned]
        out[poisoned] = poisoned_values(codes, wide, out.dtype)


def any_set(mask: Tensor) -> bool:
    """Whether a CPU bool tensor holds a True (poisoned groups: rare).

    The compiled codecs run on CPU tensors only, where reading a flag on
    the host synchronises nothing; skipping the poisoned groups' fix-up
    when there are none saves its ~10 eager ops (25-30 us a call, a third
    of a 64 KiB encode; ``benchmarks/bench_codecs_cpu.py``).  The decoder
    bodies return the same flag as their last output (``isnan(lo).any()``
    in the compiled call instead of two eager ops); in the encoders' bodies
    that reduction cost more than it saved (16 MiB 2-bit and int8 encodes
    ~10% slower on an AVX2 VM: it broke their one pass per group).  The
    reference and Triton paths, which also run on GPUs, never branch on
    the data."""
    return bool(mask.any())


def poisoned_values(q: Tensor, wide: bool, dtype: torch.dtype) -> Tensor:
    """Decoded values of a poisoned group's classes, in ``dtype`` (eager: the
    canonical NaN of ``dtype``, as the reference writes it)."""
    nan = torch.full((), math.nan, dtype=dtype, device=q.device)
    if not wide:
        return nan
    qf = q.float()
    return torch.where(qf == 2, math.inf, torch.where(qf == 3, -math.inf, nan)).to(dtype)


def finish_ranges_(lo: Tensor, hi: Tensor, poisoned: Tensor) -> None:
    """Mark poisoned groups in place, as stored: NaN lo, zero hi.

    Eager, on the small range tensors: ``masked_fill_`` writes the dtype's
    canonical quiet NaN (bfloat16 0x7FC0, float16 0x7E00), what the reference
    stores; a vectorised float32 -> bfloat16 cast on the CPU writes 0xFFFF.
    """
    lo.masked_fill_(poisoned, math.nan)
    hi.masked_fill_(poisoned, 0.0)
