"""A real 2-rank DeepSpeed run on aspect-ratio buckets of real photos, its exact resume and its elastic resume.

The trainer (``torchrun tests/integration/fault_train.py``, which is ``train.py`` with
state dumps; ZeRO-2, fp32, the fused op required) trains ``configs/tiny.yaml`` made RGB
(logistic likelihood) on scikit-image's non-square photos (:mod:`tests.fixtures.photos`)
with three buckets, random crops and flips, gradient checkpointing and channels-last on,
and validates at ``model.image_size``. That run is made once per module. Then:

* a second 2-rank run resumes from its step-2 checkpoint -- part-filled buckets
  included, read back from their shards -- and must end at step 4 with weights bitwise
  equal to the uninterrupted run's;
* a 1-rank run resumes from the same checkpoint (elastic, docs/DESIGN.md "The checkpoint
  protocol"): weights, both Adam moments and the Adam step must be bitwise those saved
  (DeepSpeed's universal conversion), and the data stream, whose per-rank states (pending
  bucket references included) do not map to one rank, restarts from its seed at world
  size 1: after the resumed steps its state must be that of a fresh 1-rank stream that
  delivered as many batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.trainer_runs import assert_same_tensors, weights
from tests.launching import REPO, clean_env, run, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUCKETS = "[[24,40],[40,24],[32,32]]"
SCRIPT = "tests/integration/fault_train.py"


def _overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train={shards}", f"data.val={shards}", "model.in_channels=3",
            "model.likelihood=logistic", "model.image_size=32", "model.gradient_checkpointing=true",
            "model.channels_last=true", f"data.aspect_buckets={BUCKETS}", "data.resize=true", "data.random_crop=true",
            "data.random_flip=true", "data.shuffle_buffer=8", "data.num_workers=1", "distributed.zero_stage=2",
            "distributed.precision=fp32", "train.max_steps=4", "train.global_batch_size=8",
            "checkpoint.every_steps=2", "logging.image_every=0", "logging.histogram_every=0"]


def _train(shards: Path, run_dir: Path, *extra: str, nproc: int = 2, faults: dict | None = None) -> str:
    cmd = torchrun(SCRIPT, "--config", "configs/tiny.yaml", *_overrides(shards, run_dir), *extra, nproc=nproc)
    env = clean_env(VAE_TRAIN_REQUIRE_FUSED="1", VAE_TEST_FAULTS=json.dumps(faults or {}))
    done = run(cmd, env=env, timeout_s=400, merge_stderr=True)
    assert done.returncode == 0, (done.stdout or "")[-6000:]
    return done.stdout


def _data_states(checkpoint: Path, ranks: int) -> list[dict]:
    from vae_train.checkpoint.manifest import trainer_state_files

    return [json.loads((checkpoint / trainer_state_files(rank)[0]).read_text())["parts"]["data"]
            for rank in range(ranks)]


@pytest.fixture(scope="module")
def first_run(photo_shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (checkpoints 2 and 4; the full training state dumped at checkpoint 2)."""
    first = tmp_path_factory.mktemp("buckets") / "first"
    _train(photo_shards.path, first, faults={"out": str(first.parent), "dump_at_save": [2]})
    return first


def test_two_ranks_train_on_buckets_and_resume_exactly(photo_shards, first_run: Path, tmp_path: Path) -> None:
    first = first_run
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, 5))
    assert all(math.isfinite(row["loss"]) for row in train_rows)
    assert any(row["split"] == "val" and math.isfinite(row["nelbo_nats"]) for row in rows)
    info = json.loads((first / "run_info.json").read_text())
    assert info["checkpointed_blocks"] > 0 and info["channels_last"] is True

    # the data part of the step-2 checkpoint holds each rank's part-filled buckets by reference
    states = _data_states(first / "checkpoints" / "step-00000002", 2)
    assert all(s["aspect_buckets"] == [[24, 40], [40, 24], [32, 32]] for s in states)
    assert all(w is None or "pending" in w for s in states for w in s["workers"])

    resumed = tmp_path / "resumed"
    _train(photo_shards.path, resumed, f"resume={first / 'checkpoints' / 'step-00000002'}")
    assert_same_tensors(weights(first / "checkpoints" / "step-00000004"),
                        weights(resumed / "checkpoints" / "step-00000004"), "weights after resuming on buckets")


def test_elastic_resume_on_one_rank_restarts_the_bucketed_stream(photo_shards, first_run: Path,
                                                                 tmp_path: Path) -> None:
    from vae_train.config import load_config
    from vae_train.data import build_train_stream
    from vae_train.model.likelihoods import likelihood_value_range

    checkpoint = first_run / "checkpoints" / "step-00000002"
    assert any(w and w["pending"] for s in _data_states(checkpoint, 2) for w in s["workers"])  # buckets part-filled
    elastic = tmp_path / "elastic"
    log = _train(photo_shards.path, elastic, f"resume={checkpoint}", nproc=1,
                 faults={"out": str(tmp_path), "dump_after_load": "continue"})
    assert f"elastic resume from {checkpoint} at step 2: world size 2 -> 1" in log, log[-3000:]
    assert "part 'data' restarts from the state it was built with" in log, log[-3000:]
    assert_same_tensors(load_file(first_run.parent / "saved-2.safetensors"), load_file(tmp_path / "loaded.safetensors"),
                        "weights / Adam moments / Adam step after the elastic resume on buckets")
    rows = [json.loads(line) for line in (elastic / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [3, 4]
    assert all(math.isfinite(row["loss"]) for row in rows if row["split"] == "train")

    # the stream restarted at world size 1 (micro-batch 8): a fresh stream after as many batches is in the same state
    (saved,) = _data_states(elastic / "checkpoints" / "step-00000004", 1)
    assert saved["world_size"] == 1 and saved["micro_batch_size"] == 8 and saved["batches"] == 2
    cfg = load_config(REPO / "configs/tiny.yaml", _overrides(photo_shards.path, elastic))
    fresh = build_train_stream(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.in_channels,
                               value_range=likelihood_value_range(cfg.model.likelihood), micro_batch_size=8, rank=0,
                               world_size=1, seed=cfg.seed, s3_cfg=cfg.s3, size_multiple=cfg.model.downsampling_factor)
    for _ in range(saved["batches"]):
        next(fresh)
    assert json.loads(json.dumps(fresh.state_dict())) == saved
    fresh.close()
