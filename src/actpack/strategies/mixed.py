"""ActNN mixed precision: sensitivity model, bit allocation and optimization levels.

Variance model
--------------
Stochastic rounding of a value whose fractional position inside its step is
uniform adds variance ``step**2 / 6``; a group of ``G`` elements with range
``r`` quantized to ``L`` levels (``L = 2**b - 1``, or ``2**b - 2`` when code 0
is reserved for exact ReLU zeros) has steps ``r / L``.  The row (sample) ``n``
of a saved tensor ``k`` therefore adds

    V[k, n] = S[k, n] / L(b[k, n])**2,   S[k, n] = s[k] * R[k, n]

to the gradient variance, where

* ``R[k, n] = sum over the row's groups of r**2 * m / 6``, ``m`` the group's
  elements strictly above its minimum (a value on the bottom of the grid, a
  ReLU zero or an image's background, is coded exactly and adds no noise):
  measured on the device at every save (:func:`row_ranges`);
* ``s[k] = sum over the ops c that read the saved values in backward of
  locations(c) * mean_n ||dL/dy_c[n]||**2``: ActNN's gradient scale, the
  squared norm of the gradient of each consuming op's *output*, per sample,
  times ``locations = kernel elements / spatial positions`` for convolutions
  and ``1 / positions`` otherwise (ActNN's ``num_locations / num_pixels``).
  It is read from the real backward by a pre-hook on each consuming op's
  autograd node (robust to later in-place ops, which only add nodes after
  it) and smoothed with an exponential moving average.  Ops whose backward
  reads only an exact sign pattern (ReLU family) or indices (max-pooling)
  are not consumers: a tensor saved only for them has ``s = 0``.

Where the model is wrong: normalization inputs
----------------------------------------------
The formula is first order in the op's *weight* gradient, which is right for
convolutions and linear layers: their input gradient does not read the saved
input, so its noise stays in their own weight gradient.  A normalization op
(BatchNorm, LayerNorm, ...) is different: its input gradient reads the saved
input through ``x_hat`` (``dx = g/sigma (dy - mean dy - x_hat mean(dy x_hat))``),
so the noise also flows into every earlier layer's gradient, and its weight
gradient sees the noise scaled by ``1/sigma**2``, not by the range.  We
measured it (built-in ResNet "tiny" on Fashion-MNIST, after 12 training
steps; each saved tensor quantized alone at 2 bits, its measured share of
the gradient variance divided by the model's prediction): 0.09-0.15 for the
inputs of convolutions and the linear head (a consistent model up to a
constant), but 0.075-0.86 for BatchNorm inputs, the earliest ones
under-estimated 5-7x.  Trusting the formula there gave the first BatchNorm
inputs 1 bit and made mixed precision *worse* than uniform 2 bits (relative
variance 0.095 vs 0.089).  So, as in ActNN (whose BatchNorm layers take the
width of the layer before and allocate only across samples), a tensor read
by a normalization op keeps the average width: its own rows share
``budget`` bits per element, ranked by their ranges, and it takes no part
in the trade across layers.  The same measurement showed the input images
over-estimated 7x (a constant background sits on the grid, hence ``m``
above).  See benchmarks/results/mixed.md for the effect.

Allocation
----------
:func:`~actpack.strategies.allocate.allocate_bits` (host side, :mod:`actpack.strategies.allocate`)
minimises ``sum V`` subject to ``sum b * D <= budget * sum D`` (``D``
elements per row), bits in ``min_bits..max_bits``: a Lagrangian greedy,
exact when all rows weigh the same, or dynamic programming over layers.

No host synchronisation in the save path
----------------------------------------
Every ``refresh_every`` forwards, :meth:`ActNNMixed.refresh` copies the
statistics to the host once, solves the allocation and stores, per saved
tensor, how many rows get each bit width (host integers).  At each save the
device ranks the rows by their current ranges and gives the top rows the
widest codes (``sort`` + ``index_select`` with host-known sizes): no
``.item()``, no data-dependent shape.  Before the first refresh each tensor
splits the average budget over its own rows, ranked by their ranges.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from actpack.codecs.backend import quantize_groups
from actpack.codecs.encoded import Encoded
from actpack.engine.untraced import eager_only
from actpack.policy.ops import ROW_NORM_OPS
from actpack.policy.rules import ReluOutput, reads_region_only
from actpack.strategies.actnn import (
    ActNN,
    check_bits,
    check_int,
    check_real,
    parse_level,
    rows_of,
)
from actpack.strategies.allocate import MAX_BITS, Allocation, allocate_bits
from actpack.strategies.base import SaveInfo, seed_of
from actpack.strategies.levels import LEVELS, NORM_OPS, ActNNPreset
from actpack.strategies.mixedcode import Kept, MixedGroups
from actpack.strategies.seeds import check_seed
from actpack.strategies.sensitivity import VALUE_FREE_OPS, locations, row_ranges

__all__ = [
    "LEVELS",
    "NORM_OPS",
    "ActNNMixed",
    "ActNNPreset",
    "Allocation",
    "Kept",
    "MixedGroups",
    "allocate_bits",
    "row_ranges",
]


class _OpWatch(TorchFunctionMode):
    """Hooks the autograd node of every op that saves a value-read tensor.

    Saved-tensor hooks fire inside the op, before its output exists; this mode
    sees the output when the op returns and registers one pre-hook on its
    node, which reads the gradient of the output when backward reaches it.
    """

    def __init__(self, owner: ActNNMixed) -> None:
        super().__init__()
        self.owner = owner
        self.inside = False
        self.args: tuple = ()
        self.pending: list = []

    @eager_only  # called from C++ by ops that eager code runs under torch.compile
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside or self.owner._encoding:
            return func(*args, **kwargs)
        self.inside, self.args, self.pending = True, args, []
        try:
            out = func(*args, **kwargs)
        finally:
            pending, self.pending = self.pending, []
            self.inside, self.args = False, ()
        if pending:
            self.owner._hook_outputs(out, pending)
        return out


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


class _Layer:
    """Statistics of one saved tensor (one ``SaveInfo.key``)."""

    __slots__ = (
        "key", "rows", "cols", "shape", "min_bits", "zero_exact", "profile", "grad", "gacc",
        "grad_known", "consumers", "unknown", "pinned", "counts", "counts_rows", "step",
    )  # fmt: skip

    def __init__(self, key: str, rows: int, cols: int, shape, min_bits: int, zero_exact: bool):
        self.key, self.rows, self.cols, self.shape = key, rows, cols, tuple(shape)
        self.min_bits, self.zero_exact = min_bits, zero_exact
        self.profile: Tensor | None = None  # EMA of the row ranges, sorted descending
        self.grad: Tensor | None = None  # EMA of the gradient scale s[k]
        self.gacc: Tensor | None = None  # gradient scale accumulated by the running backward
        self.grad_known = False
        self.consumers = 0  # value-reading saves in the last forward
        self.pinned = False  # read by a normalization op: keeps the average width
        self.unknown = False  # saved outside any op: consumer unknown
        self.counts: list[tuple[int, int]] | None = None  # (bits, rows), widest first
        self.counts_rows = 0
        self.step = -1


def _split(counts: list[tuple[int, int]], total: int, rows: int) -> list[tuple[int, int]]:
    """Rescale row counts made for ``total`` rows to ``rows`` rows (largest remainder)."""
    exact = [n * rows / total for _, n in counts]
    out = [math.floor(e) for e in exact]
    rest = rows - sum(out)
    for i in sorted(range(len(out)), key=lambda i: out[i] - exact[i])[:rest]:
        out[i] += 1
    return [(b, n) for (b, _), n in zip(counts, out)]


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #


class ActNNMixed(ActNN):
    """ActNN mixed precision (levels L3-L5): bits per sample and per layer.

    Each saved tensor is cut into rows (samples) and groups as in
    :class:`~actpack.ActNN`; every row gets its own width in
    ``min_bits..max_bits`` so that the modelled gradient variance (see
    :mod:`actpack.strategies.mixed`) is minimal with ``budget`` code bits per element on
    average (per-group metadata and row indices come on top, as for ActNN).

    Args:
        budget: average code bits per element (float, e.g. 2.0 or 2.5).
        group_size, stochastic, seed: as for :class:`~actpack.ActNN`.
        refresh_every: forwards between two allocations (each costs one
            host synchronisation; saves never synchronise).
        momentum: EMA factor of the range and gradient-scale statistics.
        min_bits, max_bits: allowed widths (ReLU outputs use at least 2 so
            their zeros stay exact).
        method: allocation method, see :func:`allocate_bits`.
        offload: swap packed data to pinned CPU memory (CUDA only; L4).
        prefetch: how many swapped tensors ahead backward brings back.
        arena: pinned host arena reused across steps, and expandable CUDA
            segments (L5).
        level: ``"L3"``, ``"L4"`` or ``"L5"`` presets for the above.

    The statistics belong to this object: :meth:`state_dict` holds them for
    resuming, and two models with their own strategies never interfere.

    Example::

        strategy = actpack.ActNN(level="L3")        # or actpack.ActNNMixed(budget=2.0)
        model = actpack.wrap(model, strategy)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            ...
        strategy.last_bits                          # {bits: elements} of the last forward
    """

    levels = (3, 4, 5)  # what ActNN(level=...) builds with this class
    thread_safe = False  # per-forward statistics and swap lists

    name = "actnn-mixed"
    keeps_relu_exact = True

    def __init__(
        self,
        budget: float = 2.0,
        group_size: int = 256,
        stochastic: bool = True,
        seed: int | None = None,
        *,
        refresh_every: int = 10,
        momentum: float = 0.9,
        min_bits: int = 1,
        max_bits: int = MAX_BITS,
        method: str = "auto",
        offload: bool | None = None,
        prefetch: int = 2,
        arena: bool | None = None,
        level: str | None = None,
    ) -> None:
        n = parse_level(level) if level is not None else None
        if n is not None and n < 3:
            raise ValueError(f"ActNNMixed covers L3-L5; use actpack.ActNN(level='L{n}')")
        super().__init__(bits=2, group_size=group_size, stochastic=stochastic, seed=seed)
        self.keeps_relu_exact = True
        # Knobs as plain Python numbers (NumPy scalars and 0-d tensors accepted).
        try:
            budget = check_real("budget", budget)
        except ValueError:
            raise ValueError(f"budget must be a number of bits, got {budget!r}") from None
        min_bits = check_bits(min_bits, "min_bits")
        max_bits = check_bits(max_bits, "max_bits")
        if max_bits < 2:
            raise ValueError("max_bits must be at least 2 (ReLU outputs need 2 bits)")
        if min_bits > max_bits:
            raise ValueError(
                f"min_bits must not exceed max_bits, got min_bits={min_bits} > "
                f"max_bits={max_bits}; lower min_bits or raise max_bits"
            )
        if not min_bits <= budget <= max_bits:
            raise ValueError(f"budget must be within [{min_bits}, {max_bits}], got {budget!r}")
        refresh_every = check_int("refresh_every", refresh_every, 1)
        momentum = check_real("momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if method not in ("auto", "greedy", "exact"):
            raise ValueError(f"method must be 'auto', 'greedy' or 'exact', got {method!r}")
        prefetch = check_int("prefetch", prefetch, 0)
        self.budget = float(budget)
        self.bits = self.budget  # average bits (ActNN's fixed width does not apply)
        self.refresh_every = refresh_every
        self.momentum = float(momentum)
        self.min_bits, self.max_bits = min_bits, max_bits
        self.method = method
        self.level = f"L{n}" if n is not None else None
        if n is not None:
            self.name = f"actnn-l{n}"
        self.offload = bool(offload) if offload is not None else (n is not None and n >= 4)
        self.arena = bool(arena) if arena is not None else n == 5
        self.offload = self.offload or self.arena
        self.prefetch = prefetch
        #: Why swapping is not active (set on the first save that could not swap).
        self.offload_note: str | None = None
        #: What L5 did about fragmentation (set on the first CUDA save).
        self.notes: list[str] = []
        self._config = dict(
            budget=budget, group_size=group_size, stochastic=stochastic,
            refresh_every=refresh_every, momentum=momentum, min_bits=min_bits,
            max_bits=max_bits, method=method, offload=self.offload, prefetch=prefetch,
            arena=self.arena, level=level,
        )  # fmt: skip
        self._simulate_swap = False  # tests: run the swap machinery on CPU tensors
        self._reset()

    # -- state -----------------------------------------------------------------
    def _reset(self) -> None:
        self._layers: dict[str, _Layer] = {}
        self.step = 0  # forwards that saved something
        self._last_refresh = -1
        self._refreshed_blind = False  # last refresh had no gradient scale
        self._forward_keys: list[str] = []
        self._current: list[str] = []
        self._current_set: set[str] = set()
        self._watch = _OpWatch(self)
        self._active = 0
        self._encoding = False
        self._anon = 0
        self._swap: dict[torch.device, Any] = {}  # device -> SwapStore
        self._swap_lists: dict[torch.device, Any] = {}  # device -> this forward's SwapList
        self._rng_pending: dict[str, Tensor] = {}
        #: {bits: elements} coded at each width in the last forward.
        self.last_bits: dict[int, int] = {}
        self._bits_now: dict[int, int] = {}
        #: The last :class:`Allocation` (None before the first refresh).
        self.last_allocation: Allocation | None = None

    @property
    def offload_active(self) -> bool:
        """Whether packed data are being swapped to host memory."""
        return bool(self._swap)

    @property
    def average_bits(self) -> float:
        """Average code bits per element of the last forward."""
        total = sum(self.last_bits.values())
        return sum(b * n for b, n in self.last_bits.items()) / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Seed, step, random state and every saved tensor's statistics (CPU tensors)."""
        layers = {}
        for key, L in self._layers.items():
            grad = L.grad
            if L.gacc is not None:
                grad = L.gacc if grad is None else self._ema(grad, L.gacc)
            layers[key] = {
                "rows": L.rows, "cols": L.cols, "shape": list(L.shape),
                "min_bits": L.min_bits, "zero_exact": L.zero_exact,
                "profile": None if L.profile is None else L.profile.detach().cpu(),
                "grad": None if grad is None else grad.detach().cpu(),
                "grad_known": L.grad_known or L.gacc is not None,
                "consumers": L.consumers, "unknown": L.unknown, "pinned": L.pinned,
                "counts": None if L.counts is None else [list(c) for c in L.counts],
                "counts_rows": L.counts_rows, "step": L.step,
            }  # fmt: skip
        return {
            **super().state_dict(),  # seed, rng, rng_rank
            "step": self.step,
            "last_refresh": self._last_refresh,
            "refreshed_blind": self._refreshed_blind,
            "forward_keys": list(self._forward_keys),
            "layers": layers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seed_of(self, state)  # checked before anything is reset
        swap = self._swap
        self._reset()
        self._swap = swap
        super().load_state_dict(state)  # seed, and the generators' states
        if "layers" not in state:
            return
        self.step = int(state["step"])
        self._last_refresh = int(state["last_refresh"])
        self._refreshed_blind = bool(state.get("refreshed_blind", False))
        self._forward_keys = list(state["forward_keys"])
        for key, d in state["layers"].items():
            L = _Layer(key, d["rows"], d["cols"], d["shape"], d["min_bits"], d["zero_exact"])
            L.profile = None if d["profile"] is None else d["profile"].clone()
            L.grad = None if d["grad"] is None else d["grad"].clone()
            L.grad_known = bool(d["grad_known"])
            L.consumers, L.unknown = int(d["consumers"]), bool(d["unknown"])
            L.pinned = bool(d.get("pinned", False))
            L.counts = None if d["counts"] is None else [tuple(c) for c in d["counts"]]
            L.counts_rows, L.step = int(d["counts_rows"]), int(d["step"])
            self._layers[key] = L

    def __reduce__(self) -> tuple:
        # Copies and pickles carry the settings and the statistics; the swap
        # machinery (CUDA streams) and the op watch are rebuilt.
        return (_rebuild, (type(self), self._config, self.state_dict(), self._simulate_swap))

    def fork(self, seed: int | None = None) -> ActNNMixed:
        """A new strategy with the same settings and statistics (and ``seed``)."""
        new = type(self)(**self._config)
        state = self.state_dict()
        if seed is not None:
            state["seed"] = check_seed(seed)
            state["rng"] = {}
        new.load_state_dict(state)
        new._simulate_swap = self._simulate_swap
        return new

    # -- forward bookkeeping -----------------------------------------------------
    def _ema(self, old: Tensor, new: Tensor) -> Tensor:
        return old.to(new.device) * self.momentum + new * (1.0 - self.momentum)

    def begin_forward(self) -> None:
        self._active += 1
        if self._active > 1:
            return
        self._fold_gradients()
        if self._refresh_due():
            self.refresh()
        self._current, self._current_set = [], set()
        self._bits_now = {}
        self._swap_lists = {}
        self._watch.__enter__()

    def end_forward(self) -> None:
        self._active -= 1
        if self._active > 0:
            return
        self._watch.__exit__(None, None, None)
        if self._current:
            self.step += 1
            self._forward_keys = list(self._current)
            self.last_bits = dict(sorted(self._bits_now.items(), reverse=True))
        for lst in self._swap_lists.values():
            lst.prefetch_last(self.prefetch)
        self._swap_lists = {}

    def _fold_gradients(self) -> None:
        for L in self._layers.values():
            if L.gacc is not None:
                L.grad = L.gacc if L.grad is None else self._ema(L.grad, L.gacc)
                L.gacc = None
                L.grad_known = True

    def _refresh_due(self) -> bool:
        if self.step < 1 or not self._forward_keys:
            return False
        if self._last_refresh < 0 or self.step - self._last_refresh >= self.refresh_every:
            return True
        layers = [self._layers[k] for k in self._forward_keys if k in self._layers]
        if any(L.counts is None for L in layers):
            return True  # a tensor appeared since the last allocation
        return self._refreshed_blind and any(L.grad_known for L in layers)

    def refresh(self) -> Allocation | None:
        """Solve the allocation from the statistics (one host synchronisation).

        Called automatically every ``refresh_every`` forwards; rows per width
        are then fixed until the next refresh.
        """
        layers = [
            self._layers[k]
            for k in self._forward_keys
            if k in self._layers and self._layers[k].profile is not None
        ]
        if not layers:
            return None
        profiles, grads = {}, {}
        by_device: dict[torch.device, list[_Layer]] = {}
        for L in layers:
            by_device.setdefault(L.profile.device, []).append(L)
        nan = float("nan")
        for device, group in by_device.items():
            scale = [
                L.grad.reshape(1).float().to(device)
                if L.grad is not None
                else torch.full((1,), nan, device=device)
                for L in group
            ]
            flat = torch.cat([L.profile.float().reshape(-1) for L in group] + scale)
            host = flat.cpu().double()  # the one synchronisation of a refresh
            start = 0
            for L in group:
                profiles[L.key] = host[start : start + L.profile.numel()]
                start += L.profile.numel()
            for L, g in zip(group, host[start:].tolist()):
                grads[L.key] = g
        known = [g for k, g in grads.items() if math.isfinite(g) and g > 0]
        default = sum(known) / len(known) if known else 1.0
        sens = []
        for L in layers:
            g = grads[L.key]
            if L.consumers == 0 and not L.unknown:
                g = 0.0  # only exact sign patterns or indices are read back
            elif not math.isfinite(g) or (g <= 0 and not L.grad_known):
                g = default  # no gradient scale yet: ranges only
            sens.append(profiles[L.key] * g)
        alloc = self._allocate(layers, sens)
        for L, bits in zip(layers, alloc.bits):
            hist = torch.bincount(bits, minlength=MAX_BITS + 1).tolist()
            L.counts = [(b, hist[b]) for b in range(MAX_BITS, 0, -1) if hist[b]]
            L.counts_rows = bits.numel()
        self.last_allocation = alloc
        self._last_refresh = self.step
        self._refreshed_blind = not known
        return alloc

    def _allocate(self, layers: list[_Layer], sens: list[Tensor]) -> Allocation:
        """Inputs of normalization ops keep the average width; the rest trade bits.

        A normalization input's rows share ``budget`` bits per element among
        themselves (ranked by their own ranges, as ActNN does for BatchNorm);
        every other tensor takes part in the allocation across layers.
        """
        free = [i for i, L in enumerate(layers) if not L.pinned]
        groups = [free] + [[i] for i, L in enumerate(layers) if L.pinned]
        bits: list[Tensor | None] = [None] * len(layers)
        used = capacity = 0
        cost = 0.0
        methods, feasible = set(), True
        for idx in groups:
            if not idx:
                continue
            part = allocate_bits(
                [sens[i] for i in idx],
                [layers[i].cols for i in idx],
                self.budget,
                min_bits=[layers[i].min_bits for i in idx],
                max_bits=self.max_bits,
                zero_exact=[layers[i].zero_exact for i in idx],
                method=self.method,
            )
            for i, b in zip(idx, part.bits):
                bits[i] = b
            used, capacity, cost = (
                used + part.used_bits,
                capacity + part.capacity_bits,
                cost + part.cost,
            )
            methods.add(part.method)
            feasible = feasible and part.feasible
        return Allocation(
            bits,
            [L.cols for L in layers],
            used,
            capacity,
            cost,
            "+".join(sorted(methods)),
            feasible,
        )

    # -- saving -------------------------------------------------------------------
    def _layer(self, key: str | None, rows: int, cols: int, shape, zero_exact: bool) -> _Layer:
        if key is None:
            key = f"<anonymous>#{self._anon}"
            self._anon += 1
        L = self._layers.get(key)
        min_bits = max(self.min_bits, 2) if zero_exact else self.min_bits
        if L is None or L.cols != cols or L.zero_exact != zero_exact or L.min_bits != min_bits:
            L = _Layer(key, rows, cols, shape, min_bits, zero_exact)
            self._layers[key] = L
        if key not in self._current_set:
            L.step = self.step
            L.consumers, L.unknown, L.pinned = 0, False, False
            self._current.append(key)
            self._current_set.add(key)
        L.rows, L.shape = rows, tuple(shape)
        return L

    def _counts(self, L: _Layer, rows: int) -> list[tuple[int, int]]:
        if L.counts is not None and L.counts_rows > 0:
            if L.counts_rows == rows:
                return L.counts
            return _split(L.counts, L.counts_rows, rows)
        # Not allocated yet: this tensor's own rows share the average budget,
        # ranked by their ranges.
        avg = min(max(self.budget, L.min_bits), self.max_bits)
        lo = int(math.floor(avg))
        hi_rows = min(rows, int(round(rows * (avg - lo)))) if lo < self.max_bits else 0
        return [(b, n) for b, n in ((lo + 1, hi_rows), (lo, rows - hi_rows)) if n]

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        self._encoding = True
        try:
            return self._encode(x, info)
        finally:
            self._encoding = False

    def _group_size(self, x: Tensor, cols: int, info: SaveInfo) -> int:
        """Groups within a row (sample) that neither pad short rows (F.linear's
        (tokens, features) view) nor span two tokens of a LayerNorm input."""
        g = self.group_size
        d = x.shape[-1] if x.dim() >= 2 else cols
        if info.op in ROW_NORM_OPS and d % g:
            return max(k for k in range(1, min(d, g) + 1) if d % k == 0)
        return min(g, cols) if cols else g

    def _encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        rows = rows_of(x)
        x2 = x.reshape(rows, -1)
        cols = x2.shape[1]
        gs = self._group_size(x, cols, info)
        zero_exact = isinstance(info.rule, ReluOutput)
        L = self._layer(info.key, rows, cols, x.shape, zero_exact)
        ranges = row_ranges(x2, gs)
        if rows > 1:
            ranked, order = torch.sort(ranges, descending=True)
        else:
            ranked, order = ranges, None
        if L.profile is None or L.profile.shape != ranked.shape:
            L.profile = ranked
        else:
            L.profile = self._ema(L.profile, ranked)
        parts, start = [], 0
        gen = self.generator(x.device) if self.stochastic else None
        for bits, n in self._counts(L, rows):
            if n == 0:
                continue  # a width the allocation gives no row of this batch
            if n == rows:
                idx, sub = None, x2
            else:
                idx = order[start : start + n]
                sub = x2.index_select(0, idx)
                idx = idx.to(torch.int32)
            start += n
            code = quantize_groups(
                sub,
                bits,
                gs,
                stochastic=self.stochastic,
                generator=gen,
                zero_exact=zero_exact and bits >= 2,
            )
            parts.append((idx, code))
            self._bits_now[bits] = self._bits_now.get(bits, 0) + n * cols
        enc = MixedGroups(parts, rows, cols, x.shape, x.dtype, key=L.key)
        enc.swap_ref = self._maybe_swap(enc, x.device)
        self._attribute(L, info.op, enc.swap_ref)
        return enc

    def saved_again(self, encoded: Encoded, info: SaveInfo) -> None:
        inner = encoded
        while not isinstance(inner, MixedGroups) and hasattr(inner, "inner"):
            inner = inner.inner
        if isinstance(inner, MixedGroups) and inner.key in self._layers:
            self._attribute(self._layers[inner.key], info.op, inner.swap_ref)

    def _attribute(self, L: _Layer, op: str | None, swap_ref: Any) -> None:
        """Record that ``op`` reads the values of ``L`` in backward."""
        base = (op or "").strip("_")
        if reads_region_only(base) or base in VALUE_FREE_OPS:
            return  # backward reads an exact sign pattern or indices only
        if base in NORM_OPS:
            L.pinned = True
        if not self._watch.inside:
            L.unknown = True
            return
        L.consumers += 1
        scale = locations(op, L.shape, self._watch.args) / max(1, L.rows)
        self._watch.pending.append((L, scale, swap_ref))

    def _hook_outputs(self, out: Any, pending: list) -> None:
        nodes = {}
        for t in _tensors(out):
            if t.grad_fn is not None:
                nodes[id(t.grad_fn)] = t.grad_fn
        if not nodes:
            return
        targets = [(L, s) for L, s, _ in pending]
        refs = [r for _, _, r in pending if r is not None]

        def hook(grad_outputs: tuple) -> None:
            total = None
            for g in grad_outputs:
                if g is not None and g.is_floating_point() and g.numel():
                    v = torch.linalg.vector_norm(g.detach(), dtype=torch.float32).square()
                    total = v if total is None else total + v
            if total is not None:
                total = torch.where(torch.isfinite(total), total, 0.0)
                for L, s in targets:
                    L.gacc = total * s if L.gacc is None else L.gacc + total * s
            if refs:
                lst = refs[0][0]
                lst.prefetch_before(min(i for _, i in refs), self.prefetch)
            return None

        for node in nodes.values():
            node.register_prehook(hook)

    # -- swapping ------------------------------------------------------------------
    def _maybe_swap(self, enc: MixedGroups, device: torch.device) -> Any:
        if not self.offload:
            return None
        if device.type != "cuda" and not self._simulate_swap:
            if self.offload_note is None:
                self.offload_note = (
                    f"{self.name}: swapping packed data to CPU memory needs CUDA tensors; "
                    f"tensors on {device.type} stay where they are (this behaves like L3)"
                )
                warnings.warn(self.offload_note, stacklevel=4)
            return None
        from actpack.engine.offload import SwapStore

        store = self._swap.get(device)
        if store is None:
            store = SwapStore(device, arena=self.arena, simulate=device.type != "cuda")
            self._swap[device] = store
            if self.arena and device.type == "cuda":
                self.notes.append(_expandable_segments())
        lst = self._swap_lists.get(device)
        if lst is None:
            lst = store.new_list()
            self._swap_lists[device] = lst
        enc.swap = lst.put(enc.detach_parts())
        return (lst, enc.swap.index)

    def __repr__(self) -> str:
        extra = f", level={self.level!r}" if self.level else ""
        return (
            f"ActNNMixed(budget={self.budget}, group_size={self.group_size}, "
            f"refresh_every={self.refresh_every}, offload={self.offload}{extra})"
        )


def _expandable_segments() -> str:
    """L5: let the CUDA caching allocator grow segments instead of fragmenting them."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments" in conf:
        return "expandable_segments already configured by the environment"
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except Exception as exc:  # pragma: no cover - depends on the build
        return (
            f"could not enable expandable segments ({exc}); set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting Python"
        )
    return "enabled expandable_segments in the CUDA caching allocator (process-wide)"


def _rebuild(cls: type, config: dict[str, Any], state: dict[str, Any], simulate: bool) -> Any:
    new = cls(**config)
    new.load_state_dict(state)
    new._simulate_swap = simulate
    return new
