"""Which tensors of an eager forward hold a mask's extreme fill value.

A group code spends its levels on the range of its group.  A masked value
far outside the data (``-1e8``, ``-1e9``, ``finfo.min``, ``-inf``) stretches
that range so far that every other value of its group decodes to the fill's
scale: the code stays unbiased in exact arithmetic, but its variance is
~fill^2 and float rounding at that scale adds a bias.  Where such a tensor is
read as values in backward the gradient is garbage, silently: a masked
policy's entropy, ``Categorical(logits=where(mask, logits, -1e8)).entropy()``
(``p_log_p = logits * probs`` saves the masked log-probabilities), gave a
mean of 16 draws 100% off the exact gradient under ``actnn`` (109x under
``int8``) before this rule.

Eager autograd does not record a fill's value, so the op tracker
(:class:`~actpack.engine.tracking.OpTracker`, which sees every torch call of
a lossy forward) tags the outputs of ops writing an extreme constant
(``masked_fill``, ``where``, ``full``, ``fill_``, ``x[m] = v``, a product
with an extreme scalar, an extreme 0-dim tensor) and then every floating
output of an op that reads a tagged tensor, except ops whose output is
bounded whatever their input (softmax, sigmoid, tanh, attention), which is
where an attention mask ends.  A save of a tagged tensor, or of an
intermediate of a composite op reading one, stays exact (``FILL_REASON``);
log_softmax's own save of its output is coded through ``exp`` and is safe.
The tags live in the forward's tracker: nothing is shared between forwards.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from actpack.engine.rereads import operand_tensors, same_memory

#: A fill at least this large in magnitude (or not finite) is a mask value,
#: not an activation: 2-bit codes of a group holding it are useless at the
#: data's scale (one step is a third of the fill).  fp16's finfo.min
#: (-65504) and the -1e4 of older attention masks are above it.
EXTREME_FILL = 1e3

#: Why such a save stays exact (the compiled engine's reason for the same).
FILL_REASON = "holds an extreme fill (a group code would ruin the rest of its group)"

# Ops writing a constant into (part of) their output, and where the
# constant is: positional indices, keywords, and whether a 0-dim tensor
# counts (for products, only a Python scalar is looked at: ``mul`` is too
# common a call to read its tensor operands).
_FILL_ARGS: dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]] = {
    "masked_fill": ((2,), ("value",), True),
    "masked_fill_": ((2,), ("value",), True),
    "where": ((1, 2), ("input", "other", "self"), True),
    "full": ((1,), ("fill_value",), True),
    "full_like": ((1,), ("fill_value",), True),
    "new_full": ((2,), ("fill_value",), True),
    "fill_": ((1,), ("value",), True),
    "fill": ((1,), ("value",), True),
    "__setitem__": ((2,), (), True),
    "index_fill": ((3,), ("value",), True),
    "index_fill_": ((3,), ("value",), True),
    "nan_to_num": ((1, 2, 3), ("nan", "posinf", "neginf"), False),
    "nan_to_num_": ((1, 2, 3), ("nan", "posinf", "neginf"), False),
    # A product with an extreme scalar: ``(1 - mask) * finfo.min``.
    "mul": ((0, 1), ("other",), False),
    "mul_": ((1,), ("other",), False),
    "multiply": ((0, 1), ("other",), False),
    "__mul__": ((1,), (), False),
    "__rmul__": ((1,), (), False),
    "__imul__": ((1,), (), False),
    # 0-dim tensors made from a scalar: ``torch.tensor(-1e8)`` in a ``where``.
    "tensor": ((0,), ("data",), False),
    "as_tensor": ((0,), ("data",), False),
    "scalar_tensor": ((0,), ("s",), False),
}

#: Products with a scalar (its place: the second operand, positional).
SCALINGS = frozenset({"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"})

#: The other calls that may write an extreme fill.  The tracker calls
#: :meth:`FillTags.after` for these, for a product whose second operand is
#: an extreme Python number, and for every call once a tensor of the
#: forward is tagged; before that, a product costs it one comparison.
FILL_OPS = frozenset(_FILL_ARGS) - SCALINGS

# Ops whose output is bounded whatever values their input holds: an
# attention mask's fill ends there.
_BOUNDED = frozenset(
    {"softmax", "_softmax", "sigmoid", "sigmoid_", "tanh", "tanh_",
     "scaled_dot_product_attention", "multi_head_attention_forward", "_safe_softmax"}
)  # fmt: skip


def _extreme(value: Any, tensors: bool) -> bool:
    """Whether ``value`` is an extreme fill: a Python number, or (with
    ``tensors``) a floating 0-dim tensor; one on another device than the
    CPU is taken as one without reading it (reading would synchronise)."""
    kind = type(value)
    if kind is float or kind is int:
        return not abs(value) < EXTREME_FILL  # NaN too
    if tensors and isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        return value.device.type != "cpu" or not abs(value.item()) < EXTREME_FILL
    return False


def _writes(spec: tuple, args: tuple, kwargs: dict) -> bool:
    positions, keywords, tensors = spec
    n = len(args)
    for i in positions:
        if i < n and _extreme(args[i], tensors):
            return True
    return bool(kwargs) and any(_extreme(kwargs.get(k), tensors) for k in keywords)


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, Tensor)]
    return []


class FillTags:
    """The tensors of one forward holding an extreme fill, by identity.

    Held weakly (a tag never keeps a tensor alive); ``len`` is the number of
    tags, so an empty set costs the tracker one truth test per call."""

    __slots__ = ("_tags",)

    def __init__(self) -> None:
        self._tags: dict[int, weakref.ref] = {}

    def __len__(self) -> int:
        return len(self._tags)

    def tagged(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        ref = self._tags.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, t: Tensor) -> None:
        if t.is_floating_point():
            key = id(t)
            self._tags[key] = weakref.ref(t, lambda _r, k=key, d=self._tags: d.pop(k, None))

    def _reads_tag(self, args: tuple, kwargs: dict) -> bool:
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                if self.tagged(a):
                    return True
            elif isinstance(a, (list, tuple)):
                if any(self.tagged(b) for b in a):
                    return True
        return False

    def after(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Tag what the torch call ``name(*args, **kwargs)`` returned (or, for
        an in-place op, its first argument) if it holds an extreme fill."""
        spec = _FILL_ARGS.get(name)
        if not (spec is not None and _writes(spec, args, kwargs)) and not (
            self._tags and name not in _BOUNDED and self._reads_tag(args, kwargs)
        ):
            return
        targets = _outputs(out)
        if (not targets or name == "__setitem__") and args and isinstance(args[0], Tensor):
            targets = [args[0]]  # in place, returning nothing (x[m] = v)
        for t in targets:
            self._tag(t)

    def holds(self, t: Tensor, args: tuple, kwargs: dict, op: str | None) -> bool:
        """Whether a save of ``t`` by ``op`` may hold an extreme fill: ``t``
        (or the tensor it is a view of) is tagged, or ``t`` is an
        intermediate of a composite op (not one of its arguments) reading a
        tagged tensor, whose output is not bounded."""
        if not self._tags:
            return False
        if self.tagged(t) or (t._base is not None and self.tagged(t._base)):
            return True
        if op in _BOUNDED or not self._reads_tag(args, kwargs):
            return False
        # An untagged argument (the probabilities beside masked
        # log-probabilities) holds its own values: only an intermediate of
        # the op can have been computed from the tagged one.
        return not any(same_memory(a, t) for a in operand_tensors((*args, *kwargs.values())))
