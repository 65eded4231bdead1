"""The trainer as users run it: real multi-process DeepSpeed runs on CPU (gloo) on Fashion-MNIST shards.

One module-scoped fixture trains ``configs/tiny.yaml`` at ZeRO-0 and ZeRO-2 (2
ranks under torchrun, 10 steps, real shards); the assertions share those runs.
Tolerance for "the stages give the same loss trajectory": every logged loss
within a relative 1e-3 of ZeRO-0's (the stages differ only in how gradients are
reduced and partitioned, i.e. in float summation order). ZeRO-1 and ZeRO-3 are
held more tightly by tests/integration/test_zero_equivalence.py (every stage's
loss, gradient norm and weights against plain PyTorch, and its run_info), so
they are not trained a second time here (the suite's time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.launching import clean_env, free_port, run, torchrun
from vae_train.trainer import PNG_MIN_WIDTH

PYTHON = sys.executable
BIN = Path(sys.executable).parent
STAGES = (0, 2)
TRAJECTORY_RTOL = 1e-3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _env(**extra: str) -> dict[str, str]:
    return {**clean_env(), **extra}


def _train_args(shards: Path, run_dir: Path, *overrides: str, nan_at: str = "") -> list[str]:
    """``train.py`` and its arguments; ``nan_at="RANK:STEP"`` runs the test launcher that injects a NaN loss."""
    script = ["tests/integration/nan_train.py", nan_at] if nan_at else ["train.py"]
    return [*script, "--config", "configs/tiny.yaml", f"run_dir={run_dir}", f"data.train={shards}",
            f"data.val={shards}", *overrides]


def _torchrun(shards: Path, run_dir: Path, *overrides: str, nan_at: str = "") -> subprocess.CompletedProcess:
    return run(torchrun(*_train_args(shards, run_dir, *overrides, nan_at=nan_at)), env=_env(), timeout_s=240)


def _rows(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


@pytest.fixture(scope="module")
def zero_runs(fashion_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """ZeRO stages 0 and 2, fp32, 2 ranks, same seed: stage -> run dir."""
    runs = {}
    for stage in STAGES:
        run_dir = tmp_path_factory.mktemp(f"zero{stage}")
        result = _torchrun(fashion_shards, run_dir, f"distributed.zero_stage={stage}", "train.val_every=5")
        assert result.returncode == 0, result.stderr[-4000:]
        runs[stage] = run_dir
    return runs


def test_zero0_and_zero2_train_with_two_ranks(zero_runs: dict[int, Path]) -> None:
    for stage, run_dir in zero_runs.items():
        info = _info(run_dir)
        assert (info["world_size"], info["zero_stage"], info["backend"], info["precision"]) == (2, stage, "gloo", "fp32")
        losses = [row["loss"] for row in _rows(run_dir)]
        assert [row["step"] for row in _rows(run_dir)] == list(range(1, 11))
        assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, (stage, losses)  # the loss falls


def test_zero_stages_give_the_same_loss_trajectory(zero_runs: dict[int, Path]) -> None:
    # Same seed and data; the runs must also have used the same reparameterization kernel.
    assert len({_info(run_dir)["reparam_backend"] for run_dir in zero_runs.values()}) == 1
    reference = [row["loss"] for row in _rows(zero_runs[0])]
    for stage in STAGES[1:]:
        losses = [row["loss"] for row in _rows(zero_runs[stage])]
        assert losses == pytest.approx(reference, rel=TRAJECTORY_RTOL), stage


def test_tensorboard_has_scalars_images_and_histograms(zero_runs: dict[int, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = zero_runs[2]
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    expected = {f"train/{name}" for name in ("loss", "recon", "kl", "beta", "lr", "grad_norm", "skipped_steps",
                                             "images_per_s", "data_wait_fraction", "bits_per_dim",
                                             "active_channels")}
    expected |= {"val/nelbo_nats", "val/nelbo_bpd", "val/active_channels", "val/psnr_db",
                 "val/latent_scaling_factor", "val/latent_shift_factor", "val/latent_mean_c0", "val/latent_std_c3"}
    assert expected <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 10
    assert [e.step for e in events.Scalars("val/nelbo_nats")] == [5, 10]
    assert {"images/reconstructions", "images/samples"} <= set(tags["images"])
    assert [e.step for e in events.Images("images/samples")][-1] == 10
    assert "latent/kl_per_channel" in tags["histograms"]
    for png in ("samples.png", "reconstructions.png"):
        with Image.open(run_dir / png) as image:
            assert image.size[0] >= PNG_MIN_WIDTH  # big enough to look at, not a 28-pixel-per-image thumbnail


@pytest.mark.timeout(400)
def test_bf16_run_under_the_deepspeed_launcher(fashion_shards: Path, tmp_path: Path) -> None:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *_train_args(fashion_shards, tmp_path, "distributed.precision=bf16", "distributed.zero_stage=1",
                        "train.max_steps=4")]
    result = run(cmd, env=_env(), timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = _info(tmp_path)
    assert (info["launcher"], info["precision"], info["zero_stage"], info["world_size"]) == ("deepspeed", "bf16", 1, 2)
    losses = [row["loss"] for row in _rows(tmp_path)]
    assert len(losses) == 4 and all(0 < loss < 1e4 for loss in losses)


def test_accelerate_launch_runs_two_deepspeed_ranks_and_skips_a_nan_step_together(
    fashion_shards: Path, tmp_path: Path
) -> None:
    """`accelerate launch` with the CPU config; rank 1's loss is NaN in step 3 (0-based).

    The CPU config leaves the ZeRO stage to the experiment config (tiny.yaml: ZeRO-0, fp32), so the
    verdicts' all-reduce runs asynchronously during the backward and still settles the skip on both ranks."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate_cpu.yaml",
           *_train_args(fashion_shards, tmp_path, "train.max_steps=6", nan_at="1:3")]
    result = run(cmd, env=_env(), timeout_s=240)
    assert result.returncode == 0, result.stderr[-4000:]
    info = _info(tmp_path)
    assert (info["launcher"], info["world_size"], info["zero_stage"]) == ("accelerate", 2, 0)
    for rank in (0, 1):
        skips = [line for line in result.stderr.splitlines() if f"[rank {rank}] WARNING step" in line]
        assert len(skips) == 1 and "step 3 skipped on every rank" in skips[0], result.stderr[-3000:]
    skipped = {row["step"]: row["skipped_steps"] for row in _rows(tmp_path)}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert all(isinstance(row["loss"], float) for row in _rows(tmp_path) if row["step"] != 4)


