"""ActNN's sensitivity model on the device: per-row ranges and gradient-scale locations.

Pure tensor functions used by :class:`~actpack.strategies.mixed.ActNNMixed`
(the variance model is described in :mod:`actpack.strategies.mixed`):
:func:`row_ranges` is ``R[k, n]``, :func:`locations` ActNN's
``num_locations / num_pixels`` factor of the gradient scale ``s[k]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from actpack.policy.ops import CHANNEL_FIRST_OPS

# Ops whose backward reads only indices (and shapes) of their saved input.
VALUE_FREE_OPS = frozenset(
    {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
     "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
     "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d"}
)  # fmt: skip


def row_ranges(x2: Tensor, group_size: int) -> Tensor:
    """``R[n] = sum over row n's groups of range**2 * interior / 6`` (float32).

    ``interior`` counts the group's elements strictly above its minimum: a
    value on the bottom of the grid (a ReLU zero, an image's background) is
    coded exactly and adds no rounding noise.  Non-finite rows get 0: they
    decode to their non-finite values whatever their width.  No host
    synchronisation.
    """
    rows, cols = x2.shape
    ngroups = -(-cols // group_size)
    pad = ngroups * group_size - cols
    xf = x2.detach().float()
    if pad:
        xf = torch.cat([xf, xf[:, -1:].expand(rows, pad)], dim=1)
    groups = xf.reshape(rows, ngroups, group_size)
    lo, hi = torch.aminmax(groups, dim=-1)
    above = groups > lo.unsqueeze(-1)
    if pad:  # padding repeats the last element; it is not coded
        valid = torch.arange(ngroups * group_size, device=xf.device) < cols
        above = above & valid.view(ngroups, group_size)
    interior = above.sum(-1, dtype=torch.float32)
    r = ((hi - lo).square() * interior).sum(-1) * (1.0 / 6.0)
    return torch.where(torch.isfinite(r), r, 0.0)


def locations(op: str | None, shape: tuple[int, ...], args: tuple) -> float:
    """ActNN's ``num_locations / num_pixels`` for a tensor of ``shape`` read by ``op``."""
    if len(shape) < 2:
        return 1.0
    per_row = math.prod(shape[1:])
    if op is not None and op.startswith("conv"):
        weight = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None
        kernel = math.prod(weight.shape[2:]) if weight is not None and weight.dim() > 2 else 1
        return kernel / max(1, math.prod(shape[2:]))
    channels = shape[1] if op in CHANNEL_FIRST_OPS else shape[-1]
    return 1.0 / max(1, per_row // max(1, channels))
