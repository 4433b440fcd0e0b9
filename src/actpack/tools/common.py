"""Helpers the actpack commands share: strategies, devices, environment, JSON, progress bars."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import actpack
from actpack.tools.specs import ModelSpec

__all__ = [
    "autocast_context",
    "default_device",
    "environment",
    "make_strategy",
    "mib",
    "progress",
    "progress_bar",
    "synchronize",
    "write_json",
]


def make_strategy(name: str, seed: int) -> actpack.Strategy:
    """A fresh strategy for ``name`` whose random state is seeded with ``seed``."""
    strategy = actpack.resolve(name)
    state = strategy.state_dict()
    if "seed" in state:
        state["seed"] = int(seed)
        strategy.load_state_dict(state)
    return strategy


def autocast_context(device: torch.device, dtype: str | None) -> Any:
    """Autocast to ``dtype`` (``"bfloat16"``, ``"float16"``); none for ``None``, ``"none"``,
    ``"fp32"``."""
    if dtype in (None, "none", "fp32"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine description stored with every result."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "actpack": actpack.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_bytes"] = props.total_memory
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, ModelSpec):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _tqdm(quiet: bool, **kwargs: Any) -> Any:
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, pipes).
    return tqdm(disable=None, leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)


def progress(iterable: Any, *, quiet: bool = False, **kwargs: Any) -> Any:
    """``iterable`` with a tqdm progress bar on stderr, shown only on a terminal and
    unless ``quiet``.

    Without tqdm installed the iterable comes back unchanged (the command
    says so once when it starts, see :func:`actpack.tools.args.check_optional`).
    """
    bar = _tqdm(quiet, iterable=iterable, **kwargs)
    return iterable if bar is None else bar


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(total: int, *, quiet: bool = False, **kwargs: Any) -> Any:
    """A bar of ``total`` steps, advanced by ``update()`` and shown as :func:`progress`
    shows it; ``close()`` it when done."""
    bar = _tqdm(quiet, total=total, **kwargs)
    return _NoBar() if bar is None else bar
