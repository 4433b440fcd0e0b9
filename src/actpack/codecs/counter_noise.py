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
neighbouring indices are decorrelated by the avalanche.  Products stay
within int64 (a multiplier of 2**31 or more is applied as its negative
32-bit equivalent), so no step relies on signed overflow, which is undefined
in the C++ Inductor emits; and the hash stays under Inductor's CPU limit for
inlining (50 ops), so it is computed inside the quantization loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_key", "random_key", "uniform"]

_MASK32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for ``h`` in [0, 2**32), with ``c`` applied as the signed
    32-bit constant of the same residue, so that the product's magnitude stays below 2**63."""
    return (h * (c - (1 << 32) if c >= 1 << 31 else c)) & _MASK32


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
    """float32 values in [0, 1), one per element of the int64 ``index`` (any shape).

    ``below_2_32=True`` promises every index is below 2**32 and skips hashing
    the high word (four integer ops per element, ~10% of a fused 2-bit encode).

    ``key``: an integer tensor of shape (2,), two uniformly random 32-bit
    words (:func:`random_key`; only their low 32 bits are read; not checked
    here, see :func:`check_key`).  24 random bits per value, every value
    exactly representable in float32; a function of (index, key) only.
    """
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
