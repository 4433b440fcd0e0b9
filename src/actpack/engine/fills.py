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
(``masked_fill``, ``where``, ``full``, ``fill_``, ``x[m] = v``, ``F.pad``,
``scatter``, ``index_put_``, ``fill_diagonal_``, ``pad_sequence``, a sum or
product with an extreme scalar, an extreme one-element tensor), the log of a
constant (RLlib's action mask ``clamp(log(mask), min=FLOAT_MIN)``: ``log(0)``
is ``-inf``, a fill made by no fill op) and then every floating output of an
op that reads a tagged tensor, except ops whose output is bounded whatever
their input (softmax, sigmoid, tanh, sin, attention), which is where an
attention mask ends.  An op writing in place tags the storage it wrote, so
the other tensors over that memory are tagged too (``l[:, :k].fill_(-1e9)``
tags ``l``; so does ``l.data[m] = -1e9``).  A save of a tagged tensor, or of
an intermediate of a composite op reading one, stays exact (``FILL_REASON``);
log_softmax's own save of its output is coded through ``exp`` and is safe.
The tags live in the forward's tracker: nothing is shared between forwards.

Not seen: a fill made before the engine is entered (a mask tensor built
outside ``compress`` other than a one-element constant) and non-finite
values that no tagged op made (``exp`` overflowing): both read values, which
the tracker never does for tensors of more than one element.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from torch import Tensor

from actpack.engine.rereads import operand_tensors, same_memory
from actpack.engine.untraced import eager_only

#: A fill at least this large in magnitude (or not finite) is a mask value,
#: not an activation: 2-bit codes of a group holding it are useless at the
#: data's scale (one step is a third of the fill).  fp16's finfo.min
#: (-65504) and the -1e4 of older attention masks are above it.
EXTREME_FILL = 1e3

#: Why such a save stays exact (the compiled engine's reason for the same).
FILL_REASON = "holds an extreme fill (a group code would ruin the rest of its group)"

# Ops writing a constant into (part of) their output, and where the
# constant is: positional indices, keywords, and whether a one-element
# tensor counts (for sums and products, only a Python scalar is looked at:
# ``mul`` and ``add`` are too common calls to read their tensor operands).
_FILL_ARGS: dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]] = {
    "masked_fill": ((2,), ("value",), True),
    "masked_fill_": ((2,), ("value",), True),
    "where": ((1, 2), ("input", "other", "self"), True),
    "full": ((1,), ("fill_value",), True),
    "full_like": ((1,), ("fill_value",), True),
    "new_full": ((2,), ("fill_value",), True),
    "fill_": ((1,), ("value",), True),
    "fill": ((1,), ("value",), True),
    "fill_diagonal_": ((1,), ("fill_value",), False),
    "__setitem__": ((2,), (), True),
    "index_fill": ((3,), ("value",), True),
    "index_fill_": ((3,), ("value",), True),
    "index_put": ((2,), ("values",), True),
    "index_put_": ((2,), ("values",), True),
    "scatter": ((3,), ("value", "src"), True),
    "scatter_": ((3,), ("value", "src"), True),
    # Padding with a mask value: ``F.pad(logits, (0, n), value=-1e9)``.
    "pad": ((3,), ("value",), True),
    "constant_pad_nd": ((2,), ("value",), True),
    "pad_sequence": ((2,), ("padding_value",), False),
    "nan_to_num": ((1, 2, 3), ("nan", "posinf", "neginf"), False),
    "nan_to_num_": ((1, 2, 3), ("nan", "posinf", "neginf"), False),
    # 0-dim tensors made from a scalar: ``torch.tensor(-1e8)`` in a ``where``.
    "tensor": ((0,), ("data",), False),
    "as_tensor": ((0,), ("data",), False),
    "scalar_tensor": ((0,), ("s",), False),
    "new_tensor": ((1,), ("data",), False),
}

# Sums and products with an extreme scalar (its place: the second operand,
# positional, or ``alpha``): ``(1 - mask) * finfo.min``,
# ``zeros_like(x) - 1e9``, ``x.add(1 - mask, alpha=-1e9)``.
_SCALAR_ARGS: dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]] = {
    name: ((0, 1), ("other", "alpha"), False)
    for name in ("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "add", "add_",
                 "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "__sub__",
                 "__rsub__", "__isub__", "rsub")
}  # fmt: skip
_FILL_ARGS.update(_SCALAR_ARGS)

_PRODUCTS = frozenset({"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"})

#: Sums and products with a scalar: the tracker looks at their second
#: operand (and ``alpha``) itself before calling :meth:`FillTags.after`.
SCALARS = frozenset(_SCALAR_ARGS)

# Logarithms: of a constant (no autograd history) they may hold ``-inf``
# (``log(mask)``), a fill no fill op wrote, told by reading the output (on an
# accelerator, a synchronisation: such calls are rare, once a forward for an
# action mask or log-mel features).  Of an activation, ``log(0)`` already
# makes the exact gradient infinite.
_LOGS = frozenset({"log", "log2", "log10", "log_", "log2_", "log10_"})

#: The other calls that may write an extreme fill.  The tracker calls
#: :meth:`FillTags.after` for these, for a sum or product whose second
#: operand (or ``alpha``) is an extreme Python number, and for every call
#: once a tensor of the forward is tagged; before that, a sum or product
#: costs it one comparison.
FILL_OPS = (frozenset(_FILL_ARGS) - SCALARS) | _LOGS

