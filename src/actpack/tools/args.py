"""Command-line input the actpack commands share: checked argument types, help text, usage errors.

Bad input is refused by argparse itself (one ``error:`` line, exit status
2) before any work starts, never by a traceback or a table of zeros.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

import actpack
from actpack.tools.specs import ModelSpec, parse_spec

__all__ = [
    "AUTOCAST_CHOICES",
    "AUTOCAST_HELP",
    "CLI_EXTRA",
    "HelpFormatter",
    "UsageError",
    "check_optional",
    "device",
    "fraction",
    "model_spec",
    "nonnegative_float",
    "nonnegative_int",
    "plain",
    "positive_float",
    "positive_int",
    "require",
    "short_dtype",
    "strategy_name",
]

#: What installs every optional dependency of the commands.
CLI_EXTRA = "pip install 'actpack[cli]'"


class UsageError(ValueError):
    """Bad input found after parsing (it depends on several options); shown as argparse's error."""


def _checked(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type by it in its own messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: v > 0, "a positive number")
nonnegative_float = _checked(float, lambda v: v >= 0, "a non-negative number")
fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def strategy_name(value: str) -> str:
    """argparse type: any name :func:`actpack.resolve` accepts."""
    try:
        actpack.resolve(value)
    except (ValueError, TypeError) as exc:
        # The API's hint about Strategy objects means nothing on a command line.
        raise argparse.ArgumentTypeError(str(exc).split(" (or pass a Strategy")[0]) from None
    return value.lower()  # names are case-insensitive: shown as the API names them


# The usual spellings of each floating dtype (strategy names say bf16/fp16,
# torch says bfloat16/float16).
_DTYPE_SPELLINGS = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}  # fmt: skip


#: ``--autocast`` of ``bench`` and ``train``: torch's names, as ``report --dtype``
#: spells them (``dtype_spelling`` also reads bf16, fp16 and half).
AUTOCAST_CHOICES = ("none", "bfloat16", "float16")
AUTOCAST_HELP = "(bf16 and fp16 or half are read as bfloat16 and float16)"


def short_dtype(name: str) -> str:
    """The short name of a dtype spelling (``bfloat16`` and ``bf16``: ``bf16``;
    ``float16``: ``fp16``; ``float32``: ``fp32``), as tables and notes show it;
    other text as it is."""
    full = _DTYPE_SPELLINGS.get(str(name).lower())
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(full or "", name)


def dtype_spelling(choices: Sequence[str]) -> Callable[[str], str]:
    """argparse type for an option with ``choices`` of dtype names: any usual
    spelling of one of them (``bf16`` or ``bfloat16``, ``fp16``, ``float16``
    or ``half``, ``fp32`` or ``float32``) is read as the spelling ``choices``
    uses; anything else is left for argparse's check of ``choices``."""

    def parse(text: str) -> str:
        same = _DTYPE_SPELLINGS.get(text.lower(), text.lower())
        return next((c for c in choices if _DTYPE_SPELLINGS.get(c, c) == same), text)

    return parse


def model_spec(text: str) -> ModelSpec:
    """argparse type: a model spec (see :mod:`actpack.tools.specs`)."""
    try:
        return parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device(text: str) -> str:
    """argparse type: a torch device that exists on this machine."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        # meta tensors hold no values (nothing to time or code), and other
        # backends are untested: say so instead of a traceback mid-run.
        raise argparse.ArgumentTypeError(
            f"{text}: actpack's commands run on cpu or cuda, not {dev.type}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: CUDA is not available here (torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return text


def plain(doc: str | None) -> str:
    """A docstring as plain text for ``--help``: Sphinx roles and ``literals`` unwrapped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text.replace("::\n", ":\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows each option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or any(default is v for v in (None, False, argparse.SUPPRESS))  # 0 is shown
            or "default" in text
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})"


def check_optional(quiet: bool) -> None:
    """Say once, up front, what an optional dependency that is missing costs."""
    if not quiet and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is None:
        print(
            f"actpack: no progress bars: tqdm is not installed ({CLI_EXTRA})",
            file=sys.stderr,
        )


def require(module: str, option: str) -> None:
    """Raise :class:`UsageError`, before any work, when ``option`` needs a missing ``module``."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{option} needs {module}, which is not installed: {CLI_EXTRA}")


def writable(path: str | os.PathLike | None, option: str) -> None:
    """Raise :class:`UsageError`, before any work, when ``option``'s output
    file ``path`` cannot be written (its folder is made if missing, as the
    writers do): a run must not end in a traceback after its training."""
    if path is None:
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".actpack-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"{option} {path}: cannot write there ({exc.strerror or exc}); choose another path"
        ) from None
