"""Checkpoint building blocks in one process: manifest, retention policy, verification,
weights-only loading, download verification, config checks, and start-up S3 errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vae_train import checkpoint as ck
from vae_train.config import config_from_dict
from vae_train.storage import LocalStore, StorageError

pytestmark = pytest.mark.timeout(120)


def _fake_checkpoint(root, step=10, world=2, model=None):
    """A committed checkpoint directory with real files and a real manifest (no DeepSpeed needed)."""
    d = root / ck.step_name(step)
    d.mkdir(parents=True)
    files = {}
    for rank in range(world):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (d / name).write_bytes(os.urandom(100 + rank))
        state, _ = ck.trainer_state_files(rank)
        body = {"step": step, "state": {}, "rng": {}}
        if rank == 0:
            body["config"] = {"model": model or config_from_dict({}).model.model_dump(mode="json")}
        (d / state).write_text(json.dumps(body))
    for path in d.iterdir():
        files[path.name] = ck.FileEntry(path.stat().st_size, ck.sha256_file(path), ck.owner_rank(path.name))
    manifest = ck.Manifest(step, world, 2, files, "now", "0.1.0")
    (d / ck.MANIFEST).write_bytes(manifest.to_json())
    return d, manifest


def test_retention_keeps_newest_and_keepers():
    assert ck.retention_victims([2, 4, 6, 8], keep_last=2, keep_every=0) == [2, 4]
    assert ck.retention_victims([2, 4, 6, 8, 10], keep_last=1, keep_every=4) == [2, 6]
    assert ck.retention_victims([5], keep_last=1, keep_every=0) == []
    assert ck.retention_victims([], keep_last=3, keep_every=0) == []


def test_step_names_and_file_owners():
    assert ck.step_name(42) == "step-00000042" and ck.parse_step("step-00000042") == 42
    assert ck.parse_step("step-42") is None and ck.parse_step("latest") is None
    assert ck.owner_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert ck.owner_rank("trainer_state.rank00002.json") == 2
    assert ck.owner_rank("mp_rank_00_model_states.pt") == 0


def test_manifest_roundtrip_and_rejections(tmp_path):
    d, manifest = _fake_checkpoint(tmp_path)
    back = ck.read_manifest(d)
    assert back.same_content(manifest) and back.zero_stage == 2 and back.world_size == 2
    assert ck.read_manifest(tmp_path) is None  # no manifest = not committed
    good = json.loads(manifest.to_json())
    for mutate in (lambda m: m.update(format="other/9"),
                   lambda m: m["files"].update({"../escape": {"size": 1, "sha256": "x", "rank": 0}}),
                   lambda m: m.update(files={}),
                   lambda m: m.pop("step")):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ck.CheckpointError, match="invalid manifest"):
            ck.Manifest.from_json(json.dumps(bad), "x")


def test_verify_local_detects_tampering(tmp_path):
    d, manifest = _fake_checkpoint(tmp_path)
    assert ck.verify_local(d, manifest) == []
    target = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    assert ck.verify_local(d, manifest, hashes=False) == []
    assert ck.verify_local(d, manifest) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt: SHA-256 mismatch"]
    target.unlink()
    assert "missing" in ck.verify_local(d, manifest)[0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_torch_load_refuses_code_and_keeps_tensors(tmp_path):
    torch.save({"w": torch.ones(3), "n": 1}, tmp_path / "ok.pt")
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    original = torch.load
    with ck.restricted_torch_load():
        with ck.restricted_torch_load():  # re-entrant
            pass
        assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=False)["w"], torch.ones(3))
        with pytest.raises(ck.CheckpointError, match="allow-list"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # the caller's False is overridden
    assert torch.load is original


def test_download_verifies_against_manifest(tmp_path):
    d, manifest = _fake_checkpoint(tmp_path / "src")
    remote = LocalStore(tmp_path / "remote")
    for name in manifest.files:
        remote.put_file(d / name, f"{d.name}/{name}")
    remote.put_bytes(manifest.to_json(), f"{d.name}/{ck.MANIFEST}")
    dest = ck.download_checkpoint(remote, 10, tmp_path / "local" / d.name)
    assert ck.verify_local(dest, ck.read_manifest(dest)) == []
    assert ck.download_checkpoint(remote, 10, dest) == dest  # an intact local copy is reused
    key = f"{d.name}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    remote.put_bytes(b"X" * manifest.files["zero_pp_rank_0_mp_rank_00_optim_states.pt"].size, key)
    with pytest.raises(ck.CheckpointError, match="corrupted"):
        ck.download_checkpoint(remote, 10, tmp_path / "other" / d.name)
    assert not (tmp_path / "other" / d.name).exists(), "a failed download must not leave a checkpoint behind"
    with pytest.raises(ck.CheckpointError, match="not a committed checkpoint"):
        ck.download_checkpoint(remote, 99, tmp_path / "none")


def test_incompatible_model_config_lists_keys(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"base_channels": 64, "latent_channels": 8}})
    d, _ = _fake_checkpoint(tmp_path / "ck")
    manager = ck.CheckpointManager(cfg, rank=0, world_size=2, local_rank=0)
    with pytest.raises(ck.CheckpointError) as err:
        manager.load(d)
    msg = str(err.value)
    assert "model.base_channels: checkpoint 32, config 64" in msg and "model.latent_channels" in msg
    assert "model.image_size" not in msg


def test_resume_reads_older_model_configs_with_defaults_and_refuses_another_trainable(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run")})
    newer = ("arch", "init_from", "block_out_channels", "layers_per_block", "norm_num_groups",
             "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
    old_model = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k not in newer}
    d, _ = _fake_checkpoint(tmp_path / "ck", world=1, model=old_model)
    # The keys it predates count as their defaults: the load passes the config check and stops only at the
    # RNG files this fake checkpoint lacks.
    with pytest.raises(FileNotFoundError, match="rng"):
        ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0).load(d)
    decoder_only = config_from_dict({"run_dir": str(tmp_path / "run"), "train": {"trainable": "decoder"}})
    with pytest.raises(ck.CheckpointError, match="train.trainable=all .* the config says decoder"):
        ck.CheckpointManager(decoder_only, rank=0, world_size=1, local_rank=0).load(d)


def test_resume_modes(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run")})
    manager = ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
    assert manager.resolve_resume(cfg.model_copy(update={"resume": "none"})) is None
    assert manager.resolve_resume(cfg) is None  # auto with nothing anywhere: start fresh
    with pytest.raises(ck.CheckpointError, match="not a committed checkpoint"):
        manager.resolve_resume(cfg.model_copy(update={"resume": str(tmp_path / "nope")}))
    with pytest.raises(ck.CheckpointError, match="step-00001000"):
        manager.resolve_resume(cfg.model_copy(update={"resume": "s3://bucket/run/latest"}))
    # auto: the newest committed local checkpoint; a tampered one is refused and the previous one taken.
    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(root, step=2)
    newest, _ = _fake_checkpoint(root, step=4)
    (root / ck.step_name(6)).mkdir()  # an uncommitted save: does not exist for resume
    assert manager.resolve_resume(cfg) == str(newest)
    victim = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert manager.resolve_resume(cfg) == str(root / ck.step_name(2))
    with pytest.raises(ck.CheckpointError, match="SHA-256 mismatch"):
        manager.resolve_resume(cfg.model_copy(update={"resume": str(newest)}))


@pytest.mark.slow  # starts the real S3 server
def test_unusable_remote_fails_before_training(s3_env, s3_bucket, tmp_path, monkeypatch):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "checkpoint": {"remote": f"s3://{s3_bucket}/run"}})
    ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0).close()  # good credentials: fine
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as err:
        ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
    assert "denied" in str(err.value) and "not-the-secret" not in str(err.value)
    missing = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"remote": "s3://no-such-bucket-q/x"})})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with pytest.raises(StorageError, match="does not exist"):
        ck.CheckpointManager(missing, rank=0, world_size=1, local_rank=0)
