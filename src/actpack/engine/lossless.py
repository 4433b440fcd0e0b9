"""The lossless engine's saves (``"none"``): kept as they are, counted in batches.

Under a lossless strategy without op names every non-bool save is kept, so
the pack hook's only work besides autograd's in-place check is the byte
accounting.  Counting a save between the forward's ops costs several times
what the same Python costs in a loop, so saves wait in their forward's
list and are counted together (``benchmarks/bench_host.py``, the
"accounting skipped" row, measures what the count still costs).

The forward's state (``actpack.engine.eager._Forward``) and its engine are
duck-typed here: this module is imported by the engine, not the reverse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from actpack.engine.saved import Leaf, _modified
from actpack.engine.savefacts import CAST_NODES
from actpack.engine.untraced import eager_only

#: Saves of a lossless forward waiting to be counted: bounds how long a save
#: freed during the forward (a branch whose result is dropped) outlives it.
UNACCOUNTED_MAX = 64

#: The reason of every save a lossless strategy keeps.
EXACT_STRATEGY = "exact strategy"
_PARAMETER = nn.Parameter
_BOOL = torch.bool
_new_object = object.__new__


class Uncounted:
    """The pack hook of a lossless forward without op names (``"none"``),
    bound to the forward's state (``functools.partial(Uncounted, st)``),
    and what it returns for a save kept as it is (as
    :class:`~actpack.engine.saved.Held`: a detached alias and its version).

    Every non-bool tensor is kept, so the decision reduces to accounting,
    which waits (:func:`count_waiting`) until the forward exits, its
    backward starts (the first restore), ``stats`` is read, or
    ``UNACCOUNTED_MAX`` saves wait: counted in one loop, a save costs less
    than between a forward's ops.  Until then the list holds the saves,
    which autograd holds anyway, so no counted address can be reused.  The
    class is the hook (its ``__new__`` returns leaves as
    :class:`~actpack.engine.saved.Leaf`, and bool masks' codes, instead of
    an instance): one Python call per save, not two
    (``benchmarks/bench_host.py``).
    """

    __slots__ = ("data", "version", "forward", "__weakref__")

    @eager_only
    def __new__(cls, st: Any, t: Tensor) -> Any:
        if t.requires_grad:
            if t.is_leaf:
                return Leaf(t)  # parameters exist anyway, and hold no graph: no cycle
        elif t.dtype is _BOOL:
            return st.engine._pack_in(st, t)  # bit-packed: lossless, a quarter of the bytes
        elif type(t) is _PARAMETER:
            return Leaf(t)
        self = _new_object(cls)
        self.data = t.detach()
        self.version = t._version
        self.forward = st.ref  # weak: a state never kept alive by autograd's graph
        waiting = st.unaccounted
        waiting.append((t, self))
        if len(waiting) >= UNACCOUNTED_MAX:
            count_waiting(st.engine, st)
        return self

    def restore(self) -> Tensor:
        st = self.forward()
        if st is not None and st.unaccounted:
            count_waiting(st.engine, st)
        if self.data._version != self.version:
            raise _modified(self.data, self.version)
        return self.data


def count_waiting(engine: Any, st: Any, final: bool = False) -> None:
    """Count the bytes of the saves :class:`Uncounted` kept.

    The forward's thread appends while another may count (a ``stats``
    read, a backward in another thread): the batch is taken, under the
    engine's lock, as a slice of the list that appends never replace.
    Written flat (it runs once per save, and each attribute read or call
    on a tensor costs ~0.2 us between a forward's ops): activations are
    told from the model's weights by their autograd node's type; the
    slower tests run for views, casts and the model's listed weights
    only (a save without history has no op arguments here, so
    ``frozen_weight`` cannot match it).  Storages are read from the
    hook's alias, which holds what autograd holds even if the tensor's
    ``.data`` was swapped since; a storage resized in place before the
    count (FSDP's reshard frees gathered weights after the forward)
    counts at its size then.  Every save of a batch is alive (the
    list holds it), so the storage sets need no weak reference of a
    storage the batch counts unless a later batch of this forward must
    tell it from a new one at the same address (``final``: none)."""
    with engine._lock:
        pending = st.unaccounted
        n = len(pending)
        saves = pending[:n]
        del pending[:n]
        stats = st.stats
        activations = []
        others = []  # the model's weights, and saves to look at one by one
        for t, saved in saves:
            node = t.grad_fn  # (the hook returns leaves that need grad)
            if node is None:
                if st.weights:  # no history: a weight if the model lists its storage
                    others.append((t, saved))
                    continue
            elif type(node).__name__ in CAST_NODES:
                # A view's base, or a cast: a weight's, or an activation's.
                base = t._base
                if base is None or base.is_leaf or type(base.grad_fn).__name__ in CAST_NODES:
                    others.append((t, saved))
                    continue
            activations.append(saved.data)
        for t, saved in others:
            try:
                kind = engine._leaf(t, (), st)
                if kind is None:
                    activations.append(saved.data)
                    continue
                engine._count_leaf(saved.data, kind, st, final)
            except RuntimeError:
                engine._uninspectable(t, st)
        if not activations:
            return
        total, elements, failed = st.held.add_all(activations, final)
        for data in failed:
            engine._uninspectable(data, st)
        passthrough = stats.passthrough
        passthrough[EXACT_STRATEGY] = passthrough.get(EXACT_STRATEGY, 0) + total
        stats.tensors += len(activations) - len(failed)
        module = engine._modules.current if engine._modules is not None else None
        stats.add(module, None, total, total, elements)
