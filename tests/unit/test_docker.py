"""The Dockerfile, checked without a Docker engine (there is none here).

What can go stale without a build: a COPY of a file that moved or that
.dockerignore drops, a base image whose torch differs from pyproject's pin (pip
would then replace the CUDA build), dependencies that drift from pyproject, an
entry point naming files that do not exist, running as root.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    logical, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    pairs = []
    for item in logical:
        keyword, _, rest = item.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _pins() -> dict[str, str]:
    """name -> version of every ``name==version`` dependency in pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(dep.split("==", 1) for dep in deps if "==" in dep)


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    copies = [shlex.split(args) for keyword, args in _instructions() if keyword == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
    copied = {s.rstrip("/") for args in copies for s in args[:-1]}
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "vae_train", "train.py"} <= copied


def test_base_image_torch_matches_the_pin_and_can_compile() -> None:
    args = dict(a.split("=", 1) for keyword, a in _instructions() if keyword == "ARG" and "=" in a)
    image = args["BASE_IMAGE"]
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch"
    assert tag.split("-")[0] == _pins()["torch"], f"{image} does not carry torch=={_pins()['torch']}"
    assert "cuda" in tag and tag.endswith("devel"), "build-ops needs nvcc: use a CUDA devel image"
    froms = [a for keyword, a in _instructions() if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"]


def test_installed_dependencies_are_exactly_pyprojects_pins(tmp_path: Path) -> None:
    runs = [a for keyword, a in _instructions() if keyword == "RUN"]
    installer = next(r for r in runs if "requirements.txt" in r and "tomllib" in r)
    # Run the Dockerfile's own extraction command on this checkout.
    command = re.search(r"python -c (\"[^\"]*\")", installer).group(1)
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    out = subprocess.run([sys.executable, "-c", shlex.split(command)[0]], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d.replace(" ", "") for d in expected] == out
    assert "pip install -r /tmp/requirements.txt" in installer
    # Nothing else may install a dependency with its own version, and the package
    # itself goes in without re-resolving (--no-deps).
    for run in runs:
        for name, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", run):
            assert _pins().get(name) == version, f"Dockerfile pins {name}=={version}, pyproject differs"
    assert any("pip install --no-deps ." in r for r in runs)


def test_entry_point_exists_and_runs_as_a_normal_user() -> None:
    instructions = _instructions()
    keywords = [k for k, _ in instructions]
    cmd = json.loads(dict(instructions)["CMD"])
    line = " ".join(cmd)
    assert "accelerate launch" in line and " train.py " in line
    for path in re.findall(r"[\w./-]+\.(?:py|yaml)", line):
        assert (REPO / path).is_file(), f"the entry point names {path}, which does not exist"
        assert any(path == s or path.startswith(s.rstrip("/") + "/")
                   for k, a in instructions if k == "COPY" for s in shlex.split(a)[:-1]), f"{path} is not copied"
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("CMD")
    build_ops = [a for k, a in instructions if k == "RUN" and "vae-train build-ops" in a]
    assert build_ops and keywords.index("USER") < keywords.index("RUN", keywords.index("USER"))
    from vae_train.cli import build_parser

    assert build_parser().parse_args(["build-ops", "--cuda"]).cuda is True
