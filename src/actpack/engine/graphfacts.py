"""What a compiled graph says about one of its saved tensors.

Under ``torch.compile`` no Python call stack names the op that saves a tensor:
AOTAutograd's forward graph ends with every tensor saved for backward, and the
backward graph starts with them.  The FX graphs say more than the call stack
would: the node that produced the value, the forward ops it feeds (a
``var_mean`` over the last dimension makes it a LayerNorm input) and the
backward ops that read it (only comparisons with a constant: the region is
all backward needs).  This module turns those into the
:class:`~actpack.policy.decide.Facts` the eager engine would have built, plus
the eager op name strategies key their layouts on.

The graphs are torch's post-decomposition ATen graphs (``aten.var_mean``,
``aten.rsqrt``... rather than ``aten.native_layer_norm``), so the patterns
below match decomposed forms; they are pinned by ``tests/test_compiled.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from actpack.engine.fills import EXTREME_FILL
from actpack.engine.fxnodes import SAME_VALUES as _SAME_VALUES
from actpack.engine.fxnodes import THROUGH as _THROUGH
from actpack.engine.fxnodes import is_view_of as _is_view_of
from actpack.engine.fxnodes import op_name
from actpack.engine.graphreads import BackwardReads, backward_reads
from actpack.policy.decide import Facts
from actpack.policy.ops import SMOOTH_COMPOSITES, attention_logit_args, attention_value_args
from actpack.policy.rules import ReluOutput

aten = torch.ops.aten
prims = torch.ops.prims

# Reductions whose outputs (and values derived from them elementwise) are an
# op's statistics: backward treats them as exact constants.
_REDUCTIONS = frozenset(
    {"var_mean", "mean", "sum", "amax", "amin", "var", "std", "logsumexp", "max", "min",
     "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
     "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
     "native_group_norm", "_scaled_dot_product_flash_attention_for_cpu",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
     "_fused_rms_norm"}
)  # fmt: skip

_ELEMENTWISE = frozenset(
    {"add", "sub", "mul", "div", "rsqrt", "sqrt", "reciprocal", "pow", "exp", "log", "neg",
     "squeeze", "unsqueeze", "view", "reshape", "convert_element_type", "_to_copy", "clone",
     "expand", "permute"}
)  # fmt: skip

_MATMULS = {"mm": "linear", "addmm": "linear", "bmm": "matmul", "baddbmm": "matmul"}
_ACTIVATIONS = frozenset({"relu", "leaky_relu", "hardtanh", "gelu", "silu", "sigmoid", "tanh"})
_COMPARISONS = frozenset({"le", "gt"})  # backward reads x > c either way
_POOL_OFFSETS = "_low_memory_max_pool_offsets_to_indices"


@dataclass(frozen=True)
class GraphFacts:
    """The facts of a compiled graph's save, and the eager op name strategies see."""

    facts: Facts
    op: str | None
    producer: str
    readers: tuple[str, ...]
    #: Bits per max-pool window offset when the save is Inductor's int8 offsets.
    offset_bits: int | None = None
    #: (op name, args, kwargs) with example values for tensors, when the save
    #: is an op's integer output that :func:`~actpack.codecs.compact.compact_integer`
    #: knows (max-pool indices).
    integer_op: tuple | None = None


def _forward_users(node: fx.Node, depth: int = 3, through: frozenset = _THROUGH) -> list[fx.Node]:
    """Users of ``node`` in the forward graph, seen through ops in ``through``."""
    out: list[fx.Node] = []
    for user in node.users:
        if user.op == "output":
            continue
        out.append(user)
        if depth and op_name(user) in through:
            out.extend(_forward_users(user, depth - 1, through))
    return out


def _last_dims(user: fx.Node) -> bool:
    """Whether reduction ``user`` reduces over its input's last dimension alone."""
    source = user.args[0] if user.args else None
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    ndim = val.dim()
    dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims] == [ndim - 1]


def _norm_of(node: fx.Node) -> str | None:
    """``"layer_norm"``/``"rms_norm"``/``"batch_norm"`` if ``node`` is a normalization input."""
    # A residual sum feeding the norm counts: backward recomputes it from this save.
    for user in _forward_users(node, 4, _THROUGH | {"add"}):
        name = op_name(user)
        if name == "var_mean":
            return "layer_norm" if _last_dims(user) else "batch_norm"
        if name == "native_layer_norm":
            return "layer_norm"
        if name.startswith(("native_batch_norm", "_native_batch_norm")):
            return "batch_norm"
        if name == "native_group_norm":
            return "group_norm"
        if name == "pow":
            if any(op_name(m) == "mean" and _last_dims(m) for m in user.users):
                return "rms_norm"
    return None


