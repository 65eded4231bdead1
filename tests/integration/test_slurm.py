"""slurm/train.sbatch and slurm/prepare.sbatch on a real one-node SLURM cluster.

The cluster (tests/fixtures/slurm.py) has one node with 2 CPUs, so every
training job runs 2 ranks on it (GPUS_PER_NODE=2, gloo, DeepSpeed ZeRO-2) with
the tiny config, and checkpoints go to the session's real S3 server.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.data import FASHION_LIMIT, FASHION_SAMPLES_PER_SHARD
from tests.fixtures.s3 import S3Server
from tests.fixtures.slurm import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster, left with an empty queue whatever the test did."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def _submit_train(cluster: SlurmCluster, s3: S3Server, bucket: str, run_dir: Path, mode: str,
                  overrides: list[str], shards: Path) -> int:
    env = dict(cluster.env, **s3.env(), LAUNCH_MODE=mode, GPUS_PER_NODE="2", DS_ACCELERATOR="cpu",
               S3_REMOTE=f"s3://{bucket}/run", RUN_DIR=str(run_dir), PYTHON=sys.executable)
    return cluster.sbatch(
        "--chdir", str(REPO), "--output", str(run_dir / "slurm-%j.out"), "--time=10",
        "slurm/train.sbatch", "--config", "configs/tiny.yaml", "distributed.zero_stage=2",
        f"data.train={shards}", f"data.val={shards}", *overrides, env=env)


def _train_steps(run_dir: Path) -> list[int]:
    """Steps logged to metrics.jsonl (one row per step: logging.every_steps=1 in tiny.yaml)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if row["split"] == "train"]


def _committed_steps(s3: S3Server, bucket: str) -> set[int]:
    """Steps with a manifest (= committed) under s3://bucket/run/."""
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="run/").get("Contents", [])]
    return {int(m.group(1)) for k in keys if (m := re.fullmatch(r"run/step-(\d+)/manifest\.json", k))}


