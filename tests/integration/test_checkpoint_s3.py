"""Checkpoint sync end to end: real multi-process DeepSpeed (gloo, CPU, ZeRO-2) + real SeaweedFS S3.

Each job is ``tests/integration/ckpt_worker.py`` in its own process group: a tiny ConvVAE
trained by 1, 2 or 4 ranks, checkpointed by CheckpointManager exactly like the
trainer does, with faults (SIGKILL mid-save / mid-upload / after a save, S3
server stopped) injected from the test side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.ckpt_worker import result, run_job, start_job
from tests.launching import finish
from vae_train import checkpoint as ck
from vae_train.config import config_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _spec(tmp_path: Path, name: str, **kw) -> dict:
    spec = {"world": 2, "run_dir": str(tmp_path / name / "run"), "out": str(tmp_path / name / "out"),
            "steps": 4, "every": 2}
    spec.update(kw)
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    return spec


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def _killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}:\n{proc.stdout[-4000:]}"


def _remote(s3, bucket: str, prefix: str) -> tuple[dict[int, list[str]], set[int]]:
    from vae_train.storage import S3Store

    return ck.list_remote(S3Store(bucket, prefix, s3.client()))


def _assert_equal_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def exact_resume(s3_server, tmp_path_factory) -> SimpleNamespace:
    """One SIGKILL-then-resume-from-S3 scenario (3 jobs) that the exact-resume and export tests both read.

    The reference runs 8 steps uninterrupted (local only); the same run is SIGKILLed
    right after its step-4 checkpoint committed to S3 (the bucket's state is recorded
    then); a third job resumes into an empty run dir from S3 and runs to step 8.
    """
    tmp_path = tmp_path_factory.mktemp("exact")
    env = s3_server.env()
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/exact"
    client = s3_server.client()
    ref = _spec(tmp_path, "ref", steps=8)
    _ok(run_job(ref, tmp_path, env))
    killed = _spec(tmp_path, "killed", steps=8, remote=remote, keep_last=2, kill_after_save=4)
    _killed(run_job(killed, tmp_path, env))
    by_step, committed = _remote(s3_server, bucket, "exact")
    manifest = ck.Manifest.from_json(client.get_object(
        Bucket=bucket, Key="exact/step-00000004/manifest.json")["Body"].read(), "remote") if 4 in committed else None
    heads = {} if manifest is None else {
        name: client.head_object(Bucket=bucket, Key=f"exact/{manifest.remote_key(name)}") for name in manifest.files}
    resumed = _spec(tmp_path, "resumed", steps=8, remote=remote, keep_last=2)
    log = _ok(run_job(resumed, tmp_path, env))
    return SimpleNamespace(bucket=bucket, remote=remote, env=env, ref=ref, resumed=resumed, log=log,
                           after_kill=SimpleNamespace(by_step=by_step, committed=committed, manifest=manifest,
                                                      heads=heads))


def test_exact_resume_from_s3_into_empty_run_dir_after_sigkill(s3_server, exact_resume):
    bucket, after_kill = exact_resume.bucket, exact_resume.after_kill
    # After the SIGKILL right after the step-4 commit: steps 2 and 4 committed, step 4's files all listed and intact.
    assert after_kill.committed == {2, 4}
    manifest = after_kill.manifest
    assert manifest.world_size == 2 and manifest.zero_stage == 2 and manifest.step == 4
    assert manifest.writer.startswith("g00000001-")  # the first incarnation on this prefix; its files live under it
    assert sorted(manifest.remote_key(n) for n in manifest.files) == \
        sorted(k for k in after_kill.by_step[4] if not k.endswith(ck.MANIFEST))
    for name, entry in manifest.files.items():  # every listed file is there, verified by its stored hash
        head = after_kill.heads[name]
        assert head["ContentLength"] == entry.size and head["Metadata"]["sha256"] == entry.sha256
    # The resume on a "new machine": an empty run dir, everything came from S3.
    resumed, log = exact_resume.resumed, exact_resume.log
    res = result(resumed)
    assert res["resumed_from"] == 4 and res["elastic"] is False and res["uploads_done"]
    assert "resumed from" in log and "exact" in log
    _assert_equal_tensors(load_file(Path(exact_resume.ref["out"]) / "final_full.safetensors"),
                          load_file(Path(resumed["out"]) / "final_full.safetensors"))
    # Retention: the newest keep_last=2 committed, locally and remotely; nothing uncommitted left behind.
    _, committed = _remote(s3_server, bucket, "exact")
    assert committed == {6, 8}
    local = sorted(p.name for p in (Path(resumed["run_dir"]) / "checkpoints").glob("step-*"))
    assert local == ["step-00000006", "step-00000008"]
    hint = s3_server.client().get_object(Bucket=bucket, Key="exact/latest")["Body"].read()
    assert hint == b"step-00000008"


def test_export_from_s3_and_load_model_without_deepspeed(exact_resume, tmp_path, monkeypatch):
    """The resumed run's final checkpoint (step 8, committed to S3) exported from S3 and from its local copy."""
    env, remote, spec = exact_resume.env, exact_resume.remote, exact_resume.resumed
    weights = Path(spec["out"]) / "final_weights.safetensors"
    out_dir = tmp_path / "export-fp32"
    cli = subprocess.run([sys.executable, "-m", "vae_train", "export", f"{remote}/step-00000008", "--out", str(out_dir)],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["dtype"] == "fp32" and meta["step"] == 8 and meta["model"]["base_channels"] == 8
    # load_model in a process where importing deepspeed is impossible.
    check = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import torch, vae_train\nfrom safetensors.torch import load_file\n"
        f"m = vae_train.load_model({str(out_dir)!r})\n"
        f"ref = load_file({str(weights)!r}); sd = m.state_dict()\n"
        "assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)\n"
        "assert not m.training and m.sample(2).shape == (2, 1, 8, 8)\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # bf16 export, in this process, straight from S3; load_model also takes the checkpoint itself.
    from vae_train import load_model
    from vae_train.export import export_checkpoint

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ref = load_file(weights)
    bf16 = export_checkpoint(f"{remote}/step-00000008", tmp_path / "export-bf16", "bf16")
    assert {v.dtype for v in load_file(bf16 / "model.safetensors").values()} == {torch.bfloat16}
    sd = load_model(bf16).state_dict()
    assert all(torch.equal(sd[k], ref[k].to(torch.bfloat16).float()) for k in ref)
    sd = load_model(Path(spec["run_dir"]) / "checkpoints" / "step-00000008").state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    bad = subprocess.run([sys.executable, "-m", "vae_train", "export", f"{remote}/step-00000099", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert bad.returncode == 2 and "not a committed checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_elastic_resume_2_to_1_and_2_to_4(s3_server, s3_bucket, tmp_path):
    env = s3_server.env()
    remote = f"s3://{s3_bucket}/elastic"
    base = _spec(tmp_path, "base", steps=4, every=4, remote=remote, dump_at=4)
    _ok(run_job(base, tmp_path, env))
    saved = load_file(Path(base["out"]) / "state_4.safetensors")
    assert any(k.startswith("exp_avg/") for k in saved)
    for world in (1, 4):
        spec = _spec(tmp_path, f"w{world}", world=world, steps=6, every=4, remote=f"{remote}-w{world}",
                     resume=f"{remote}/step-00000004", dump_after_load=True)
        log = _ok(run_job(spec, tmp_path, env))
        res = result(spec)
        assert res["resumed_from"] == 4 and res["elastic"] is True and res["step"] == 6
        assert f"world size 2 -> {world}" in log and "elastic resume" in log
        # Weights and Adam moments restored exactly through the universal checkpoint.
        _assert_equal_tensors(saved, load_file(Path(spec["out"]) / "after_load.safetensors"))


def test_sigkill_mid_save_resumes_previous_committed(tmp_path):
    spec = _spec(tmp_path, "midsave", steps=6, kill_in_save=4)
    _killed(run_job(spec, tmp_path))
    ckpts = Path(spec["run_dir"]) / "checkpoints"
    assert (ckpts / "step-00000004" / "mp_rank_00_model_states.pt").exists()  # DeepSpeed's files were written
    assert not (ckpts / "step-00000004" / ck.MANIFEST).exists()  # ... but never committed
    spec.pop("kill_in_save")
    _ok(run_job(spec, tmp_path))
    res = result(spec)
    assert res["resumed_from"] == 2 and res["step"] == 6
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert all((ckpts / n / ck.MANIFEST).exists() for n in ("step-00000004", "step-00000006"))


def test_sigkill_mid_upload_keeps_previous_remote_checkpoint(s3_server, s3_bucket, tmp_path):
    env = s3_server.env()
    remote = f"s3://{s3_bucket}/midupload"
    spec = _spec(tmp_path, "mid", steps=6, remote=remote, kill_mid_upload=4)
    _killed(run_job(spec, tmp_path, env))
    by_step, committed = _remote(s3_server, s3_bucket, "midupload")
    assert committed == {2} and 4 in by_step  # step 4 half-uploaded, not committed
    fresh = _spec(tmp_path, "fresh", steps=6, remote=remote)
    _ok(run_job(fresh, tmp_path, env))
    assert result(fresh)["resumed_from"] == 2
    _, committed = _remote(s3_server, s3_bucket, "midupload")
    assert committed == {4, 6}


def test_tampered_remote_file_is_refused_and_auto_falls_back(s3_env, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/tamper"
    _ok(run_job(_spec(tmp_path, "orig", world=1, steps=4, keep_last=3, remote=remote), tmp_path, s3_env.env()))
    client = s3_env.client()
    manifest = ck.Manifest.from_json(client.get_object(Bucket=s3_bucket, Key="tamper/step-00000004/manifest.json")
                                     ["Body"].read(), "remote")
    key = f"tamper/{manifest.remote_key('zero_pp_rank_0_mp_rank_00_optim_states.pt')}"
    head = client.head_object(Bucket=s3_bucket, Key=key)
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one flipped bit, same size, the stored hash metadata kept
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])
    # Resolution on a fresh machine (this process, an empty run dir; no engine needed to decide).
    cfg = config_from_dict({"run_dir": str(tmp_path / "fresh"), "checkpoint": {"remote": remote}})
    manager = ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
    try:
        with pytest.raises(ck.CheckpointError, match="corrupted: zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            manager.resolve_resume(cfg.model_copy(update={"resume": f"{remote}/step-00000004"}))
        assert manager.resolve_resume(cfg) == str(tmp_path / "fresh" / "checkpoints" / "step-00000002")
    finally:
        manager.close()
    assert not (tmp_path / "fresh" / "checkpoints" / "step-00000004").exists()


def test_s3_down_during_upload_training_continues_then_commits(s3_server, s3_bucket, tmp_path):
    """Saves every 2 steps, S3 down from step 3 to 7, room for one pending upload: the pending
    upload (step 2 or 4) retries until S3 is back, step 6 is skipped (uploads are behind) and
    stays local, and the final step 8 waits for room and commits."""
    env = s3_server.env()
    remote = f"s3://{s3_bucket}/outage"
    spec = _spec(tmp_path, "outage", steps=8, every=2, max_pending=1, remote=remote,
                 outage={"pause_at": 3, "steps_down": 3})
    out = Path(spec["out"])
    proc = start_job(spec, tmp_path, env)
    try:
        _wait(out / "paused", proc)
        s3_server.stop()  # the step-4 save happens while S3 is unreachable
        (out / "server_down").touch()
        _wait(out / "trained_while_down", proc)  # training went on with the upload pending
        assert not (out / "result.json").exists()
    finally:
        s3_server.start()
    (out / "server_up").touch()
    log = _ok(finish(proc))
    res = result(spec)
    res["committed_remote"] = [int(s) for s in re.findall(r"checkpoint step-(\d+) committed to", log)]  # rank 0's commits
    assert res["trained_during_outage"] >= 3 and res["uploads_done"]
    assert res["committed_remote"][-1] == 8 and 6 not in res["committed_remote"], log[-5000:]
    assert len(res["committed_remote"]) >= 2  # the upload pending during the outage got through
    # The lag is logged (whether botocore's own retries or ours bridged the outage depends on timing).
    assert "uploads are behind" in log and "step-00000006 stays local only" in log
    assert f"checkpoint {ck.step_name(res['committed_remote'][-2])} committed" in log and "after the save" in log
    assert s3_server.secret_key not in log and s3_server.access_key not in log
    _, committed = _remote(s3_server, s3_bucket, "outage")
    assert committed == set(res["committed_remote"][-2:])  # keep_last=2


def _wait(path: Path, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
