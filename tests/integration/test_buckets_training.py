"""A real 2-rank DeepSpeed run on aspect-ratio buckets of real photos, and its exact resume.

The trainer (``torchrun train.py``, ZeRO-2, fp32, the fused op required) trains
``configs/tiny.yaml`` made RGB (logistic likelihood) on scikit-image's non-square
photos (:mod:`tests.fixtures.photos`) with three buckets, random crops and flips,
gradient checkpointing and channels-last on, and validates at ``model.image_size``.
Then a second run resumes from the first run's step-2 checkpoint -- part-filled
buckets included, read back from their shards -- and must end at step 4 with weights
bitwise equal to the uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.trainer_runs import assert_same_tensors, weights
from tests.launching import clean_env, run, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUCKETS = "[[24,40],[40,24],[32,32]]"


def _train(shards: Path, run_dir: Path, *extra: str) -> str:
    cmd = torchrun("train.py", "--config", "configs/tiny.yaml", f"run_dir={run_dir}", f"data.train={shards}",
                   f"data.val={shards}", "model.in_channels=3", "model.likelihood=logistic", "model.image_size=32",
                   "model.gradient_checkpointing=true", "model.channels_last=true", f"data.aspect_buckets={BUCKETS}",
                   "data.resize=true", "data.random_crop=true", "data.random_flip=true", "data.shuffle_buffer=8",
                   "data.num_workers=1", "distributed.zero_stage=2", "distributed.precision=fp32",
                   "train.max_steps=4", "train.global_batch_size=8", "checkpoint.every_steps=2",
                   "logging.image_every=0", "logging.histogram_every=0", *extra, nproc=2)
    done = run(cmd, env=clean_env(VAE_TRAIN_REQUIRE_FUSED="1"), timeout_s=400)
    assert done.returncode == 0, (done.stdout or "")[-4000:] + (done.stderr or "")[-4000:]
    return done.stdout


def test_two_ranks_train_on_buckets_and_resume_exactly(photo_shards, tmp_path: Path) -> None:
    first = tmp_path / "first"
    _train(photo_shards.path, first)
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, 5))
    assert all(math.isfinite(row["loss"]) for row in train_rows)
    assert any(row["split"] == "val" and math.isfinite(row["nelbo_nats"]) for row in rows)
    info = json.loads((first / "run_info.json").read_text())
    assert info["checkpointed_blocks"] > 0 and info["channels_last"] is True

    # the data part of the step-2 checkpoint holds each rank's part-filled buckets by reference
    from vae_train.checkpoint.manifest import trainer_state_files

    step2 = first / "checkpoints" / "step-00000002"
    states = [json.loads((step2 / trainer_state_files(rank)[0]).read_text())["parts"]["data"] for rank in (0, 1)]
    assert all(s["aspect_buckets"] == [[24, 40], [40, 24], [32, 32]] for s in states)
    assert all(w is None or "pending" in w for s in states for w in s["workers"])

    resumed = tmp_path / "resumed"
    _train(photo_shards.path, resumed, f"resume={first / 'checkpoints' / 'step-00000002'}")
    assert_same_tensors(weights(first / "checkpoints" / "step-00000004"),
                        weights(resumed / "checkpoints" / "step-00000004"), "weights after resuming on buckets")
