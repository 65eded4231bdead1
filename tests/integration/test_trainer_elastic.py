"""Resume at another world size or ZeRO stage, and a skipped step, through the real trainer (``train.py``).

Each source run (``torchrun`` of :mod:`tests.integration.fault_train`, real
Fashion-MNIST, fused op required) dumps its whole training state when it saves
checkpoint N: the fp32 master weights, both Adam moments (whole, gathered over
the ZeRO partitions) and the Adam step counters. The target run resumes from
that checkpoint at another world size or ZeRO stage, dumps the same state right
after the load and exits. Equality is bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.trainer_runs import assert_same_tensors, ok, reap, start_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N = 5


@pytest.fixture(scope="module")
def source_runs(fashion_shards, tmp_path_factory):
    """Checkpoint N of a run with (ranks, ZeRO stage), made once per module, with its state dump."""
    made: dict[tuple[int, int], tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(ranks: int, stage: int) -> tuple[Path, dict[str, torch.Tensor]]:
        if (ranks, stage) not in made:
            out = tmp_path_factory.mktemp(f"source-w{ranks}-z{stage}")
            ok(start_train(fashion_shards, out / "run", f"distributed.zero_stage={stage}", f"train.max_steps={N}",
                           f"checkpoint.every_steps={N}", nproc=ranks, faults={"out": str(out), "dump_at_save": [N]}))
            saved = load_file(out / f"saved-{N}.safetensors")
            assert any(k.startswith("exp_avg_sq/") for k in saved) and saved["adam_step"].tolist() == [float(N)]
            made[ranks, stage] = (out / "run" / "checkpoints" / f"step-{N:08d}", saved)
        return made[ranks, stage]

    return get


@pytest.mark.parametrize(("src_ranks", "src_stage", "dst_ranks", "dst_stage"),
                         [(2, 2, 1, 2), (1, 2, 2, 2), (4, 2, 2, 2), (2, 2, 2, 1)],
                         ids=["2to1", "1to2", "4to2", "zero2to1"])
def test_elastic_resume_restores_weights_adam_moments_and_step_exactly(
        source_runs, fashion_shards, tmp_path, src_ranks, src_stage, dst_ranks, dst_stage):
    checkpoint, saved = source_runs(src_ranks, src_stage)
    log = ok(start_train(fashion_shards, tmp_path / "run", f"distributed.zero_stage={dst_stage}",
                         f"train.max_steps={2 * N}", f"resume={checkpoint}", nproc=dst_ranks,
                         faults={"out": str(tmp_path), "dump_after_load": True}))
    assert f"fault_train: loaded step {N} elastic=True" in log
    assert (f"elastic resume from {checkpoint} at step {N}: world size {src_ranks} -> {dst_ranks}, "
            f"ZeRO stage {src_stage} -> {dst_stage}") in log, log[-3000:]
    loaded = load_file(tmp_path / "loaded.safetensors")
    assert_same_tensors(saved, loaded, "weights / Adam moments / Adam step after the elastic resume")


def test_resume_into_zero3_from_another_stage_is_refused_clearly(source_runs, fashion_shards, tmp_path):
    """DeepSpeed cannot load a universal checkpoint into ZeRO-3: the resume stops before loading, saying what works."""
    checkpoint, _ = source_runs(2, 2)
    result = reap(start_train(fashion_shards, tmp_path / "run", "distributed.zero_stage=3", f"train.max_steps={2 * N}",
                              f"resume={checkpoint}", faults={"out": str(tmp_path), "dump_after_load": True}))
    assert result.returncode != 0
    assert (f"vae-train train: error: checkpoint {checkpoint} ('model') was saved by 2 ranks with ZeRO stage 2; "
            "this run has 2 ranks with ZeRO stage 3") in result.stdout, result.stdout[-3000:]
    assert "distributed.zero_stage=2 (exact)" in result.stdout
    assert "AssertionError" not in result.stdout and not (tmp_path / "loaded.safetensors").exists()


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_skipped_step_leaves_weights_and_adam_state_unchanged(fashion_shards, tmp_path, stage):
    """A NaN loss on rank 1 in step 6 (0-based) skips that update on every rank.

    Checkpoint 6 is saved before step 6 runs, checkpoint 7 after it: the fp32
    weights, both Adam moments and Adam's step counters must be bit-identical.
    What legitimately moves across a skipped step (and is not compared): the
    trainer's step and ``skipped_steps`` counters, the data stream's position,
    the RNG states (the skipped step drew its noise) and DeepSpeed's own
    ``global_steps``/sample counters. The step after (checkpoint 8) must differ:
    training goes on.
    """
    log = ok(start_train(fashion_shards, tmp_path / "run", f"distributed.zero_stage={stage}", "train.max_steps=8",
                         "checkpoint.every_steps=1", faults={"out": str(tmp_path), "nan": "1:6",
                                                             "dump_at_save": [6, 7, 8]}))
    assert "step 6 skipped on every rank" in log and "done: 8 steps, 1 skipped" in log
    before, after, later = (load_file(tmp_path / f"saved-{s}.safetensors") for s in (6, 7, 8))
    assert before["adam_step"].tolist() == [6.0]
    assert_same_tensors(before, after, "weights / Adam moments / Adam step across the skipped step")
    assert later["adam_step"].tolist() == [7.0]
    changed = [k for k in after if k.startswith("w/") and not torch.equal(after[k], later[k])]
    assert changed, "the step after the skipped one changed no weight"
