"""What the eager engine hands autograd in place of a saved tensor.

Returning the tensor itself from a pack hook would keep an op's output alive
together with its ``grad_fn`` (a reference cycle through C++ that Python's
garbage collector cannot see: graphs that never run backward would never be
freed), and autograd does not check versions of tensors that went through
hooks.  So a tensor kept as it is travels as ``t.detach()`` (same storage,
same version counter, no ``grad_fn``) with the version it had when saved,
and every restore checks it, as autograd's own ``SavedVariable`` does.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from actpack.codecs.encoded import Encoded
from actpack.engine.untraced import eager_only


def _dense_order(t: Tensor) -> bool:
    """Whether ``t`` covers its elements without overlap (strides of a permutation)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _same_strides(t: Tensor, stride: tuple[int, ...]) -> bool:
    return all(n == 1 or a == b for n, a, b in zip(t.shape, t.stride(), stride))


def _modified(t: Tensor, version: int) -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
        f"expected version {version} instead (actpack: the tensor was changed in place "
        "after autograd saved it; clone it before the in-place op)."
    )


def _check_grad_mode(requires_grad: bool) -> None:
    # Inside backward (a graph task runs) with grad mode on means
    # create_graph=True: higher-order terms through a lossy code would be
    # silently missing.  Outside backward (a debugger reading
    # grad_fn._saved_self) a snapshot of the values is fine.
    if requires_grad and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            "actpack: a compressed saved tensor was unpacked with grad mode on "
            "(backward(create_graph=True) or double backward). Higher-order gradients "
            "through lossy codes would silently miss terms; run that part without "
            "actpack.compress or with strategy='none'."
        )


class Held:
    """A saved tensor kept as it is (its detached alias and its version)."""

    __slots__ = ("data", "version", "__weakref__")

    def __init__(self, t: Tensor) -> None:
        self.data = t.detach()
        self.version = t._version

    def restore(self) -> Tensor:
        if self.data._version != self.version:
            raise _modified(self.data, self.version)
        return self.data


class Leaf(Held):
    """A leaf kept as it is (a parameter, an input needing grad): the tensor
    itself, which holds no graph to cycle through, and its version.

    Autograd checks a saved leaf's version like any other saved tensor's (an
    optimizer step between forward and backward is refused), but not when
    the save went through hooks: returned bare, a leaf edited in place
    would reach backward with its new values."""

    __slots__ = ()

    def __init__(self, t: Tensor) -> None:
        self.data = t
        self.version = t._version


class Saved:
    """A saved tensor in an encoded form, restored with its original strides."""

    __slots__ = (
        "encoded", "shape", "stride", "requires_grad", "version", "source", "__weakref__"
    )  # fmt: skip

    def __init__(self, encoded: Encoded, t: Tensor, requires_grad: bool) -> None:
        self.encoded = encoded
        self.shape = tuple(t.shape)
        # Restored tensors keep the original strides: some backward kernels
        # (oneDNN's RNN) read their inputs as if they had them.
        self.stride = t.stride() if _dense_order(t) else None
        self.requires_grad = requires_grad
        # The values were captured at save time, so a later in-place change
        # cannot corrupt the gradient; it is still refused, as autograd
        # refuses it, while the changed tensor is alive to tell.  A view
        # shares its base's version counter, and the base is what is alive to
        # tell: views ops make of their inputs (mm's transpose, a slice) die
        # with the forward, while their base is edited in place after it.
        self.version = t._version
        self.source = weakref.ref(t if t._base is None else t._base)

    def restore(self) -> Tensor:
        _check_grad_mode(self.requires_grad)
        src = self.source()
        if src is not None and src._version != self.version:
            raise _modified(src, self.version)
        x = self.encoded.decode()
        if self.stride is not None and not _same_strides(x, self.stride):
            x = torch.empty_strided(x.shape, self.stride, dtype=x.dtype, device=x.device).copy_(x)
        return x


class Reshaped:
    """Another view (same contiguous memory, another shape) of a saved tensor."""

    __slots__ = ("saved", "shape", "__weakref__")

    def __init__(self, saved: Saved, shape: tuple[int, ...]) -> None:
        self.saved, self.shape = saved, shape

    def restore(self) -> Tensor:
        return self.saved.restore().reshape(self.shape)


@eager_only
def unpack(obj: object) -> Tensor:
    """The unpack hook: a tensor from what :func:`pack` returned (a tensor
    only from code that must leave autograd's checks to autograd: compiled
    graphs' exact saves)."""
    if isinstance(obj, Tensor):
        return obj
    return obj.restore()
