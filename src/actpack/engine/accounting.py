"""Exact byte accounting of what autograd holds for backward."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import Tensor


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

    @property
    def ratio(self) -> float:
        return (
            self.baseline_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")
        )

    @property
    def bits_per_element(self) -> float:
        return 8 * self.compressed_bytes / self.baseline_elements if self.baseline_elements else 0.0

    def add(
        self, module: str | None, op: str | None, before: int, after: int, elements: int = 0
    ) -> None:
        self.baseline_bytes += before
        self.baseline_elements += elements
        self.compressed_bytes += after
        for table, key in ((self.by_module, module or "<none>"), (self.by_op, op or "<none>")):
            row = table.setdefault(key, [0, 0])
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
    """Storages seen so far, valid only while a tensor that uses them is alive.

    A freed storage's address can be reused by a new tensor; tying each entry
    to live weak references keeps a new tensor from being taken for an old one.
    """

    def __init__(self) -> None:
        self._refs: dict[tuple, list[weakref.ref]] = {}

    @staticmethod
    def key(t: Tensor) -> tuple:
        # The storage's address without building a storage object (hot path).
        return (t.device, t.data_ptr() - t.storage_offset() * t.element_size())

    def add(self, t: Tensor) -> bool:
        """Record ``t``'s storage; True if it was not already held."""
        key = self.key(t)
        refs = self._refs.get(key)
        ref = weakref.ref(anchor(t))
        if refs is None:
            self._refs[key] = [ref]
            return True
        alive = any(r() is not None for r in refs)
        if not alive:
            refs.clear()
        refs.append(ref)
        return not alive

    def clear(self) -> None:
        self._refs.clear()