def test_consecutive_skips_stop_every_rank_with_a_clear_error(fashion_shards: Path, tmp_path: Path) -> None:
    """ZeRO-0 fp32: the trainer's own gate decides (DeepSpeed has no overflow check there).

    Step 0: rank 1's loss is NaN, so both ranks skip it on the strength of one all-reduce;
    steps 1-2: every gradient norm is above the threshold. Both ranks stop at step 2.
    """
    result = _torchrun(fashion_shards, tmp_path, "distributed.zero_stage=0", "train.skip_grad_norm=1e-6",
                       "train.max_consecutive_skips=3", nan_at="1:0")
    assert result.returncode != 0
    for rank in (0, 1):
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"[rank {rank}] WARNING step")]
        assert len(lines) == 3, result.stderr[-3000:]
        assert "step 0 skipped on every rank: non-finite loss on 1 rank(s)" in lines[0]
        assert "step 2 skipped on every rank: gradient norm" in lines[2]
    assert result.stderr.count("3 updates in a row were skipped (last at step 2: gradient norm") == 2
    assert "vae_train/trainer.py" not in result.stderr  # our message, not a traceback


def test_plain_python_runs_one_process(fashion_shards: Path, tmp_path: Path) -> None:
    cmd = [PYTHON, *_train_args(fashion_shards, tmp_path, "train.max_steps=3")]
    result = run(cmd, env=_env(), timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    info = _info(tmp_path)
    assert (info["launcher"], info["world_size"], info["zero_stage"]) == ("python", 1, 0)
    assert [row["step"] for row in _rows(tmp_path)] == [1, 2, 3]


def test_shards_made_elsewhere_train_from_a_brace_pattern_without_an_index(tmp_path: Path) -> None:
    """Two shards written with plain tarfile (real Fashion-MNIST images), no index.json, no extra key."""
    import io
    import tarfile

    from PIL import Image

    from tests.fixtures.trained_vae import read_fashion_mnist

    images, labels = read_fashion_mnist("train", 120)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"part-{shard:06d}.tar", "w") as tar:
            for i in range(shard * 60, (shard + 1) * 60):
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                members = {f"img{i:05d}.png": png.getvalue(), f"img{i:05d}.cls": str(labels[i]).encode()}
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    assert not (shards / "index.json").exists()
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "train.py", "--config", "configs/tiny.yaml", f"run_dir={run_dir}",
           f"data.train={shards}/part-{{000000..000001}}.tar", "data.val=", "train.max_steps=3"]
    result = run(cmd, env=_env(), timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in _rows(run_dir)] == [1, 2, 3]
    assert all(row["data_skipped_samples"] == 0 for row in _rows(run_dir))
