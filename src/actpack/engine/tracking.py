"""Who is saving: the torch function being recorded and the module running."""

from __future__ import annotations

import threading
from typing import Any, Callable

from torch import nn
from torch.compiler import is_compiling
from torch.overrides import TorchFunctionMode

from actpack.engine.fills import EXTREME_FILL, FILL_OPS, SCALARS, FillTags, scalar_fill
from actpack.engine.untraced import eager_only

_NUMBERS = (float, int)


class OpTracker(TorchFunctionMode):
    """Remembers the outermost torch function call in progress.

    Saved-tensor hooks fire inside that call, so the engine can tell which op
    saves a tensor (and read its arguments, e.g. Hardtanh's bounds).  It also
    tags the tensors holding a mask's extreme fill (``fills``,
    :class:`~actpack.engine.fills.FillTags`): autograd does not record fill
    values, and a group code of such a tensor is useless.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}
        self.fills = FillTags()

    @eager_only  # called from C++ by ops that eager code runs under torch.compile
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs=None):
        kwargs = kwargs or {}
        if is_compiling():
            # Dynamo inlines an active mode's __torch_function__ into the graph
            # it traces.  The compiled engine decides from the graphs, not from
            # this tracker; and the fill tags' id() of containers cannot be
            # reconstructed across a graph break, so Dynamo abandoned the whole
            # frame and ran the model eagerly (`with compress(): compiled(x)` on
            # any model with a masked_fill/where of an extreme constant).
            return func(*args, **kwargs)
        outer = (self.name, self.args, self.kwargs)
        name = self.name = getattr(func, "__name__", None) or str(func)
        self.args, self.kwargs = args, kwargs
        try:
            out = func(*args, **kwargs)
        finally:
            self.name, self.args, self.kwargs = outer
        fills = self.fills
        if fills or name in FILL_OPS:
            fills.after(name, args, kwargs, out)
        elif name in SCALARS:
            # (1 - mask) * finfo.min, zeros - 1e9, x.add(1 - mask, alpha=-1e9)
            if (
                len(args) > 1 and type(args[1]) in _NUMBERS and not abs(args[1]) < EXTREME_FILL
            ) or (kwargs and scalar_fill(args, kwargs)):
                fills.after(name, args, kwargs, out)
        return out


class _Push:
    """Forward pre-hook of one submodule: push its qualified name."""

    def __init__(self, tracker: ModuleTracker, name: str) -> None:
        self.tracker, self.name = tracker, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.tracker.stack.append(self.name)


class _Pop:
    """Forward hook of one submodule (always called): pop its name."""

    def __init__(self, tracker: ModuleTracker) -> None:
        self.tracker = tracker

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self.tracker.stack
        if stack:
            stack.pop()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


#: The name of the tracked model itself in module rows.
ROOT = "<root>"


class ModuleTracker:
    """Keeps the qualified name of the innermost running submodule of a model.

    The hooks are small picklable objects, so a model carrying them can be
    deep-copied or saved; the name stack is per thread.  A copy's hooks
    belong to a tracker copy that no engine owns: :meth:`strip` removes
    such strays before an engine installs its own.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self.model = model
        self.strip(model, owner=None)  # strays copied along with a wrapped model
        for name, module in model.named_modules():
            module.register_forward_pre_hook(_Push(self, name or ROOT))
            module.register_forward_hook(_Pop(self), always_call=True)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy tracks nothing until an engine installs a new tracker

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()
        self.model = None

    @property
    def stack(self) -> list[str]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @property
    def current(self) -> str | None:
        stack = self.stack
        return stack[-1] if stack else None

    @staticmethod
    def strip(model: nn.Module, owner: ModuleTracker | None) -> None:
        """Remove ``owner``'s hooks from ``model``'s modules; with ``owner=None``,
        those of trackers no engine owns (copies, whose ``model`` is None)."""
        for module in model.modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if not hooks:
                    continue
                for key in [
                    k
                    for k, h in hooks.items()
                    if isinstance(h, (_Push, _Pop))
                    and (h.tracker is owner if owner is not None else h.tracker.model is None)
                ]:
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)

    def remove(self) -> None:
        if self.model is not None:
            self.strip(self.model, owner=self)
        self.stack.clear()
