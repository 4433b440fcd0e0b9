"""How a compiled backward graph reads its saved tensors: products of one save.

AOTAutograd's partitioner saves a value once for the whole backward graph.
Where eager mode gives a second save of a tensor a code of its own
(:mod:`actpack.engine.rereads`), a compiled backward can read one saved
placeholder in both operands of a product (``h * h * h``, ``(h @ W) * h``,
HF's Python RMSNorm, ``tanh(h) * tanh(h)``): one stochastic code ``c`` makes
the mean of such a term ``x^2 + Var(c)``, a bias.  :func:`backward_reads`
follows which saves each backward value was computed from and reports the
saves a product reads twice (kept exact by
:func:`actpack.engine.graphfacts.graph_facts`), those a smooth op's own
backward formula reads (the second-order bias ``smooth="code"`` accepts),
and those a smooth op recomputes its output from for another op's backward
(kept exact: outside the op's formula).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass

import torch
from torch import fx

from actpack.engine.fxnodes import SAME_VALUES as _SAME_VALUES
from actpack.engine.fxnodes import op_name
from actpack.policy.ops import SMOOTH_COMPOSITES

# Smooth ops (the policy's SMOOTH_BACKWARD_OPS) by the aten names their
# forward and backward take in AOTAutograd's graphs (``original_aten`` of the
# nodes their decompositions emit): the family whose second-order bias the
# policy accepts when one code is read inside the op's own backward formula.
_SMOOTH_FAMILIES = {
    "gelu": "gelu", "gelu_backward": "gelu", "silu": "silu", "silu_backward": "silu",
    "tanh": "tanh", "tanh_backward": "tanh", "sigmoid": "sigmoid",
    "sigmoid_backward": "sigmoid", "softplus": "softplus", "softplus_backward": "softplus",
    "mish": "mish", "mish_backward": "mish", "log_sigmoid_forward": "logsigmoid",
    "log_sigmoid_backward": "logsigmoid", "_softmax": "softmax",
    "_softmax_backward_data": "softmax", "native_layer_norm": "layer_norm",
    "native_layer_norm_backward": "layer_norm", "_fused_rms_norm": "rms_norm",
    "_fused_rms_norm_backward": "rms_norm", "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "native_batch_norm_backward": "batch_norm", "native_group_norm": "group_norm",
    "native_group_norm_backward": "group_norm",
}  # fmt: skip

# Ops through which several values derived from one save combine by sums,
# never by products (their other arguments: sizes, dims, scalars).
_ADDITIVE = _SAME_VALUES | frozenset(
    {"add", "sub", "neg", "cat", "stack", "sum", "mean", "where", "index_put", "slice_scatter",
     "select_scatter", "copy", "slice_backward", "select_backward", "constant_pad_nd",
     "convert_element_type", "_to_copy", "split", "split_with_sizes", "getitem", "slice",
     "select", "_unsafe_view", "sum_to_size", "new_zeros", "zeros_like"}
)  # fmt: skip

# Ops affine in each of their arguments (a product of two values carrying
# one save is reported as a product): a decomposed norm's ``(x - mean) *
# rstd`` with saved statistics is affine in the save; ``tanh``, ``sigmoid``,
# ``erf``, a norm recomputing its statistics are not.
_AFFINE = _ADDITIVE | frozenset({"mul", "div", "true_divide"})

# Arguments (by position) that a backward op reads for their region or
# shape alone: a derived value there is no read of its values.
_NOT_VALUES = {
    "where": (0,), "threshold_backward": (1,), "max_pool2d_with_indices_backward": (1,),
    "max_pool3d_with_indices_backward": (1,), "avg_pool2d_backward": (1,),
    "avg_pool3d_backward": (1,), "_adaptive_avg_pool2d_backward": (1,),
    "_adaptive_avg_pool3d_backward": (1,), "nll_loss_backward": (1,),
    "nll_loss2d_backward": (1,), "new_zeros": (0,), "zeros_like": (0,), "new_empty": (0,),
    "empty_like": (0,), "ones_like": (0,), "full_like": (0,), "new_ones": (0,),
}  # fmt: skip

# Ops whose output is one read of their first argument: its values, moved
# or cast (a cast of a code is a function of that one code).
_ONE_READ = _SAME_VALUES | frozenset({"convert_element_type", "_to_copy"})

# The arguments of these ops that multiply each other (the others are added).
_PRODUCT_ARGS = {"addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2), "addcmul": (1, 2)}


def _float_value(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in val)
    return val is None and node.op != "placeholder"  # no example value: nothing known


def _smooth_group(node: fx.Node) -> tuple | None:
    """The smooth op whose own forward or backward formula ``node`` belongs to:
    a smooth composite activation (its module, from the node's own or its
    forward's ``nn_module_stack``), else a smooth aten op (its family and
    autograd sequence number, shared by the op's forward, its recomputation
    and its backward); None for anything else (user arithmetic)."""
    for key in ("nn_module_stack", "fwd_nn_module_stack"):
        stack = node.meta.get(key)
        if stack:
            path, (_, cls) = list(stack.items())[-1]
            name = SMOOTH_COMPOSITES.get(
                (getattr(cls, "__module__", None), getattr(cls, "__name__", None))
            )
            if name is not None:
                return (name, "module", path)
    original = node.meta.get("original_aten")
    packet = getattr(original, "overloadpacket", None)
    aten_name = packet.__name__ if packet is not None else op_name(node)
    family = _SMOOTH_FAMILIES.get(aten_name)
    if family is None:
        return None
    return (family, "op", node.meta.get("seq_nr"))


def _tensor_args(node: fx.Node) -> list[tuple[int, fx.Node]]:
    """``(position, node)`` of the tensor arguments of ``node`` (lists flattened,
    keyword arguments after the positional ones)."""
    out: list[tuple[int, fx.Node]] = []
    args = (*node.args, *node.kwargs.values())
    for i, arg in enumerate(args):
        for a in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(a, fx.Node):
                out.append((i, a))
    return out


def _twice(masks: list[int]) -> int:
    """The bits set in at least two of ``masks``."""
    seen = twice = 0
    for m in masks:
        twice |= seen & m
        seen |= m
    return twice


@dataclass(frozen=True)
class BackwardReads:
    """How a backward graph reads its saves (by placeholder name), beyond
    what each op reading them says: :func:`backward_reads`."""

    #: Saves read twice in one product, with the op that does.
    products: dict[str, str]
    #: Saves whose values (not a gradient computed from them) a smooth op's
    #: backward formula reads, with that op (``smooth="exact"`` keeps them).
    smooth: dict[str, str]
    #: Saves a smooth op recomputes from in backward whose recomputed output
    #: something outside that op's backward formula reads, with that op.
    recomputed: dict[str, str] = dataclasses.field(default_factory=dict)


def backward_reads(bw_graph: fx.Graph) -> BackwardReads:
    """The saves of ``bw_graph`` (its placeholders, by name) that backward
    reads twice in one product, and those a smooth op's formula reads.

    **Products.** One shared stochastic code ``c`` read in both operands of
    a product gives ``E[c * c] = x^2 + Var(c)``, a bias that averaging draws
    does not remove.  The partitioner saves a value once for the whole
    backward graph, so where eager mode hands a second save of a tensor a
    code of its own (:mod:`actpack.engine.rereads`), a compiled graph reads
    one placeholder in both operands: ``mul(x, x)`` (``e * e``; ``h * h *
    h`` recomputed), ``pow(x, 2)``, a gradient computed from the save
    multiplied by the save again (``h * h * h``'s ``g * h * h``, RMSNorm's
    ``h * sum(g * h)``), the weight gradient ``mm(h^T, g * h)`` of ``(h @
    W) * h``, or a smooth op's backward whose incoming gradient was
    computed from its own saved output (``tanh(h) * tanh(h)``).  One pass
    over the graph, in order: each node carries the bit set of the saves it
    was computed from; a product (any op but sums, views and the arguments
    read for their region or shape) of two operands sharing a bit, a power
    other than 0 or 1 or a divisor carrying one, reports that save.

    What the policy accepts as a smooth op's second-order bias is the op's
    own backward formula reading one code (GELU's ``x * exp(-x^2 / 2)``,
    SiLU's ``x * sigmoid(x)``, LayerNorm's ``x_hat * sum(g * x_hat)``, the
    products a smooth composite such as HF's ``NewGELUActivation``
    decomposes into): products inside one smooth op's formula
    (:func:`_smooth_group`) pass while the save reaches them through one
    input of the formula, and are reported when it reaches them through two
    (the gradient flowing into the op computed from the save, and the op's
    own read of it: what eager mode codes apart).

    **Smooth reads.** An input of a smooth op's formula computed from a save
    without the incoming gradients (the ``tangents``): the save itself, or
    a value recomputed from it.  Eager mode keeps the smooth op's own save
    exact under ``smooth="exact"``; compiled, one code would serve it.

    **Recomputed smooth outputs.** Inductor's partitioner may save the input
    of a smooth op and recompute its output in backward (``c * tanh(h)``:
    ``h`` saved, ``tanh(h)`` recomputed for the gradient of ``c``).  Eager
    mode codes the output itself for the ops that read it (unbiased); a
    compiled graph reads ``tanh(code of h)``, whose mean is not ``tanh(h)``:
    a bias outside the op's own backward formula, which is all that
    ``smooth="code"`` accepts (R of 8.4 at K = 64 for ``c * tanh(h)``
    under ``"actnn"`` and Inductor's partition, 1.7 in eager mode).  A value
    of a smooth op's formula computed without the tangents through a curved
    op (not a decomposed norm's ``(x - mean) * rstd`` with saved statistics,
    affine in the save), read by a node outside that formula, reports the
    saves it was computed from."""
    masks: dict[fx.Node, int] = {}
    # The node whose values a node holds (a view or cast of a save: that save).
    base: dict[fx.Node, fx.Node] = {}
    # The smooth op whose formula a node belongs to, and for those that do,
    # the formula's inputs from outside it that the node was computed from
    # (by base node), each with the bits of the saves it carries.
    groups: dict[fx.Node, tuple] = {}
    inputs: dict[fx.Node, dict[fx.Node, int]] = {}
    products: dict[int, str] = {}
    smooth: dict[int, str] = {}
    recomputed: dict[int, str] = {}
    # For values of a smooth op's formula: the saves they are a curved
    # (not affine) function of.
    curved: dict[fx.Node, int] = {}
    names: list[str] = []
    tangents = 0
    for node in bw_graph.nodes:
        if node.op == "placeholder":
            base[node] = node
            if _float_value(node):
                masks[node] = 1 << len(names)
                names.append(node.name)
                if node.name.startswith("tangents"):
                    tangents |= masks[node]
            continue
        if node.op != "call_function" or not _float_value(node):
            continue
        name = op_name(node)
        skip = _NOT_VALUES.get(name, ())
        args = [(i, a) for i, a in _tensor_args(node) if i not in skip and masks.get(a, 0)]
        if not args:
            continue
        group = _smooth_group(node)
        first = node.args[0] if node.args else None
        one_read = name in _ONE_READ and isinstance(first, fx.Node)
        if group is None and one_read:
            group = groups.get(first)  # a view inside a formula stays in it
        for _, a in args:
            # A smooth op's output recomputed from saves (no tangent among
            # what it was computed from), read outside the op's formula.
            outer = groups.get(a)
            if outer is not None and outer != group and not masks[a] & tangents:
                _report(recomputed, curved.get(a, 0), outer[0])
        masks[node] = mask = functools.reduce(operator.or_, (masks[a] for _, a in args))
        base[node] = base.get(first, first) if one_read else node
        if group is not None:
            groups[node] = group
            # The saves this value of the formula is a curved function of.
            bent = 0 if name in _AFFINE else mask & ~tangents
            for _, a in args:
                if groups.get(a) == group:
                    bent |= curved.get(a, 0)
            if bent:
                curved[node] = bent
            ent: dict[fx.Node, int] = {}
            for _, a in args:
                inner = inputs.get(a) if groups.get(a) == group else None
                if inner is None:
                    inner = {base.get(a, a): masks[a]}
                    if not masks[a] & tangents:
                        _report(smooth, masks[a], group[0])
                for key, bits in inner.items():
                    ent[key] = ent.get(key, 0) | bits
            inputs[node] = ent
            if name not in _ADDITIVE:
                _report(products, _twice(list(ent.values())), f"{group[0]} backward")
            continue
        if name in _ADDITIVE:
            continue
        if name in ("pow", "float_power"):
            exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
            if isinstance(exponent, fx.Node) or exponent not in (0, 1):
                _report(products, mask, name)
            continue
        if name in ("square", "reciprocal"):
            _report(products, mask, name)
            continue
        if name in ("div", "true_divide") and len(node.args) > 1:
            divisor = node.args[1]
            if isinstance(divisor, fx.Node):
                _report(products, masks.get(divisor, 0), name)
        product = _PRODUCT_ARGS.get(name)
        operands = [masks[a] for i, a in args if product is None or i in product]
        _report(products, _twice(operands), name)
    return BackwardReads(
        {names[bit]: op for bit, op in products.items()},
        {names[bit]: op for bit, op in smooth.items()},
        {names[bit]: op for bit, op in recomputed.items()},
    )


def _report(found: dict[int, str], mask: int, op: str) -> None:
    while mask:
        low = mask & -mask
        found.setdefault(low.bit_length() - 1, op)
        mask ^= low
