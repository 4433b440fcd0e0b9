"""What a saved tensor becomes: one pure decision from what is known about it.

The eager engine (``torch.autograd.graph.saved_tensors_hooks``) and the
compile-native path (hooks inlined into AOTAutograd's graphs) both describe
each saved tensor as :class:`Facts` and call :func:`decide`; they differ only
in how they learn the facts (the torch function being recorded and the
Python stack in eager mode, the FX graph under ``torch.compile``).

The rule behind every branch: **a lossy code is used only where it is known
to be safe**.  That takes all of

* a floating-point tensor with autograd history (``grad_fn``), saved by an op
  actpack can name: a tensor with no history is a leaf (parameters, buffers,
  frozen weights, the input batch: their storage exists anyway) or an op's
  own statistics (BatchNorm/LayerNorm mean and rstd, attention's logsumexp),
  which backward uses as exact constants;
* an origin whose backward actpack knows: saves made by a custom
  ``torch.autograd.Function`` (fused-kernel libraries save their own
  statistics), by a compiled graph seen from outside, or by
  ``torch.utils.checkpoint`` (which recomputes the block from what it saved)
  stay exact;
* a tensor large enough to be worth it, dense, strided, of a plain type.

Lossless forms are always allowed: bool masks in 1 bit, dropout's two-valued
noise in 1 bit plus its scale, integer indices narrowed, and the region
pattern that ReLU-family backward reads.

One lossy form is not the strategy's: the query and key of fused attention,
whose backward recomputes the softmax from them, are stored in fp16 (with a
power-of-two scale), where the error of every recomputed logit has a
worst-case bound (:attr:`Kind.HALF`); so are its value and output, whose
products with the incoming gradient that backward subtracts cancel where
attention is sharp.  Under lossless strategies and ``smooth="exact"`` they
stay exact, and 16-bit ones stay as they are.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from actpack.policy.ops import DROPOUT_OPS, LINEAR_BACKWARD_OPS, SMOOTH_BACKWARD_OPS
from actpack.policy.rules import ReluOutput

__all__ = [
    "LOGITS_16BIT", "LOGITS_HALF", "ORIGINS", "ROLES", "VALUES_16BIT", "VALUES_HALF", "Facts",
    "Kind", "Plan", "Settings", "decide", "small_plan",
]  # fmt: skip

#: Where a save comes from: a torch function actpack can name ("op"), a
#: custom autograd.Function, torch.utils.checkpoint, a compiled graph seen
#: from outside, or nothing actpack recognises.
ORIGINS = ("op", "custom-function", "checkpoint", "compiled", "unknown")

#: How the saved tensor relates to the saving op: one of its arguments, one
#: of its outputs, or neither (the op's own statistics).
ROLES = ("input", "output", "internal", "unknown")


class Kind(enum.Enum):
    """The forms a saved tensor can take."""

    #: Hand autograd the tensor itself: its storage exists anyway (a
    #: parameter, a buffer, a leaf the caller holds).  Never compressed.
    KEEP = "keep"
    #: Keep the values exactly (an exact copy if it is a small view of a
    #: large storage, so that the storage can be freed).
    EXACT = "exact"
    #: A bool tensor, 1 bit per element, lossless.
    BITS = "bits"
    #: Dropout's noise (0 or 1/(1-p) by construction): 1 bit + its scale,
    #: lossless.  Where values can be checked cheaply (CPU) they are, and a
    #: tensor that is not two-valued is kept exact instead.
    TWO_VALUED = "two-valued"
    #: An integer tensor in a narrower lossless form (pool offsets, indices).
    COMPACT = "compact"
    #: Only the region ReLU-family backward reads, 1 bit per element.
    REGION = "region"
    #: The strategy's lossy code (``rule`` keeps a region exact inside it).
    LOSSY = "lossy"
    #: Hardswish's input: its three regions exact (2 bits per element) and
    #: the strategy's code of the values between -3 and 3, where backward
    #: reads them linearly.  Only for strategies with ``bounded_codes``.
    PIECEWISE = "piecewise"
    #: The query or key of fused attention (fp32): fp16 values times one
    #: power-of-two scale, whatever the strategy.  Fused attention's backward
    #: recomputes the probabilities as ``exp(s q k^T - logsumexp)`` with the
    #: exact forward's logsumexp, so an error in q or k lands in an exponent:
    #: no unbiased few-bit code bounds it (a 2-bit draw put gradients 21x to
    #: 2e5x off).  Rounding to nearest fp16 errs by at most ``2^-11 |x|``
    #: per element (plus ``2^-25 scale`` for subnormals), so every logit
    #: errs by at most ``s (2^-10 + 2^-22) sum_j |q_ij| |k_tj|
    #: <= ~ s 2^-10 |q_i| |k_t|``: a worst-case bound, and what fp16 autocast
    #: itself runs attention with.  The scale keeps values above 65504 from
    #: overflowing without reading them on the host.
    #:
    #: Fused attention's value v and output O take this form too.  Its
    #: backward forms dS_it = P_it (dO_i . v_t - dO_i . O_i): where row i of P
    #: is nearly one-hot at t (sharp heads, a query matching itself, an
    #: attention sink), O_i ~ v_t and the two products cancel, but codes of v
    #: and O drawn apart do not (one 2-bit draw put dq 25x off where
    #: matmul + softmax, whose saved one-hot P decodes exactly, erred 1.7x).
    #: In fp16 each product errs by at most sum_j |dO_ij| (2^-11 |v_tj| +
    #: 2^-25 scale), <= ~2^-11 |dO_i||v_t| (likewise for O_i), so dS_it errs
    #: by at most ~2^-11 P_it |dO_i| (|v_t| + |O_i|) (plus the logits' share):
    #: the cancellation leaves fp16 rounding, whatever the sharpness.
    HALF = "half"


class Facts(NamedTuple):
    """What is known about one saved tensor when it is saved (a named tuple:
    cheap to build on the save path).

    Attributes:
        dtype: the tensor's dtype.
        numel: its number of elements.
        origin: one of :data:`ORIGINS`.
        op: name of the torch function (eager) or aten op (compiled) saving
            it, or None when unknown.
        role: one of :data:`ROLES`.
        history: whether it has autograd history (a ``grad_fn``): computed
            by differentiable ops in this graph.
        leaf: ``"parameter"``, ``"buffer"``, ``"parameter view"`` or
            ``"parameter cast"`` when its storage belongs to the model's
            weights; in a compiled graph, ``"graph input"`` or ``"leaf
            input"`` (one that does not require grad) for the graph's own
            inputs, whose storage the caller holds; else None.
        plain: a plain strided, non-meta ``torch.Tensor`` (not a subclass).
        overlapping: a broadcast view (stride 0 over a dimension > 1).
        rule: the region rule ReLU-family backward needs (see
            :mod:`actpack.policy.rules`), or None.
        region_only: the saving op's backward reads only that region.
        compactable: an integer tensor with a known lossless narrow form.
        declined: why the strategy leaves this tensor as it is (a 16-bit
            tensor under a 16-bit cast), or None.
        checkable: whether a lossless form may be verified on the values
            at no synchronisation cost (CPU tensors).
        logits: the query or key of a fused attention op, whose backward
            recomputes the softmax from it (see :attr:`Kind.HALF`).
        values: the value or output of a fused attention op, whose
            backward subtracts their products with the incoming gradient
            (see :attr:`Kind.HALF`).
        region_read: (compiled graphs) one save serves a ReLU region read
            (``threshold_backward`` of the save) and other readers: its code
            must keep the region (zeros) exact as well as the values.
        smooth_read: (compiled graphs) a smooth op whose backward formula
            reads the save's values, whatever op ``op`` names (one save serves
            every reader: a tanh output also read by a matmul); under
            ``smooth="exact"`` the save stays exact, as eager mode keeps that
            op's own save.
    """

    dtype: torch.dtype
    numel: int
    origin: str = "op"
    op: str | None = None
    role: str = "unknown"
    history: bool = True
    leaf: str | None = None
    plain: bool = True
    overlapping: bool = False
    rule: object | None = None
    region_only: bool = False
    compactable: bool = False
    declined: str | None = None
    checkable: bool = False
    logits: bool = False
    values: bool = False
    region_read: bool = False
    smooth_read: str | None = None


class Plan(NamedTuple):
    """The decision for one saved tensor: its form and why (for reports)."""

    kind: Kind
    reason: str
    rule: object | None = None


@dataclass(frozen=True)
class Settings:
    """What the decision needs to know of the strategy and the engine.

    Attributes:
        lossless: the strategy never codes lossily (``"none"``, ActNN L0).
        min_numel: tensors with fewer elements stay exact.
        keeps_relu_exact: the strategy's code keeps ReLU zeros exact itself.
        checkpoint_inputs: ``"exact"``, or a lossy form the user opted into
            for tensors a checkpoint recomputes from (``"bf16"``, ``"fp16"``,
            ``"int8"``).
        smooth: ``"code"`` (default): inputs of ops with a smooth backward
            (normalization, GELU/SiLU/softmax/tanh, attention) are coded,
            leaving a second-order bias; ``"exact"`` keeps them exact.
        bounded_codes: the strategy's decoded values stay within the range
            of the values it coded (see ``Strategy.bounded_codes``).
    """

    lossless: bool = False
    min_numel: int = 2048
    keeps_relu_exact: bool = False
    checkpoint_inputs: str = "exact"
    smooth: str = "code"
    bounded_codes: bool = False


_FLOAT_EXACT = {torch.float64: "float64 (kept exact)"}

#: Reasons given for fused attention's query and key (``Facts.logits``).
LOGITS_HALF = "attention query/key: fp16 (softmax recomputed from them)"
LOGITS_16BIT = "attention query/key: 16-bit, kept (softmax recomputed from them)"
#: Reasons given for fused attention's value and output (``Facts.values``).
VALUES_HALF = "attention value/output: fp16 (backward cancels dO.v against dO.out)"
VALUES_16BIT = "attention value/output: 16-bit, kept (backward cancels dO.v against dO.out)"


@functools.lru_cache(maxsize=1024)
def _exact(reason: str) -> Plan:
    # Plans are immutable: one per reason, not one per save.
    return Plan(Kind.EXACT, reason)


@functools.lru_cache(maxsize=64)
def small_plan(dtype: torch.dtype) -> Plan:
    """:func:`decide`'s plan for a plain, non-empty tensor of ``dtype`` with
    autograd history, fewer than ``min_numel`` elements and no weight storage
    (``leaf`` None), under any settings: the common small save, decided
    without building :class:`Facts` (the eager engine's hot path; equal to
    ``decide`` by ``tests/test_policy.py``)."""
    return decide(Facts(dtype, 1, history=True), Settings(min_numel=2))


def decide(f: Facts, s: Settings) -> Plan:
    """The form of a saved tensor described by ``f`` under settings ``s``.

    Pure: the same facts and settings always give the same plan.
    """
    if f.leaf is not None:
        return Plan(Kind.KEEP, f.leaf)
    if not f.plain:
        return _exact("tensor subclass or layout")
    if f.numel == 0:
        return _exact("empty")
    if f.dtype == torch.bool:
        if f.numel < s.min_numel:
            return _exact("tiny")
        # A lossless strategy saves what autograd saves ("none" is the
        # baseline its bytes are compared with), as it does integers.
        return _exact("exact strategy") if s.lossless else Plan(Kind.BITS, "bool mask")
    if not f.dtype.is_floating_point:
        if f.dtype.is_complex:
            return _exact("complex (kept exact)")
        if f.numel < s.min_numel:
            return _exact("tiny")
        if f.compactable and not s.lossless:
            return Plan(Kind.COMPACT, "integer indices")
        return _exact("integer")
    if f.dtype in _FLOAT_EXACT:
        return _exact(_FLOAT_EXACT[f.dtype])
    if f.numel < s.min_numel:
        return _exact("tiny")
    if not f.history and f.role == "input":
        # An argument without autograd history: the input batch, a frozen
        # model's activations, a constant.  Its storage exists anyway.
        return Plan(Kind.KEEP, "leaf input")
    if s.lossless:
        return _exact("exact strategy")
    if f.origin == "checkpoint":
        if s.checkpoint_inputs != "exact" and f.history:
            return Plan(Kind.LOSSY, f"checkpoint input ({s.checkpoint_inputs}, opted in)")
        return _exact("checkpoint input")
    if f.origin == "compiled":
        return _exact("compiled graph")
    if f.origin == "custom-function":
        return _exact("custom autograd.Function")
    if f.origin != "op" or f.op is None:
        return _exact("unknown op")
    if not f.history:
        if f.role == "internal":
            if f.op.strip("_") in DROPOUT_OPS:
                return Plan(Kind.TWO_VALUED, "dropout noise")
            if f.checkable:
                # Dropout inside another op (attention's dropout_p) saves its
                # noise too; on the CPU a check of two-valuedness is cheap and
                # makes the 1-bit form lossless by verification.
                return Plan(Kind.TWO_VALUED, "op statistics")
        # Neither an argument nor a differentiable output: the op's own
        # statistics, constants to backward.
        return _exact("op statistics")
    if f.overlapping:
        return _exact("broadcast view")
    if f.declined is not None:
        return _exact(f.declined)
    if f.logits or f.values:
        # Never the strategy's code: its noise would enter an exponent (q, k)
        # or survive a cancellation (v, out).
        if f.dtype != torch.float32:
            # bf16/fp16 already; nothing narrower is bounded
            return _exact(LOGITS_16BIT if f.logits else VALUES_16BIT)
        if s.smooth == "exact":
            return _exact(f"smooth backward ({f.op}, kept exact)")
        return Plan(Kind.HALF, LOGITS_HALF if f.logits else VALUES_HALF)
    if f.smooth_read is not None and s.smooth == "exact":
        return _exact(f"smooth backward ({f.smooth_read}, kept exact)")
    base = f.op.strip("_") if f.op not in LINEAR_BACKWARD_OPS else f.op
    if f.op not in LINEAR_BACKWARD_OPS and base not in LINEAR_BACKWARD_OPS:
        if base not in SMOOTH_BACKWARD_OPS and f.op not in SMOOTH_BACKWARD_OPS:
            if base == "hardswish" and s.bounded_codes and f.role != "output":
                # Backward: 0 below -3, 1 above 3, x / 3 + 1/2 between: linear
                # in the values once the region is exact.
                return Plan(Kind.PIECEWISE, "hardswish input")
            # max/amax compare the input with the result, clamp/abs read
            # regions, log/sqrt/pow/div are far from linear: a code of the
            # input gives zero, NaN or biased gradients.
            return _exact(f"nonlinear backward ({f.op})")
        if s.smooth == "exact":
            return _exact(f"smooth backward ({f.op}, kept exact)")
    if f.rule is None or (isinstance(f.rule, ReluOutput) and s.keeps_relu_exact):
        # The strategy's own code keeps ReLU zeros exact: one code serves the
        # activation and the next layer.
        return Plan(Kind.LOSSY, "lossy", f.rule)
    if f.region_only:
        # The activation's own save: its backward reads the region alone.
        return Plan(Kind.REGION, "region", f.rule)
    if f.region_read:
        # One compiled save serves ReLU's region read and a value read: a
        # code that may move zeros (fp16 underflow, 1 bit) flips the region.
        return _exact("ReLU output read for its region and values (this code does not keep zeros)")
    # Another op saving the same values needs them unbiased; clamping a code
    # into the region would bias it.
    return Plan(Kind.LOSSY, "lossy")