def _is_statistic(node: fx.Node, depth: int = 4) -> bool:
    """Whether ``node`` is computed elementwise from a reduction's (smaller) output."""
    name = op_name(node)
    if name == "getitem":
        source = node.args[0]
        return isinstance(source, fx.Node) and (
            op_name(source) in _REDUCTIONS and (node.args[1] > 0 or op_name(source) == "var_mean")
        )
    if name in _REDUCTIONS:
        return True
    if depth == 0 or name not in _ELEMENTWISE:
        return False
    val = node.meta.get("val")
    for arg in node.args:
        if isinstance(arg, fx.Node) and _is_statistic(arg, depth - 1):
            inner = arg.meta.get("val")
            # Only if the result keeps the statistic's size (not ``x * rstd``).
            if isinstance(inner, torch.Tensor) and isinstance(val, torch.Tensor):
                if _same_numel(inner, val):
                    return True
    return False


def _same_numel(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a.numel() == b.numel()))


def _backward_placeholder(node: fx.Node, bw_graph: fx.Graph) -> fx.Node | None:
    """The backward graph's input carrying the save of ``node`` (same name)."""
    for placeholder in bw_graph.find_nodes(op="placeholder"):
        if placeholder.name == node.name:
            return placeholder
    return None


def _compared_with(readers: list[fx.Node]) -> float | None:
    """The constant backward compares the save with, if comparing is all it does."""
    thresholds = set()
    for reader in readers:
        if op_name(reader) not in _COMPARISONS or len(reader.args) != 2:
            return None
        c = reader.args[1]
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            return None
        thresholds.add(float(c))
    return thresholds.pop() if len(thresholds) == 1 else None


# Forward ops whose backward reads which region their input falls in, with
# bounds other than ReLU's 0 (and their backward ops, when not decomposed).
# The compile-native path has only ReLU's region form: a save read by one of
# these stays exact (a lossy code moves values across the bounds, flipping
# the derivative: a biased gradient).
_REGION_READERS = frozenset(
    {"leaky_relu", "leaky_relu_backward", "hardtanh", "hardtanh_backward", "hardsigmoid",
     "hardsigmoid_backward", "threshold", "rrelu_with_noise", "rrelu_with_noise_backward",
     "hardswish", "hardswish_backward", "clamp", "clamp_min", "clamp_max"}
)  # fmt: skip
_ALL_COMPARISONS = frozenset({"le", "lt", "ge", "gt", "eq", "ne"})


def _region_reader(node: fx.Node, readers: list[fx.Node]) -> str | None:
    """A reader of ``node`` that tells regions apart at a bound other than
    ReLU's 0: a region activation among its forward users or backward
    readers, or a backward comparison with a nonzero constant (what the
    former decompose to); None if there is none."""
    for user in (*_forward_users(node), *readers):
        name = op_name(user)
        if name in _REGION_READERS:
            return name
        if name in _ALL_COMPARISONS and user in readers and len(user.args) == 2:
            c = user.args[1]
            if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0:
                return f"{name} {c}"
    return None


