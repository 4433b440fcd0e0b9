"""Rules that keep the backward of piecewise activations exact.

ReLU-family backward reads only which region each element falls in (x > 0,
lo < x < hi, ...).  A lossy code may move a value across a region boundary
(a small positive rounded to 0 kills its gradient), so for these tensors the
region is stored exactly.  The activation's own save needs nothing else: it
is stored as its region alone (1 bit per element, see
:func:`reads_region_only`).  Other ops saving the same tensor (the next conv)
get the strategy's unbiased code of the values; clamping that code into the
regions would bias them.  ReLU outputs under a codec that keeps zeros exact
(ActNN at >= 2 bits) need only that one code: it serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _f32(value: float, like: Tensor) -> Tensor:
    # Backward kernels compare in float32 (opmath) against the bound as a float.
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _nearest(value: float, like: Tensor, above: bool, strict: bool) -> Tensor:
    """The value of ``like.dtype`` nearest ``value`` on one side, in float32 terms.

    above/strict: smallest v with float(v) > value (strict) or >= value;
    below/strict: largest v with float(v) < value (strict) or <= value.
    """
    bound = _f32(value, like)
    v = bound.to(like.dtype)
    vf = v.float()
    if above:
        wrong = vf <= bound if strict else vf < bound
    else:
        wrong = vf >= bound if strict else vf > bound
    step = torch.nextafter(v, torch.full_like(v, float("inf") if above else float("-inf")))
    return torch.where(wrong, step, v)


@dataclass(frozen=True)
class ReluOutput:
    """Saved tensor is a ReLU output: >= 0, and backward reads ``x > 0``."""

    def mask(self, x: Tensor) -> Tensor:
        return x > 0

    def restore(self, decoded: Tensor, mask: Tensor) -> Tensor:
        tiny = torch.finfo(decoded.dtype).tiny
        return torch.where(mask, decoded.clamp_min(tiny), torch.zeros_like(decoded))

    def values(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """``restore(zeros, mask)``: the smallest normal value inside the
        region, 0 outside, in one pass over the mask (``where`` and
        ``masked_fill`` on a bool mask run 10-15x slower on the CPU)."""
        return mask.to(dtype).mul_(torch.finfo(dtype).tiny)


@dataclass(frozen=True)
class Above:
    """Backward reads ``x > threshold`` (LeakyReLU, threshold)."""

    threshold: float = 0.0

    def mask(self, x: Tensor) -> Tensor:
        return x.float() > _f32(self.threshold, x)

    def values(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        return self.restore(torch.zeros(mask.shape, dtype=dtype, device=mask.device), mask)

    def restore(self, decoded: Tensor, mask: Tensor) -> Tensor:
        up = _nearest(self.threshold, decoded, above=True, strict=True)
        down = _nearest(self.threshold, decoded, above=False, strict=False)
        return torch.where(mask, torch.maximum(decoded, up), torch.minimum(decoded, down))


@dataclass(frozen=True)
class Between:
    """Backward reads ``lo < x < hi`` (Hardtanh, ReLU6, Hardsigmoid)."""

    lo: float
    hi: float

    def mask(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf > _f32(self.lo, x)) & (xf < _f32(self.hi, x))

    def values(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        return self.restore(torch.zeros(mask.shape, dtype=dtype, device=mask.device), mask)

    def restore(self, decoded: Tensor, mask: Tensor) -> Tensor:
        d = decoded
        inside = torch.clamp(
            d,
            _nearest(self.lo, d, above=True, strict=True),
            _nearest(self.hi, d, above=False, strict=True),
        )
        # Outside elements that drifted inside snap to the nearer bound.
        low = torch.minimum(d, _nearest(self.lo, d, above=False, strict=False))
        high = torch.maximum(d, _nearest(self.hi, d, above=True, strict=False))
        return torch.where(mask, inside, torch.where(d < 0.5 * (self.lo + self.hi), low, high))


Rule = "ReluOutput | Above | Between"

# Ops whose backward reads only the region of what they save.
_REGION_OPS = frozenset(
    {"relu", "leaky_relu", "threshold", "relu6", "hardtanh", "rrelu", "hardsigmoid"}
)


def reads_region_only(op: str | None) -> bool:
    """Whether ``op`` is an activation whose backward reads only the region of its save."""
    return op is not None and op.strip("_") in _REGION_OPS


_RELU_OUTPUT_NODES = frozenset({"ReluBackward0", "ReluBackward1"})


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: float) -> float:
    if name in kwargs:
        return float(kwargs[name])
    if len(args) > index:
        return float(args[index])
    return default


def rule_for(t: Tensor, op: str | None, args: tuple, kwargs: dict) -> object | None:
    """The exactness rule a saved tensor needs, from its producer and the saving op."""
    node = type(t.grad_fn).__name__ if t.grad_fn is not None else ""
    if node in _RELU_OUTPUT_NODES:
        return ReluOutput()
    # Otherwise only the activation's own input (or in-place output) needs a rule.
    if op is None or not args or not same_tensor(args[0], t):
        return None
    base = op.strip("_")
    if base == "relu":
        return ReluOutput()
    if base == "leaky_relu":
        return Above(0.0)
    if base == "threshold":
        return Above(_arg(args, kwargs, 1, "threshold", 0.0))
    if base == "relu6":
        return Between(0.0, 6.0)
    if base == "hardsigmoid":
        return Between(-3.0, 3.0)  # backward: grad / 6 where -3 < x < 3, else 0
    if base == "hardtanh":
        return Between(
            _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        )
    return None


def same_tensor(a: object, t: Tensor) -> bool:
    """Whether ``a`` is a tensor viewing exactly the memory of ``t``."""
    return (
        isinstance(a, Tensor)
        and a.layout == torch.strided
        and a.data_ptr() == t.data_ptr()
        and a.shape == t.shape
        and a.stride() == t.stride()
    )
