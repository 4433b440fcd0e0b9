"""Uniform noise for stochastic rounding from a counter-based hash.

Code that runs inside a compiled graph cannot call ``torch.rand`` with the
strategy's ``torch.Generator``: Inductor replaces random ops with its own
seeds, and refuses to lower one it did not place unless
``torch._inductor.config.fallback_random`` is set (which changes the random
stream of the whole program).  Both compiled paths of actpack therefore draw
``u`` from a hash of each element's flat index and a random *key*: the fused
CPU codecs (:mod:`actpack.codecs.compiled`, key drawn from the caller's
generator outside the graph) and the codes inlined into ``torch.compile``'s
graphs (:mod:`actpack.codecs.traceable`, key drawn inside the graph as
compiled dropout draws its seed).  A few integer ops: they trace, fuse into
the quantization loop and need no RNG state.

The hash is Chris Wellons' ``lowbias32`` (a 32-bit integer finaliser with
full avalanche: two xorshift-multiply rounds and a final xorshift), with
``key[0]`` and the index's high word (times an odd constant) mixed into its
input and ``key[1]`` between its rounds.  For a fixed index, ``u`` is exactly uniform on the
2**-24 grid of [0, 1) over a uniformly random key (every step after
``index ^ key[0]`` is a bijection), which is what unbiased rounding needs;
neighbouring indices are decorrelated by the avalanche.  With an int64
index, products stay within int64 (a multiplier of 2**31 or more is applied
as its negative 32-bit equivalent), so no step relies on signed overflow,
which is undefined in scalar C++; an int32 index (the fused CPU encoders,
below 2**31 elements) computes the same values with wrapping 32-bit
products, twice the vector width (see :func:`_uniform_int32`).  The hash
stays under Inductor's CPU limit for inlining (50 ops), so it is computed
inside the quantization loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_key", "counter", "int32_key", "random_key", "uniform"]

_MASK32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for ``h`` in [0, 2**32), with ``c`` applied as the signed
    32-bit constant of the same residue, so that the product's magnitude stays below 2**63."""
    return (h * _signed32(c)) & _MASK32


def random_key(
    generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """A key for :func:`uniform`: int64 tensor of shape (2,), two random 32-bit words
    drawn from ``generator`` (the default generator of ``device`` when None)."""
    return torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64, device=device)


def check_key(key: Tensor) -> None:
    """Raise ValueError unless ``key`` is an integer tensor of shape (2,)."""
    if key.shape != (2,) or key.is_floating_point() or key.is_complex():
        raise ValueError(
            f"key must be an integer tensor of shape (2,), got {key.dtype} of shape "
            f"{tuple(key.shape)}; make one with actpack.codecs.counter_noise.random_key()"
        )


def uniform(index: Tensor, key: Tensor, *, below_2_32: bool = False) -> Tensor:
    """float32 values in [0, 1), one per element of the integer ``index`` (any shape).

    ``index``: int64, or int32 with every index in [0, 2**31).  An int32
    index computes the same values in 32-bit lanes (:func:`_uniform_int32`):
    twice as many per vector as int64 and no 64-bit multiply, 1.7x faster in
    the fused CPU encoders.
    ``below_2_32=True`` promises every int64 index is below 2**32 and skips
    hashing the high word (four integer ops per element, ~10% of a fused 2-bit encode).

    ``key``: an integer tensor of shape (2,), two uniformly random 32-bit
    words (:func:`random_key`; only their low 32 bits are read; not checked
    here, see :func:`check_key`).  24 random bits per value, every value
    exactly representable in float32; a function of (index, key) only.
    """
    if index.dtype == torch.int32:
        return _uniform_int32(index, key)
    k = key.to(torch.int64) & _MASK32
    # The high word enters scrambled (a constant XOR into the low word would
    # only shift u by a constant after the avalanche's last round).
    h = (index & _MASK32) ^ k[0]
    if not below_2_32:
        h = h ^ _mul32(index >> 32, 0x2C1B3C6D)
    h = _mul32(h ^ (h >> 16), 0x7FEB352D)
    h = h ^ (h >> 15) ^ k[1]
    h = _mul32(h, 0x846CA68B)
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def counter(numel: int, key: Tensor) -> tuple[torch.dtype, Tensor]:
    """The index dtype and key :func:`uniform` should get for ``numel``
    counters: int32, with ``key`` as int32 words (converted once, outside a
    compiled loop, rather than in every iteration), where every index is
    below 2**31; else int64 and ``key`` as it is."""
    if numel < 1 << 31:
        return torch.int32, int32_key(key)
    return torch.int64, key


def int32_key(key: Tensor) -> Tensor:
    """``key`` as int32 words with the same low 32 bits (for an int32 index:
    converted once, outside a compiled loop, rather than in every iteration)."""
    # One cast (a few microseconds per encode): int64 -> int32 keeps the low
    # 32 bits, in ATen's scalar (static_cast, modular) and vector conversions.
    return key if key.dtype == torch.int32 else key.to(torch.int64).to(torch.int32)


def _signed32(c: int) -> int:
    """The int32 value with the bit pattern of ``c`` in [0, 2**32)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _uniform_int32(index: Tensor, key: Tensor) -> Tensor:
    """:func:`uniform` for an int32 ``index`` in [0, 2**31): the same values.

    Every step acts on the 32-bit patterns: XOR and masks are the same on
    int32, a logical right shift is the arithmetic shift masked to the
    remaining bits, and a product modulo 2**32 is the int32 product, which
    wraps in two's complement in ATen's CPU and CUDA kernels, in Triton, and
    in the AVX/AVX-512 ``mullo`` instructions of Inductor's vectorised CPU
    loops.  (A scalar C++ loop of Inductor would rely on signed overflow;
    ``tests/test_counter_noise.py`` checks the compiled values against the
    int64 form, awkward sizes included.)
    """
    k = key if key.dtype == torch.int32 else int32_key(key)
    h = index ^ k[0]
    h = (h ^ ((h >> 16) & 0xFFFF)) * _signed32(0x7FEB352D)
    h = h ^ ((h >> 15) & 0x1FFFF) ^ k[1]
    h = h * _signed32(0x846CA68B)
    h = h ^ ((h >> 16) & 0xFFFF)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
