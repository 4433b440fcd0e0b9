"""Public entry points: compress, wrap, unwrap, measure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from actpack.engine import DEFAULT_MIN_NUMEL, Engine
from actpack.strategies import Strategy


def compress(
    strategy: str | Strategy = "actnn",
    *,
    model: nn.Module | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> Engine:
    """Context manager: compress every tensor autograd saves inside it.

    Parameters, buffers and autocast's weight casts are never compressed;
    tensors with fewer than ``min_numel`` elements pass through; bool masks
    are kept losslessly in 1 bit; the sign pattern ReLU-family backward reads
    stays exact.  Backward may run after the context exits.

    Args:
        strategy: a name (``"none"``, ``"fp16"``, ``"bf16"``, ``"int8"``,
            ``"actnn"``, ``"division"``) or a :class:`~actpack.Strategy`.
        model: optional; lets the engine recognise that model's buffers.
        min_numel: smallest tensor (in elements) worth compressing.

    Returns the engine; its ``stats`` hold the bytes saved for backward.

    Example::

        with actpack.compress("actnn") as ctx:
            loss = model(x).sum()
        loss.backward()
        print(ctx.stats.ratio)
    """
    return Engine(strategy, model=model, min_numel=min_numel)


_ATTR = "_actpack_engine"


def wrap(
    model: nn.Module,
    strategy: str | Strategy = "actnn",
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    track_modules: bool = False,
) -> nn.Module:
    """Make every forward of ``model`` run under :func:`compress`.

    The model itself is returned, with a forward pre-hook and hook added: it
    is never rebuilt, so its parameters, ``state_dict`` keys and weights stay
    exactly as they were.  :func:`unwrap` removes the hooks.

    Example::

        model = actpack.wrap(model, actpack.Division(block_size=8, bits=2))
        loss = model(x).sum()
        loss.backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, _ATTR):
        raise ValueError("model is already wrapped by actpack; call actpack.unwrap(model) first")
    engine = Engine(strategy, model=model, min_numel=min_numel, track_modules=track_modules)

    # Run eagerly even when the wrapped model is compiled as a whole: Dynamo
    # cannot trace entering saved-tensor hooks, and the hooks must be in place
    # before AOTAutograd compiles the forward (they are inlined into it).  The
    # model's forward stays one graph: the breaks fall before and after it.
    @torch.compiler.disable
    def enter(module: nn.Module, args: Any) -> None:
        engine.__enter__()

    @torch.compiler.disable
    def leave(module: nn.Module, args: Any, output: Any) -> None:
        engine.__exit__()

    handles = (
        model.register_forward_pre_hook(enter),
        model.register_forward_hook(leave, always_call=True),
    )
    object.__setattr__(model, _ATTR, (engine, handles))
    return model


def engine_of(model: nn.Module) -> Engine:
    """The engine of a wrapped model (its ``stats`` describe the last forward)."""
    try:
        return getattr(model, _ATTR)[0]
    except AttributeError:
        raise ValueError("model is not wrapped by actpack.wrap") from None


def unwrap(model: nn.Module) -> nn.Module:
    """Remove what :func:`wrap` added; the model is returned unchanged otherwise."""
    engine, handles = getattr(model, _ATTR, (None, ()))
    if engine is None:
        raise ValueError("model is not wrapped by actpack.wrap")
    for handle in handles:
        handle.remove()
    engine.close()
    object.__delattr__(model, _ATTR)
    return model