# Backward ops through which a value derived from the save stays a linear
# (or smooth) function of it: the recomputation Inductor's partitioner puts in
# the backward graph (BatchNorm's affine map before a recomputed ReLU, ...).
# Not exp, softmax or log_softmax: recomputed from a coded save, they put the
# code's noise into an exponent (the error fused attention's coded q/k gave,
# growing exponentially with the logits' scale), and a masked logit coded
# with its -inf neighbours is NaN.  Eager softmax/exp save their outputs.
_DERIVED_THROUGH = _THROUGH | frozenset(
    {"add", "sub", "mul", "neg", "div", "sum", "mean", "cat", "stack", "slice", "select",
     "split", "split_with_sizes", "squeeze", "unsqueeze", "expand", "where", "getitem",
     "slice_backward", "select_backward", "constant_pad_nd", "gelu", "silu", "sigmoid",
     "tanh", "erf", "native_layer_norm",
     "native_dropout", "_to_copy", "detach", "pow", "square"}
)  # fmt: skip
# Backward ops that only read a derived value linearly (or smoothly) and end
# its path: the matmuls and the fused backward kernels.
_DERIVED_END = frozenset(
    {"mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward",
     "native_layer_norm_backward", "native_batch_norm_backward", "native_group_norm_backward",
     "_native_batch_norm_legit_functional", "gelu_backward", "silu_backward",
     "sigmoid_backward", "tanh_backward", "_softmax_backward_data",
     "_log_softmax_backward_data", "avg_pool2d_backward", "avg_pool3d_backward",
     "_adaptive_avg_pool2d_backward", "max_pool2d_with_indices_backward",
     "max_pool3d_with_indices_backward", "embedding_dense_backward",
     "native_dropout_backward", "nll_loss_backward", "nll_loss2d_backward",
     "_scaled_dot_product_flash_attention_for_cpu_backward",
     "_scaled_dot_product_efficient_attention_backward",
     "_scaled_dot_product_flash_attention_backward",
     "_scaled_dot_product_cudnn_attention_backward", "output"}
)  # fmt: skip


def _derived_nonlinear_read(node: fx.Node, start: fx.Node, limit: int = 4000) -> str | None:
    """An op of the backward graph reading a value derived from the save
    (the save itself or recomputed from it) other than linearly or smoothly;
    None if there is none.

    Inductor's partitioner may save a pre-activation and recompute the
    activation in backward (ReLU, BatchNorm + ReLU): then the region of a
    *recomputed* value decides the gradient, and a lossy code of the save
    moves values across it.  The direct readers do not show this; following
    the save through the ops that recompute from it does.  Arithmetic and
    smooth functions of derived values pass here (a smooth op's bias is the
    second-order one the policy accepts, as in eager mode; a product of two
    values derived from the save is :func:`backward_reads`' to find); a region read
    (ReLU, a comparison, ``where``'s condition, ``threshold_backward`` of a
    recomputed value) or any op outside the known sets is reported.  Where
    ``threshold_backward``/comparisons read the save itself, the ReLU forms
    above decide.  ``start``: the backward graph's placeholder of the save.
    The walk stops after ``limit`` nodes (reported too)."""
    relu_save = op_name(node) == "relu"
    derived = {start}
    queue = [start]
    seen = 0
    while queue:
        current = queue.pop()
        for user in current.users:
            seen += 1
            if seen > limit:
                return "backward too large to follow"
            name = op_name(user)
            if name == "threshold_backward":
                # (grad, self, threshold): a derived grad is read linearly;
                # comparing a *recomputed* self reads a region.  A ReLU output
                # read through views or ``detach`` (AOTAutograd without
                # Inductor) is the save's own region: its ReLU form keeps it.
                self_arg = user.args[1] if len(user.args) > 1 else None
                if self_arg in derived and self_arg is not start:
                    if not (relu_save and _holds_the_save(self_arg, start)):
                        return name
                continue
            if name in _DERIVED_END:
                continue
            if name in _DERIVED_THROUGH:
                if name == "where" and user.args and user.args[0] in derived:
                    return "where on the save"
                if user not in derived:
                    derived.add(user)
                    queue.append(user)
                continue
            if current is start and name in _ALL_COMPARISONS:
                continue  # the save's own region: decided by the ReLU forms
            return name
    return None


# CheckpointPolicy members (torch.utils.checkpoint) the nodes of a checkpointed
# region carry in ``meta["recompute"]`` when backward recomputes them.
_RECOMPUTED = frozenset({"MUST_RECOMPUTE", "PREFER_RECOMPUTE"})


def _checkpoint_recomputes_from(start: fx.Node, limit: int = 64) -> bool:
    """Whether backward recomputes a ``torch.utils.checkpoint`` region from
    the save (``start``: its backward placeholder), read directly or through
    views.

    Dynamo turns a checkpoint it can trace into a region whose nodes carry
    ``meta["recompute"]`` and ``meta["ac_graph_id"]``; the partitioner saves
    what the region reads from outside it and recomputes the region in the
    backward graph, where those tags stay.  Such a save is what eager
    checkpointing keeps to recompute from (``"checkpoint input"``): the
    whole block is recomputed from it, so a code of it would bias every
    gradient of the block."""
    queue, seen = [start], 0
    while queue:
        for user in queue.pop().users:
            seen += 1
            if seen > limit:
                return False
            policy = user.meta.get("recompute")
            if "ac_graph_id" in user.meta and getattr(policy, "name", None) in _RECOMPUTED:
                return True
            if op_name(user) in _THROUGH:
                queue.append(user)
    return False


