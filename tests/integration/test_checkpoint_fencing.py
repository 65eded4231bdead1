"""Split brain, orphans and damaged history with the real trainer (``torchrun train.py``, 2 ranks, CPU,
ZeRO-2) and the real S3 server: two jobs on one prefix, a SIGKILLed launcher, resume over damage.

What is checked is the promise of issue 20: a committed checkpoint is never changed by another writer, the
older incarnation stops with an error naming the newer one, ranks do not outlive their launcher, and
``resume=auto`` never silently trains from step 0 over checkpoints it cannot verify.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launching import clean_env, finish, start, torchrun
from vae_train import checkpoint as ck
from vae_train.storage import S3Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]



def _start(shards: Path, run_dir: Path, env: dict[str, str], *overrides: str) -> subprocess.Popen:
    cmd = torchrun("train.py", "--config", "configs/tiny.yaml",
                   f"data.train={shards}", f"data.val={shards}", f"run_dir={run_dir}", "distributed.zero_stage=2",
                   "distributed.precision=fp32", "checkpoint.every_steps=5", "checkpoint.keep_last=2",
                   "logging.image_every=0", "logging.histogram_every=0", "resume=auto", *overrides)
    return start(cmd, env=clean_env(**env))


def _generation(manifest: ck.Manifest) -> int:
    return int(manifest.writer.split("-")[0][1:])


def _committed(store: S3Store) -> dict[int, ck.Manifest]:
    """The committed checkpoints' manifests. While a job runs, its retention (``keep_last``) may delete a
    checkpoint between the listing and the read of its manifest: that one is left out, as a later listing would."""
    _, steps = ck.list_remote(store)
    manifests = {}
    for step in steps:
        try:
            raw = store.get_bytes(f"{ck.step_name(step)}/{ck.MANIFEST}")
        except store.client.exceptions.NoSuchKey:
            continue
        manifests[step] = ck.Manifest.from_json(raw, str(step))
    return manifests


def _wait_for_commit(store: S3Store, step: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.exists(f"{ck.step_name(step)}/{ck.MANIFEST}"):
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before committing step {step}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"step {step} never committed"
        time.sleep(0.2)


def _all_verify(store: S3Store, workdir: Path) -> dict[int, ck.Manifest]:
    """Every committed checkpoint downloads and matches its manifest (raises otherwise)."""
    manifests = _committed(store)
    for step in manifests:
        ck.download_checkpoint(store, step, workdir / f"verify-{step}" / ck.step_name(step))
    return manifests


def test_two_jobs_on_one_prefix_fence_the_older_and_keep_every_checkpoint_verifiable(
        fashion_shards, s3_server, s3_bucket, tmp_path):
    env = s3_server.env()
    store = S3Store(s3_bucket, "split", s3_server.client())
    remote = f"checkpoint.remote=s3://{s3_bucket}/split"
    old = _start(fashion_shards, tmp_path / "old", env, remote, "train.max_steps=5000")
    new = None
    try:
        _wait_for_commit(store, 10, old)
        # A requeue (or a resubmission) while the old incarnation still trains and uploads.
        new = _start(fashion_shards, tmp_path / "new", env, remote, "train.max_steps=5000")
        old_log = finish(old, 400)  # it must stop by itself
        deadline = time.monotonic() + 300
        while not any(_generation(m) == 2 for m in _committed(store).values()):
            assert new.poll() is None and time.monotonic() < deadline, "the new incarnation never committed"
            time.sleep(0.5)
        for pid in _children(new.pid):  # then end it the way a cluster does: SIGTERM to its ranks
            os.kill(pid, signal.SIGTERM)
        new_log = finish(new, 300)
    finally:
        for proc in (old, new):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert new_log.returncode == 0, new_log.stdout[-6000:]
    # The older incarnation stopped by itself, on every rank, with an error naming the newer one.
    assert old_log.returncode != 0, old_log.stdout[-4000:]
    assert old_log.stdout.count("error: another incarnation of this run took over") == 2, old_log.stdout[-6000:]
    assert "generation 2 (host" in old_log.stdout and "claimed it after this one (generation 1" in old_log.stdout
    manifests = _all_verify(store, tmp_path)
    generations = store.child("generations")
    assert {info.key for info in generations.list()} == {"g00000001.json", "g00000002.json"}
    claimed_at = json.loads(generations.get_bytes("g00000002.json"))["started"]
    writers = {json.loads(generations.get_bytes(f"g0000000{g}.json"))["incarnation"][:12]: g for g in (1, 2)}
    for step, manifest in manifests.items():
        assert writers[manifest.writer[-12:]] == _generation(manifest), (step, manifest.writer)
        if _generation(manifest) == 1:  # the old one saved nothing after the newer claim
            assert manifest.created <= claimed_at, (step, manifest.created, claimed_at)
        else:
            assert manifest.ancestors and manifest.ancestors[0][0].startswith("g00000001-"), manifest.ancestors
    newest = manifests[max(manifests)]
    assert _generation(newest) == 2 and f"checkpoint {ck.step_name(max(manifests))} committed" in new_log.stdout
    old_steps = sorted(s for s, m in manifests.items() if _generation(m) == 1)
    print(f"old incarnation: committed steps still present {old_steps}; new one resumed from "
          f"{newest.ancestors[-1]} and committed up to step {max(manifests)}; conflicts logged: "
          f"{new_log.stdout.count('was already committed by writer')}")
    # No object was written by two incarnations: each lives under its writer's name.
    by_step, _ = ck.list_remote(store)
    for step, keys in by_step.items():
        for key in keys:
            assert key.endswith(ck.MANIFEST) or key.split("/")[1][-12:] in writers, key


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def test_ranks_stop_after_a_final_checkpoint_when_their_launcher_is_sigkilled(
        fashion_shards, s3_server, s3_bucket, tmp_path):
    store = S3Store(s3_bucket, "orphans", s3_server.client())
    job = _start(fashion_shards, tmp_path / "run", s3_server.env(), f"checkpoint.remote=s3://{s3_bucket}/orphans",
                 "train.max_steps=5000")
    ranks: list[int] = []
    try:
        _wait_for_commit(store, 5, job)
        before = max(_committed(store))
        ranks = _children(job.pid)
        assert len(ranks) == 2, ranks
        os.kill(job.pid, signal.SIGKILL)  # the launcher only: torchrun's ranks run in sessions of their own
        killed_at = time.monotonic()
        deadline = killed_at + 180
        while any(_alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "the ranks kept running after their launcher died"
            time.sleep(0.2)
        stopped_after = time.monotonic() - killed_at
        out, _ = job.communicate(timeout=60)  # the ranks held the launcher's stdout: all of their output
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "launcher torchrun" in out and "exited while this rank runs" in out, out[-4000:]
    assert "received: saving step" in out, out[-4000:]  # the trainer's preemption path, agreed by all ranks
    manifests = _all_verify(store, tmp_path)
    final = max(manifests)
    assert final > before, (before, sorted(manifests))  # a final checkpoint, saved after the launcher died
    assert f"checkpoint {ck.step_name(final)} committed" in out, out[-4000:]
    print(f"ranks stopped {stopped_after:.1f}s after the launcher's SIGKILL; final checkpoint {ck.step_name(final)}")


def test_resume_over_a_damaged_history_refuses_to_start_fresh(fashion_shards, s3_server, s3_bucket, tmp_path):
    env = s3_server.env()
    client = s3_server.client()
    store = S3Store(s3_bucket, "damaged", client)
    remote = f"checkpoint.remote=s3://{s3_bucket}/damaged"
    first = finish(_start(fashion_shards, tmp_path / "first", env, remote, "train.max_steps=10"), 300)
    assert first.returncode == 0, first.stdout[-6000:]
    manifests = _committed(store)
    assert set(manifests) == {5, 10}

    def damage(step: int) -> None:
        manifest = manifests[step]
        key = f"damaged/{manifest.remote_key(ck.trainer_state_files(1)[0])}"
        head = client.head_object(Bucket=s3_bucket, Key=key)
        body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0x01  # one bit, same size, the stored hash metadata kept
        client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])

    # With only the newest damaged, resume=auto falls back to the older one and says what is lost: that is
    # test_trainer_faults.py::test_tampered_remote_file_is_refused_and_the_previous_commit_resumed. Here: both.
    damage(10)
    damage(5)
    refused = finish(_start(fashion_shards, tmp_path / "refused", env, remote, "train.max_steps=10"), 300)
    assert refused.returncode != 0, refused.stdout[-6000:]
    out = refused.stdout
    assert "vae-train train: error: resume=auto found committed checkpoints but none that verifies" in out, out[-6000:]
    assert "step-00000005" in out and "step-00000010" in out and "resume=none" in out and "resume=PATH" in out
    assert not list((tmp_path / "refused" / "checkpoints").glob("step-*"))  # nothing trained, nothing saved