def _log(run_dir: Path, job: int) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("mode", "signal_name", "workers"), [("torchrun", "USR1", 0), ("srun", "TERM", 1)])
def test_signalled_job_checkpoints_requeues_and_resumes_from_s3_exactly_once(
        cluster: SlurmCluster, s3_server: S3Server, fashion_shards: Path, tmp_path: Path,
        mode: str, signal_name: str, workers: int) -> None:
    """USR1 (time-limit warning) or TERM (preemption) mid-run: every step is trained exactly once.

    With a DataLoader worker per rank, the job-wide signal also reaches the workers,
    which must survive it while their trainer saves. The same job, once requeued,
    runs to the end: it is also the check that train.sbatch in each launch mode
    runs 2 ranks at ZeRO-2, commits every ``checkpoint.every_steps`` and the final
    step to S3, and that a finished run does not requeue itself (one job instead
    of a separate uninterrupted one per mode: the suite's time).
    """
    max_steps = 40
    bucket = s3_server.new_bucket()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = _submit_train(cluster, s3_server, bucket, run_dir, mode,
                        [f"train.max_steps={max_steps}", "checkpoint.every_steps=15",
                         f"data.num_workers={workers}"], fashion_shards)

    deadline = time.monotonic() + 180
    while len(_train_steps(run_dir)) < 3:
        assert time.monotonic() < deadline, "the job did not start training\n" + _log(run_dir, job)
        assert cluster.job_states(job) in (["PENDING"], ["RUNNING"]), _log(run_dir, job)
        time.sleep(0.1)
    cluster.run("scancel", f"--signal={signal_name}", str(job))

    # Wait for the requeue, then hold the job and delete the local checkpoints so the
    # restart must resume from S3 (as it would on another node with an empty disk).
    deadline = time.monotonic() + 120
    while cluster.job_info(job).get("Restarts") != "1":
        assert time.monotonic() < deadline, "the job was not requeued\n" + _log(run_dir, job)
        time.sleep(0.1)
    cluster.run("scontrol", "hold", str(job), check=False)
    cluster.wait_state(job, {"PENDING"}, timeout=60)
    preempt_step = max(_train_steps(run_dir))
    assert preempt_step in _committed_steps(s3_server, bucket)
    for path in sorted((run_dir / "checkpoints").glob("**/*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    cluster.run("scontrol", "release", str(job))

    state = cluster.wait_done(job, timeout=240)
    log = _log(run_dir, job)
    assert state == "COMPLETED", log
    assert cluster.job_info(job)["Restarts"] == "1"  # requeued once by the signal, not again once finished
    assert f"mode {mode}" in log and "restart 0" in log
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["zero_stage"]) == (2, 2)
    assert f"SIG{signal_name} received: saving step {preempt_step}" in log
    assert f"requeued SLURM job {job} at step {preempt_step}/{max_steps}" in log
    assert "restart 1" in log
    assert re.search(rf"newest committed remote checkpoint is s3://{bucket}/run/step-0*{preempt_step}\b", log), log
    assert f"at step {preempt_step} (exact: same world size 2)" in log
    assert 3 <= preempt_step < max_steps
    steps = _train_steps(run_dir)
    assert sorted(steps) == list(range(1, max_steps + 1)), "a step was trained twice or skipped"
    committed = _committed_steps(s3_server, bucket)
    # Every 15 steps and the final step (keep_last=3 may have dropped the oldest); nothing else but the signal's save.
    assert {30, max_steps} <= committed <= {15, 30, preempt_step, max_steps}, committed


def _digests(directory: Path) -> dict[str, str]:
    """sha256 of every shard and the index (the plan and slice records are bookkeeping)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.suffix == ".tar" or p.name == "index.json"}


@pytest.mark.timeout(300)
def test_prepare_job_array_writes_the_same_shards_as_one_process(
        cluster: SlurmCluster, fashion_shards: Path, tmp_path: Path) -> None:
    # The session's shards are the one-process run: `vae-train prepare fashion-mnist` with these options, 1 worker.
    options = ["--limit", str(FASHION_LIMIT), "--samples-per-shard", str(FASHION_SAMPLES_PER_SHARD), "--no-progress"]
    single, sliced = fashion_shards, tmp_path / "sliced"

    env = dict(cluster.env, PYTHON=sys.executable)
    array = cluster.sbatch("--chdir", str(REPO), "--array=0-2", "--cpus-per-task=1",
                           "--output", str(tmp_path / "%x-%A_%a.out"),
                           "slurm/prepare.sbatch", "fashion-mnist", "--out", str(sliced), *options, env=env)
    assert cluster.wait_done(array, timeout=240) == "COMPLETED"
    first_log = (tmp_path / f"vae-prepare-{array}_0.out").read_text()
    match = re.search(r"index job (\d+) runs after array job", first_log)
    assert match, first_log
    index_job = int(match.group(1))
    state = cluster.wait_done(index_job, timeout=120)
    index_log = (tmp_path / f"vae-prepare-index-{index_job}.out").read_text()
    assert state == "COMPLETED", index_log

    expected = _digests(single)
    assert "index.json" in expected and len(expected) > 3
    assert _digests(sliced) == expected
    logs = "".join(p.read_text() for p in tmp_path.glob(f"vae-prepare-{array}_*.out"))
    assert all(f"writes slice {i} of 3" in logs for i in range(3)), logs


@pytest.mark.timeout(120)
def test_unknown_launch_mode_fails_with_a_clear_message(cluster: SlurmCluster, tmp_path: Path) -> None:
    env = dict(cluster.env, LAUNCH_MODE="mpirun", PYTHON=sys.executable)
    job = cluster.sbatch("--chdir", str(REPO), "--output", str(tmp_path / "slurm-%j.out"),
                         "slurm/train.sbatch", "--config", "configs/tiny.yaml", env=env)
    assert cluster.wait_done(job, timeout=60) == "FAILED"
    assert "LAUNCH_MODE=mpirun is not one of torchrun, srun" in (tmp_path / f"slurm-{job}.out").read_text()
