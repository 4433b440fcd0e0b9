"""Randomized Hadamard rotation before per-group quantization (reference codec).

A 2-D matrix ``x`` (rows, cols), e.g. the (tokens, features) input of a
Linear layer, is rotated along its columns, ``y = (x * s) H``, quantized per
group with :func:`~actpack.codecs.groupquant.quantize_groups`, and rotated
back at decode, ``x' = (Q(y) H) * s``.  ``s`` holds one random sign per
column, drawn anew at every encode; ``H`` is block diagonal: normalized
Sylvester-Hadamard blocks of ``block`` columns (a power of two), and the
``cols % block`` tail split into power-of-two chunks (its binary expansion),
so any width works without padding.

Why: a few outlier features set the range of every group they sit in, and
the noise of 2-bit stochastic rounding grows with the square of that range.
The rotation spreads each row's energy evenly over its block (each rotated
value is a random-sign sum of ``block`` values over ``sqrt(block)``, close
to Gaussian), so a group's range follows the row's RMS instead of its
largest element.  This is the trick of QuIP#/HALO/Quartet/NVFP4 training
(Ashkboos et al. 2025, "HALO"; Castro et al. 2025, "Quartet"; NVIDIA 2025,
"Pretraining LLMs with NVFP4").

Unbiased: stochastic rounding is unbiased in the rotated domain and the
inverse rotation is linear, so ``E[x'] = x`` up to float32 rounding of the
rotation.  Error: the rotation is orthogonal, so each chunk's squared error
equals the squared error of its rotated codes, at most ``chunk * step**2``
(``step = range / (2**bits - 1)`` of the group, half that when rounding to
nearest); an element's error is at most ``sqrt(chunk) * step``.

Rows holding a non-finite value, or a finite value so large that a rotated
sum could overflow float32, are quantized unrotated (one flag bit per row):
``quantize_groups`` then poisons their groups, so NaN/Inf decode exactly as
they do without rotation instead of being smeared over a block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from actpack.codecs.backend import (
    dequantize_groups,
    pack_mask,
    quantize_groups,
    unpack_mask,
)
from actpack.codecs.groupquant import GroupCode, check_float32_range

__all__ = [
    "RotatedCode",
    "apply_blocks",
    "chunk_sizes",
    "hadamard_decode",
    "hadamard_encode",
    "hadamard_matrix",
    "plain_limit",
    "random_signs",
    "rotate",
    "rotated_rows",
    "unrotate",
]


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block!r}")
    return block


def chunk_sizes(cols: int, block: int) -> list[int]:
    """Widths of the diagonal blocks of the rotation of ``cols`` columns.

    ``cols // block`` blocks of ``block``, then the remainder's binary
    expansion, widest first: ``chunk_sizes(100, 64) == [64, 32, 4]``.
    """
    _check_block(block)
    sizes = [block] * (cols // block)
    rest = cols % block
    width = block >> 1
    while rest:
        if rest >= width:
            sizes.append(width)
            rest -= width
        width >>= 1
    return sizes


def hadamard_matrix(n: int, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (float32, symmetric).

    ``H @ H == I``.  Built by ``log2(n)`` Kronecker doublings; ``n`` must be a
    power of two (ValueError otherwise).
    """
    _check_block(n)
    return _matrix(n, torch.device(device) if device is not None else torch.device("cpu")).clone()


