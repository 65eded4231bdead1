"""The kill/resume soak (``benchmarks/soak_kill_resume.py``), short: 2 SIGKILLs of a real 2-rank run with S3.

The benchmark itself makes 20 kills (its default) and prints the table the README
quotes; this keeps its checks in the suite at a size the suite can afford.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.launching import REPO, clean_env, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_soak_two_kills_no_corrupt_resume_no_lost_step_every_step_once(fashion_shards, tmp_path):
    out = tmp_path / "soak.json"
    result = run([sys.executable, "benchmarks/soak_kill_resume.py", "--kills", "2", "--steps", "40", "--every", "3",
                  "--shards", str(fashion_shards), "--workdir", str(tmp_path / "work"), "--json", str(out)],
                 env=clean_env(), cwd=REPO, timeout_s=800, merge_stderr=True)
    assert out.exists(), result.stdout[-4000:]
    soak = json.loads(out.read_text())
    assert soak["kills"] == 2, result.stdout[-4000:]
    assert soak["corrupt_resumes"] == 0 and soak["lost_committed_steps"] == 0, result.stdout[-4000:]
    assert soak["steps_not_exactly_once"] == 0 and soak["steps_not_logged"] == 0
    assert soak["steps_with_different_loss"] == 0 and soak["final_weights_bitwise_equal"]
    assert result.returncode == 0, result.stdout[-4000:]
