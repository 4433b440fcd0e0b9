"""Seeds of the strategies' stochastic rounding: checked, derived, and per rank.

A strategy's ``seed`` starts a ``torch.Generator`` per device, from which
every code draws its rounding noise (``torch.rand`` in the reference codecs,
a hash key in the fused ones).  Under ``torch.distributed`` every rank
usually runs the same script with the same seed (Hugging Face's
``set_seed``, Lightning's ``seed_everything``), so with the seed alone every
rank would round alike: the noise of rank r's element i would be rank s's.
The codes stay unbiased, but the errors of the ranks' gradients correlate
(by 0.28-0.30 between two ranks on correlated data:
``benchmarks/bench_rank_noise.py``), and the all-reduced gradient's noise
then falls more slowly than 1/N with N ranks.  Each rank therefore draws its
own stream: :func:`rank_seed` mixes the rank into the seed (rank 0, and a
process outside a distributed job, keep the seed as it is), and compiled
graphs XOR their per-run key with :func:`rank_key_words` (a constant
XOR of a uniformly random key is still uniformly random, so unbiased).
"""

from __future__ import annotations

import operator

import torch

__all__ = ["check_seed", "derived_seed", "process_rank", "rank_key_words", "rank_seed"]

#: SplitMix64's increment (2**64 divided by the golden ratio, odd): rank
#: offsets ``rank * _GAMMA`` are far apart for every rank, and far from the
#: small offsets of :func:`derived_seed`.
_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def check_seed(seed: object) -> int:
    """``seed`` as an int, or ValueError: an integer (``int``, a NumPy
    integer, a 0-d integer tensor) in [-2**63, 2**64), the range
    ``torch.Generator.manual_seed`` takes (negative seeds as their 64-bit
    two's complement)."""
    if (
        isinstance(seed, bool)
        or type(seed).__name__ == "bool_"
        or (isinstance(seed, torch.Tensor) and (seed.dim() != 0 or seed.dtype == torch.bool))
    ):
        value = None  # True is no seed; a 1-element tensor, not a scalar
    else:
        try:
            value = operator.index(seed)
        except TypeError:
            value = None
    if value is None or not -(2**63) <= value < 2**64:
        raise ValueError(
            "seed must be an integer in [-2**63, 2**64) (torch.Generator.manual_seed's "
            f"range), got {seed!r}"
        )
    return value


def derived_seed(seed: int, offset: int) -> int:
    """The seed of a strategy's inner strategy number ``offset``: ``seed +
    offset`` as ``manual_seed`` reads it (modulo 2**64), so that every valid
    ``seed`` gives valid derived ones."""
    return (seed + offset) % 2**64


def process_rank() -> int:
    """This process's rank in ``torch.distributed``'s default group; 0 outside
    a distributed job (not built, or no process group initialised)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def rank_seed(seed: int, rank: int) -> int:
    """The generator seed of ``rank`` for a strategy's ``seed``: ``seed + rank
    * 0x9E3779B97F4A7C15`` modulo 2**64 (``seed`` itself on rank 0)."""
    return (seed + rank * _GAMMA) & _MASK64


def rank_key_words(rank: int) -> tuple[int, int]:
    """Two 32-bit words XORed into a compiled graph's hash key on ``rank``
    (``(0, 0)`` on rank 0): the low and high words of ``rank * 0x9E3779B97F4A7C15``."""
    offset = (rank * _GAMMA) & _MASK64
    return offset & 0xFFFFFFFF, offset >> 32
