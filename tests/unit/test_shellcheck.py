"""Every shell script in the repository passes shellcheck (Debian's `shellcheck` package).

Scripts: ``*.sh``, ``*.sbatch`` and extension-less files whose first line is a
sh/bash shebang (``.ci/run``). launch/setup.sh installs shellcheck when missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "build", "runs", "data", "node_modules", ".local_s3"}
SHEBANG_SHELLS = ("sh", "bash")


def _is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".sbatch"):
        return True
    if path.suffix or not path.is_file():
        return False
    with path.open("rb") as f:
        first = f.readline(200).decode(errors="replace").strip()
    return first.startswith("#!") and first.split("/")[-1].split()[-1] in SHEBANG_SHELLS


def shell_scripts() -> list[Path]:
    found = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part == "__pycache__" for part in rel.parts):
            continue
        if path.is_file() and _is_shell_script(path):
            found.append(path)
    return found


def test_the_slurm_and_launch_scripts_are_found() -> None:
    names = {str(p.relative_to(REPO)) for p in shell_scripts()}
    assert {"slurm/train.sbatch", "slurm/prepare.sbatch"} <= names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: apt-get install shellcheck (launch/setup.sh does it)"
    # -x follows `source`d files; the dialect comes from each script's shebang.
    out = subprocess.run([shellcheck, "-x", "--severity=style", str(script)],
                         cwd=script.parent, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
