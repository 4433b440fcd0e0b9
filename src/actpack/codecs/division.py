"""DIVISION dual precision for (N, C, *S) maps with 1, 2 or 3 spatial dims.

The low-frequency component (LFC) is the mean of each non-overlapping block
(a trailing partial block averages only what it covers), summed in float32
in the order :func:`block_sums` fixes and kept in bf16.
The high-frequency component (HFC) is ``x - up(LFC as stored)``, so the LFC's
rounding error moves into the HFC, which is quantized per (n, c) row with
:func:`quantize_groups`.  Decoding is unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from actpack.codecs.groupquant import (
    GroupCode,
    check_float32_range,
    dequantize_groups,
    quantize_groups,
)
from actpack.codecs.pack import _check_bits


@dataclass(frozen=True)
class DivisionCode:
    """Block means plus the quantized residual; see :func:`division_encode`."""

    lfc: Tensor  # (N, C, *ceil(S_i / B_i)) bfloat16 block means
    hfc: GroupCode  # rows N*C, one group of prod(S) per row
    shape: tuple[int, ...]
    block: tuple[int, ...]  # effective block per spatial dim, min(block, S_i)

    @property
    def nbytes(self) -> int:
        """Storage in bytes, from shapes only."""
        return self.lfc.numel() * self.lfc.element_size() + self.hfc.nbytes


def block_sums(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """Per-block sums of float32 ``x`` (N, C, *S) over blocks of ``block``
    (one size per spatial dim), trailing partial blocks included:
    (N, C, *ceil(S_i / B_i)) float32.

    The summation order is part of the specification, because the bf16 block
    mean and so every residual code depend on its rounding: each spatial dim
    is reduced in turn, outermost first, by adding the block's slices one
    after the other, the first slice first (the map padded with +0.0 to whole
    blocks).  Every step is an elementwise float32 addition, so every
    implementation computes the same bits (but for the sign of a zero sum,
    where a compiler assumes no signed zeros): ATen here, Inductor's
    vectorised loops (the outer dims' sums read ``x`` contiguously along its
    innermost dim: 1.8-2.2x faster than ATen's ``avg_pool2d`` at 16 MiB,
    whose channels-first CPU kernel sums each window in one scalar chain;
    BENCHMARKS.md, "CPU codecs", round 8), and the Triton kernels.
    """
    s = x
    for i, b in enumerate(block):
        d = 2 + i
        size = s.shape[d]
        nb = -(-size // b)
        if nb * b != size:  # +0.0 where a trailing block is partial
            pad = [0, 0] * (s.dim() - 1 - d) + [0, nb * b - size]
            s = F.pad(s, pad)
        v = s.unflatten(d, (nb, b))
        acc = v.select(d + 1, 0)
        for j in range(1, b):
            acc = acc + v.select(d + 1, j)
        s = acc
    return s


def block_counts(spatial: tuple[int, ...], block: tuple[int, ...], like: Tensor) -> Tensor:
    """How many elements of the map each block covers, as float32 broadcastable
    against :func:`block_sums` (trailing partial blocks cover fewer)."""
    count = torch.ones((), dtype=torch.float32, device=like.device)
    for i, (b, s) in enumerate(zip(block, spatial)):
        nb = -(-s // b)
        along = (s - torch.arange(nb, device=like.device) * b).clamp(max=b).to(torch.float32)
        count = count * along.view([-1 if e == i else 1 for e in range(len(block))])
    return count


def block_means(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """Block means of float32 ``x`` (N, C, *S), rounded to bf16: the LFC
    (N, C, *ceil(S_i / B_i)) before any row falls back to zero.

    :func:`block_sums` divided by :func:`block_counts` (an IEEE float32
    division), then rounded to nearest even in bf16."""
    spatial = tuple(x.shape[2:])
    return (block_sums(x, block) / block_counts(spatial, block, x)).to(torch.bfloat16)


def _upsample(lfc: Tensor, block: tuple[int, ...], spatial: tuple[int, ...]) -> Tensor:
    """Repeat each block mean over exactly the elements of its block."""
    up = lfc
    for i, (b, s) in enumerate(zip(block, spatial)):
        up = up.repeat_interleave(b, dim=2 + i).narrow(2 + i, 0, s)
    return up


def division_encode(
    x: Tensor,
    block: int = 8,
    bits: int = 2,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> DivisionCode:
    """Split ``x`` (N, C, *S) into bf16 block means and a ``bits``-bit residual.

    ``noise``: the rounding offsets of the residual, as for
    :func:`~actpack.codecs.groupquant.quantize_groups` (one per element of
    ``x``, row-major); the compiled codec's check passes its counter hash.

    A row (n, c) whose residual is not finite although ``x`` is (sums or
    differences overflowing float32 near its maximum) stores a zero LFC and
    quantizes ``x`` itself, so extreme finite values never decode to NaN.
    A row holding NaN/Inf is poisoned in the HFC and decodes as described in
    :mod:`actpack.codecs.groupquant`; its LFC is stored as zero.
    """
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            f"x must be (N, C, L), (N, C, H, W) or (N, C, D, H, W), got shape {tuple(x.shape)}"
        )
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    bits = _check_bits(bits)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    check_float32_range(x)
    shape = tuple(x.shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    if min(spatial) < 1:
        raise ValueError(f"spatial dims must be non-empty, got shape {shape}")
    eff = tuple(min(block, s) for s in spatial)

    with torch.no_grad():
        xf = x.detach().float()
        lfc = block_means(xf, eff)
        hfc = xf - _upsample(lfc.float(), eff, spatial)
        size = math.prod(spatial)
        rows = hfc.reshape(n * c, size)
        # Rows with a non-finite residual fall back to LFC = 0: the HFC is then x
        # itself, so groupquant poisons exactly the rows where x is non-finite and
        # handles huge finite ranges safely.
        ok = torch.isfinite(rows).all(dim=1)
        rows = torch.where(ok.unsqueeze(1), rows, xf.reshape(n * c, size))
        lfc = torch.where(ok.view(n, c, *([1] * len(spatial))), lfc, torch.zeros_like(lfc))
        code = quantize_groups(
            rows,
            bits,
            size,
            stochastic=stochastic,
            generator=generator,
            meta_dtype=torch.bfloat16,
            noise=noise,
        )
        return DivisionCode(lfc, code, shape, eff)


def division_decode(code: DivisionCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rebuild a tensor of ``code.shape`` and ``dtype`` from a :class:`DivisionCode`."""
    with torch.no_grad():
        shape, spatial = code.shape, code.shape[2:]
        hq = dequantize_groups(code.hfc, torch.float32).reshape(shape)
        out = _upsample(code.lfc.float(), code.block, spatial) + hq
        # A poisoned row decodes from its classes alone: its LFC must not leak in.
        poisoned = torch.isnan(code.hfc.lo).view(shape[0], shape[1], *([1] * len(spatial)))
        # Finite stays finite in dtype; float64 holds every float32 value.
        big = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
        out = torch.where(poisoned, hq, out.clamp(-big, big))
        out = out.to(dtype)
        if dtype != torch.float32:
            # NaN arises only in poisoned rows.  Its 16-bit pattern after a cast depends on
            # the device (CPU's vectorised float32 -> bfloat16 cast gives 0xFFFF, CUDA and
            # the scalar cast 0x7FC0): write the canonical quiet NaN, as dequantize_groups does.
            nan = torch.full((), math.nan, dtype=dtype, device=out.device)
            out = torch.where(torch.isnan(out), nan, out)
        return out
