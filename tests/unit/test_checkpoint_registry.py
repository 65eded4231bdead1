"""Named checkpoint parts in one process (no DeepSpeed): registration, bitwise round trips, refusals,
the elastic policies, and checkpoints of the format before named parts."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.unit.checkpoint_parts import Counter
from vae_train import checkpoint as ck
from vae_train.config import config_from_dict

pytestmark = pytest.mark.timeout(120)


class _Ema:
    """EMA-like state: tensors of several dtypes (bits must survive) plus JSON counters."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g),
                        "norm.bias": torch.randn(7, generator=g).to(torch.bfloat16),
                        "steps_seen": torch.randint(0, 2**40, (3,), generator=g)}
        self.decay = 0.999
        self.updates = seed

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "decay": self.decay, "updates": self.updates, "tag": [1, "a", None]}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])
        self.decay, self.updates = state["decay"], state["updates"]
        assert state["tag"] == [1, "a", None]


def _cfg(tmp_path, name="run"):
    return config_from_dict({"run_dir": str(tmp_path / name), "checkpoint": {"every_steps": 1}})


def _manager(tmp_path, world_size=1, name="run"):
    return ck.CheckpointManager(_cfg(tmp_path, name), rank=0, world_size=world_size, local_rank=0)


def test_a_registered_part_round_trips_bitwise_with_the_rng(tmp_path):
    saver = _manager(tmp_path)
    ema, counter = _Ema(seed=3), Counter(41)
    saver.register("ema", ema)
    saver.register("trainer", counter, resize=ck.Resize.REPLICATED)
    torch.manual_seed(123)
    torch.rand(5)
    path = saver.save(7)
    after_save = torch.rand(4)  # what the run draws next
    manifest = ck.read_manifest(path)
    assert manifest.format == ck.FORMAT and manifest.step == 7
    assert manifest.parts == {"ema": ck.PartEntry("state"), "trainer": ck.PartEntry("state")}
    assert ck.part_tensor_file("ema", 0) in manifest.files  # tensors: listed, hashed, uploaded like any file
    assert ck.verify_local(path, manifest) == []

    loader = _manager(tmp_path)
    restored, restored_counter = _Ema(seed=99), Counter()
    loader.register("ema", restored)
    loader.register("trainer", restored_counter, resize=ck.Resize.REPLICATED)
    torch.manual_seed(0)
    resumed = loader.load(loader.resolve_resume())
    assert (resumed.step, resumed.elastic, resumed.saved_world_size) == (7, False, 1)
    assert torch.equal(torch.rand(4), after_save)  # the RNG continues exactly
    assert restored_counter.value == 41 and (restored.decay, restored.updates) == (0.999, 3)
    assert sorted(restored.weights) == sorted(ema.weights)
    for key, value in ema.weights.items():
        got = restored.weights[key]
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.view(-1).view(torch.uint8).tolist() == value.view(-1).view(torch.uint8).tolist(), key


def test_a_registered_part_missing_from_the_checkpoint_is_refused_by_name(tmp_path):
    saver = _manager(tmp_path)
    saver.register("trainer", Counter(5))
    path = saver.save(2)
    loader = _manager(tmp_path)
    counter = Counter()
    loader.register("trainer", counter)
    loader.register("ema", _Ema(seed=1))
    with pytest.raises(ck.CheckpointError) as err:
        loader.load(path)
    msg = str(err.value)
    assert "no saved state for 'ema'" in msg and "it holds trainer" in msg and "resume=none" in msg
    assert counter.value == 0  # refused before anything was loaded


