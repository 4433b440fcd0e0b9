"""When one code of a saved tensor would not serve a second save of it.

The eager engine codes a tensor once and hands that code to every op that
saves it (``Engine._carry_out``'s table).  Each op's backward then reads an
unbiased code of the tensor, and a gradient that reads it once, linearly, is
unbiased.  Two cases break that, both silently (found by a break-it pass on
HF Trainer and Lightning losses, 2026-11-30):

* **Self-products.**  Op B saves ``t`` again while another of its operands
  was computed from ``t`` by an op A that also saved it.  B's backward sends
  a gradient built from its read of ``t`` back through A, whose backward
  multiplies it by A's read of ``t``: one term holds the product of two reads
  of one code, whose mean is not the product of the means (the bias grows
  with the code's variance).  HF's Python RMSNorm (Llama, Mistral, Qwen2,
  T5): ``x * rsqrt(x.pow(2).mean(-1) + eps)``; ``(h @ W) * h``; ``h * h * h``;
  ``nn.Bilinear(h, h)``, whose weight gradient multiplies its two reads.
  Independent codes for A and B make the product's mean the product of the
  means: B gets a code of its own.  So does an op reading ``t`` itself to
  form the gradient sent back to ``t`` (``t`` in two operand slots, or
  squared): the producer's backward (``exp``, ``tanh`` reading their
  output) multiplies that gradient by its own read (``exp(h) ** 2`` inside
  ``Normal(mu, exp(h)).log_prob``; a quadratic form as an ``einsum``).
* **log_softmax's output** is coded as the code of its probabilities (its
  backward reads ``exp(output)``); an op reading the log-probabilities
  themselves (an entropy term ``p * logp``, a soft-target cross-entropy whose
  target has grad) needs a code of the values: only log_softmax's own save
  gets the code of ``exp``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

#: Nodes of an operand's history searched for the saved tensor's producer;
#: beyond it, the operand is taken to depend on it (a code of its own costs
#: memory, a shared one could cost a bias).
HISTORY_BUDGET = 256

_LOG_SOFTMAX_NODE = "LogSoftmaxBackward0"


def operand_tensors(args: tuple) -> list[Tensor]:
    """The tensors among ``args`` and inside its lists and tuples (one level)."""
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [b for b in a if isinstance(b, Tensor)]
    return out


def same_memory(a: Tensor, t: Tensor) -> bool:
    """Whether ``a`` and ``t`` share a storage (True when either has none to read)."""
    try:
        return a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    except RuntimeError:  # no storage of its own (a wrapper subclass): cannot tell
        return True


def log_softmax_output(t: Tensor, args: tuple) -> bool:
    """Whether saving ``t`` is log_softmax's save of its own output: ``t``
    was made by log_softmax and is not an argument of the op saving it (an
    op reading the log-probabilities takes them as an argument; a composite
    such as ``cross_entropy`` computes them inside, and saves them first for
    log_softmax's backward, which the caller tells by the order)."""
    node = t.grad_fn
    if node is None or type(node).__name__ != _LOG_SOFTMAX_NODE:
        return False
    return not any(same_memory(a, t) for a in operand_tensors(args))


#: Ops that save their input only for its shape (nll_loss's backward
#: scatters into zeros of the input's size and never reads its values).
_SHAPE_ONLY_OPS = frozenset({"nll_loss", "nll_loss2d", "nll_loss_nd", "nll_loss_forward"})


def shape_only(op: str | None, args: tuple, kwargs: dict) -> bool:
    """Whether a save by ``op`` of a tensor already coded reads none of its
    values, so that any code of it serves: nll_loss's save of its input
    (alone, or inside ``cross_entropy`` with class-index targets, where it
    follows log_softmax's own save of the same tensor)."""
    if op in _SHAPE_ONLY_OPS:
        return True
    if op != "cross_entropy":
        return False
    target = args[1] if len(args) > 1 else kwargs.get("target")
    return isinstance(target, Tensor) and not target.is_floating_point()


def reads_twice(t: Tensor, op: str | None, args: tuple, kwargs: dict) -> bool:
    """Whether the op saving ``t`` again (its code already made for an
    earlier save) could read it in a product with the earlier save's read:
    another of its tensor arguments (positional or keyword) was computed
    from ``t`` (within :data:`HISTORY_BUDGET` nodes of its autograd history;
    beyond it, assumed so); or its own backward reads ``t`` to form the
    gradient flowing back to ``t``, which the earlier save's backward (the
    producer's, as ``exp`` reading its output) may multiply by its read:
    ``t`` in two operand slots (``e * e``, ``einsum('bi,ij,bj', h, W, h)``,
    ``bilinear(h, h)``) or squared (``e.pow(2)``, ``Normal(mu,
    std).log_prob`` with ``std = exp(h)``)."""
    tensors = operand_tensors((*args, *kwargs.values()))
    # Arguments over t's own memory (t, the base t is a view of, other views
    # of it) are t itself, not computed from it.
    itself = [same_memory(a, t) for a in tensors]
    if op == "square" or sum(itself) > 1:
        return True
    targets = [n for n in (t.grad_fn, t._base.grad_fn if t._base is not None else None) if n]
    if not targets:
        return False
    starts = [a.grad_fn for a, same in zip(tensors, itself) if not same and a.grad_fn is not None]
    if not starts:
        return False
    return _reaches(starts, targets)


def _reaches(starts: list[Any], targets: list[Any]) -> bool:
    # Keyed by id, with each node object held in ``seen``: a Python node
    # object that died could hand its id to another while the walk runs.
    wanted = {id(n): n for n in targets}
    seen: dict[int, Any] = {}
    stack = list(starts)
    while stack:
        node = stack.pop()
        key = id(node)
        if key in wanted:
            return True
        if key in seen:
            continue
        seen[key] = node
        if len(seen) > HISTORY_BUDGET:
            return True
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False