# Ops whose output is bounded whatever values their input holds: an
# attention mask's fill ends there.
_BOUNDED = frozenset(
    {"softmax", "_softmax", "softmin", "sigmoid", "sigmoid_", "tanh", "tanh_", "sin", "sin_",
     "cos", "cos_", "erf", "erf_", "atan", "softsign", "hardtanh", "hardtanh_", "hardsigmoid",
     "relu6", "scaled_dot_product_attention", "multi_head_attention_forward", "_safe_softmax"}
)  # fmt: skip


def _extreme(value: Any, tensors: bool) -> bool:
    """Whether ``value`` is an extreme fill: a Python number, or (with
    ``tensors``) a floating one-element tensor; one on another device than
    the CPU is taken as one without reading it (reading would synchronise)."""
    kind = type(value)
    if kind is float or kind is int:
        return not abs(value) < EXTREME_FILL  # NaN too
    if tensors and isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.device.type != "cpu" or not abs(value.item()) < EXTREME_FILL
    return False


def scalar_fill(args: tuple, kwargs: dict) -> bool:
    """Whether a sum or product (:data:`SCALARS`) has an extreme Python
    number as its second operand or its ``alpha``: the tracker's check."""
    if len(args) > 1 and _extreme(args[1], False):
        return True
    return bool(kwargs) and _extreme(kwargs.get("alpha"), False)


def _writes(spec: tuple, args: tuple, kwargs: dict) -> bool:
    positions, keywords, tensors = spec
    n = len(args)
    for i in positions:
        if i < n and _extreme(args[i], tensors):
            return True
    return bool(kwargs) and any(_extreme(kwargs.get(k), tensors) for k in keywords)


def _log_of_constant(args: tuple, out: Any) -> bool:
    """Whether a logarithm of a constant returned a non-finite value."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.requires_grad or x.numel() <= 1:
        return False
    return isinstance(out, Tensor) and out.is_floating_point() and not bool(out.isfinite().all())


def _fills(name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether the call wrote an extreme fill into what it returned."""
    spec = _FILL_ARGS.get(name)
    if spec is not None:
        return _writes(spec, args, kwargs)
    return name in _LOGS and _log_of_constant(args, out)


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, Tensor)]
    return []


class FillTags:
    """The tensors of one forward holding an extreme fill, by identity, and
    the storages written in place with one (the other tensors over them).

    Held weakly (a tag never keeps a tensor or a storage alive), in one dict
    by ``id`` (a live tensor and a live storage never share one); ``len`` is
    the number of tags, so an empty set costs the tracker one truth test per
    call.  A storage is looked up only once one is tagged."""

    __slots__ = ("_storages", "_tags", "scaled")

    def __init__(self) -> None:
        self._tags: dict[int, weakref.ref] = {}
        self._storages = False  # whether a storage is tagged
        #: The first product of a tensor with autograd history by an extreme
        #: scalar, (op, scalar), or None.  Tagged like a mask's fill (a soft
        #: mask with grad, ``(1 - gate) * -1e9``, is one), though most such
        #: products are plain scalings; the engine warns once that they and
        #: what is computed from them stay exact.
        self.scaled: tuple[str, Any] | None = None

    def __len__(self) -> int:
        return len(self._tags)

    def tagged(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        ref = self._tags.get(id(t))
        if ref is not None and ref() is t:
            return True
        if not self._storages:
            return False
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage of its own (a wrapper subclass)
            return False
        ref = self._tags.get(id(storage))
        return ref is not None and ref() is storage

    def _add(self, obj: Any) -> None:
        key = id(obj)
        self._tags[key] = weakref.ref(obj, functools.partial(_untag, self._tags, key))

    def _tag(self, t: Tensor, in_place: bool) -> None:
        if not t.is_floating_point():
            return
        self._add(t)
        if in_place:
            try:
                self._add(t.untyped_storage())
            except (RuntimeError, NotImplementedError):
                return
            self._storages = True

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
        an in-place op, its first argument and its storage) if it holds an
        extreme fill."""
        if _fills(name, args, kwargs, out):
            if name in _PRODUCTS and self.scaled is None:
                first = args[0] if args else None
                if isinstance(first, Tensor) and first.requires_grad:
                    value = args[1] if len(args) > 1 else kwargs.get("other")
                    self.scaled = (name, value)
        elif not (self and name not in _BOUNDED and self._reads_tag(args, kwargs)):
            return
        targets = _outputs(out)
        first = args[0] if args else None
        if (not targets or name == "__setitem__") and isinstance(first, Tensor):
            targets = [first]  # in place, returning nothing (x[m] = v)
        written = kwargs.get("out") if kwargs else None
        for t in targets:
            # In place (the op returns its first argument, or writes ``out``):
            # views and aliases of that memory made before hold the fill too.
            self._tag(t, t is first or t is written)

    def holds(self, t: Tensor, args: tuple, kwargs: dict, op: str | None) -> bool:
        """Whether a save of ``t`` by ``op`` may hold an extreme fill: ``t``
        (or the tensor it is a view of, or its memory) is tagged, or ``t`` is
        an intermediate of a composite op (not one of its arguments) reading
        a tagged tensor, whose output is not bounded."""
        if not self:
            return False
        if self.tagged(t) or (t._base is not None and self.tagged(t._base)):
            return True
        if op in _BOUNDED or not self._reads_tag(args, kwargs):
            return False
        # An untagged argument (the probabilities beside masked
        # log-probabilities) holds its own values: only an intermediate of
        # the op can have been computed from the tagged one.
        return not any(same_memory(a, t) for a in operand_tensors((*args, *kwargs.values())))


@eager_only
def _untag(tags: dict, key: int, _ref: object) -> None:
    """Drop a tag (a weak reference's callback: the tagged object died).  A
    callback runs wherever the object dies, compiled code's eager parts
    included: marked so that Dynamo never compiles it."""
    tags.pop(key, None)
