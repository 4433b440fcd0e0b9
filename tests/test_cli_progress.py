"""Progress bars: on stderr when it is a terminal, absent from logs and pipes."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from actpack.tools import args as cli_args
from actpack.tools import cli
from actpack.tools.common import progress, progress_bar

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    master, slave = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where tqdm draws nothing; a real one is not.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "actpack.tools.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=300), out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    ("argv", "bars"),
    [
        (["report", "--models", "resnet:tiny", "--strategies", "none", "actnn",
          "--batch-size", "2"], ["measuring"]),
        (["bench", "--model", "resnet", "--size", "tiny", "--batch-size", "2", "--strategies",
          "actnn", "--alternatives", "--steps", "2"], ["saved bytes", "warm-up", "timing"]),
    ],
)  # fmt: skip
def test_progress_on_a_terminal(argv: list[str], bars: list[str]) -> None:
    status, out, err = _run_on_a_terminal(argv)
    assert status == 0, err
    for bar in bars:
        assert bar in err, err
    assert "|" in out  # the table itself goes to stdout, untouched
    assert "Traceback" not in err


def test_no_progress_in_logs(capsys) -> None:
    """stderr that is not a terminal (CI logs, pipes) gets no bar."""
    assert cli.main(["report", "--models", "resnet:tiny", "--strategies", "none"]) == 0
    assert "measuring" not in capsys.readouterr().err


def test_quiet_and_missing_tqdm_give_plain_iterables(monkeypatch) -> None:
    items = [1, 2, 3]
    assert progress(items, quiet=True) is items
    bar = progress_bar(3, quiet=True)
    bar.update()
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert progress(items) is items


def test_missing_tqdm_is_said_once_up_front(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    cli_args.check_optional(quiet=False)
    assert err.getvalue() == (
        "actpack: no progress bars: tqdm is not installed (pip install 'actpack[cli]')\n"
    )
    cli_args.check_optional(quiet=True)
    assert err.getvalue().count("\n") == 1
