"""Checkpoint faults through the real trainer: ``torchrun`` with 2 ranks, ZeRO-2, real S3, the fused op required.

Every job is ``tests/integration/fault_train.py`` (``train.py`` plus a fault
injected at a public seam from the test side). Each fault run is compared with
one uninterrupted reference run of the same configuration: after the fault and
a resume, the weights at the final step are bitwise those of the reference, so
no committed step was lost and none was trained twice differently.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.trainer_runs import (
    REFERENCE,
    assert_same_tensors,
    has_object,
    killed,
    ok,
    reap,
    start_train,
    wait_for,
    weights,
)
from tests.launching import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, EVERY = REFERENCE.steps, REFERENCE.every
RUN = REFERENCE.overrides(2)


def _step(n: int) -> str:
    return f"step-{n:08d}"


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """Final weights of the uninterrupted ZeRO-2 run (shared with test_checkpoint_e2e)."""
    return reference_run(2).weights


def _check_final(run: Path, reference: dict) -> None:
    assert_same_tensors(reference, weights(run / "checkpoints" / _step(STEPS)), f"final weights of {run}")


def _remote_keys(client, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def _committed(client, bucket: str, prefix: str) -> set[int]:
    """Steps committed under ``prefix`` (their manifest is there)."""
    return {int(m.group(1)) for k in _remote_keys(client, bucket, prefix + "/")
            if (m := re.search(r"step-(\d+)/manifest\.json$", k))}


def _remote_key_of(client, bucket: str, step: int, file_name: str) -> str | None:
    """The key of one file of checkpoint ``step`` (files sit under the step's writer generation)."""
    return next((k for k in _remote_keys(client, bucket, f"run/{_step(step)}/") if k.endswith("/" + file_name)), None)


def test_sigkill_mid_save_resumes_previous_commit_exactly(fashion_shards, tmp_path, reference):
    run = tmp_path / "run"
    killed(start_train(fashion_shards, run, *RUN, faults={"kill_in_save": 10}))
    ckpts = run / "checkpoints"
    assert (ckpts / _step(10) / "mp_rank_00_model_states.pt").exists()  # DeepSpeed wrote its files ...
    assert not (ckpts / _step(10) / "manifest.json").exists()  # ... the save was never committed
    log = ok(start_train(fashion_shards, run, *RUN))
    assert f"resumed from {ckpts / _step(5)} at step 5 (exact: same world size 2)" in log
    _check_final(run, reference)


def test_sigkill_mid_upload_resumes_previous_remote_commit_exactly(fashion_shards, tmp_path, reference, s3_server,
                                                                  s3_bucket):
    remote, client = f"s3://{s3_bucket}/run", s3_server.client()
    killed(start_train(fashion_shards, tmp_path / "killed", *RUN, f"checkpoint.remote={remote}",
                       env=s3_server.env(), faults={"kill_mid_upload": 10}))
    assert _committed(client, s3_bucket, "run") == {5}
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix=f"run/{_step(10)}/")["KeyCount"] >= 1  # half uploaded
    # A new machine: an empty run dir, everything from S3.
    run = tmp_path / "resumed"
    log = ok(start_train(fashion_shards, run, *RUN, f"checkpoint.remote={remote}", env=s3_server.env()))
    assert f"resumed from {run / 'checkpoints' / _step(5)} at step 5" in log
    assert _committed(client, s3_bucket, "run") == {5, 10, 15, 20}
    _check_final(run, reference)


