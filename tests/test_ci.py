"""CI's test command ends its log with pytest's closing "N passed" line."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_log_ends_with_the_pytest_summary(tmp_path: Path) -> None:
    """The test command of .ci/run, with the project's pytest settings, on a two-test file."""
    line = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]  # nothing prints after
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "pytest"], line
    (tmp_path / "test_two.py").write_text(
        "import pytest\n\ndef test_a():\n    pass\n\n"
        "@pytest.mark.skip(reason='r')\ndef test_b():\n    pass\n"
    )
    proc = subprocess.run(
        [sys.executable, *argv[1:], "-c", str(ROOT / "pyproject.toml"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.rstrip().splitlines()[-1]
    assert re.fullmatch(r"=* ?1 passed, 1 skipped in [\d.]+s ?=*", last), proc.stdout
