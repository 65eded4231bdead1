"""The exact-resume property with the real trainer: ``torchrun train.py``, 2 ranks, CPU, fp32, ZeRO-1, 2 and 3.

An uninterrupted run of 2N steps (the session's ``reference_run``, shared with
test_trainer_faults.py) and a run SIGKILLed right after its step-N checkpoint
committed to S3 (``tests/integration/train_kill_after_save.py``), then resumed
from S3 into an empty run dir with ``resume=auto``, end with bitwise-identical
weights (real Fashion-MNIST shards, real SeaweedFS, the fused op required). The
resumed run's final checkpoint is then exported (``vae-train export``: the ZeRO
partitions merged) and loaded without DeepSpeed.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.trainer_runs import REFERENCE
from tests.launching import clean_env, finish, kill_group, start, torchrun
from vae_train.cli import main
from vae_train.export import consolidated_state_dict, load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = REFERENCE.steps // 2


def _start(shards: Path, run_dir: Path, env: dict[str, str], stage: int, *overrides: str,
           script: str = "train.py") -> subprocess.Popen:
    cmd = torchrun(script, "--config", "configs/tiny.yaml",
                   f"data.train={shards}", f"data.val={shards}", f"run_dir={run_dir}", f"distributed.zero_stage={stage}",
                   "distributed.precision=fp32", f"train.max_steps={2 * N}", f"checkpoint.every_steps={REFERENCE.every}",
                   "logging.image_every=0", "logging.histogram_every=0", "resume=auto", *overrides)
    return start(cmd, env=clean_env(VAE_TRAIN_REQUIRE_FUSED="1", **env))


def _finish(proc: subprocess.Popen) -> str:
    """The run's output, after checking that it exited cleanly (a hung run is killed and fails)."""
    result = finish(proc, timeout_s=300)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def _has(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError:
        return False


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])
def test_sigkill_then_resume_from_s3_is_bitwise_exact(fashion_shards, s3_server, s3_bucket, tmp_path, stage,
                                                      reference_run):
    env = s3_server.env()
    remote = f"s3://{s3_bucket}/run"
    client = s3_server.client()

    # Same run, SIGKILLed right after its step-N checkpoint committed and uploaded to S3.
    killed = _start(fashion_shards, tmp_path / "killed", {**env, "VAE_TEST_KILL_AFTER_STEP": str(N)}, stage,
                    f"checkpoint.remote={remote}", script="tests/integration/train_kill_after_save.py")
    try:
        out, _ = killed.communicate(timeout=300)
    finally:
        kill_group(killed)
    assert killed.returncode == -signal.SIGKILL, out[-4000:]
    assert _has(client, s3_bucket, f"run/step-{N:08d}/manifest.json")
    assert not _has(client, s3_bucket, f"run/step-{N + 5:08d}/manifest.json")

    # Resume on a machine with nothing local: everything comes from S3.
    resumed = tmp_path / "resumed"
    log = _finish(_start(fashion_shards, resumed, env, stage, f"checkpoint.remote={remote}"))
    assert f"resumed from {resumed}/checkpoints/step-{N:08d} at step {N} (exact: same world size 2)" in log
    assert s3_server.secret_key not in log

    want = reference_run(stage).weights
    got, _ = consolidated_state_dict(resumed / "checkpoints" / f"step-{2 * N:08d}")
    assert sorted(want) == sorted(got)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    manifest = json.loads((resumed / "checkpoints" / f"step-{2 * N:08d}" / "manifest.json").read_text())
    assert manifest["zero_stage"] == stage

    # Export merges the ZeRO partitions; the model loads without DeepSpeed and holds exactly those weights.
    export = tmp_path / "export"
    assert main(["export", str(resumed / "checkpoints" / f"step-{2 * N:08d}"), "--out", str(export)]) == 0
    exported = load_model(export).state_dict()
    assert sorted(exported) == sorted(got)
    assert all(torch.equal(exported[k], got[k]) for k in got)
