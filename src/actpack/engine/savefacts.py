"""What the eager engine reads about a saved tensor besides the tensor itself.

A pack hook sees only the tensor; who saves it and why comes from elsewhere:
the torch function being called and its arguments (the op tracker), the
Python frame that called it (a custom ``autograd.Function``'s ``apply``, a
checkpoint's recomputation, ``nn.MultiheadAttention``'s locals) and the
autograd graph behind the tensor (a weight seen through views and casts).
These readers are pure functions of those; :mod:`actpack.engine.eager` turns
their answers into :class:`~actpack.policy.decide.Facts`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from actpack.policy.ops import (
    ATTENTION_LOGIT_OPS,
    ATTENTION_NODES,
    SMOOTH_COMPOSITES,
    attention_logit_args,
    attention_value_args,
)
from actpack.policy.rules import same_tensor

_STRIDED = torch.strided
# Autograd nodes a parameter passes through before it is saved as a cast
# (autocast's cached weight casts, their transposes and views).
CAST_NODES = frozenset(
    {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0",
     "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "AliasBackward0",
     "SliceBackward0", "SelectBackward0", "SqueezeBackward0", "SqueezeBackward1",
     "ReshapeAliasBackward0", "AsStridedBackward0", "SplitBackward0",
     "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0",
     "NarrowBackward0", "UnbindBackward0"}
)  # fmt: skip

# ``x ** n`` as torch functions name it.
POW_OPS = frozenset({"pow", "pow_", "__pow__", "__ipow__"})


def squares(op: str | None, args: tuple, kwargs: dict) -> bool:
    """Whether the op is ``pow(x, 2)`` (``x ** 2``, a Python-number exponent 2).

    Its backward, ``2 * x * grad``, reads ``x`` linearly, so an unbiased code
    of ``x`` gives an unbiased gradient: the policy treats it as ``square``
    (HF Llama's RMSNorm squares its input this way; the compile-native path
    reads ``aten.pow(x, 2)`` the same way).  Other exponents stay nonlinear.
    """
    if op not in POW_OPS:
        return False
    exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
    return type(exponent) in (int, float) and exponent == 2


_FUNCTION_FILE = ("autograd", "function.py")
_CHECKPOINT_FILE = ("utils", "checkpoint.py")
_CHECKPOINT_MODULE = "torch.utils.checkpoint"


def parameter_source(t: Tensor) -> str | None:
    """``"parameter view"`` or ``"parameter cast"`` if ``t`` is a weight seen
    through views and casts that require grad, else None.

    A view's ``_base`` is the tensor at the root of its chain of views, so a
    view is a parameter's view when its base is a leaf requiring grad, and
    otherwise whatever its base is (only a cast, ``ToCopyBackward0``, starts
    a new base); the autograd nodes are walked from there, which costs a
    tuple per node (``next_functions``) and runs for every saved view.  A
    view edited in place since is neither: the base's node is then
    ``CopySlices``.
    """
    base = t._base
    if base is not None:
        if base.grad_fn is None:
            return "parameter view" if base.requires_grad else None
        t = base
    node, depth, cast = t.grad_fn, 0, False
    while node is not None and depth < 6:
        name = type(node).__name__
        if name == "AccumulateGrad":
            return "parameter cast" if cast else "parameter view"
        if name not in CAST_NODES or len(node.next_functions) != 1:
            return None
        cast = cast or name == "ToCopyBackward0"
        node, depth = node.next_functions[0][0], depth + 1
    return None


def _in_file(filename: str, tail: tuple[str, str]) -> bool:
    return filename.endswith(tail[1]) and filename[: -len(tail[1]) - 1].endswith(tail[0])


def save_origin(frame: Any) -> str:
    """Who is saving, read from the Python frame that called into autograd.

    A custom ``autograd.Function`` saves from ``Function.apply`` (its class is
    that frame's ``cls``: AOTAutograd's ``CompiledFunction`` for compiled
    graphs).  ``torch.utils.checkpoint`` saves what it recomputes from in a
    way that depends on the torch version: reentrant checkpointing through
    ``CheckpointFunction.apply``; non-reentrant checkpointing through
    ``_NoopSaveInputs.apply`` (torch 2.11 and earlier), or from a frame of
    torch/utils/checkpoint.py itself (torch 2.13: ``_make_saved_tensor`` in
    ``save_inputs``).  So any ``autograd.Function`` defined in
    ``torch.utils.checkpoint`` counts as checkpointing, whatever its name; a
    save that neither reading recognises falls to ``"custom-function"`` or to
    an op without a name, both kept exact, never coded.
    Ops save from C++ called by any other frame.  One frame suffices, and
    the save path pays for no more.
    """
    code = frame.f_code
    filename = code.co_filename
    if code.co_name == "apply" and _in_file(filename, _FUNCTION_FILE):
        cls = frame.f_locals.get("cls")
        name = getattr(cls, "__name__", "")
        if name == "CheckpointFunction" or getattr(cls, "__module__", None) == _CHECKPOINT_MODULE:
            return "checkpoint"
        if name == "CompiledFunction" or getattr(cls, "__module__", "").startswith(
            "torch._functorch"
        ):
            return "compiled"
        return "custom-function"
    if _in_file(filename, _CHECKPOINT_FILE):
        return "checkpoint"
    return "op"


def composite(frame: Any) -> str | None:
    """The smooth activation (``policy.ops.SMOOTH_COMPOSITES``) whose module's
    code called the op, looking at most three frames up (the op tracker's own
    frame, the module's ``forward`` and a helper it calls); None if not one.
    Read only for saves of ops with a nonlinear backward, so the common save
    path pays nothing."""
    for _ in range(3):
        if frame is None:
            return None
        owner = frame.f_code.co_qualname.partition(".")[0]
        name = SMOOTH_COMPOSITES.get((frame.f_globals.get("__name__"), owner))
        if name is not None:
            return name
        frame = frame.f_back
    return None


_MHA = "multi_head_attention_forward"


def _mha_locals(frame: Any) -> dict[str, Any] | None:
    """``need_weights``, ``q``, ``k`` and ``v`` of the innermost running
    ``torch.nn.functional.multi_head_attention_forward`` at or above ``frame``,
    or None if there is none or they are not tensors (before the function
    assigns them, after it deletes them, or under another torch).

    The op tracker sees that Python function as one call (its ops run inside
    the tracker's own dispatch), so which of its saves are the heads' query
    and key is read from its frame: at the moment of a save its locals ``q``
    ``k`` and ``v`` are the tensors it is handing to attention.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name == _MHA and frame.f_globals.get("__name__") == "torch.nn.functional":
            snapshot = frame.f_locals
            found = {name: snapshot.get(name) for name in ("need_weights", "q", "k", "v")}
            if type(snapshot) is dict:
                # Python < 3.13 caches this copy on the running frame: it would
                # keep q, k, v alive past the function's own ``del q, k, v``.
                # (From 3.13 f_locals is a view that holds nothing.)
                snapshot.clear()
            if not isinstance(found["need_weights"], bool) or not all(
                isinstance(found[name], Tensor) for name in ("q", "k", "v")
            ):
                # Not yet assigned (the in-projection's save), deleted (the
                # out-projection's), or renamed by another torch: not known.
                return None
            return found
        frame = frame.f_back
    return None


def _attention_output(t: Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``t`` is the output a fused attention kernel saves for its
    backward: its ``grad_fn`` is that kernel's node, and its shape is the
    query's with the value's last dimension.  The kernel's logsumexp has no
    ``grad_fn`` (not differentiable), and the matmul + softmax path's saves
    belong to other nodes."""
    node = t.grad_fn
    if node is None or type(node).__name__ not in ATTENTION_NODES:
        return False
    if not args or not isinstance(args[0], Tensor):
        return True  # MHA's own arguments are not attention's: the node decides
    query = args[0]
    value = args[2] if len(args) > 2 and isinstance(args[2], Tensor) else kwargs.get("value")
    if not isinstance(value, Tensor):
        return True
    return t.shape == query.shape[:-1] + value.shape[-1:]


def attention_input(t: Tensor, op: str, args: tuple, kwargs: dict, frame: Any) -> str | None:
    """``"logits"`` if ``t`` is the query or key of fused attention
    (``Facts.logits``), ``"values"`` if its value or output (``Facts.values``),
    else None.

    Fused attention's backward (flash, memory-efficient, cuDNN) recomputes
    the probabilities as ``exp(q k^T * scale - logsumexp)`` with the
    logsumexp of the exact forward: a coded q or k puts its noise into an
    exponent, and rows no longer sum to 1 (relative error of the mean of 64
    draws 0.39 at logit std 1.3 and 5.2 at std 3 under 2-bit codes;
    non-finite under ActNN with sharper attention), far from a smooth op's
    second-order bias.  It then forms dS = P o (dO v^T - rowsum(dO o out)),
    whose two terms cancel where a row of P is nearly one-hot: codes of v
    and out drawn apart leave their noise there (dq 25x off in one draw).
    The policy stores all four in fp16, whose error has a worst-case bound
    (``Kind.HALF``); the logsumexp stays exact (op statistics).

    The value is matched as the op's argument and the output by its
    ``grad_fn`` (the fused kernel's node).  Where the op runs matmul +
    softmax instead (dropout on the CPU, head dims it has no kernel for),
    it saves reshaped views of q, k and v, which match no argument, and
    the probabilities: nothing is recomputed, and they keep the strategy's
    code.

    ``nn.MultiheadAttention`` runs attention inside one Python function
    (``frame``: the frame that called the op, or one below it): with
    ``need_weights=False`` it hands its locals ``q``, ``k`` and ``v`` to
    ``scaled_dot_product_attention``, and they are what is matched; its other
    saves are the projections' inputs and the output (found by its node),
    or, where the CPU runs attention as matmul + softmax (dropout), products
    and probabilities read linearly and smoothly.  With ``need_weights=True``
    it runs bmm + softmax + bmm, which save the probabilities and recompute
    nothing: q, k and v are coded like any matmul input.  Where its frame
    holds no tensors ``q``, ``k`` and ``v`` (before they exist, after it
    deletes them, or under another torch), every 4-D save inside it, the
    heads' q, k, v and output (or probabilities), takes the fp16 form,
    never a few-bit code (its other saves, the projections' inputs, are 2-D
    or 3-D).
    """
    if op in ATTENTION_LOGIT_OPS:
        qk, _ = attention_logit_args(op, args, kwargs)
        if any(same_tensor(a, t) for a in qk):
            return "logits"
        if any(same_tensor(a, t) for a in attention_value_args(op, args, kwargs)):
            return "values"
        return "values" if _attention_output(t, args, kwargs) else None
    if op != _MHA:
        return None
    found = _mha_locals(frame)
    if found is None:
        if _attention_output(t, (), {}):
            return "values"
        return "logits" if t.dim() == 4 else None
    if found["need_weights"]:
        return None
    if same_tensor(found["q"], t) or same_tensor(found["k"], t):
        return "logits"
    if same_tensor(found["v"], t) or _attention_output(t, (), {}):
        return "values"
    return None


def attention_mask_input(t: Tensor, op: str, args: tuple, kwargs: dict) -> str | None:
    """Why ``t`` stays exact if it is the additive mask (bias) of fused attention.

    The mask enters the same recomputed exponent as q and k: ALiBi or
    relative-position biases computed in the model would get a coded q's
    error, and a ``-inf`` mask coded by groups decodes NaN next to each
    ``-inf``.
    """
    if op in ATTENTION_LOGIT_OPS:
        _, mask = attention_logit_args(op, args, kwargs)
        if any(same_tensor(a, t) for a in mask):
            return "attention mask (softmax recomputed with it)"
    return None


def argument_role(t: Tensor, args: tuple, kwargs: dict) -> str:
    """``"input"`` if ``t`` (a save without history) is one of the op's tensor
    arguments or a view of one, else ``"internal"``.

    Views count: ``F.linear`` saves a 2-D view of a 3-D input batch, which
    is that batch's memory (a leaf input, kept and not counted as saved),
    not a tensor the op made.  So do tensors inside list or tuple arguments
    (``torch.einsum(eq, [x, w])``).  A history-free tensor an op makes itself
    (dropout's mask, noise) has storage of its own.
    """
    # One pass, one storage read per operand: it runs for every save without
    # history (an op's statistics too), before anything else is decided.
    storage = t.untyped_storage().data_ptr()
    device = t.device
    for arg in (*args, *kwargs.values()) if kwargs else args:
        for a in arg if isinstance(arg, (list, tuple)) else (arg,):
            if not isinstance(a, Tensor) or a.layout is not _STRIDED:
                continue
            try:
                shared = a.untyped_storage().data_ptr() == storage
            except RuntimeError:  # a wrapper subclass: no storage of its own
                continue
            if shared and a.device == device:
                return "input"
    return "internal"


def frozen_weight(t: Tensor, args: tuple) -> bool:
    """Whether ``t`` (no history) is a cast of one of the op's parameter args.

    A cast of a frozen weight (autocast, no grad) has no autograd link to
    the parameter; it is recognised by shape (or transposed shape) among the
    op's frozen parameter args (a weight that requires grad casts with
    history, so a save without history is none of its casts).  Where
    another tensor argument has that shape too (a square weight and a
    square input batch, whose cast is saved as well) the shape cannot tell
    them apart, and the values decide.
    """
    for a in args:
        # Parameter's isinstance goes through a Python metaclass: test it last.
        if not (
            isinstance(a, Tensor)
            and a.dtype != t.dtype
            and not a.requires_grad
            and isinstance(a, nn.Parameter)
            and a.dim() == t.dim()
        ):
            continue
        # The weight as saved: itself, or (2-D) its transpose, as matmuls save it.
        forms = [w for w in (a, a.t() if a.dim() == 2 else a) if w.shape == t.shape]
        if not forms:
            continue
        # (numel: an input the op reshapes before its cast is saved.)
        shared = any(
            b is not a
            and isinstance(b, Tensor)
            and (b.shape in (a.shape, t.shape) or b.numel() == t.numel())
            for b in args
        )
        if not shared:
            return True
        with torch.no_grad():
            if any(torch.equal(w.to(t.dtype), t) for w in forms):
                return True
    return False