def test_manifest_waits_for_a_held_then_failing_upload_on_rank_1(fashion_shards, tmp_path, reference, s3_server,
                                                                 s3_bucket):
    """Rank 1's upload of checkpoint 10 is held, then fails twice: rank 0 must not commit until it is whole."""
    remote, client = f"s3://{s3_bucket}/run", s3_server.client()
    run = tmp_path / "run"
    proc = start_train(fashion_shards, run, *RUN, f"checkpoint.remote={remote}", env=s3_server.env(),
                       faults={"out": str(tmp_path), "hold_upload": {"rank": 1, "step": 10, "fail": 2}})
    try:
        wait_for(tmp_path / "upload_held", proc)
        # Rank 0's own files of checkpoint 10 arrive; it then waits for rank 1's.
        rank0_files = ["trainer_state.rank00000.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        deadline = time.monotonic() + 120
        while not all(_remote_key_of(client, s3_bucket, 10, name) for name in rank0_files):
            assert time.monotonic() < deadline and proc.poll() is None, "rank 0 never uploaded its files"
            time.sleep(0.2)
        time.sleep(3)  # rank 0 polls for its peers' files meanwhile
        assert not has_object(client, s3_bucket, f"run/{_step(10)}/manifest.json")
        assert _committed(client, s3_bucket, "run") == {5}
    finally:
        (tmp_path / "upload_release").touch()
    log = ok(proc)
    assert "injected upload failure" in log and "retrying" in log
    assert has_object(client, s3_bucket, f"run/{_step(10)}/manifest.json")
    assert 20 in _committed(client, s3_bucket, "run")
    _check_final(run, reference)


def test_s3_down_at_start_is_a_clear_error_not_a_hang(fashion_shards, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_EC2_METADATA_DISABLED": "true"}
    started = time.monotonic()
    result = reap(start_train(fashion_shards, tmp_path / "run", *RUN, "checkpoint.remote=s3://bucket/run", env=env),
                  timeout_s=240)
    assert result.returncode != 0
    assert "cannot reach S3 endpoint" in result.stdout, result.stdout[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", result.stdout)  # the ranks stop on the message, not a crash
    assert time.monotonic() - started < 180
    assert not (tmp_path / "run" / "checkpoints" / _step(5)).exists()  # it stopped before training


def test_s3_down_mid_run_training_continues_and_later_checkpoints_commit(fashion_shards, tmp_path, reference,
                                                                         s3_server, s3_bucket):
    """The server stops before step 7 and restarts after step 16: saves 10 and 15 happen during the outage."""
    remote, client = f"s3://{s3_bucket}/run", s3_server.client()
    run = tmp_path / "run"
    proc = start_train(fashion_shards, run, *RUN, f"checkpoint.remote={remote}", env=s3_server.env(),
                       faults={"out": str(tmp_path), "pauses": [{"step": 7, "touch": "paused", "wait": "down"},
                                                                {"step": 17, "touch": "trained", "wait": "up"}]})
    try:
        wait_for(tmp_path / "paused.rank0", proc)
        wait_for(tmp_path / "paused.rank1", proc)
        s3_server.stop()
        (tmp_path / "down").touch()
        wait_for(tmp_path / "trained.rank0", proc)  # steps 7-16 and saves 10, 15 happened with S3 down
        assert (run / "checkpoints" / _step(15) / "manifest.json").exists()
    finally:
        s3_server.start()
    (tmp_path / "up").touch()
    log = ok(proc)
    assert "failed (attempt" in log  # the outage was seen and retried, not ignored
    assert s3_server.secret_key not in log
    committed = _committed(client, s3_bucket, "run")
    assert 5 in committed and 20 in committed, (committed, log[-4000:])
    _check_final(run, reference)


def test_tampered_remote_file_is_refused_and_the_previous_commit_resumed(fashion_shards, tmp_path, reference,
                                                                         reference_run, s3_server):
    """One flipped bit in the newest remote checkpoint (20): a resume refuses it, naming it, and retrains 16-20.

    The history is the reference run's own (4 committed checkpoints on S3); this is its last user.
    """
    s3_bucket = reference_run(2).bucket
    remote, client = f"s3://{s3_bucket}/run", s3_server.client()
    assert _committed(client, s3_bucket, "run") == {5, 10, 15, 20}
    key = _remote_key_of(client, s3_bucket, 20, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert key is not None
    head = client.head_object(Bucket=s3_bucket, Key=key)
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one flipped bit; same size, the stored hash metadata kept
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])
    run = tmp_path / "resumed"
    log = ok(start_train(fashion_shards, run, *RUN, f"checkpoint.remote={remote}", env=s3_server.env()))
    assert re.search(rf"refusing remote checkpoint {_step(20)}: .*corrupted: zero_pp_rank_1_mp_rank_00_optim_states",
                     log), log[-4000:]
    assert (f"resume=auto: falling back to {_step(15)}: the newer {_step(20)} cannot be used (see above), so the "
            "5 step(s) after step 15 are lost and trained again") in log
    assert f"resumed from {run / 'checkpoints' / _step(15)} at step 15" in log
    _check_final(run, reference)


def test_sigkilled_rank_ends_the_job_within_the_timeout_and_resume_is_exact(fashion_shards, tmp_path, reference):
    timeout_s, margin_s = 20, 40
    run = tmp_path / "run"
    proc = start_train(fashion_shards, run, *RUN, f"distributed.timeout_s={timeout_s}",
                       faults={"out": str(tmp_path), "pauses": [{"step": 12, "touch": "at12", "wait": "go"}]})
    wait_for(tmp_path / "at12.rank1", proc)
    wait_for(tmp_path / "at12.rank0", proc)
    os.kill(int((tmp_path / "at12.rank1").read_text()), signal.SIGKILL)  # rank 1 only, not the launcher
    killed_at = time.monotonic()
    (tmp_path / "go").touch()
    result = reap(proc, timeout_s=timeout_s + margin_s)
    elapsed = time.monotonic() - killed_at
    assert result.returncode not in (0, None) and elapsed < timeout_s + margin_s
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", result.stdout), result.stdout[-4000:]
    assert "Signal 9 (SIGKILL)" in result.stdout
    log = ok(start_train(fashion_shards, run, *RUN))
    assert f"resumed from {run / 'checkpoints' / _step(10)} at step 10" in log
    _check_final(run, reference)
