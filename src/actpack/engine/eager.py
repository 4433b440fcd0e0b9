"""The eager engine: packs what autograd saves, restores it in backward.

Mechanism: ``torch.autograd.graph.saved_tensors_hooks`` (the mechanism of
``torch.autograd.graph.save_on_cpu``).  Each saved tensor is described as
:class:`~actpack.policy.decide.Facts`, :func:`~actpack.policy.decide.decide`
picks its form, and this module carries the plan out.

State is per thread and per forward: hooks and ``TorchFunctionMode`` stacks
are thread-local in PyTorch, so each thread entering the engine gets its own
hooks, op tracker and de-duplication table; two threads running forwards of
one wrapped model never see each other's saves.
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from actpack.codecs.compact import compact_integer
from actpack.codecs.encoded import (
    Bits,
    Copy,
    Encoded,
    HardswishInput,
    LogOf,
    Region,
    ScaledHalf,
    TwoValued,
)
from actpack.engine.accounting import Stats, StorageSet, anchor
from actpack.engine.compiled import compiled_hooks, op_caller
from actpack.engine.fills import EXTREME_FILL, FILL_REASON
from actpack.engine.lossless import Uncounted, count_waiting
from actpack.engine.rereads import log_softmax_output, reads_twice, shape_only
from actpack.engine.saved import Held, Leaf, Reshaped, Saved, unpack
from actpack.engine.savefacts import (
    POW_OPS,
    argument_role,
    attention_input,
    attention_mask_input,
    composite,
    frozen_weight,
    parameter_source,
    save_origin,
    squares,
)
from actpack.engine.tracking import ROOT, ModuleTracker, OpTracker
from actpack.engine.untraced import eager_only
from actpack.policy.decide import (
    LOGITS_16BIT,
    VALUES_16BIT,
    Facts,
    Kind,
    Plan,
    Settings,
    decide,
    small_plan,
)
from actpack.policy.ops import (
    LINEAR_BACKWARD_OPS,
    SMOOTH_BACKWARD_OPS,
)
from actpack.policy.rules import ReluOutput, reads_region_only, rule_for
from actpack.strategies import Cast16, Int8, SaveInfo, Strategy, resolve
from actpack.strategies.seeds import derived_seed

DEFAULT_MIN_NUMEL = 2048

#: Forms tensors a checkpoint recomputes from may take when the user opts in.
CHECKPOINT_INPUTS = ("exact", "bf16", "fp16", "int8")

#: The reason of a save kept exact because its code was larger than it.
CODE_LARGER = "code larger than the tensor"
#: A save of memory another op of the forward keeps exact: that copy serves
#: it too (a code would cost bytes on top and read other values).
HELD_EXACT = "held exact for another op"

# Reasons to keep a tensor exact under which an exact copy of a small view
# (freeing the large storage it pins) is still exact.
_COPYABLE = frozenset(
    {"tiny", CODE_LARGER, "integer", "float64 (kept exact)", "op statistics",
     LOGITS_16BIT, VALUES_16BIT, "attention mask (softmax recomputed with it)"}
)  # fmt: skip


_DEFAULT_SETTINGS = Settings()

_get_ident = threading.get_ident
_current_thread = threading.current_thread
_top_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_push_saved_hooks = torch._C._autograd._push_saved_tensors_default_hooks
_pop_saved_hooks = torch._C._autograd._pop_saved_tensors_default_hooks
#: ``_Forward.hooks`` of a forward whose hooks were pushed directly.
_PLAIN_HOOKS = object()


def _is_checkpoint_hook(pack: Any) -> bool:
    """Whether ``pack`` is a pack hook of non-reentrant ``torch.utils.checkpoint``
    (its forward's, or its recomputation's in backward)."""
    return getattr(pack, "__module__", None) == "torch.utils.checkpoint"


@functools.lru_cache(maxsize=256)
def _settings_of(
    lossless: bool,
    min_numel: int,
    keeps_relu_exact: bool,
    checkpoint_inputs: str,
    smooth: str,
    bounded_codes: bool,
) -> Settings:
    # One Settings per combination: every entry of every engine asks.
    return Settings(
        lossless=lossless,
        min_numel=min_numel,
        keeps_relu_exact=keeps_relu_exact,
        checkpoint_inputs=checkpoint_inputs,
        smooth=smooth,
        bounded_codes=bounded_codes,
    )


class _Forward:
    """One thread's state during one forward under the engine."""

    __slots__ = (
        "depth", "hooks", "ops", "table", "held", "held_compressed", "kept", "ordinals",
        "stats", "weights", "settings", "unaccounted", "engine", "thread", "ref", "coded",
        "__weakref__",
    )  # fmt: skip

    def __init__(self, tracked: bool) -> None:
        self.depth = 0
        self.hooks: Any = None
        self.ops = OpTracker() if tracked else None
        self.table: dict[tuple, list[tuple[weakref.ref, object, Any]]] = {}
        #: The table's keys by storage, (device, storage address) -> keys: every
        #: view coded of a storage that a later save keeps exact is found.
        self.coded: dict[tuple, list[tuple]] = {}
        self.held = StorageSet()
        # Made on first use (most forwards of a lossless strategy need neither).
        self.held_compressed: StorageSet | None = None
        #: Storages of the saves kept as they are (leaves, weights): their own bytes.
        self.kept: StorageSet | None = None
        self.ordinals: dict[tuple, int] = {}
        self.stats = Stats()
        #: Storage addresses of the model's plain parameters and buffers.
        self.weights: dict[int, str] = {}
        self.settings: Settings = _DEFAULT_SETTINGS
        #: Saves kept as they are whose bytes are not yet counted, as
        #: (tensor, what the hook returned) (see :class:`~actpack.engine.lossless.Uncounted`), and
        #: the engine that counts them.
        self.unaccounted: list[tuple[Tensor, Any]] = []
        self.engine: Engine | None = None
        #: The thread running this forward (thread ids are reused).
        self.thread: threading.Thread | None = None
        #: A weak reference to this state, shared by the saves it keeps.
        self.ref: Any = None