def _holds_the_save(arg: object, start: fx.Node) -> bool:
    """Whether ``arg`` holds the values of ``start`` (the save's placeholder)
    unchanged: ``start`` itself or reached from it through views and detach."""
    return _is_view_of(arg, start, depth=8, through=_SAME_VALUES)


def _relu_region_read(start: fx.Node) -> bool:
    """Whether backward reads the save whose placeholder is ``start`` for
    ReLU's region: a ``threshold_backward`` (or a comparison with 0) of the
    save itself or of its values through views and ``detach``."""
    queue, seen = [start], {start}
    while queue:
        current = queue.pop()
        for user in current.users:
            name = op_name(user)
            if name == "threshold_backward" and len(user.args) > 1 and user.args[1] is current:
                return True
            if name in _ALL_COMPARISONS and user.args and user.args[0] is current:
                return True
            if name in _SAME_VALUES and user not in seen:
                seen.add(user)
                queue.append(user)
    return False


def _attention_input(node: fx.Node, saved: fx.Node | None) -> tuple[str, str] | None:
    """``(role, op)`` if a fused attention op takes ``node`` as its query or key
    (role ``"qk"``: stored in fp16, ``Kind.HALF``), as its value or, in
    backward, as the forward's output (role ``"values"``: fp16 too), or as
    its additive mask (role ``"mask"``: kept exact); its backward recomputes
    the probabilities from q, k and the mask, and cancels dO.v against
    dO.out (see the eager engine's rule of the same name).  None if none
    does.  The output is found through the backward op reading it (``saved``:
    the backward graph's input carrying the save, followed through views):
    in the forward graph it is an output of the attention op, not an
    argument."""
    users = [(user, node) for user in _forward_users(node)]
    if saved is not None:
        users += [(user, saved) for user in _forward_users(saved)]
    found: dict[str, str] = {}
    for user, source in users:
        name = op_name(user)
        qk, mask = attention_logit_args(name, user.args, user.kwargs)
        base = name.removesuffix("_backward")
        if any(_is_view_of(a, source) for a in mask):
            found.setdefault("mask", base)
        if any(_is_view_of(a, source) for a in qk):
            found.setdefault("qk", base)
        values = attention_value_args(name, user.args, user.kwargs)
        if any(_is_view_of(a, source) for a in values):
            found.setdefault("values", base)
    # One code serves every reader: the strictest role decides (a mask in
    # fp16 would err by 2^-11 of its size inside the exponent).
    for role in ("mask", "qk", "values"):
        if role in found:
            return role, found[role]
    return None


# Ops that produce a tensor from a scalar value, and those through which a
# fill value reaches the result unchanged (selected, broadcast, moved).
_FILLS = frozenset({"scalar_tensor", "full", "full_like", "new_full", "fill", "fill_"})
_FILL_THROUGH = _THROUGH | frozenset(
    {"where", "masked_fill", "cat", "stack", "slice", "select", "index_put", "constant_pad_nd",
     "slice_scatter", "select_scatter", "copy", "add", "sub", "mul", "minimum", "maximum"}
)  # fmt: skip


# One threshold for both engines (fills.EXTREME_FILL, 1e3): a constant that
# large next to activations makes a 2-bit group's step a third of the fill,
# so its group's other values get noise at the fill's scale (eager: 85-96x
# the gradient with a -1e4 mask).  The compiled walk took only >= 1e30
# (finfo.min) until 2026-12-01: a -1e4 or -1e9 fill saved for a Linear was
# coded when compiled, kept exact in eager mode (tests/test_fills.py).
# Ops whose int arguments are values (a fill, a scalar operand); elsewhere ints
# are sizes, dims and slice bounds (view(x, [8, 1024]), slice(x, 0, 0, 2**63-1)).
_INT_VALUES = frozenset(
    {"mul", "add", "sub", "full", "full_like", "new_full", "fill", "fill_", "scalar_tensor",
     "masked_fill", "where", "minimum", "maximum"}
)  # fmt: skip