def test_registration_errors_are_clear(tmp_path):
    manager = _manager(tmp_path)
    with pytest.raises(ck.CheckpointError, match="lower-case"):
        manager.register("Model/1", Counter())
    manager.register("trainer", Counter())
    with pytest.raises(ck.CheckpointError, match="registered twice"):
        manager.register("trainer", Counter())
    with pytest.raises(ck.CheckpointError, match="no state_dict"):
        manager.register("other", object())
    with pytest.raises(ck.CheckpointError, match="nothing to save"):
        _manager(tmp_path, name="empty").save(1)

    class _Opaque:
        def state_dict(self):
            return {"fn": print}

        def load_state_dict(self, state):
            pass

    manager.register("opaque", _Opaque())
    with pytest.raises(ck.CheckpointError, match="part 'opaque' at /fn is a builtin_function_or_method"):
        manager.save(1)


def test_resize_policies_at_another_world_size(tmp_path):
    # Saved "by 2 ranks" (this process is rank 0 of a world of 2 that has no peers: enough for the policies).
    saver = _manager(tmp_path, world_size=2)
    saver.register("data", Counter(10), resize=ck.Resize.RESTART)
    saver.register("trainer", Counter(20), resize=ck.Resize.REPLICATED)
    saver.register("ema", Counter(30))  # REFUSE by default
    path = saver.save(4)

    loader = _manager(tmp_path, world_size=1)
    data, trainer, ema = Counter(1), Counter(2), Counter(3)
    loader.register("data", data, resize=ck.Resize.RESTART)
    loader.register("trainer", trainer, resize=ck.Resize.REPLICATED)
    loader.register("ema", ema)
    with pytest.raises(ck.CheckpointError, match="part 'ema' holds per-rank state that cannot be mapped to 1 ranks"):
        loader.load(path)
    assert (data.value, trainer.value, ema.value) == (1, 2, 3)  # nothing half-loaded

    loader = _manager(tmp_path, world_size=1)
    loader.register("data", data, resize=ck.Resize.RESTART)
    loader.register("trainer", trainer, resize=ck.Resize.REPLICATED)
    resumed = loader.load(path)
    assert resumed.elastic and resumed.saved_world_size == 2
    assert (data.value, trainer.value) == (1, 20)  # restarted / rank 0's state


def _v1_checkpoint(root, step=10):
    """A committed checkpoint as vae-train wrote it before named parts (format 1)."""
    d = root / ck.step_name(step)
    d.mkdir(parents=True)
    (d / ck.MODEL_STATES).write_bytes(os.urandom(64))
    state, _ = ck.trainer_state_files(0)
    (d / state).write_text(json.dumps({"step": step, "state": {"data": {}, "skipped_steps": 0}, "rng": {},
                                       "config": {"model": config_from_dict({}).model.model_dump(mode="json")}}))
    files = {p.name: ck.FileEntry(p.stat().st_size, ck.sha256_file(p), 0) for p in d.iterdir()}
    body = {"format": ck.FORMAT_V1, "step": step, "world_size": 1, "zero_stage": 0, "created": "", "library_version":
            "0.1.0", "files": {k: {"size": v.size, "sha256": v.sha256, "rank": v.rank} for k, v in files.items()}}
    (d / ck.MANIFEST).write_text(json.dumps(body))
    return d


def test_a_format_1_checkpoint_verifies_but_is_refused_for_resume_naming_its_format(tmp_path):
    cfg = _cfg(tmp_path)
    old = _v1_checkpoint(tmp_path / "run" / "checkpoints")
    manifest = ck.verified_manifest(old)  # still verifiable (and exportable)
    assert manifest.format == ck.FORMAT_V1 and manifest.parts == {}
    manager = ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
    manager.register("trainer", Counter())
    for mode in ("auto", str(old)):
        with pytest.raises(ck.CheckpointError) as err:
            manager.resolve_resume(cfg.model_copy(update={"resume": mode}))
        msg = str(err.value)
        assert "vae-train-checkpoint/1" in msg and "vae-train-checkpoint/2" in msg
        assert "vae-train export" in msg and "resume=none" in msg
    with pytest.raises(ck.CheckpointError, match="vae-train-checkpoint/1"):
        manager.load(old)
    assert manager.resolve_resume(cfg.model_copy(update={"resume": "none"})) is None
