"""Exact byte accounting of what autograd holds for backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef


def compression_ratio(baseline_bytes: int, compressed_bytes: int) -> float:
    """``baseline_bytes / compressed_bytes``; ``inf`` when nothing is held."""
    return baseline_bytes / compressed_bytes if compressed_bytes else float("inf")


def bits_per_element(compressed_bytes: int, elements: int) -> float:
    """Compressed bits per element autograd would have held (0 for no elements)."""
    return 8 * compressed_bytes / elements if elements else 0.0


@dataclass
class Stats:
    """Bytes held for backward, without actpack (baseline) and with it.

    ``baseline_bytes`` counts each distinct storage autograd would keep alive
    once (a saved view keeps its whole storage); parameters, buffers and
    their casts are excluded (see ``weight_bytes``).
    ``compressed_bytes`` counts every encoding once plus the storages of
    tensors passed through unchanged.
    """

    baseline_bytes: int = 0
    compressed_bytes: int = 0
    #: Elements in the baseline storages, for bits per saved element.
    baseline_elements: int = 0
    #: Casts of parameters and buffers autograd holds (autocast's bf16 weight
    #: copies): never compressed, the same with or without actpack.
    weight_bytes: int = 0
    #: Leaf tensors without autograd history that autograd holds (the input
    #: batch, a frozen model's activations): never compressed, since their
    #: storage normally exists anyway, and not counted in the ratio.
    leaf_bytes: int = 0
    tensors: int = 0
    by_module: dict[str, list[int]] = field(default_factory=dict)
    by_op: dict[str, list[int]] = field(default_factory=dict)
    passthrough: dict[str, int] = field(default_factory=dict)
    #: Saves stored in a form the policy picks instead of the strategy's code
    #: (fused attention's query and key in fp16), by reason:
    #: [bytes without actpack, bytes with it].
    forms: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return compression_ratio(self.baseline_bytes, self.compressed_bytes)

    @property
    def bits_per_element(self) -> float:
        return bits_per_element(self.compressed_bytes, self.baseline_elements)

    def add(
        self, module: str | None, op: str | None, before: int, after: int, elements: int = 0
    ) -> None:
        self.baseline_bytes += before
        self.baseline_elements += elements
        self.compressed_bytes += after
        # Unrolled, and no list built unless a row is new (the save path).
        row = self.by_module.get(module or "<none>")
        if row is None:
            row = self.by_module[module or "<none>"] = [0, 0]
        row[0] += before
        row[1] += after
        row = self.by_op.get(op or "<none>")
        if row is None:
            row = self.by_op[op or "<none>"] = [0, 0]
        row[0] += before
        row[1] += after


def anchor(t: Tensor) -> Tensor:
    """The tensor whose lifetime pins ``t``'s memory: its base if ``t`` is a view.

    A view an op makes of its input (F.linear's reshape) dies at once, while
    its base keeps the storage alive; tying liveness to the base lets several
    such views of one storage be recognised as the same memory.
    """
    return t._base if t._base is not None else t


class StorageSet:
    """Storages seen so far, each valid while it is alive.

    A freed storage's address can be reused by a new tensor; a weak
    reference to each recorded storage keeps a new one from being taken for
    an old one.

    Entries are kept per device and keyed by the storage's address (an int,
    which the garbage collector does not track): two storages over one
    buffer (``torch.from_numpy`` twice) are one memory.  An entry is a
    ``StorageWeakRef`` of the storage, or ``None`` for a storage the caller
    keeps alive for as long as the set is used (``alive=True``).
    """

    def __init__(self) -> None:
        self._refs: dict[torch.device, dict[int, Any]] = {}
        #: Per device and address, the rows a recorded storage's bytes were
        #: booked to (``new_bytes``' ``owner``), made on first use.
        self._owners: dict[torch.device, dict[int, Any]] | None = None

    def new_bytes(self, t: Tensor, alive: bool = False, owner: Any = None) -> int:
        """Record ``t``'s storage: its size in bytes if it was not already
        held, else 0.  ``alive``: the caller keeps ``t`` alive for as long
        as it uses this set, so no weak reference is needed.  ``owner``:
        kept with a storage recorded now, for :meth:`owner_of` (what its
        bytes were booked to).  Raises RuntimeError for tensors without a
        storage of their own (sparse, vmap's batched tensors, wrapper
        subclasses such as DTensor)."""
        storage = t.untyped_storage()
        return self._record(t, storage, storage.data_ptr(), alive, owner)

    def holds(self, t: Tensor) -> bool:
        """Whether ``t``'s storage is recorded and alive.  Raises
        RuntimeError as :meth:`new_bytes` does."""
        table = self._refs.get(t.device)
        if table is None:
            return False
        entry = table.get(t.untyped_storage().data_ptr(), _MISSING)
        return entry is None or (entry is not _MISSING and not entry.expired())

    def owner_of(self, t: Tensor) -> Any:
        """The ``owner`` given when ``t``'s storage was recorded (it must be
        held: ``new_bytes`` returned 0 for it), or None."""
        owners = self._owners
        if owners is None:
            return None
        table = owners.get(t.device)
        return table.get(t.untyped_storage().data_ptr()) if table is not None else None

    def add_all(self, tensors: list[Tensor], alive: bool = False) -> tuple[int, int, list[Tensor]]:
        """``new_bytes`` of each of ``tensors`` in turn, in one loop (the
        saves a forward counts together): (bytes, elements) of the storages
        not already held, and the tensors without a storage of their own
        (sparse, vmap's batched tensors, wrapper subclasses), not recorded."""
        refs = self._refs
        total = elements = 0
        failed = []
        for t in tensors:
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()  # raises for wrapper subclasses
            except RuntimeError:
                failed.append(t)
                continue
            device = t.device
            table = refs.get(device)
            if table is None:
                table = refs[device] = {}
            entry = table.get(key, _MISSING)
            if entry is None:  # kept alive by the caller: counted
                continue
            if entry is _MISSING and alive:  # the common case, inlined
                table[key] = None
                nbytes = storage.nbytes()
            else:
                nbytes = self._record(t, storage, key, alive)
            if nbytes:
                total += nbytes
                elements += nbytes // t.itemsize
        return total, elements, failed

    def _record(self, t: Tensor, storage: Any, key: int, alive: bool, owner: Any = None) -> int:
        """Record ``storage`` at address ``key``: its bytes if the address
        holds no live storage recorded before, else 0.

        Liveness is the storage's own (a weak reference to its
        ``StorageImpl``, as ``torch.multiprocessing`` keeps them), not a
        tensor object's: a saved tensor, the alias a pack hook made of it,
        or a graph holding that alias may each die while another alias of
        the same storage lives on and is saved later (``h.detach()`` kept
        past ``h``), which object lifetimes took for new memory at a reused
        address."""
        device = t.device
        table = self._refs.get(device)
        if table is None:
            table = self._refs[device] = {}
        entry = table.get(key, _MISSING)
        if entry is None:  # kept alive by the caller
            return 0
        if entry is not _MISSING and not entry.expired():
            return 0
        table[key] = None if alive else StorageWeakRef(storage)
        owners = self._owners
        if owner is not None:
            if owners is None:
                owners = self._owners = {}
            owners.setdefault(device, {})[key] = owner
        elif owners is not None and device in owners:
            owners[device].pop(key, None)  # a new storage at a recorded address
        return storage.nbytes()


_MISSING = object()