def _extreme_fill(node: fx.Node, limit: int = 64) -> float | None:
    """A non-finite or huge constant (``-inf`` or ``finfo.min`` of a mask, a
    NaN fill) that the value of ``node`` takes by construction, found among
    the scalars of the ops producing it; None if there is none.

    A group code keeps the non-finite values of a group and cannot code its
    finite ones (:mod:`actpack.codecs.groupquant`: they decode to NaN), so
    such a save would turn every finite neighbour of a ``-inf`` NaN; a
    ``finfo.min`` stretches its group's range to ~3e38, one step of which
    is ~1e38: the other values of its group decode to 0 or +-1e38 (unbiased,
    and useless).  The walk follows the ops in ``_FILL_THROUGH`` up to
    ``limit`` nodes."""
    queue, seen = [node], {node}
    while queue and len(seen) <= limit:
        current = queue.pop()
        name = op_name(current)
        if name not in _FILL_THROUGH and name not in _FILLS:
            continue  # softmax of a masked logit: finite, whatever its input held
        for arg in (*current.args, *current.kwargs.values()):
            for a in arg if isinstance(arg, (list, tuple)) else (arg,):
                if (type(a) is float or (type(a) is int and a is arg and name in _INT_VALUES)) and (
                    not abs(a) < EXTREME_FILL
                ):
                    return float(a)
                if isinstance(a, fx.Node) and a not in seen:
                    seen.add(a)
                    queue.append(a)
    return None


def _offset_bits(node: fx.Node, readers: list[fx.Node]) -> int | None:
    for reader in readers:
        if op_name(reader) == _POOL_OFFSETS and len(reader.args) > 1:
            size = math.prod(int(k) for k in reader.args[1])
            return max(1, math.ceil(math.log2(size))) if 1 < size <= 256 else None
    return None


def _integer_op(node: fx.Node) -> tuple | None:
    """The op producing integer save ``node`` (max-pool indices), with example values."""
    if op_name(node) != "getitem" or node.args[1] != 1:
        return None
    source = node.args[0]
    name = op_name(source) if isinstance(source, fx.Node) else ""
    if name not in ("max_pool2d_with_indices", "max_pool3d_with_indices"):
        return None

    def val(a: object) -> object:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    return name, tuple(val(a) for a in source.args), {k: val(v) for k, v in source.kwargs.items()}


def _saving_op(node: fx.Node, ndim: int, readers: list[fx.Node]) -> str | None:
    norm = _norm_of(node)
    if norm is not None:
        return norm
    names = [op_name(u) for u in _forward_users(node)] + [op_name(r) for r in readers]
    names = [n for n in names if n not in _THROUGH]
    for name in names:
        if name == "convolution":
            return f"conv{max(1, ndim - 2)}d"
        if name in _MATMULS:
            return _MATMULS[name]
    for name in names:
        if name in _ACTIVATIONS:
            return name
    return names[0] if names else None


# Forward users whose backward reads a saved value linearly or smoothly (or
# not at all): the same rule as the eager policy's op lists, in aten names.
# A save feeding any other op (amax/max compare it with their result, abs,
# clamp, log, pow, ...) stays exact: one code would serve every reader.
_SAFE_USERS = _THROUGH | frozenset(_MATMULS) | _ACTIVATIONS | frozenset(
    {"convolution", "mul", "add", "sub", "neg", "sum", "mean", "cat", "stack", "split",
     "split_with_sizes", "slice", "select", "_softmax", "_log_softmax", "native_layer_norm",
     "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
     "_native_batch_norm_legit_no_training", "native_group_norm", "var_mean", "exp",
     "threshold", "le", "gt", "lt", "ge", "where", "native_dropout", "bernoulli",
     "embedding", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d", "max_pool2d_with_indices",
     "max_pool3d_with_indices", "_low_memory_max_pool2d_with_offsets",
     "_low_memory_max_pool3d_with_offsets", "scaled_dot_product_attention",
     "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
     "copy", "copy_", "fill", "zeros_like", "empty_like", "full_like", "ones_like"}
)  # fmt: skip


def _composite(user: fx.Node) -> str | None:
    """The smooth activation (``policy.ops.SMOOTH_COMPOSITES``) whose module
    computes ``user``, from its innermost ``nn_module_stack`` entry; else None."""
    stack = user.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[-1][1]
    return SMOOTH_COMPOSITES.get((getattr(cls, "__module__", None), getattr(cls, "__name__", None)))


def _composite_user(node: fx.Node) -> str | None:
    """The smooth activation that the first forward user of ``node`` belongs to, if any."""
    for user in _forward_users(node):
        name = _composite(user)
        if name is not None:
            return name
    return None


