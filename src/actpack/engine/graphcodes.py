"""The forms a compiled graph's save takes: encoded and decoded with traceable ops.

A pack hook inlined into a graph may return tensors, symbolic sizes and
constants only (AOTAutograd makes the tensors outputs of the forward graph and
inputs of the backward graph, and bakes the constants into the unpack graph).
Each form here is therefore ``(form, meta, tensors)``: a name, constants
(shape, dtype, code parameters) and the tensors the graph keeps.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import Tensor

from actpack.codecs import traceable
from actpack.codecs.compact import PoolIndices, Window, compact_integer
from actpack.codecs.groupquant import GroupCode
from actpack.codecs.pack import pack_bits, unpack_bits
from actpack.engine.graphfacts import GraphFacts
from actpack.policy.decide import Kind, Plan
from actpack.policy.rules import ReluOutput
from actpack.strategies import ActNN, Cast16, SaveInfo, Strategy
from actpack.strategies.levels import ActNNPreset
from actpack.strategies.rows import RowActNN
from actpack.strategies.seeds import rank_key_words

Coded = tuple[str, tuple, tuple[Tensor, ...]]

# Constants in a form must be plain literals (numbers, strings, tuples,
# dtypes): AOTAutograd bakes them into the unpack graph, and an object would
# become a constructor call there.


def _fields(obj: object) -> tuple:
    return dataclasses.astuple(obj)


def traceable_strategy(strategy: Strategy) -> bool:
    """Whether the compiled path has a traceable twin of ``strategy.encode``.

    Mixed precision (allocations kept across steps in Python) and DIVISION
    have none yet: their lossy saves stay exact inside compiled graphs.
    :class:`~actpack.strategies.rows.RowActNN`'s twin codes the same token
    rows at the same widths, without the Hadamard rotation.
    """
    if isinstance(strategy, Cast16) or strategy.lossless:
        return True
    if isinstance(strategy, ActNN):
        return type(strategy).encode in (ActNN.encode, ActNNPreset.encode, RowActNN.encode)
    return False


def _fresh_key(device: torch.device, rank: int) -> Tensor:
    """A hash key drawn each time the graph runs (two random 32-bit words),
    XORed with :func:`~actpack.strategies.seeds.rank_key_words` of ``rank``.

    ``prims.inductor_seeds`` is the op Inductor itself places for dropout: it
    lowers natively (one ``randint`` from the default generator per call), so
    compiled actpack draws its rounding noise as compiled dropout does.
    """
    importlib.import_module("torch._inductor.inductor_prims")  # registers the prims
    seed = torch.ops.prims.inductor_seeds.default(1, device)
    # Ranks seeded alike would draw alike: a constant per rank (traced in,
    # as a process's rank is fixed) gives each its own keys, still uniform.
    low, high = rank_key_words(rank)
    if low or high:
        return torch.cat([seed ^ low, (seed >> 32) ^ high])
    return torch.cat([seed, seed >> 32])


def _carrier(x: Tensor) -> Tensor:
    """An empty tensor whose shape after the first dim, and dtype, are those of ``x``.

    Sizes travel inside a tensor rather than as symbolic ints: under dynamic
    shapes one symbol may stand for several sizes (duck sizing), and
    AOTAutograd's inlining breaks the graph when a pack output repeats a
    symbolic node.  Costs no memory.
    """
    return x.new_empty((0, *x.shape))


def _shape(carrier: Tensor) -> tuple:
    return tuple(carrier.shape[1:])


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n = n * s
    return n


def _lossy(strategy: Strategy, x: Tensor, info: SaveInfo, rank: int) -> Coded | None:
    """The strategy's code of ``x``, or None where the strategy keeps ``x``."""
    if isinstance(strategy, Cast16):
        return "cast", (x.dtype,), (x.to(strategy.dtype),)
    if isinstance(strategy, ActNNPreset) and info.op in strategy.keep_ops:
        return None
    bits = strategy.bits
    layout = None
    if isinstance(strategy, RowActNN):
        # The eager widths and token-row layout, without the Hadamard rotation.
        # Under dynamic shapes, ActNN's grouping below (rows of the last dim).
        bits = strategy.bits_for(info)
        if all(type(n) is int for n in x.shape):
            if strategy._rowwise(x, info) and x.shape[-1] == 1:
                return None  # a per-row statistic: kept exact, as in eager
            layout = strategy.row_layout(x, info)
    # The eager strategy's own grouping: per-token ranges for row-norm inputs.
    rows, group_size = layout or strategy._grouping(x, info)
    if isinstance(x.numel() // rows, torch.SymInt) and isinstance(x.shape[-1], int):
        # Dynamic shapes, where that grouping would merge samples into one
        # row of symbolic length: one range per row of the last dimension
        # instead, so that only the number of rows is symbolic.
        rows, group_size = x.numel() // x.shape[-1], min(group_size, x.shape[-1])
    zero_exact = isinstance(info.rule, ReluOutput) and bits >= 2
    key = _fresh_key(x.device, rank) if strategy.stochastic else None
    code = traceable.quantize_groups(
        x.reshape(rows, -1), bits, group_size, key, zero_exact=zero_exact
    )
    meta = (group_size, code.bits, zero_exact)
    return "groups", meta, (_carrier(x), code.packed, code.lo, code.hi)


def encode(strategy: Strategy, plan: Plan, gf: GraphFacts, x: Tensor, rank: int = 0) -> Coded:
    """``x`` in the form ``plan`` asks for; ``("exact", (), ())`` keeps ``x`` itself.

    ``rank``: the process's rank in its distributed job, mixed into the
    rounding noise's key (:func:`_fresh_key`)."""
    kind = plan.kind
    if kind == Kind.BITS:
        return "bits", (), (_carrier(x), traceable.pack_mask(x))
    if kind == Kind.COMPACT and gf.offset_bits is not None:
        # Inductor's max-pool offsets (int8, < kernel size): log2(kernel) bits each.
        packed = pack_bits(x.reshape(-1).to(torch.uint8), gf.offset_bits)
        return "offsets", (gf.offset_bits,), (_carrier(x), packed)
    if kind == Kind.COMPACT and gf.integer_op is not None:
        # Max-pool indices as offsets inside their window (the eager engine's code).
        code = compact_integer(x, *gf.integer_op)
        window = _fields(code.window) if isinstance(code, PoolIndices) else ()
        if window and all(type(n) is int for part in window for n in part):
            return "pool", (code.bits, window), (_carrier(x), code.packed)
    if kind == Kind.HALF and x.dtype == torch.float32:
        # Fused attention's query, key, value or output: any strategy,
        # traceable or not.
        data, scale = traceable.half_scaled(x)
        return "half", (x.dtype,), (data, scale)
    if kind == Kind.REGION and isinstance(plan.rule, ReluOutput):
        # The only region graphfacts proposes: ReLU's x > 0.
        return "region", (), (_carrier(x), traceable.pack_mask(x > 0))
    if kind == Kind.LOSSY and traceable_strategy(strategy):
        coded = _lossy(strategy, x, SaveInfo(op=gf.op, rule=plan.rule), rank)
        if coded is not None:
            return coded
    return "exact", (), ()


def decode(form: str, meta: tuple, tensors: tuple[Tensor, ...]) -> Tensor:
    """The tensor backward reads, from :func:`encode`'s form."""
    if form == "cast":
        return tensors[0].to(meta[0])
    if form == "half":
        return traceable.half_unscaled(tensors[0], tensors[1], meta[0])
    carrier, packed = tensors[0], tensors[1]
    shape, dtype = _shape(carrier), carrier.dtype
    if form == "bits":
        return traceable.unpack_mask(packed, shape)
    if form == "offsets":
        return unpack_bits(packed, meta[0], _numel(shape)).to(dtype).view(shape)
    if form == "pool":
        bits, window = meta
        return PoolIndices(packed, bits, torch.Size(shape), Window(*window)).decode()
    if form == "region":
        mask = traceable.unpack_mask(packed, shape)
        zeros = torch.zeros(shape, dtype=dtype, device=packed.device)
        return ReluOutput().restore(zeros, mask)
    if form == "groups":
        group_size, bits, zero_exact = meta
        lo, hi = tensors[2], tensors[3]
        rows = lo.shape[0]
        cols = _numel(shape) // rows
        code = GroupCode(packed, lo, hi, rows, cols, group_size, bits, zero_exact)
        return traceable.dequantize_groups(code, dtype).reshape(shape)
    raise AssertionError(f"unknown graph code {form!r}")
