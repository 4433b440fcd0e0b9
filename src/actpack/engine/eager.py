"""The saved-tensor engine: packs what autograd saves, restores it in backward."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from actpack.codecs.compact import compact_integer
from actpack.codecs.encoded import Bits, Copy, Encoded, LogOf, Region
from actpack.engine.compiled import compiled_hooks
from actpack.engine.accounting import Stats, StorageSet, anchor
from actpack.engine.tracking import ModuleTracker, OpTracker
from actpack.policy.rules import ReluOutput, reads_region_only, rule_for, same_tensor
from actpack.strategies import SaveInfo, Strategy, resolve

DEFAULT_MIN_NUMEL = 2048

# Autograd nodes a parameter passes through before it is saved as a cast
# (autocast's cached weight casts, their transposes and views).
_CAST_NODES = frozenset(
    {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0",
     "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "AliasBackward0",
     "SliceBackward0", "SelectBackward0", "SqueezeBackward0", "SqueezeBackward1",
     "ReshapeAliasBackward0", "AsStridedBackward0"}
)  # fmt: skip


# Reasons to keep a tensor exact under which an exact copy is still fine.
_COPYABLE = frozenset({"tiny", "integer", "float64 (kept exact)", "op statistics"})


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


def _overlaps(t: Tensor) -> bool:
    return any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))


def _parameter_source(t: Tensor) -> str | None:
    """ "view" or "cast" if ``t`` is a parameter seen through views and casts."""
    node, depth, cast = t.grad_fn, 0, False
    while node is not None and depth < 6:
        name = type(node).__name__
        if name == "AccumulateGrad":
            return "cast" if cast else "view"
        if name not in _CAST_NODES or len(node.next_functions) != 1:
            return None
        cast = cast or name == "ToCopyBackward0"
        node, depth = node.next_functions[0][0], depth + 1
    return None


class Saved:
    """What the engine hands autograd in place of a tensor."""

    __slots__ = ("encoded", "stride", "requires_grad", "__weakref__")

    def __init__(self, encoded: Encoded, stride: tuple[int, ...] | None, requires_grad: bool):
        self.encoded = encoded
        self.stride = stride
        self.requires_grad = requires_grad

    def restore(self) -> Tensor:
        if self.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "actpack: a compressed saved tensor was unpacked with grad mode on "
                "(backward(create_graph=True) or double backward). Higher-order gradients "
                "through lossy codes would silently miss terms; run that part without "
                "actpack.compress or with strategy='none'."
            )
        x = self.encoded.decode()
        if self.stride is not None and not _same_strides(x, self.stride):
            x = torch.empty_strided(x.shape, self.stride, dtype=x.dtype, device=x.device).copy_(x)
        return x


class Engine:
    """Context manager installing actpack's saved-tensor hooks.

    Use :func:`actpack.compress` rather than this class directly.
    """

    def __init__(
        self,
        strategy: str | Strategy,
        *,
        model: nn.Module | None = None,
        min_numel: int = DEFAULT_MIN_NUMEL,
        track_modules: bool = False,
    ) -> None:
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative integer, got {min_numel!r}")
        self.strategy = resolve(strategy)
        self.min_numel = min_numel
        self.stats = Stats()
        self._model = model
        self._modules: ModuleTracker | None = None
        self._track_modules = track_modules and model is not None
        self._ops = OpTracker()
        self._hooks: Any = None
        self._depth = 0
        self._table: dict[tuple, list[tuple[weakref.ref, object, Saved]]] = {}
        self._held = StorageSet()
        self._held_compressed = StorageSet()
        self._param_ptrs: dict[int, str] = {}
        self._ordinals: dict[tuple, int] = {}

    # -- context management -------------------------------------------------
    def __enter__(self) -> Engine:
        self._depth += 1
        if self._depth > 1:
            return self
        self.stats = Stats()
        self._param_ptrs = {}
        self._ordinals: dict[tuple, int] = {}
        self.strategy.begin_forward()
        if self._model is not None:
            for p in self._model.parameters():
                self._param_ptrs[p.untyped_storage().data_ptr()] = "parameter"
            for b in self._model.buffers():
                self._param_ptrs[b.untyped_storage().data_ptr()] = "buffer"
            if self._track_modules and self._modules is None:
                self._modules = ModuleTracker(self._model)
        # Compile-native when torch can inline GraphModule hooks (eager saves
        # still come to self.pack/self.unpack through them).
        self._hooks = compiled_hooks(self) or torch.autograd.graph.saved_tensors_hooks(
            self.pack, self.unpack
        )
        self._hooks.__enter__()
        self._ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        exc = exc or (None, None, None)
        self._ops.__exit__(*exc)
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._table.clear()
        self._held.clear()
        self._held_compressed.clear()
        self.strategy.end_forward()

    def close(self) -> None:
        """Remove the module hooks this engine installed (if any)."""
        if self._modules is not None:
            self._modules.remove()
            self._modules = None

    # -- hooks ----------------------------------------------------------------
    def _skip_reason(self, t: Tensor) -> str | None:
        if type(t) is not Tensor and not isinstance(t, nn.Parameter):
            return "tensor subclass"
        if t.layout != torch.strided or t.device.type == "meta":
            return "unsupported layout"
        if _parameter_source(t) == "cast":
            return "parameter cast"
        kind = self._param_ptrs.get(t.untyped_storage().data_ptr())
        if kind is not None:
            return kind
        if t.grad_fn is None and not t.requires_grad and self._is_frozen_weight_cast(t):
            return "parameter cast"
        if t.dtype == torch.bool:
            return None if t.numel() >= self.min_numel else "tiny"
        if not t.is_floating_point():
            if t.is_complex():
                return "unsupported dtype"
            return "integer" if t.numel() >= self.min_numel else "tiny"
        if t.dtype == torch.float64:
            return "float64 (kept exact)"
        if t.numel() < self.min_numel:
            return "tiny"
        if self._is_op_internal(t):
            return "op statistics"
        if _overlaps(t):
            return "broadcast view"
        if self.strategy.lossless:
            return "exact strategy"
        return self.strategy.skip_reason(t)

    def _worth_copying(self, t: Tensor, reason: str) -> bool:
        if reason not in _COPYABLE or self.strategy.lossless:
            return False
        return 2 * t.numel() * t.element_size() < t.untyped_storage().nbytes()

    def _is_op_internal(self, t: Tensor) -> bool:
        # Neither an argument nor a differentiable output: an op's own
        # statistics (BatchNorm/LayerNorm mean and rstd, attention's
        # logsumexp).  Backward treats them as exact constants, so a lossy
        # code would bias every gradient upstream.
        if self._ops.name is None or t.grad_fn is not None:
            return False
        return not any(same_tensor(a, t) for a in self._ops.args) and not any(
            same_tensor(a, t) for a in self._ops.kwargs.values()
        )

    def _is_frozen_weight_cast(self, t: Tensor) -> bool:
        # A cast of a frozen weight (autocast, no grad) has no autograd link to
        # the parameter; recognise it by shape among the op's parameter args.
        for a in self._ops.args:
            if isinstance(a, nn.Parameter) and a.dtype != t.dtype and a.dim() == t.dim():
                if a.shape == t.shape or (a.dim() == 2 and a.shape[::-1] == t.shape):
                    return True
        return False

    def pack(self, t: Tensor) -> object:
        if (
            isinstance(t, nn.Parameter)
            or (t.is_leaf and t.requires_grad)
            or _parameter_source(t) == "view"
        ):
            return t  # parameters exist anyway: neither held nor compressed
        reason = self._skip_reason(t)
        module = self._modules.current if self._modules is not None else None
        op, args, kwargs = self._ops.name, self._ops.args, self._ops.kwargs
        compact = None
        if reason == "integer" and not self.strategy.lossless:
            compact = compact_integer(t, op, args, kwargs)
        if compact is not None:
            reason = None
        before = t.untyped_storage().nbytes() if self._held.add(t) else 0
        elements = before // t.element_size()
        if reason in ("parameter", "buffer"):
            return t  # the model's own storage: exists anyway
        if reason == "parameter cast":
            # Copies of weights, identical with or without actpack: reported
            # apart so that activation ratios are not diluted by model size.
            self.stats.weight_bytes += before
            return t
        if reason is not None and self._worth_copying(t, reason):
            # A small view keeps its whole storage alive; an exact copy frees it.
            saved = Saved(Copy(t.detach().clone()), None, t.requires_grad)
            self.stats.passthrough[reason] = self.stats.passthrough.get(reason, 0) + (
                saved.encoded.nbytes
            )
            self.stats.tensors += 1
            self.stats.add(module, op, before, saved.encoded.nbytes, elements)
            return saved
        if reason is not None:
            after = t.untyped_storage().nbytes() if self._held_compressed.add(t) else 0
            self.stats.passthrough[reason] = self.stats.passthrough.get(reason, 0) + after
            self.stats.tensors += 1
            self.stats.add(module, op, before, after, elements)
            return t
        rule = rule_for(t, op, args, kwargs) if t.is_floating_point() else None
        region_only = False
        if rule is not None and not (
            isinstance(rule, ReluOutput) and self.strategy.keeps_relu_exact
        ):
            # The activation itself needs only the region; other ops saving the
            # same tensor need unbiased values, which clamping would bias.
            region_only = reads_region_only(op)
            rule = rule if region_only else None
        tag = (region_only, rule)
        dedupe = (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t._version)
        for ref, entry_tag, saved in self._table.get(dedupe, ()):
            # A live entry pins its memory, so equal keys mean equal bytes.
            if ref() is not None and entry_tag == tag:
                self.stats.add(module, op, before, 0, elements)
                self.strategy.saved_again(saved.encoded, SaveInfo(op=op, module=module, rule=rule))
                return saved
        n = self._ordinals.get((module, op), 0)
        self._ordinals[(module, op)] = n + 1
        info = SaveInfo(op=op, module=module, rule=rule, key=f"{module or ''}/{op or ''}#{n}")
        saved = self._encode(t, info, compact, region_only)
        entries = self._table.setdefault(dedupe, [])
        entries.append(
            (weakref.ref(anchor(t), lambda _r, k=dedupe: self._table.pop(k, None)), tag, saved)
        )
        self.stats.tensors += 1
        self.stats.add(module, op, before, saved.encoded.nbytes, elements)
        return saved

    def _encode(
        self, t: Tensor, info: SaveInfo, compact: Encoded | None, region_only: bool = False
    ) -> Saved:
        # Restored tensors keep the original strides: some backward kernels
        # (oneDNN's RNN) read their inputs as if they had them.
        stride = t.stride() if _dense_order(t) else None
        if compact is not None:
            return Saved(compact, stride, False)
        if t.dtype == torch.bool:
            return Saved(Bits.encode(t), stride, False)
        x = t.detach()
        if region_only:
            region = Region(Bits.encode(info.rule.mask(x)), info.rule, x.dtype)
            return Saved(region, stride, t.requires_grad)
        if t.grad_fn is not None and type(t.grad_fn).__name__ == "LogSoftmaxBackward0":
            # log_softmax backward reads exp(output): code the probabilities, so
            # the restored exp(output) is unbiased (a code of the log would not be).
            return Saved(LogOf(self.strategy.encode(x.exp(), info)), stride, t.requires_grad)
        return Saved(self.strategy.encode(x, info), stride, t.requires_grad)

    def unpack(self, obj: object) -> Tensor:
        if isinstance(obj, Tensor):
            return obj
        return obj.restore()