def _unsafe_user(node: fx.Node) -> str | None:
    """The first forward user of ``node`` whose backward may read it nonlinearly
    (users inside a smooth composite activation are read smoothly as a whole)."""
    for user in _forward_users(node):
        name = op_name(user)
        if name not in _SAFE_USERS and _composite(user) is not None:
            continue
        if name == "div":
            if len(user.args) > 1 and user.args[1] is node:
                return name  # a denominator: far from linear
            continue
        if name == "pow":
            if len(user.args) > 1 and user.args[1] == 2:
                continue
            return name
        if name not in _SAFE_USERS:
            return name
    return None


# Ops whose result has no autograd history whatever their tensor arguments
# (eager gives them no grad_fn): values made to the shape or dtype of a
# tensor.  Not ``detach``: AOTAutograd saves an op's output for backward as
# ``detach(output)``, an activation with history (SDPA's output), and the
# graph does not tell that from a user's ``detach()``.
_NO_HISTORY = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
     "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided"}
)  # fmt: skip


def _differentiable(val: object) -> bool:
    """Whether ``val`` (a node's example value) could carry autograd history:
    a floating or complex tensor, or a tuple holding one (multi-output ops;
    their ``getitem`` s decide for themselves)."""
    if isinstance(val, torch.Tensor):
        return val.dtype.is_floating_point or val.dtype.is_complex
    if isinstance(val, (tuple, list)):
        return any(_differentiable(v) for v in val)
    if val is None:
        return True  # no example value recorded: nothing is known
    return False  # SymInts, numbers: sizes and flags carry no gradient


def _input_requires_grad(node: fx.Node) -> bool:
    """Whether graph input (or constant) ``node`` requires grad.

    AOTAutograd records each forward input's ``requires_grad`` in its
    ``tensor_meta`` (parameters and inputs that require grad: True; buffers,
    the input batch, RNG seeds: False); the example values in ``val`` are
    detached and say False for all.  Without that record the input is taken
    to require grad: its dependants are decided as they were before
    inputs' history was read (coded where the rest allows)."""
    val = node.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):
        return False  # a symbolic size
    meta = node.meta.get("tensor_meta")
    requires_grad = getattr(meta, "requires_grad", None)
    return True if requires_grad is None else bool(requires_grad)


def history_free(fw_graph: fx.Graph) -> frozenset[str]:
    """Names of the nodes of ``fw_graph`` without autograd history, eager's
    ``grad_fn is None``: graph inputs that do not require grad (buffers, the
    input batch, constants), integer and bool values, and whatever is
    computed from those alone (a fixed ALiBi bias from ``arange`` and a
    buffer, a mask from integers).

    AOTAutograd's graphs are traced below autograd (every intermediate's
    ``tensor_meta.requires_grad`` is False), so history is propagated here
    from the inputs, in graph order: a node has history when one of its
    tensor arguments has and it is not one of the ops eager gives no
    ``grad_fn``.  This over-approximates eager only where eager's history
    ends inside the graph in a way the graph does not show (``torch.no_grad``
    blocks): those nodes keep being decided as activations."""
    free = set()
    for node in fw_graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            history = _input_requires_grad(node)
        elif node.op == "output":
            continue
        else:
            history = (
                _differentiable(node.meta.get("val"))
                and op_name(node) not in _NO_HISTORY
                and any(a.name not in free for a in node.all_input_nodes)
            )
        if not history:
            free.add(node.name)
    return frozenset(free)


def _input_leaf(node: fx.Node, history: bool) -> str | None:
    """The ``leaf`` fact of a graph input: its storage is the caller's, so it
    is handed back as it is (``Kind.KEEP``).  One that does not require grad
    is what eager calls a "leaf input" (the input batch, a buffer; the graph
    does not tell them apart); one that does is a parameter, or an activation
    of an earlier graph."""
    if node.op != "placeholder":
        return None
    return "graph input" if history else "leaf input"


