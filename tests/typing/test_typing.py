"""mypy accepts typed task calls (accepted.py, checked in CI) and rejects wrong ones (rejected.py.txt)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_mypy_rejects_each_wrong_call(tmp_path: Path) -> None:
    # Given a module whose marked lines call a task with the wrong arguments
    source = (HERE / "rejected.py.txt").read_text()
    module = tmp_path / "rejected.py"
    module.write_text(source)
    expected = {
        number: line.split("# E:")[1].strip()
        for number, line in enumerate(source.splitlines(), start=1)
        if "# E:" in line
    }
    # When mypy checks it
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--config-file",
            "/dev/null",
            str(module),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    # Then every marked line, and only those, is an error of the expected code
    found: dict[int, set[str]] = {}
    for match in re.finditer(r"rejected\.py:(\d+): error: .*\[([a-z-]+)\]", run.stdout):
        found.setdefault(int(match[1]), set()).add(match[2])
    assert set(found) == set(expected), run.stdout
    for number, code in expected.items():
        assert code in found[number], (number, run.stdout)