@functools.lru_cache(maxsize=64)
def _matrix(n: int, device: torch.device) -> Tensor:
    # Built once per order and device (3 log2(n) concatenations per call
    # were a visible share of a small model's step); read only: callers
    # multiply by it and never write to it.
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def apply_blocks(y: Tensor, block: int) -> Tensor:
    """``y @ blockdiag(H_c for c in chunk_sizes)`` for float32 ``y`` (rows, cols): a
    new float32 tensor (the matmul of each block's columns; ``block`` unchecked)."""
    rows, cols = y.shape
    out = torch.empty_like(y)
    full = (cols // block) * block
    if full:
        h = _matrix(block, y.device)
        torch.matmul(
            y[:, :full].reshape(rows, -1, block), h, out=out[:, :full].view(rows, -1, block)
        )
    start = full
    for width in chunk_sizes(cols - full, block):
        h = _matrix(width, y.device)
        out[:, start : start + width] = y[:, start : start + width] @ h
        start += width
    return out


def _range_sq(m: Tensor, group_size: int) -> Tensor:
    """Per row: sum over its groups of (max - min)**2, groups as quantize_groups cuts them."""
    rows, cols = m.shape
    ngroups = -(-cols // group_size)
    pad = ngroups * group_size - cols
    if pad:
        m = torch.cat([m, m[:, -1:].expand(rows, pad)], dim=1)
    lo, hi = torch.aminmax(m.view(rows, ngroups, group_size), dim=-1)
    return (hi - lo).square().sum(dim=-1)


def _signs(packed: Tensor, cols: int) -> Tensor:
    """+-1 float32 per column from the packed sign bits (bit set: -1)."""
    neg = unpack_mask(packed, torch.Size([cols]))
    return 1.0 - 2.0 * neg.to(torch.float32)


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``(x * signs) @ H`` along the last dim of 2-D ``x``, in float32.

    ``signs`` is a (cols,) tensor of +-1.  Orthogonal: :func:`unrotate` inverts it.
    """
    return apply_blocks(x.to(torch.float32) * signs, _check_block(block))


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """Inverse of :func:`rotate` (``H`` is symmetric and orthonormal): float32."""
    out = apply_blocks(y.to(torch.float32), _check_block(block))
    return out.mul_(signs)


@dataclass(frozen=True)
class RotatedCode:
    """A rotated, group-quantized matrix; see :func:`hadamard_encode`."""

    inner: GroupCode  # codes of the rotated (rows, cols) matrix
    signs: Tensor  # packed bits, one per column: the random sign (set: -1)
    plain: Tensor  # packed bits, one per row: quantized without rotation
    block: int

    @property
    def rows(self) -> int:
        return self.inner.rows

    @property
    def cols(self) -> int:
        return self.inner.cols

    @property
    def nbytes(self) -> int:
        """Storage in bytes, from shapes only."""
        extra = self.signs.numel() * self.signs.element_size()
        return self.inner.nbytes + extra + self.plain.numel() * self.plain.element_size()


def hadamard_encode(
    x: Tensor,
    bits: int,
    block: int = 64,
    group_size: int | None = None,
    *,
    adaptive: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
) -> RotatedCode:
    """Rotate 2-D ``x`` (rows, cols) along its columns, then quantize per group.

    Args:
        x: floating-point (rows, cols); any float dtype (rotated in float32).
        bits: code width, 1..8.
        block: Hadamard block, a power of two; the tail of ``cols % block``
            columns is rotated by power-of-two chunks.
        group_size: quantization group along a row (default: the whole row,
            i.e. one range per row).  Groups never span two rows.
        adaptive: keep a row unrotated when rotating does not shrink its
            ranges (sum of squared group ranges, which the rounding variance
            is proportional to): rotation symmetrizes a row, so a one-sided
            row without outliers (a GELU output) gets a wider range rotated.
            The choice depends on ``x`` and the signs only, never on the
            rounding noise, so the code stays unbiased.
        stochastic: unbiased stochastic rounding (False: round to nearest).
        generator: draws both the random signs and the rounding noise.
        meta_dtype: dtype of the per-group ranges.

    Raises ValueError for a non-2-D or non-float ``x``, a ``block`` that is
    not a power of two, invalid ``bits``/``group_size``, or float64 values
    beyond float32's range.
    """
    _check_block(block)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    check_float32_range(x)
    rows, cols = x.shape
    if group_size is None:
        group_size = max(cols, 1)
    with torch.no_grad():
        neg = random_signs(cols, generator, x.device)
    return encode_with_signs(x, neg, bits, block, group_size, adaptive=adaptive,
                             stochastic=stochastic, generator=generator,
                             meta_dtype=meta_dtype)  # fmt: skip


def encode_with_signs(
    x: Tensor,
    neg: Tensor,
    bits: int,
    block: int,
    group_size: int,
    *,
    adaptive: bool,
    stochastic: bool,
    generator: torch.Generator | None,
    meta_dtype: torch.dtype,
) -> RotatedCode:
    """:func:`hadamard_encode` of valid arguments after its signs ``neg``
    (:func:`random_signs`) are drawn; ``group_size`` an int."""
    with torch.no_grad():
        y, plain = rotated_rows(x, neg, block, group_size, adaptive)
        inner = quantize_groups(
            y,
            bits,
            group_size,
            stochastic=stochastic,
            generator=generator,
            meta_dtype=meta_dtype,
        )
    return RotatedCode(inner, pack_mask(neg.bool()), pack_mask(plain), block)


def random_signs(cols: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One uniform random bit per column (uint8 0/1; 1: the column's sign is -1),
    drawn from ``generator``: what every encode draws first."""
    return torch.randint(0, 2, (cols,), generator=generator, device=device, dtype=torch.uint8)


def plain_limit(block: int) -> float:
    """The largest magnitude a row may hold and still be rotated: a rotated
    value sums up to ``block`` inputs over ``sqrt(block)``, so rows beyond it
    could overflow float32 (compared in float32, like the rows' maxima)."""
    return torch.finfo(torch.float32).max / math.sqrt(block)


def rotated_rows(
    x: Tensor, neg: Tensor, block: int, group_size: int, adaptive: bool
) -> tuple[Tensor, Tensor]:
    """What :func:`hadamard_encode` quantizes: ``(values, plain)``.

    ``values``: float32 (rows, cols), each row of ``x`` rotated by the signs
    ``neg`` (:func:`random_signs`) and ``H``, or unrotated where ``plain``
    ((rows,) bool) is set: rows holding a non-finite value or a magnitude
    beyond :func:`plain_limit`, and (``adaptive``) rows whose sum of squared
    group ranges the rotation does not shrink.  Rows rotate independently, so
    a NaN never leaks into another row.
    """
    rows, cols = x.shape
    signs = 1.0 - 2.0 * neg.to(torch.float32)
    if cols:
        plain = ~(x.detach().abs().amax(dim=1).to(torch.float32) <= plain_limit(block))  # NaN: True
    else:
        plain = torch.zeros(rows, dtype=torch.bool, device=x.device)
    xf = x.detach().to(torch.float32)
    y = rotate(xf, signs, block)
    if adaptive and cols:
        plain |= ~(_range_sq(y, group_size) < _range_sq(xf, group_size))
    return torch.where(plain.unsqueeze(1), xf, y, out=y), plain


def hadamard_decode(code: RotatedCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode a :class:`RotatedCode` to a (rows, cols) tensor of ``dtype``."""
    with torch.no_grad():
        y = dequantize_groups(code.inner, torch.float32)
        plain = unpack_mask(code.plain, torch.Size([code.rows])).unsqueeze(1)
        x = unrotate(y, _signs(code.signs, code.cols), code.block)
        torch.where(plain, y, x, out=x)
        del y
        big = torch.finfo(dtype).max
        if big < torch.finfo(torch.float32).max:  # a finite value must not round to Inf
            x = torch.where(torch.isfinite(x), x.clamp(-big, big), x)
        return x.to(dtype)