def graph_facts(
    node: fx.Node,
    bw_graph: fx.Graph,
    val: torch.Tensor,
    free: frozenset[str] | None = None,
    reads: BackwardReads | None = None,
) -> GraphFacts:
    """Facts about the save of forward node ``node`` (value ``val``) read by
    ``bw_graph``; ``free`` is :func:`history_free` of ``node``'s graph and
    ``reads`` :func:`backward_reads` of ``bw_graph`` (computed here when
    not given: callers deciding many saves of one graph pass them once)."""
    # The backward graph's input carrying the save, looked up once.
    saved = _backward_placeholder(node, bw_graph)
    readers = list(saved.users) if saved is not None else []
    producer = op_name(node)
    statistic = node.op == "call_function" and _is_statistic(node)
    if free is None:
        free = history_free(node.graph)
    # Eager's ``grad_fn is not None``: a save computed only from inputs that
    # do not require grad is no activation (see decide: never coded).
    history = node.name not in free
    # Backward that only compares the save with 0 (ReLU's mask) reads its
    # region alone; compared with another constant, the save stays exact
    # (restoring a value on the right side of an arbitrary bound in the
    # save's dtype is not written in graph ops).
    bound = _compared_with(readers) if val.is_floating_point() else None
    region_only = bound == 0.0
    rule = ReluOutput() if region_only or producer == "relu" else None
    declined = "compared with a constant" if bound not in (None, 0.0) else None
    if declined is None and val.is_floating_point() and not region_only:
        reader = _region_reader(node, readers)
        if reader is not None:
            declined = f"region read by {reader} (no compiled region form)"
    logits = values = False
    if declined is None and val.is_floating_point() and not statistic:
        attention = _attention_input(node, saved)
        if attention is not None and attention[0] == "qk":
            logits = True
        elif attention is not None and attention[0] == "values":
            values = True
        elif attention is not None:
            declined = f"attention mask ({attention[1]} recomputes softmax with it)"
    if declined is None and val.is_floating_point() and node.op == "call_function":
        fill = _extreme_fill(node)
        if fill is not None:
            declined = f"holds a {fill:g} fill (a group code would ruin the rest of its group)"
    if declined is None and val.is_floating_point() and not statistic and saved is not None:
        reader = _derived_nonlinear_read(node, saved)
        if reader is not None:
            declined = f"recomputed in backward and read nonlinearly ({reader})"
    if reads is None and saved is not None:
        reads = backward_reads(bw_graph)
    # (Attention's fp16 form is rounding to nearest, the same value for
    # every read: its bound holds for products of reads too.)
    if (
        declined is None
        and val.is_floating_point()
        and not statistic
        and saved is not None
        and not (logits or values)
    ):
        reader = reads.products.get(saved.name)
        smooth_op = reads.recomputed.get(saved.name)
        if reader is not None:
            declined = f"read twice in one product in backward ({reader})"
        elif smooth_op is not None:
            declined = (
                f"recomputed in backward and read nonlinearly ({smooth_op} output "
                "outside its backward formula)"
            )
    offset_bits = integer_op = None
    if not val.is_floating_point():
        offset_bits = _offset_bits(node, readers)
        integer_op = _integer_op(node) if node.op == "call_function" else None
    op = _saving_op(node, val.dim(), readers)
    if region_only:
        op = "relu"  # backward reads x > 0 alone, as ReLU's does
    elif val.is_floating_point() and not statistic:
        # A node read inside a smooth composite activation is read smoothly
        # as a whole (one code serves all its readers): name that activation,
        # so that smooth="exact" applies to it.
        op = _unsafe_user(node) or _composite_user(node) or op
    overlapping = any(s == 0 and n > 1 for n, s in zip(val.shape, val.stride()))
    origin = "op" if op is not None else "unknown"
    if saved is not None and _checkpoint_recomputes_from(saved):
        origin = "checkpoint"
    facts = Facts(
        dtype=val.dtype,
        numel=val.numel(),
        origin=origin,
        op=op,
        role="internal" if statistic else "input",
        history=history and not statistic,
        leaf=_input_leaf(node, history),
        plain=type(val).__name__ in ("FakeTensor", "FunctionalTensor", "Tensor"),
        overlapping=overlapping,
        rule=rule,
        region_only=region_only,
        compactable=offset_bits is not None or integer_op is not None,
        declined=declined,
        logits=logits,
        values=values,
        region_read=(
            isinstance(rule, ReluOutput)
            and not region_only
            and saved is not None
            and _relu_region_read(saved)
        ),
        smooth_read=reads.smooth.get(saved.name) if saved is not None else None,
    )
    readers_names = tuple(op_name(r) for r in readers)
    return GraphFacts(facts, op, producer, readers_names, offset_bits, integer_op)
