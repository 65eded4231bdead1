"""launch/setup.sh fails loudly when pip fails, and the test command reports skips.

setup.sh runs in a scratch copy of the repository whose ``.venv/bin/python`` is a
stub: it logs its arguments, prints pip's noisy warning and, when told to, fails
``pip install`` the way an unreachable index or a bad pin does. No network, no
real install.
"""

from __future__ import annotations

import shutil
import subprocess
import re
from pathlib import Path

import pytest

from tests.launching import REPO

pytestmark = pytest.mark.timeout(60)

STUB_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1 $2 $3" = "-m pip install" ]; then
    echo "WARNING: Location 'x' is ignored"
    if [ -n "${STUB_PIP_FAILS:-}" ]; then
        echo "ERROR: No matching distribution found for torch==2.13.0" >&2
        exit 1
    fi
fi
exit 0
"""


def _setup_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "setup.sh", root / "launch" / "setup.sh")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    return root


def _run_setup(root: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "launch" / "setup.sh")], capture_output=True, text=True, timeout=50,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(root), **env})


def test_a_failed_pip_install_stops_setup_with_a_message(tmp_path: Path) -> None:
    root = _setup_copy(tmp_path)
    result = _run_setup(root, STUB_PIP_FAILS="1")
    assert result.returncode != 0
    assert "No matching distribution" in result.stdout  # pip's own words reach the user (through the filter)
    assert "setup: 'pip install --upgrade pip' failed" in result.stderr
    assert "setup: done" not in result.stdout
    calls = (root / ".venv" / "bin" / "calls.log").read_text().splitlines()
    assert len(calls) == 1  # stopped at the first failure


def test_a_quiet_successful_install_passes_and_the_noise_is_filtered(tmp_path: Path) -> None:
    root = _setup_copy(tmp_path)
    result = _run_setup(root)
    assert result.returncode == 0, result.stderr
    assert "setup: done" in result.stdout
    assert "WARNING: Location" not in result.stdout + result.stderr
    calls = (root / ".venv" / "bin" / "calls.log").read_text().splitlines()
    assert calls[:2] == ["-m pip install -q --upgrade pip", "-m pip install -q -e .[test]"]


def test_the_test_command_reports_skips_with_their_reasons() -> None:
    """``pytest -ra`` prints every skip's reason in the summary (launch/test.sh runs plain ``pytest tests``)."""
    addopts = re.search(r'^addopts = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert addopts and "-ra" in addopts.group(1).split()
    assert "pytest tests" in (REPO / "launch" / "test.sh").read_text()
