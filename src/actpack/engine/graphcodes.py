"""The forms a compiled graph's save takes: encoded and decoded with traceable ops.

A pack hook inlined into a graph may return tensors, symbolic sizes and
constants only (AOTAutograd makes the tensors outputs of the forward graph and
inputs of the backward graph, and bakes the constants into the unpack graph).
Each form here is therefore ``(form, meta, tensors)``: a name, constants
(shape, dtype, code parameters) and the tensors the graph keeps.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from actpack.codecs import traceable
from actpack.codecs.groupquant import GroupCode, dequantize_groups
from actpack.codecs.pack import pack_bits, unpack_bits
from actpack.engine.graphfacts import GraphFacts
from actpack.policy.decide import Kind, Plan
from actpack.policy.rules import ReluOutput
from actpack.strategies import ActNN, Cast16, SaveInfo, Strategy
from actpack.strategies.levels import ActNNPreset

Coded = tuple[str, tuple, tuple[Tensor, ...]]


def traceable_strategy(strategy: Strategy) -> bool:
    """Whether the compiled path has a traceable twin of ``strategy.encode``.

    Mixed precision (allocations kept across steps in Python) and DIVISION
    have none yet: their lossy saves stay exact inside compiled graphs.
    """
    if isinstance(strategy, Cast16) or strategy.lossless:
        return True
    if isinstance(strategy, ActNN):
        return type(strategy).encode in (ActNN.encode, ActNNPreset.encode)
    return False


def _fresh_key(device: torch.device) -> Tensor:
    """A hash key drawn each time the graph runs (two random 32-bit words).

    ``prims.inductor_seeds`` is the op Inductor itself places for dropout: it
    lowers natively (one ``randint`` from the default generator per call), so
    compiled actpack draws its rounding noise as compiled dropout does.
    """
    importlib.import_module("torch._inductor.inductor_prims")  # registers the prims
    seed = torch.ops.prims.inductor_seeds.default(1, device)
    return torch.cat([seed, seed >> 32])


def _lossy(strategy: Strategy, x: Tensor, info: SaveInfo) -> Coded | None:
    """The strategy's code of ``x``, or None where the strategy keeps ``x``."""
    if isinstance(strategy, Cast16):
        return "cast", (x.dtype,), (x.to(strategy.dtype),)
    if isinstance(strategy, ActNNPreset) and info.op in strategy.keep_ops:
        return None
    # The eager strategy's own grouping: per-token ranges for row-norm inputs.
    rows, group_size = strategy._grouping(x, info)
    zero_exact = isinstance(info.rule, ReluOutput) and strategy.bits >= 2
    key = _fresh_key(x.device) if strategy.stochastic else None
    code = traceable.quantize_groups(
        x.reshape(rows, -1), strategy.bits, group_size, key, zero_exact=zero_exact
    )
    meta = (tuple(x.shape), x.dtype, code.rows, code.cols, group_size, code.bits, zero_exact)
    return "groups", meta, (code.packed, code.lo, code.hi)


def encode(strategy: Strategy, plan: Plan, gf: GraphFacts, x: Tensor) -> Coded:
    """``x`` in the form ``plan`` asks for; ``("exact", (), ())`` keeps ``x`` itself."""
    kind = plan.kind
    if kind == Kind.BITS:
        return "bits", (tuple(x.shape),), (traceable.pack_mask(x),)
    if kind == Kind.COMPACT and gf.offset_bits is not None:
        # Inductor's max-pool offsets (int8, < kernel size): log2(kernel) bits each.
        packed = pack_bits(x.reshape(-1).to(torch.uint8), gf.offset_bits)
        return "offsets", (tuple(x.shape), x.dtype, gf.offset_bits), (packed,)
    if kind == Kind.REGION:
        rule = plan.rule
        return "region", (tuple(x.shape), x.dtype, rule), (traceable.pack_mask(rule.mask(x)),)
    if kind == Kind.LOSSY and traceable_strategy(strategy):
        coded = _lossy(strategy, x, SaveInfo(op=gf.op, rule=plan.rule))
        if coded is not None:
            return coded
    return "exact", (), ()


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n = n * s
    return n


def decode(form: str, meta: tuple, tensors: tuple[Tensor, ...]) -> Tensor:
    """The tensor backward reads, from :func:`encode`'s form."""
    if form == "cast":
        return tensors[0].to(meta[0])
    if form == "bits":
        return traceable.unpack_mask(tensors[0], meta[0])
    if form == "offsets":
        shape, dtype, bits = meta
        return unpack_bits(tensors[0], bits, _numel(shape)).to(dtype).view(shape)
    if form == "region":
        shape, dtype, rule = meta
        mask = traceable.unpack_mask(tensors[0], shape)
        return rule.restore(torch.zeros(shape, dtype=dtype, device=mask.device), mask)
    if form == "groups":
        shape, dtype, rows, cols, group_size, bits, zero_exact = meta
        packed, lo, hi = tensors
        code = GroupCode(packed, lo, hi, rows, cols, group_size, bits, zero_exact)
        return dequantize_groups(code, dtype).reshape(shape)
    raise AssertionError(f"unknown graph code {form!r}")
