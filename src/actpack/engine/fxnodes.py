"""Reading AOTAutograd's FX graphs: op names and the ops that only move values.

Shared by :mod:`actpack.engine.graphfacts` (what a graph says about one
saved tensor) and :mod:`actpack.engine.graphreads` (how a backward graph
reads its saves).
"""

from __future__ import annotations

from torch import fx

# Ops that move or relabel values without changing them: a save seen through
# them is the same data.
THROUGH = frozenset(
    {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "clone",
     "squeeze", "unsqueeze", "alias", "convert_element_type", "_to_copy", "contiguous"}
)  # fmt: skip


# Ops whose output holds its input's values unchanged (no cast, no arithmetic).
SAME_VALUES = frozenset(
    {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "clone",
     "squeeze", "unsqueeze", "alias", "contiguous", "detach"}
)  # fmt: skip


def op_name(node: fx.Node) -> str:
    """``"addmm"`` for ``aten.addmm.default``; the node's op otherwise (placeholder, output)."""
    if node.op != "call_function":
        return node.op
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def is_view_of(
    arg: object, node: fx.Node, depth: int = 4, through: frozenset[str] = THROUGH
) -> bool:
    """Whether ``arg`` is ``node`` or reached from it through the ops in
    ``through`` (view-like ops by default) in at most ``depth`` steps."""
    while isinstance(arg, fx.Node) and depth >= 0:
        if arg is node:
            return True
        if op_name(arg) not in through or not arg.args:
            return False
        arg, depth = arg.args[0], depth - 1
    return False
