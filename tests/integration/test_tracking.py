"""Validation metrics during training and the wandb tracker, on a real 2-rank run (offline mode).

One short run of ``configs/tiny.yaml`` with ``eval.metrics=[psnr,ssim,rfid]`` (random FID Inception
weights from a file) and ``logging.wandb.enabled=true``; the wandb run is read back from the files it
wrote (the ``.wandb`` transaction log, parsed here with wandb's own protobuf schema, and the media files),
and compared with ``metrics.jsonl``, TensorBoard and the resolved ``config.yaml``.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.fixtures.wandb_files import read_wandb_log
from tests.launching import clean_env, run, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 4
VAL_IMAGES = 2 * 2  # 2 ranks x train.val_batches=1 x data.val_batch_size=2


@pytest.fixture(scope="module")
def tracked_run(fashion_shards: Path, inception_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    secrets = {"AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}", "WANDB_API_KEY": f"wb-{uuid.uuid4().hex}"}
    env = clean_env(**secrets)
    env.pop("WANDB_MODE", None)  # the config's mode (offline) decides
    done = run(torchrun("train.py", "--config", "configs/tiny.yaml", f"run_dir={run_dir}",
                        f"data.train={fashion_shards}", f"data.val={fashion_shards}", f"train.max_steps={STEPS}",
                        "train.val_every=2", "data.val_batch_size=2", "logging.image_every=2",
                        "eval.metrics=[psnr,ssim,rfid]", f"eval.inception_weights={inception_weights}",
                        "logging.wandb.enabled=true", "logging.wandb.tags=[ci]"),
               env=env, timeout_s=280)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, secrets


def _val_rows(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row for row in rows if row["split"] == "val"]


def test_validation_logs_the_configured_metrics(tracked_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    rows = _val_rows(run_dir)
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert row["rfid_images"] == VAL_IMAGES and row["rfid"] > 0
        assert 0 < row["ssim"] <= 1 and row["psnr_db"] > 0
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("val/rfid")] == \
        [(row["step"], row["rfid"]) for row in rows]


def test_wandb_offline_run_holds_config_scalars_and_images(tracked_run) -> None:
    run_dir, secrets = tracked_run
    runs = list((run_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    records = read_wandb_log(runs[0] / f"run-{run_id}.wandb")
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id and list(run_record.tags) == ["ci"]
    assert run_record.display_name == "run"  # the run directory's name
    logged_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in logged_config.items() if k != "_wandb"} == resolved

    history: dict[int, dict[str, Any]] = defaultdict(dict)
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[int(items["_step"])].update(items)
    assert [step for step in sorted(history) if "train/loss" in history[step]] == list(range(1, STEPS + 1))
    train_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in train_rows:
        assert history[row["step"]][f"{row['split']}/loss" if row["split"] == "train" else "val/rfid"] == \
            pytest.approx(row["loss"] if row["split"] == "train" else row["rfid"], rel=1e-9)
    for step in (2, 4):  # logging.image_every=2: the grids as PNG files the history points to
        grid = {key.rpartition("/")[2]: value for key, value in history[step].items()
                if key.startswith("images/reconstructions/")}
        assert grid["_type"] == "image-file"
        with Image.open(runs[0] / "files" / grid["path"]) as image:
            assert image.size == (grid["width"], grid["height"]) and image.size[0] > 28

    written = [p for p in run_dir.rglob("*") if p.is_file()]
    for path in written:  # nothing the process could see in its environment is written anywhere
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"


def test_wandb_enabled_without_the_package_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vae_train.config import WandbConfig
    from vae_train.wandb_tracker import TrackerError, check_available

    check_available(WandbConfig(enabled=False))  # nothing to check
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of wandb now fails as if absent
    with pytest.raises(TrackerError, match=r"pip install 'vae-train\[wandb\]'"):
        check_available(WandbConfig(enabled=True))
