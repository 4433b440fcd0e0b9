"""Who is saving: the torch function being recorded and the module running."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.overrides import TorchFunctionMode


class OpTracker(TorchFunctionMode):
    """Remembers the outermost torch function call in progress.

    Saved-tensor hooks fire inside that call, so the engine can tell which op
    saves a tensor (and read its arguments, e.g. Hardtanh's bounds).
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs=None):
        kwargs = kwargs or {}
        outer = (self.name, self.args, self.kwargs)
        self.name = getattr(func, "__name__", None) or str(func)
        self.args, self.kwargs = args, kwargs
        try:
            return func(*args, **kwargs)
        finally:
            self.name, self.args, self.kwargs = outer


class ModuleTracker:
    """Keeps the qualified name of the innermost running submodule of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._exit(), always_call=True))

    @property
    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def _enter(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name or "<root>")

        return hook

    def _exit(self) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack:
                self.stack.pop()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()
