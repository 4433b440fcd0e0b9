"""Swap packed activations to host memory and bring them back for backward.

Used by :class:`~actpack.ActNNMixed` at levels L4 and L5 (``offload=True``):

* **Out** (forward, at each save): the packed codes, ranges and row indices
  are copied into pinned host memory on a side CUDA stream that first waits
  for the stream that produced them; ``record_stream`` keeps the device
  buffers from being reused before the copy has run, and the device copy is
  then dropped.  Nothing waits on the host.
* **Prefetch** (backward): when backward reaches the autograd node of an op
  that saved swapped tensors (a pre-hook), the next ``prefetch`` tensors in
  reverse save order are copied back on the side stream, overlapping the
  compute of the current node.  The last tensors of a forward are
  prefetched when it ends (backward needs them first).
* **Restore** (unpack): the compute stream waits for the prefetch event (or,
  for a tensor that was not prefetched, copies it itself after the
  device-to-host copy's event); the device buffers are marked as used by the
  compute stream so the caching allocator frees them only afterwards.

L5 adds a :class:`HostArena`: pinned memory in large chunks handed out in
aligned slices and recycled once every tensor cut from a chunk is dead, so
steady-state training allocates no pinned memory per tensor (and does not
fragment the pinned pool); see also ``expandable_segments`` in
:mod:`actpack.strategies.mixed`.

``simulate=True`` runs the same bookkeeping with plain CPU copies (no
streams); the tests use it to check the swap logic without a GPU.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostArena", "SwapItem", "SwapList", "SwapStore"]

_ALIGN = 64


class _Chunk:
    __slots__ = ("data", "offset", "live")

    def __init__(self, data: Tensor) -> None:
        self.data = data
        self.offset = 0
        self.live = 0


class HostArena:
    """Host memory (pinned unless ``pin=False``) cut into slices of big chunks.

    A chunk is reused once every slice cut from it belongs to a dead owner.
    Owners' deaths are queued by finalizers and applied on the next
    allocation, so a finalizer never runs arena code concurrently.
    """

    def __init__(self, pin: bool = True, chunk_bytes: int = 32 << 20) -> None:
        self.pin = pin
        self.chunk_bytes = int(chunk_bytes)
        self.chunks: list[_Chunk] = []
        self._current: _Chunk | None = None
        self._released: collections.deque = collections.deque()

    @property
    def reserved_bytes(self) -> int:
        return sum(c.data.numel() for c in self.chunks)

    def _drain(self) -> None:
        while self._released:
            chunk = self._released.popleft()
            chunk.live -= 1
            if chunk.live == 0:
                chunk.offset = 0

    def _take(self, size: int) -> _Chunk:
        for chunk in self.chunks:
            if chunk.live == 0 and chunk.data.numel() >= size:
                chunk.offset = 0
                return chunk
        data = torch.empty(max(self.chunk_bytes, size), dtype=torch.uint8, pin_memory=self.pin)
        chunk = _Chunk(data)
        self.chunks.append(chunk)
        return chunk

    def empty(self, shape: torch.Size, dtype: torch.dtype, owner: object) -> Tensor:
        """An uninitialised tensor living until ``owner`` is garbage collected."""
        self._drain()
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        chunk = self._current
        if chunk is None or chunk.offset + size > chunk.data.numel():
            chunk = self._take(size)
            self._current = chunk
        start = chunk.offset
        chunk.offset += size
        chunk.live += 1
        weakref.finalize(owner, self._released.append, chunk)
        return chunk.data[start : start + nbytes].view(dtype).view(shape)


class SwapItem:
    """The host copy of one encoded tensor's packed data (and its prefetch)."""

    __slots__ = ("store", "index", "host", "ready", "device_copy", "device_ready", "__weakref__")

    def __init__(self, store: SwapStore, index: int) -> None:
        self.store = store
        self.index = index
        self.host: list[Tensor] = []
        self.ready: Any = None  # event: the device-to-host copy has run
        self.device_copy: list[Tensor] | None = None
        self.device_ready: Any = None

    def fetch(self) -> list[Tensor]:
        """The packed tensors back on the device (for one decode)."""
        return self.store.fetch(self)


class SwapList:
    """The items swapped during one forward, in save order (weakly held)."""

    def __init__(self, store: SwapStore) -> None:
        self.store = store
        self.items: list[weakref.ref] = []

    def put(self, tensors: list[Tensor]) -> SwapItem:
        item = SwapItem(self.store, len(self.items))
        item.host, item.ready = self.store.to_host(tensors, item)
        self.items.append(weakref.ref(item))
        return item

    def _prefetch(self, indices: range) -> None:
        for j in indices:
            item = self.items[j]()
            if item is not None:
                self.store.prefetch(item)

    def prefetch_before(self, index: int, depth: int) -> None:
        """Bring back the ``depth`` items saved just before item ``index``."""
        self._prefetch(range(index - 1, max(-1, index - 1 - depth), -1))

    def prefetch_last(self, depth: int) -> None:
        """Bring back the last ``depth`` items (backward needs them first)."""
        n = len(self.items)
        self._prefetch(range(n - 1, max(-1, n - 1 - depth), -1))


class SwapStore:
    """Swapping machinery for one device: a side stream and optionally an arena."""

    def __init__(self, device: torch.device, arena: bool = False, simulate: bool = False) -> None:
        self.device = torch.device(device)
        self.simulate = simulate
        if not simulate and self.device.type != "cuda":
            raise ValueError(f"swapping needs a CUDA device, got {self.device}")
        self.stream = None if simulate else torch.cuda.Stream(self.device)
        self.arena = HostArena(pin=not simulate) if arena else None
        #: Restores served by a prefetch, and restores that copied on demand.
        self.prefetched = 0
        self.on_demand = 0

    def new_list(self) -> SwapList:
        return SwapList(self)

    def _host_empty(self, t: Tensor, owner: object) -> Tensor:
        if self.arena is not None:
            return self.arena.empty(t.shape, t.dtype, owner)
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=not self.simulate)

    def to_host(self, tensors: list[Tensor], owner: object) -> tuple[list[Tensor], Any]:
        if self.simulate:
            host = [self._host_empty(t, owner) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t)
            return host, None
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the packed data are produced there
        with torch.cuda.stream(self.stream):
            host = [self._host_empty(t, owner) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # not reused before the copy has run
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return host, ready

    def prefetch(self, item: SwapItem) -> None:
        if item.device_copy is not None or not item.host:
            return
        if self.simulate:
            item.device_copy = [h.clone() for h in item.host]
            return
        with torch.cuda.stream(self.stream):  # after the device-to-host copy (same stream)
            item.device_copy = [h.to(self.device, non_blocking=True) for h in item.host]
            item.device_ready = torch.cuda.Event()
            item.device_ready.record(self.stream)

    def fetch(self, item: SwapItem) -> list[Tensor]:
        if item.device_copy is not None:
            self.prefetched += 1
            out, item.device_copy = item.device_copy, None
            if not self.simulate:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(item.device_ready)
                for t in out:
                    t.record_stream(compute)  # allocated on the side stream
            return out
        self.on_demand += 1
        if self.simulate:
            return [h.clone() for h in item.host]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(item.ready)
        return [h.to(self.device, non_blocking=True) for h in item.host]
