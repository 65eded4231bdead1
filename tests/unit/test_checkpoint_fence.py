"""Fencing and lineage in one process (directory stores, no DeepSpeed): generations, a stale writer stopped
before it writes, retention that deletes only its own lineage, and resume=auto over a damaged history."""

from __future__ import annotations

import json

import pytest

from tests.unit.checkpoint_parts import Counter
from vae_train import checkpoint as ck
from vae_train.checkpoint.fence import Fence, FencedError
from vae_train.config import config_from_dict
from vae_train.storage import LocalStore

pytestmark = pytest.mark.timeout(120)


def _manager(tmp_path, run: str, remote: str = "", keep_last: int = 1, resume: str = "auto"):
    cfg = config_from_dict({"run_dir": str(tmp_path / run), "resume": resume,
                            "checkpoint": {"remote": remote, "keep_last": keep_last, "upload_deadline_s": 30}})
    manager = ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
    counter = Counter()
    manager.register("trainer", counter)
    return manager, counter


def test_generations_are_claimed_in_order_and_the_older_one_sees_the_newer(tmp_path):
    store = LocalStore(tmp_path / "prefix")
    first, second = Fence([("p", store)]), Fence([("p", store)])
    assert (first.mine.generation, second.mine.generation) == (1, 2)
    assert first.mine.writer == f"g00000001-{first.mine.incarnation[:12]}" and second.newer() is None
    where, newer = first.newer()
    assert where == "p" and newer == second.mine
    msg = str(first.error(where, newer))
    assert "generation 2" in msg and f"pid {newer.pid}" in msg and "generation 1" in msg


def test_a_stale_writer_stops_before_writing_into_a_run_dir_a_newer_one_owns(tmp_path):
    old, counter = _manager(tmp_path, "run")
    counter.value = 1
    old.save(1)
    new, _ = _manager(tmp_path, "run")  # the same run dir, started again while the old one runs
    with pytest.raises(FencedError, match="generation 2") as err:
        old.save(2)
    assert str(tmp_path / "run" / "checkpoints") in str(err.value)
    assert not (tmp_path / "run" / "checkpoints" / ck.step_name(2)).exists()  # nothing written
    assert new.load(new.resolve_resume()).step == 1
    new.save(2)
    assert ck.read_manifest(tmp_path / "run" / "checkpoints" / ck.step_name(2)).writer == new.writer


def _committed(remote):
    _, committed = ck.list_remote(LocalStore(remote))
    return committed


def _remote_manifest(remote, step):
    return ck.Manifest.from_json((remote / ck.step_name(step) / ck.MANIFEST).read_bytes(), "remote")