@dataclass
class Report:
    """Bytes autograd holds for backward, with and without compression."""

    strategy: str
    baseline_bytes: int
    compressed_bytes: int
    tensors: int
    baseline_elements: int = 0
    weight_bytes: int = 0
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    ops: dict[str, tuple[int, int]] = field(default_factory=dict)
    passthrough: dict[str, int] = field(default_factory=dict)
    peak_bytes: int | None = None
    baseline_peak_bytes: int | None = None

    @property
    def ratio(self) -> float:
        return (
            self.baseline_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")
        )

    @property
    def bits_per_element(self) -> float:
        """Compressed bits per element autograd would have held."""
        return 8 * self.compressed_bytes / self.baseline_elements if self.baseline_elements else 0.0

    def __str__(self) -> str:
        lines = [
            f"strategy {self.strategy}: {self.baseline_bytes / 2**20:.2f} MiB -> "
            f"{self.compressed_bytes / 2**20:.2f} MiB saved for backward ({self.ratio:.2f}x)"
        ]
        if self.peak_bytes is not None:
            lines.append(
                f"peak memory of the step: {self.baseline_peak_bytes / 2**20:.1f} MiB -> "
                f"{self.peak_bytes / 2**20:.1f} MiB"
            )
        if self.weight_bytes:
            lines.append(
                f"  weight casts held for backward (never compressed, not counted above): "
                f"{self.weight_bytes / 2**20:.2f} MiB"
            )
        for reason, n in sorted(self.passthrough.items(), key=lambda kv: -kv[1]):
            lines.append(f"  passed through ({reason}): {n / 2**20:.3f} MiB")
        return "\n".join(lines)


def _default_loss(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output.float().sum()
    if isinstance(output, (tuple, list)):
        return sum(_default_loss(o) for o in output if isinstance(o, Tensor))
    if isinstance(output, dict):
        return sum(_default_loss(o) for o in output.values() if isinstance(o, Tensor))
    if hasattr(output, "loss") and isinstance(output.loss, Tensor):
        return output.loss
    raise TypeError("measure: cannot reduce the model output to a loss; pass loss_fn=")


def _step(model: nn.Module, inputs: tuple, loss_fn: Callable | None, ctx: Any) -> None:
    with ctx:
        out = model(*inputs)
        loss = loss_fn(out) if loss_fn is not None else _default_loss(out)
    params = [p for p in model.parameters() if p.requires_grad]
    if loss.requires_grad and params:
        torch.autograd.grad(loss, params, allow_unused=True)


def measure(
    model: nn.Module,
    *inputs: Any,
    strategy: str | Strategy = "actnn",
    loss_fn: Callable[[Any], Tensor] | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> Report:
    """Run one forward and backward of ``model`` and report the bytes saved.

    The count is exact: every tensor autograd saves is seen by the engine.
    Parameter ``.grad`` and buffers (BatchNorm statistics) are left as they
    were.  On CUDA the peak memory of the step is reported with and without
    compression.

    Example::

        report = actpack.measure(model, x, strategy="division")
        print(report.ratio, report.modules)
    """
    buffers = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not isinstance(v, nn.Parameter)
    }
    engine = Engine(strategy, model=model, min_numel=min_numel, track_modules=True)
    device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
    peak = baseline_peak = None
    try:
        if device.type == "cuda":
            baseline_peak = _peak(lambda: _step(model, inputs, loss_fn, _null()), device)
            peak = _peak(lambda: _step(model, inputs, loss_fn, engine), device)
        else:
            _step(model, inputs, loss_fn, engine)
    finally:
        engine.close()
        with torch.no_grad():
            state = model.state_dict()
            for k, v in buffers.items():
                state[k].copy_(v)
    s = engine.stats
    return Report(
        strategy=repr(engine.strategy),
        baseline_bytes=s.baseline_bytes,
        compressed_bytes=s.compressed_bytes,
        tensors=s.tensors,
        baseline_elements=s.baseline_elements,
        weight_bytes=s.weight_bytes,
        modules={k: (v[0], v[1]) for k, v in s.by_module.items()},
        ops={k: (v[0], v[1]) for k, v in s.by_op.items()},
        passthrough=dict(s.passthrough),
        peak_bytes=peak,
        baseline_peak_bytes=baseline_peak,
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _peak(fn: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
