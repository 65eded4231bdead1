"""The wandb tracker in offline mode, in-process: resume keeps the run id, WANDB_MODE overrides the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.wandb_files import read_wandb_log
from vae_train.config import WandbConfig
from vae_train.wandb_tracker import WandbTracker


def _history(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for record in read_wandb_log(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def test_resumed_run_continues_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = WandbConfig(enabled=True, project="p")
    first = WandbTracker(cfg, tmp_path / "run", {"seed": 3})
    first.scalars(1, {"loss": 2.5}, "train")
    first.images(1, {"samples": np.zeros((6, 10, 3), np.uint8)})
    first.close()
    second = WandbTracker(cfg, tmp_path / "run", {"seed": 3})
    second.scalars(2, {"loss": 1.5}, "train")
    second.close()
    assert first.run_id == second.run_id
    runs = sorted((tmp_path / "run" / "wandb" / "wandb").glob(f"offline-run-*-{first.run_id}"))
    assert len(runs) == 2  # `wandb sync` merges them into one run
    steps = [_history(run / f"run-{first.run_id}.wandb") for run in runs]
    assert steps[0][1]["train/loss"] == 2.5 and steps[0][1]["images/samples/width"] == 10
    assert steps[1][2]["train/loss"] == 1.5


def test_wandb_mode_in_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = WandbTracker(WandbConfig(enabled=True, dir=str(tmp_path / "elsewhere")), tmp_path / "run", {})
    tracker.scalars(1, {"loss": 1.0}, "train")
    tracker.close()
    assert (tmp_path / "elsewhere" / "run_id").is_file()  # logging.wandb.dir is honoured
    assert not list((tmp_path / "elsewhere").rglob("*.wandb"))  # disabled: nothing written