def test_two_incarnations_on_one_prefix_keep_every_committed_checkpoint_verifiable(tmp_path):
    remote = tmp_path / "prefix"
    old, counter = _manager(tmp_path, "a", str(remote))
    for step in (1, 2, 3):
        counter.value = step
        old.save(step)
        assert old.wait_for_uploads(30)
    assert _committed(remote) == {3}  # keep_last=1, own lineage
    new, new_counter = _manager(tmp_path, "b", str(remote))  # a requeue on another machine
    assert new.load(new.resolve_resume()).step == 3 and new_counter.value == 3
    with pytest.raises(FencedError, match=f"another incarnation of this run took over {remote}"):
        old.save(4)  # the old incarnation is still running: fenced at its next save
    old.close()
    # A committed checkpoint of another lineage (as a stale commit racing the claim would leave one).
    foreign = _remote_manifest(remote, 3)
    foreign.step, foreign.writer, foreign.ancestors = 7, "g00000009-0123456789ab", []
    for rel in foreign.files:
        target = remote / foreign.remote_key(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((remote / _remote_manifest(remote, 3).remote_key(rel)).read_bytes())
    (remote / ck.step_name(7)).mkdir(exist_ok=True)
    (remote / ck.step_name(7) / ck.MANIFEST).write_bytes(foreign.to_json())
    for step in (4, 5):
        new_counter.value = step
        new.save(step)
        assert new.wait_for_uploads(30)
    new.close()
    # Retention removed its own lineage's older ones (g1's step 3, its own step 4), never the foreign step 7.
    assert _committed(remote) == {5, 7}
    five = _remote_manifest(remote, 5)
    assert (five.writer, five.ancestors) == (new.writer, [(old.writer, 3)])
    for step in (5, 7):
        assert ck.verify_remote(LocalStore(remote), _remote_manifest(remote, step)) == []
    # Both writers' objects live under their own names: none was ever written twice.
    assert sorted(p.name for p in (remote / ck.step_name(5)).iterdir()) == [new.writer, "manifest.json"]


def test_resume_auto_refuses_to_start_fresh_over_a_damaged_history(tmp_path):
    run, counter = _manager(tmp_path, "run", keep_last=3)
    for step in (1, 2):
        counter.value = step
        run.save(step)
    root = tmp_path / "run" / "checkpoints"
    state = root / ck.step_name(2) / ck.trainer_state_files(0)[0]
    state.write_text(state.read_text().replace('"value": 2', '"value": 9'))  # same size, other bytes
    again, _ = _manager(tmp_path, "run", keep_last=3)
    assert again.resolve_resume() == str(root / ck.step_name(1))  # falls back (logged with the steps lost)
    (root / ck.step_name(1) / ck.MANIFEST).write_text("{not json")
    with pytest.raises(ck.CheckpointError) as err:
        again.resolve_resume()
    msg = str(err.value)
    assert "does not start from step 0" in msg and ck.step_name(1) in msg and ck.step_name(2) in msg
    assert "resume=none" in msg and "resume=PATH" in msg
    assert again.resolve_resume(again.cfg.model_copy(update={"resume": "none"})) is None


def test_falling_back_names_the_steps_lost(tmp_path, caplog):
    run, counter = _manager(tmp_path, "run", keep_last=3)
    for step in (2, 5):
        counter.value = step
        run.save(step)
    root = tmp_path / "run" / "checkpoints"
    (root / ck.step_name(5) / ck.trainer_state_files(0)[0]).unlink()
    again, _ = _manager(tmp_path, "run", keep_last=3)
    with caplog.at_level("WARNING"):
        assert again.resolve_resume() == str(root / ck.step_name(2))
    assert "falling back to step-00000002" in caplog.text and "the 3 step(s) after step 2 are lost" in caplog.text


def test_a_format_2_manifest_without_writer_downloads_from_the_flat_layout(tmp_path):
    run, counter = _manager(tmp_path, "run")
    run.save(3)
    local = tmp_path / "run" / "checkpoints" / ck.step_name(3)
    manifest = ck.read_manifest(local)
    manifest.format, manifest.writer = ck.FORMAT_V2, ""
    remote = LocalStore(tmp_path / "old-prefix")
    for rel in manifest.files:
        remote.put_file(local / rel, f"{ck.step_name(3)}/{rel}")
    remote.put_bytes(manifest.to_json(), f"{ck.step_name(3)}/{ck.MANIFEST}")
    dest = ck.download_checkpoint(remote, 3, tmp_path / "restored" / ck.step_name(3))
    assert json.loads((dest / ck.MANIFEST).read_text())["format"] == ck.FORMAT_V2
    ck.check_resumable(ck.verified_manifest(dest), str(dest))  # format 2 still resumes


def test_a_step_another_writer_committed_first_stays_as_it_was(tmp_path, caplog):
    remote = tmp_path / "prefix"
    first, counter = _manager(tmp_path, "a", str(remote), keep_last=5)
    counter.value = 6
    first.save(6)
    assert first.wait_for_uploads(30)
    first.close()
    theirs = _remote_manifest(remote, 6)
    # A second run on the prefix trains to the same step with other content, and tries to commit it too.
    second, other = _manager(tmp_path, "b", str(remote), keep_last=5, resume="none")
    other.value = 60
    with caplog.at_level("WARNING"):
        second.save(6)
        assert second.wait_for_uploads(30)
    second.close()
    assert f"already committed by writer {first.writer}" in caplog.text and "stays local only" in caplog.text
    assert _remote_manifest(remote, 6).same_content(theirs)  # the committed one is unchanged...
    assert ck.verify_remote(LocalStore(remote), theirs) == []  # ... and still verifies
    assert ck.read_manifest(tmp_path / "b" / "checkpoints" / ck.step_name(6)).writer == second.writer