class Engine:
    """Context manager installing actpack's saved-tensor hooks.

    Use :func:`actpack.compress` or :func:`actpack.wrap` rather than this
    class directly.  An engine may be entered by several threads at once
    (each gets its own hooks and tables) and re-entered by one (nested
    forwards share the outer one's state).  ``stats`` describe the forward
    most recently started.  Copies (``copy.deepcopy``, pickling) get an
    engine of their own with a copy of the strategy and nothing else.
    """

    def __init__(
        self,
        strategy: str | Strategy,
        *,
        model: nn.Module | None = None,
        min_numel: int = DEFAULT_MIN_NUMEL,
        track_modules: bool = False,
        checkpoint_inputs: str = "exact",
        track_ops: bool | None = None,
        smooth: str = "code",
    ) -> None:
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative integer, got {min_numel!r}")
        if checkpoint_inputs not in CHECKPOINT_INPUTS:
            raise ValueError(
                f"checkpoint_inputs must be one of {', '.join(CHECKPOINT_INPUTS)}, "
                f"got {checkpoint_inputs!r}"
            )
        if smooth not in ("code", "exact"):
            raise ValueError(f"smooth must be 'code' or 'exact', got {smooth!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the nn.Module whose parameters the engine should recognise, "
                f"got {type(model).__name__}; pass model=your_model, or leave it out"
            )
        self.smooth = smooth
        self.strategy = resolve(strategy)
        if checkpoint_inputs != "exact" and self.strategy.lossless:
            raise ValueError(
                f"checkpoint_inputs={checkpoint_inputs!r} stores what torch.utils.checkpoint "
                f"keeps in a lossy form, but {self.strategy!r} is lossless and keeps every "
                "saved tensor exact; use it with a lossy strategy (e.g. 'actnn'), or leave "
                "checkpoint_inputs='exact'"
            )
        self.min_numel = min_numel
        self.checkpoint_inputs = checkpoint_inputs
        self._stats: Stats | None = None
        self._model = model
        # The model's weight storages, checked and reused between forwards.
        self._weights: (
            tuple[list[tuple[dict, str, weakref.ref, int | None]], dict[int, str]] | None
        ) = None
        self._track_modules = track_modules and model is not None
        self._modules: ModuleTracker | None = None
        # Each thread's forward under this engine, by thread id (a dict, not
        # a threading.local: creating and freeing one of those costs more
        # than a small layer's saves, and compress() makes an engine per step).
        self._states: dict[int, _Forward] = {}
        self._warned: set[str] = set()
        self._suspended = 0
        self._checkpoint_strategy: Strategy | None = None
        self._lock = threading.Lock()
        # Naming the op of every torch call costs a few microseconds each; a
        # lossless strategy needs no name unless the accounting must tell the
        # input batch from an op's statistics (measure does).
        self._track_ops = track_ops

    # -- copies ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "model": self._model,
            "min_numel": self.min_numel,
            "track_modules": self._track_modules,
            "checkpoint_inputs": self.checkpoint_inputs,
            "track_ops": self._track_ops,
            "smooth": self.smooth,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["strategy"],
            model=state["model"],
            min_numel=state["min_numel"],
            track_modules=state["track_modules"],
            checkpoint_inputs=state["checkpoint_inputs"],
            track_ops=state["track_ops"],
            smooth=state["smooth"],
        )

    # -- context management -------------------------------------------------
    @property
    def stats(self) -> Stats:
        """Bytes saved for backward by the forward most recently started
        (empty before the first)."""
        for st in tuple(self._states.values()):
            if st.unaccounted:
                self._account(st)  # read while forwards run: count what waits
        stats = self._stats
        if stats is None:
            stats = self._stats = Stats()
        return stats

    def _state(self) -> _Forward | None:
        return self._states.get(_get_ident())

    def __enter__(self) -> Engine:
        # (Called through the module: Dynamo recognises torch.compiler.is_compiling
        # there, not through a module-level alias of it.)
        if torch.compiler.is_compiling():
            # Dynamo traces this call: the hooks are entered as a side effect
            # between graphs, and whether the graph holding the model sees
            # them depends on where Dynamo breaks (a Linear-GELU-Linear
            # model compiled together with this call was not compressed).
            self._warn_once(
                "inside compile",
                "actpack: the engine is entered inside a torch.compile'd function; Dynamo "
                "traces it, and the model called there may run uncompressed. Enter it "
                "outside the compiled code (`with actpack.compress(): compiled_model(x)`) or "
                "use actpack.wrap(torch.compile(model)).",
            )
        ident = _get_ident()
        st = self._states.get(ident)
        thread = _current_thread()
        if st is not None:
            if st.thread is thread:
                st.depth += 1
                return self
            self._end_stale(ident, st)  # left by a dead thread whose id this one reuses
        top = _top_saved_hooks(False)
        if self._suspended or (top is not None and _is_checkpoint_hook(top[0])):
            # Suspended; or inside a non-reentrant torch.utils.checkpoint
            # (a checkpointed block wrapped on its own, an engine entered in
            # the checkpointed function): the block's saves are checkpoint's
            # (what it recomputes from, the recomputed tensors), as without
            # actpack.  Hooks installed here would be innermost: checkpoint
            # would keep nothing and skip the recompute.
            self._states[ident] = st = _Forward(tracked=False)
            st.depth = 1
            st.thread = thread
            return self
        if top is not None:
            self._warn_nested(top)
        strategy = self.strategy
        tracked = self._track_ops if self._track_ops is not None else not strategy.lossless
        st = _Forward(tracked=tracked)
        st.depth = 1
        st.engine = self  # (a forward entered while suspended has none)
        st.thread = thread
        st.ref = weakref.ref(st)
        if strategy.thread_safe:
            self._states[ident] = st
        else:
            self._admit(st, ident)
        self._stats = st.stats
        strategy.begin_forward()
        if self._model is not None:
            if self._track_modules and self._modules is None:
                self._modules = ModuleTracker(self._model)
            st.weights = self._weight_storages()
        st.settings = self._settings()
        # This forward's pack hook, bound to its state (no per-save lookup
        # of the thread's state); a lossless strategy without op names keeps
        # every non-bool tensor, so its hook only counts bytes.
        if st.ops is not None:
            pack: Any = functools.partial(Engine._pack_in, self, st)
        elif self._modules is None:
            pack = functools.partial(Uncounted, st)
        else:
            pack = functools.partial(Engine._pack_untracked, self, st)
        # Compile-native where torch can inline GraphModule hooks into
        # compiled graphs; eager saves still come to ``pack`` and ``unpack``.
        # A lossless strategy codes nothing, compiled or not: its plain hooks
        # (called for compiled graphs' saves after their forward, which it
        # keeps) save the GraphModule pair's dispatch on every save.
        graph_hooks = None if st.ops is None and self.strategy.lossless else compiled_hooks(self)
        if graph_hooks is not None:
            st.hooks = graph_hooks.installed(pack)
            st.hooks.__enter__()
        else:
            # What saved_tensors_hooks(pack, unpack).__enter__ does, without
            # its object (``__exit__`` pops them).
            _push_saved_hooks(pack, unpack)
            st.hooks = _PLAIN_HOOKS
        if st.ops is not None:
            st.ops.__enter__()
        return self

    def _enter_forward(self) -> None:
        """Enter from the model's forward pre-hook (``wrap``): its forward
        runs next.  A module tracker made by this entry registered the
        root's hooks after PyTorch had collected those of this call, so
        the root's name is pushed here (its forward hook, collected after
        the forward, pops it); else the root's own saves of the first
        forward would be counted under no module."""
        fresh = self._track_modules and self._modules is None
        self.__enter__()
        if fresh and self._modules is not None:
            self._modules.stack.append(ROOT)

    def __exit__(self, *exc: object) -> None:
        st = self._state()
        if st is None:
            # Exited from another thread (a generator closed there): a
            # forward whose thread has died ends here.
            for ident, other in tuple(self._states.items()):
                if other.thread is not None and not other.thread.is_alive():
                    self._end_stale(ident, other)
            return
        st.depth -= 1
        if st.depth > 0:
            return
        self._states.pop(_get_ident(), None)
        exc = exc or (None, None, None)
        try:
            if st.unaccounted:
                self._account(st, final=True)
        finally:
            self._end(st, exc)

    def _end_stale(self, ident: int, st: _Forward) -> None:
        """End the forward of a thread that died inside it: its hooks died
        with the thread; its waiting saves are counted and released."""
        self._states.pop(ident, None)
        if st.unaccounted:
            self._account(st)
        st.hooks = None
        if st.engine is not None:
            self.strategy.end_forward()

    def _end(self, st: _Forward, exc: tuple) -> None:
        if st.hooks is not None:
            if st.ops is not None:
                st.ops.__exit__(*exc)
            if st.hooks is _PLAIN_HOOKS:
                _pop_saved_hooks()
            else:
                st.hooks.__exit__(*exc)
            # The installed hooks hold this forward's pack hook, bound to st:
            # dropping them ends the cycle, so the state dies by reference count.
            st.hooks = None
            if st.table:
                st.table.clear()
            self.strategy.end_forward()
            if (
                exc[0] is None  # never in place of the user's own exception
                and st.ops is not None
                and st.ops.fills.scaled is not None
                and st.stats.passthrough.get(FILL_REASON)
            ):
                # Only when a save was kept exact for a fill (a loss scaled by
                # 1024 saves nothing), and after the cleanup: under -W error
                # the warning raises.
                self._warn_scaled(*st.ops.fills.scaled)

    def _admit(self, st: _Forward, ident: int) -> None:
        """Make ``st`` this thread's forward (a strategy that keeps per-forward
        state) unless another thread is inside a forward of this engine."""
        with self._lock:
            if any(other.engine is not None for other in tuple(self._states.values())):
                raise RuntimeError(
                    f"actpack: {self.strategy!r} keeps per-forward statistics and cannot run "
                    "forwards of one engine in two threads at once; give each thread its own "
                    "model copy (copy.deepcopy(model)) or use a stateless strategy such as "
                    "'actnn'."
                )
            self._states[ident] = st

    def _warn_scaled(self, op: str, scalar: Any) -> None:
        """Warn once that a product of an activation by ``scalar`` (at least
        EXTREME_FILL in magnitude) was taken as a mask's fill."""
        self._warn_once(
            "scaled",
            f"actpack: a tensor with autograd history was multiplied by {scalar!r} ({op}); a "
            f"product by a scalar of magnitude >= {EXTREME_FILL:g} is taken as a mask's fill "
            "(a soft mask times -1e9), so its saves and those of everything computed from it, "
            "up to a bounded op (softmax, sigmoid, tanh), get no group code (kept exact, reason "
            "'holds an extreme fill'). If it is a plain scaling of activations, scale by a "
            "smaller factor (e.g. fold it into the next layer's weights) to have them coded.",
        )

    def _warn_nested(self, top: tuple) -> None:
        """Warn once that ``top`` (the innermost saved-tensor hooks, read by
        ``__enter__``) is bypassed for what is saved under this engine."""
        pack = getattr(top[0], "func", top[0])  # a functools.partial's function
        owners = [pack, *type(pack).__mro__]  # the graph hooks: fx makes a class per module
        if any((getattr(o, "__module__", None) or "").startswith("actpack.") for o in owners):
            self._warn_once(
                "nested",
                "actpack.compress is entered inside another actpack engine (an outer "
                "compress, or a wrapped model's forward); the innermost engine takes every "
                "tensor saved inside it, so the outer one neither codes nor counts them. "
                "Enter one engine per forward: wrap the model, or compress around it, not both.",
            )
            return
        self._warn_once(
            "nested",
            "actpack.compress is entered inside other saved-tensor hooks "
            f"({getattr(top[0], '__qualname__', top[0])!r}); only the innermost hooks run, "
            "so those outer hooks are bypassed for everything saved inside actpack. "
            "Use actpack's own offload (ActNN level L4) instead of save_on_cpu, and see "
            "the README section 'Composing with other saved-tensor hooks'.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def suspended(self) -> _Suspend:
        """Context manager: what autograd saves inside it is not compressed by
        this engine (also inside a forward already running under it)."""
        return _Suspend(self)

    def close(self) -> None:
        """Remove the module hooks this engine installed (if any)."""
        if self._modules is not None:
            self._modules.remove()
            self._modules = None

    # -- facts ----------------------------------------------------------------
    def _settings(self) -> Settings:
        s = self.strategy
        return _settings_of(
            s.lossless,
            self.min_numel,
            s.keeps_relu_exact,
            self.checkpoint_inputs,
            self.smooth,
            s.bounded_codes,
        )

    def _weight_storages(self) -> dict[int, str]:
        """Storage address -> ``"parameter"`` / ``"buffer"`` for the model's weights.

        Walking the model costs ~1 us per weight (20 us for a small
        transformer layer, more than its step's saves), so the table is kept
        between forwards and checked instead, one lookup per weight and per
        submodule: it is rebuilt when a weight or submodule it lists is no
        longer where it was listed (``load_state_dict(assign=True)``, a
        replaced buffer or submodule, even while the old one lives on in an
        optimizer) or moved to another storage (``.to()``, FSDP2's
        resharding).  A weight or submodule registered under a new name is
        missed until then; the table only names what is kept exact anyway
        (saves without history are never coded), so a miss changes a row of
        the accounting, never a gradient.
        """
        if self._model is None:
            return {}
        cached = self._weights
        if cached is not None:
            listed, table = cached
            for holder, name, ref, address in listed:
                item = ref()
                if (
                    item is None
                    or holder.get(name) is not item
                    or (address is not None and item.untyped_storage().data_ptr() != address)
                ):
                    break
            else:
                return table
        # Plain tensors only: sharded parameters (FSDP2's DTensors) have no
        # storage of their own; what FSDP2 gathers for the forward are leaf
        # parameters, recognised without this table.  Entries hold the
        # owning dict (a module's _parameters, _buffers or _modules) and a
        # weak reference to what it held.
        listed, table = [], {}
        for module in self._model.modules():
            for kind, holder in (("parameter", module._parameters), ("buffer", module._buffers)):
                for name, p in holder.items():
                    if type(p) in (Tensor, nn.Parameter) and p.device.type != "meta":
                        address = p.untyped_storage().data_ptr()
                        table[address] = kind
                        listed.append((holder, name, weakref.ref(p), address))
            for name, child in module._modules.items():
                if child is not None:
                    listed.append((module._modules, name, weakref.ref(child), None))
        self._weights = (listed, table)
        return table

    def _leaf(self, t: Tensor, args: tuple, st: _Forward, kwargs: dict | None = None) -> str | None:
        """What storage that exists anyway ``t`` (a plain save) is: the
        model's weight (``"parameter"``, ``"buffer"``, a view or cast of
        one), a floating-point argument of the op without autograd history
        (``"leaf input"``: the input batch, a frozen model's activations),
        or None.  Decided before anything else (dtype, size, strategy), so
        that a leaf is never counted as saved activation memory, whatever
        keeps it exact (``"tiny"``, float64, a lossless strategy)."""
        if t.grad_fn is not None:
            return parameter_source(t)
        kind = st.weights.get(t.untyped_storage().data_ptr()) if st.weights else None
        if kind is not None:
            return kind
        if frozen_weight(t, args):
            return "parameter cast"
        # (Integers and bools stay with the saves: indices and masks are
        # narrowed or bit-packed, and counted alike by every strategy.)
        if t.is_floating_point() and argument_role(t, args, kwargs or {}) == "input":
            return "leaf input"
        return None

    def _facts(self, t: Tensor, st: _Forward) -> tuple[Facts, str | None, tuple, dict]:
        ops = st.ops
        op, args, kwargs = (ops.name, ops.args, ops.kwargs) if ops is not None else (None, (), {})
        if squares(op, args, kwargs):
            op = "square"  # pow(x, 2): backward reads x linearly (2 x grad), as square's
        kind = type(t)
        plain = (
            (kind is Tensor or kind is nn.Parameter)
            and t.layout == torch.strided
            and t.device.type != "meta"
        )
        history = t.grad_fn is not None
        numel = t.numel()
        dtype = t.dtype
        if numel < st.settings.min_numel and dtype != torch.bool:
            # Below min_numel the plan depends on dtype, size, plainness and
            # weights alone (decide returns before reading anything else,
            # the origin included): the common small save pays for nothing more.
            leaf = self._leaf(t, args, st, kwargs) if plain else None
            facts = Facts(dtype, numel, "op", op, "unknown", history, leaf, plain)
            return facts, op, args, kwargs
        caller = op_caller(sys._getframe(2))
        origin = save_origin(caller)
        floating = t.is_floating_point()
        rule = None
        region_only = declined = logits = values = False
        role = "unknown"
        if floating and op is not None and origin == "op":
            if history:
                if op not in LINEAR_BACKWARD_OPS and op not in SMOOTH_BACKWARD_OPS:
                    op = composite(caller) or op
                if plain:
                    rule = rule_for(t, op, args, kwargs)
                    region_only = rule is not None and reads_region_only(op)
                # The mask first: a tensor passed as the mask and as q, k or v
                # matches both in each of its saves; the exact form is safe
                # for all of them.
                declined = attention_mask_input(t, op, args, kwargs)
                if (
                    declined is None
                    and ops.fills
                    and ops.fills.holds(t, args, kwargs, op)
                    and not log_softmax_output(t, args)  # coded through exp: bounded
                ):
                    declined = FILL_REASON
                if declined is None:
                    attention = attention_input(t, op, args, kwargs, caller)
                    logits, values = attention == "logits", attention == "values"
                    # A strategy's own reason to leave x (Cast16: already
                    # 16-bit) does not apply to the fp16 form of q, k, v, out.
                    if attention is None:
                        declined = self.strategy.skip_reason(t)
            else:
                role = argument_role(t, args, kwargs)
        facts = Facts(
            dtype,
            numel,
            origin,
            op,
            role,
            history,
            self._leaf(t, args, st, kwargs) if plain else None,
            plain,
            0 in t.stride() and any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())),
            rule,
            region_only,
            False,
            declined or None,
            t.device.type == "cpu",
            logits,
            values,
        )
        return facts, op, args, kwargs

    # -- hooks ----------------------------------------------------------------
    @eager_only
    def pack(self, t: Tensor) -> object:
        """The pack hook: what autograd keeps instead of ``t``.

        Saves reach the hook bound to their forward (``_pack_in`` or
        ``_pack_untracked``); this entry point finds the calling thread's
        forward first."""
        st = self._state()
        if st is None or st.hooks is None:
            # Hooks propagated to a thread that never entered (autograd's
            # worker threads): keep the tensor, as autograd would.
            return _keep(t)
        if st.ops is None:
            return self._pack_untracked(st, t)
        return self._pack_in(st, t)

    @eager_only
    def _pack_in(self, st: _Forward, t: Tensor) -> object:
        """The pack hook of forward ``st``."""
        if type(t) is nn.Parameter or (t.requires_grad and t.is_leaf):
            return Leaf(t)  # parameters exist anyway, and hold no graph: no cycle
        if type(t) is Tensor:
            # The common small save (below min_numel, not the model's weight)
            # is decided from its dtype alone: most saves of small layers.
            numel = t.numel()
            if 0 < numel < st.settings.min_numel and t.layout is torch.strided and not t.is_meta:
                ops = st.ops
                op, args = (ops.name, ops.args) if ops is not None else (None, ())
                leaf = self._leaf(t, args, st, ops.kwargs if ops is not None else None)
                if leaf is not None:  # the model's weight: decided by that alone
                    return self._carry_out(
                        t, decide(Facts(t.dtype, numel, leaf=leaf), st.settings), st, op, None
                    )
                plan = small_plan(t.dtype)
                if plan.kind is Kind.EXACT:
                    if op in POW_OPS and squares(op, args, ops.kwargs):
                        op = "square"
                    return self._keep_exact(t, plan.reason, st, op)
        try:
            facts, op, args, kwargs = self._facts(t, st)
        except RuntimeError:
            return self._uninspectable(t, st)
        compact = None
        if not facts.dtype.is_floating_point and facts.dtype != torch.bool:
            compact = compact_integer(t, op, args, kwargs) if not self.strategy.lossless else None
            if compact is not None:
                facts = facts._replace(compactable=True)
        plan = decide(facts, st.settings)
        if plan.kind is Kind.TWO_VALUED and facts.checkable:
            compact = TwoValued.encode(t.detach(), check=True)
            if compact is None:  # not two-valued after all: exact
                plan = Plan(Kind.EXACT, plan.reason)
        if facts.origin == "compiled":
            self._warn_once(
                "compiled",
                "actpack: tensors saved by torch.compile'd graphs are kept exact (this engine "
                "cannot see which ops saved them); compress eager code, or see the README "
                "section on torch.compile.",
            )
        return self._carry_out(t, plan, st, op, compact)

    @staticmethod
    def _uninspectable(t: Tensor, st: _Forward) -> Held:
        # No storage to inspect (torch.vmap's batched tensors, sparse
        # operands): nothing can be proven, so nothing is coded.
        st.stats.passthrough["uninspectable"] = st.stats.passthrough.get("uninspectable", 0)
        return Held(t)

    @eager_only
    def _pack_untracked(self, st: _Forward, t: Tensor) -> object:
        """The pack hook of forward ``st`` for a lossless strategy without op
        names (``"none"``) when modules are tracked: the save is counted at
        once, while its module is the current one.  Without module rows the
        hook is :class:`~actpack.engine.lossless.Uncounted` itself."""
        saved = Uncounted(st, t)
        if st.unaccounted:
            self._account(st)
        return saved

    def _account(self, st: _Forward, final: bool = False) -> None:
        """Count the saves waiting in ``st`` (:func:`~actpack.engine.lossless.count_waiting`)."""
        count_waiting(self, st, final)

    def _carry_out(
        self, t: Tensor, plan: Plan, st: _Forward, op: str | None, compact: Encoded | None
    ) -> object:
        stats = st.stats
        module = self._modules.current if self._modules is not None else None
        kind = plan.kind
        if kind is Kind.KEEP:
            return self._keep_leaf(t, plan.reason, st)
        if kind is Kind.EXACT:
            return self._keep_exact(t, plan.reason, st, op)
        if st.held_compressed is not None and self._held_exact(t, st):
            return self._keep_exact(t, HELD_EXACT, st, op)
        before = st.held.new_bytes(t, owner=(module, op))
        elements = before // t.element_size() if t.element_size() else 0
        tag = (kind, plan.rule, False)  # (kind, rule, coded as log_softmax's output)
        shape = tuple(t.shape)
        key = _table_key(t)  # a view of another shape shares its code
        entries = st.table.get(key, ())
        ops = st.ops
        args, kwargs = (ops.args, ops.kwargs) if ops is not None else ((), {})
        any_code = bool(entries) and shape_only(op, args, kwargs)  # values never read
        if kind is Kind.LOSSY and log_softmax_output(t, args):
            # log_softmax's own save of its output (the first; readers of the
            # log-probabilities pass them as an argument or come after it).
            if not any(ref() is not None and entry_tag[2] for ref, entry_tag, _ in entries):
                tag = (kind, plan.rule, True)
        for ref, entry_tag, saved in entries:
            # A live entry pins its memory, so equal keys mean equal bytes.
            if ref() is not None and (any_code or self._serves(entry_tag, tag)):
                if not any_code and reads_twice(t, op, args, kwargs):
                    break  # a code of its own: the two reads are independent
                stats.add(module, op, before, 0, elements)
                if isinstance(saved, Saved):
                    self.strategy.saved_again(
                        saved.encoded, SaveInfo(op=op, module=module, rule=plan.rule)
                    )
                    if saved.shape != shape:
                        return Reshaped(saved, shape)
                return saved
        saved = self._encode(t, plan, st, op, module, compact, log_of=tag[2])
        if saved.encoded.nbytes > t.numel() * t.element_size():
            # A code larger than the tensor (a custom strategy's code with
            # per-row metadata on rows of a few elements): the tensor itself
            # costs less and is exact.
            return self._keep_exact(t, CODE_LARGER, st, op, before)
        if key not in st.table:
            st.coded.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(key)
        st.table.setdefault(key, []).append(
            (weakref.ref(anchor(t), functools.partial(_forget, st.table, key)), tag, saved)
        )
        stats.tensors += 1
        if before:
            stats.add(module, op, before, saved.encoded.nbytes, elements)
        else:
            # A code of memory an earlier save holds (a ReLU output's region,
            # coded again for the next layer's values): booked to the rows
            # holding its bytes without actpack, so every row's ratio is
            # that of the storages it holds.
            stats.add(*self._owner(t, st, module, op), 0, saved.encoded.nbytes)
        if kind is Kind.HALF:
            row = stats.forms.setdefault(plan.reason, [0, 0])
            row[0] += before
            row[1] += saved.encoded.nbytes
        return saved

    @staticmethod
    def _keep_leaf(t: Tensor, reason: str, st: _Forward) -> Held:
        """Carry out a KEEP plan (a weight, a buffer, the input batch).

        Counted once per storage among the kept leaves (``kept``), apart from
        the baseline and compressed sets: an activation coded for one op and
        kept as a leaf for another (``probe(f.detach())``) stays alive
        because of the leaf save, and its bytes must show, whichever save
        comes first; the totals (and ratio) stay those of the other saves.
        """
        Engine._count_leaf(t, reason, st)
        return Held(t)

    @staticmethod
    def _count_leaf(t: Tensor, reason: str, st: _Forward, alive: bool = False) -> None:
        """The bytes of a KEEP plan (see ``_keep_leaf``); ``alive`` as for
        :meth:`StorageSet.new_bytes`.  Raises RuntimeError for a tensor
        without a storage of its own."""
        kept = st.kept
        if kept is None:
            kept = st.kept = StorageSet()
        nbytes = kept.new_bytes(t, alive)
        if reason in ("parameter cast", "parameter view"):
            st.stats.weight_bytes += nbytes  # identical with or without actpack
        elif reason == "leaf input":
            st.stats.leaf_bytes += nbytes

    def _keep_exact(
        self, t: Tensor, reason: str, st: _Forward, op: str | None, before: int | None = None
    ) -> object:
        """Carry out an EXACT plan: the tensor as it is, or an exact copy of a
        small view (which would keep its whole storage alive).  ``before``:
        the baseline bytes when the caller has already counted them."""
        stats = st.stats
        module = self._modules.current if self._modules is not None else None
        if before is None:
            try:
                before = st.held.new_bytes(t, owner=(module, op))
            except RuntimeError:
                # No storage to count (a sparse save with history, kept exact as
                # "tensor subclass or layout"): as it is, as the untracked path keeps it.
                return self._uninspectable(t, st)
        size = t.element_size()
        if (
            reason in _COPYABLE
            and not self.strategy.lossless
            and 2 * t.numel() * size < (before or t.untyped_storage().nbytes())
        ):
            saved: Any = Saved(Copy(t.detach().clone()), t, t.requires_grad)
            after = saved.encoded.nbytes
        else:
            saved = Held(t)
            if st.held_compressed is None:
                st.held_compressed = StorageSet()
            after = st.held_compressed.new_bytes(t)
            if after and st.table:
                self._codes_to_exact(t, st, module, op)
        passthrough = stats.passthrough
        passthrough[reason] = passthrough.get(reason, 0) + after
        stats.tensors += 1
        if not before and after:  # held by an earlier save, kept exact for this one
            module, op = self._owner(t, st, module, op)
        stats.add(module, op, before, after, before // size if size else 0)
        return saved

    @staticmethod
    def _held_exact(t: Tensor, st: _Forward) -> bool:
        """Whether a save of this forward holds ``t``'s whole storage exact."""
        try:
            return st.held_compressed.holds(t)
        except RuntimeError:  # no storage of its own: nothing held
            return False

    def _codes_to_exact(self, t: Tensor, st: _Forward, module: str | None, op: str | None) -> None:
        """``t``'s storage is now held exact for an op: earlier saves of this
        forward that coded any view of it (same dtype and version: the same
        values) restore that view of the exact tensor instead, and their codes
        are freed (a tanh output coded for tanh, then kept exact as
        grid_sample's grid; a matmul's transposed operand coded, then the
        tensor kept exact for abs: each code cost bytes on top and fed its
        op's backward other values)."""
        storage = t.untyped_storage().data_ptr()
        keys = st.coded.get((t.device, storage))
        if not keys:
            return
        base, size, freed, left = t.detach(), t.element_size(), 0, []
        for key in keys:
            address, dtype, _device, layout, version = key
            if dtype != t.dtype or version != t._version:
                left.append(key)  # other values (a dtype view, or before an in-place op)
                continue
            offset = (address - storage) // size
            for ref, _tag, saved in st.table.pop(key, ()):
                if ref() is not None and isinstance(saved, Saved):
                    freed += saved.encoded.nbytes
                    saved.encoded = Copy(_view(base, saved.shape, layout, offset))
        st.coded[(t.device, storage)] = left
        if freed:
            st.stats.add(*self._owner(t, st, module, op), 0, -freed)

    @staticmethod
    def _owner(
        t: Tensor, st: _Forward, module: str | None, op: str | None
    ) -> tuple[str | None, str | None]:
        """The (module, op) rows holding the baseline bytes of ``t``'s
        storage (an earlier save counted them), else ``module`` and ``op``."""
        try:
            owner = st.held.owner_of(t)
        except RuntimeError:
            owner = None
        return owner if owner is not None else (module, op)

    def _serves(self, have: tuple, want: tuple) -> bool:
        """Whether a code made for ``have`` (kind, rule, coded as
        log_softmax's output) also serves ``want``."""
        if have == want:
            return True
        # A code keeping ReLU zeros exact is also an unbiased code of the values.
        return (
            have[0] is want[0] is Kind.LOSSY
            and have[2] is want[2] is False
            and want[1] is None
            and isinstance(have[1], ReluOutput)
            and self.strategy.keeps_relu_exact
        )

    def _encode(
        self,
        t: Tensor,
        plan: Plan,
        st: _Forward,
        op: str | None,
        module: str | None,
        compact: Encoded | None,
        log_of: bool = False,
    ) -> Saved:
        kind, x = plan.kind, t.detach()
        if kind is Kind.COMPACT:
            return Saved(compact, t, False)
        if kind is Kind.BITS:
            return Saved(Bits.encode(x), t, False)
        if kind is Kind.TWO_VALUED:
            return Saved(compact or TwoValued.encode(x), t, t.requires_grad)
        if kind is Kind.REGION:
            return Saved(
                Region(Bits.encode(plan.rule.mask(x)), plan.rule, x.dtype), t, t.requires_grad
            )
        if kind is Kind.HALF:
            return Saved(ScaledHalf.encode(x), t, t.requires_grad)
        strategy = self.strategy
        if plan.reason.startswith("checkpoint input"):
            strategy = self._checkpoint_coder()
        n = st.ordinals.get((module, op), 0)
        st.ordinals[(module, op)] = n + 1
        info = SaveInfo(op=op, module=module, rule=plan.rule, key=f"{module or ''}/{op or ''}#{n}")
        if kind is Kind.PIECEWISE:
            code = HardswishInput.encode(x, lambda middle: strategy.encode(middle, info))
            return Saved(code, t, t.requires_grad)
        if log_of:
            # log_softmax backward reads exp(output): code the probabilities, so
            # the restored exp(output) is unbiased (a code of the log would not
            # be).  Only for its own save: an op reading the log-probabilities
            # linearly (an entropy term's product) gets a code of the values.
            return Saved(LogOf(strategy.encode(x.exp(), info)), t, t.requires_grad)
        return Saved(strategy.encode(x, info), t, t.requires_grad)

    def _checkpoint_coder(self) -> Strategy:
        if self._checkpoint_strategy is None:
            form = self.checkpoint_inputs
            self._checkpoint_strategy = (
                Int8(seed=derived_seed(self.strategy.seed, 7))
                if form == "int8"
                else Cast16(torch.bfloat16 if form == "bf16" else torch.float16)
            )
        return self._checkpoint_strategy


def _table_key(t: Tensor) -> tuple:
    """The key of ``t``'s codes in a forward's table.  Contiguous tensors are
    keyed by their memory alone, so that a view of a saved tensor with another
    shape (Flatten before a Linear) shares its code."""
    layout = ("contiguous", t.numel()) if t.is_contiguous() else (tuple(t.shape), t.stride())
    return (t.data_ptr(), t.dtype, t.device, layout, t._version)


def _view(base: Tensor, shape: tuple, layout: tuple, offset: int) -> Tensor:
    """The view of ``base``'s storage that a table key's ``layout`` (see
    :func:`_table_key`) and element ``offset`` describe, in ``shape`` (the
    shape of the save a code served; a contiguous key serves any shape)."""
    if layout[0] == "contiguous":  # ("contiguous", numel)
        return base.as_strided((layout[1],), (1,), offset).view(shape)
    return base.as_strided(layout[0], layout[1], offset).view(shape)


@eager_only  # called when the anchor dies: under compiled code too
def _forget(table: dict, key: tuple, _ref: object) -> None:
    """Drop ``table``'s entries at ``key`` (a weak reference's callback: the
    tensor whose memory they describe died)."""
    table.pop(key, None)


@eager_only
def _keep(t: Tensor) -> object:
    """A pack hook keeping every tensor as autograd would (with its version check)."""
    if type(t) is nn.Parameter or (t.requires_grad and t.is_leaf):
        return Leaf(t)
    return Held(t)


class _Suspend:
    """``Engine.suspended()``: forwards entering the engine inside it install
    nothing; a forward of this thread already inside the engine has its
    hooks covered by a pair that keeps every tensor as it is."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.hooks: Any = None

    def __enter__(self) -> Engine:
        self.engine._suspended += 1
        st = self.engine._state()
        if st is not None and st.hooks is not None:
            self.hooks = torch.autograd.graph.saved_tensors_hooks(_keep, unpack)
            self.hooks.__enter__()
        return self.engine

    def __exit__(self, *exc: object) -> None:
        if self.hooks is not None:
            self.hooks.__exit__(*exc)
            self.hooks = None
        self.engine._suspended -= 1
