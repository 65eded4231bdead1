"""The latent-diffusion autoencoder objective through the real trainer: discriminator, adaptive weight, EMA.

Real 2-rank DeepSpeed jobs (``tests/integration/fault_train.py`` = ``train.py``) on real
Fashion-MNIST shards, the tiny model with ``loss.pixel=l1``, a learned output
log-variance, the PatchGAN (``loss.disc_weight``) and the EMA on. LPIPS is left out here
(a VGG16 forward per step would dominate these runs; its gradient path is covered in
``tests/unit/test_autoencoder_loss.py``) except in the one run that checks it starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.integration.trainer_runs import assert_same_tensors, killed, ok, reap, start_train, weights
from vae_train.checkpoint import part_tensor_file, read_manifest, restricted_torch_load, trainer_state_files
from vae_train.checkpoint.parts import decode_state
from vae_train.cli import main
from vae_train.ema import full_weights
from vae_train.export import ExportError, load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKENIZER = ("model.likelihood=gaussian_fixed", "loss.pixel=l1", "loss.learned_logvar=true", "loss.disc_weight=0.5",
             "kl.schedule=constant", "kl.beta=1e-6", "ema.decay=0.9", "checkpoint.keep_last=10")
DISC_START = 3
STEPS = 6


def _rows(run_dir: Path, split: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row["split"] == split}


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def disc_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The discriminator's fp32 weights from its part of a ZeRO-0/1/2 checkpoint (replicated parameters)."""
    with restricted_torch_load():
        module = torch.load(ckpt / "disc" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in module.items()}


def ema_states(ckpt: Path) -> list[dict]:
    """Every rank's saved EMA state as :func:`vae_train.ema.full_weights` takes it."""
    states = []
    for rank in range(read_manifest(ckpt).world_size):
        skeleton = json.loads((ckpt / trainer_state_files(rank)[0]).read_text())["parts"]["ema"]
        tensors = load_file(ckpt / part_tensor_file("ema", rank))
        states.append(decode_state(skeleton, tensors))
    return states


@pytest.fixture(scope="module")
def reference(fashion_shards, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2: a checkpoint after every step, the discriminator starting at step DISC_START."""
    out = tmp_path_factory.mktemp("tok-reference")
    run = out / "run"
    ok(start_train(fashion_shards, run, *TOKENIZER, "distributed.zero_stage=2", f"train.max_steps={STEPS}",
                   f"loss.disc_start={DISC_START}", "checkpoint.every_steps=1",
                   faults={"out": str(out), "dump_at_save": [4]}))
    return out


def test_discriminator_is_still_before_disc_start_and_trains_after(reference):
    run = reference / "run"
    assert {"model", "disc", "ema", "data", "trainer"} <= set(read_manifest(_ckpt(run, 1)).parts)
    before = [disc_weights(_ckpt(run, s)) for s in range(1, DISC_START + 1)]
    for later in before[1:]:  # steps 0 .. DISC_START-1 leave it exactly as built
        assert_same_tensors(before[0], later, "discriminator weights before loss.disc_start")
    after = disc_weights(_ckpt(run, DISC_START + 1))
    moved = [k for k in after if not torch.equal(after[k], before[-1][k])]
    assert len(moved) == len(after), f"only {moved} moved after disc_start"
    rows = _rows(run)
    assert all(rows[s]["g_loss"] == 0 and rows[s]["d_loss"] == 0 for s in range(1, DISC_START + 1))
    assert all(rows[s]["adaptive_weight"] > 0 and rows[s]["d_loss"] > 0 for s in range(DISC_START + 1, STEPS + 1))


def test_every_term_validation_of_both_weights_and_the_difference_grid_are_logged(reference):
    """TensorBoard has every term of the objective, validation of the raw (val/) and EMA (val_ema/) weights,
    and the input | reconstruction | amplified-difference grid, whose third panel is DIFF_GAIN x |input - recon|."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae_train.autoencoder_step import TERMS
    from vae_train.logging import DIFF_GAIN

    run = reference / "run"
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{t}" for t in (*TERMS, "disc_skipped_steps")} <= scalars, {f"train/{t}" for t in TERMS} - scalars
    assert {"val/psnr_db", "val/ssim", "val_ema/psnr_db", "val_ema/ssim"} <= scalars
    val = {p: events.Scalars(f"{p}/psnr_db")[-1] for p in ("val", "val_ema")}
    assert val["val"].step == val["val_ema"].step == STEPS and val["val"].value != val["val_ema"].value
    assert any("input_recon_diff" in tag for tag in events.Tags()["images"])
    png = np.asarray(Image.open(run / "input_recon_diff.png")).astype(np.int32)
    size, pad = 28, 2  # configs/tiny.yaml's images, logging.image_grid's padding
    width = 3 * (size + pad) + pad
    factor = png.shape[1] // width  # the run-dir PNG is enlarged by whole pixel blocks
    assert factor >= 1 and png.shape[1] == factor * width
    grid = png[::factor, ::factor]
    rows = (grid.shape[0] - pad) // (size + pad)
    assert rows >= 2
    for row in range(rows):
        top = pad + row * (size + pad)
        x, r, d = (grid[top:top + size, pad + c * (size + pad):pad + c * (size + pad) + size, 0] for c in range(3))
        # [-1, 1] images as 0..255: the difference panel shows lo + 4 |x - r|, i.e. 4 |x - r| levels
        expected = np.clip(DIFF_GAIN * np.abs(x - r), 0, 255)
        assert np.abs(d - expected).max() <= 2 * DIFF_GAIN + 1, row  # the panels' own uint8 rounding


def test_sigkill_after_a_commit_resumes_bitwise_with_discriminator_and_ema(reference, fashion_shards, tmp_path):
    run = tmp_path / "run"
    common = (*TOKENIZER, "distributed.zero_stage=2", f"train.max_steps={STEPS}", f"loss.disc_start={DISC_START}",
              "checkpoint.every_steps=1")
    killed(start_train(fashion_shards, run, *common, faults={"kill_in_save": 5}))
    assert read_manifest(_ckpt(run, 4)) is not None and read_manifest(_ckpt(run, 5)) is None
    ok(start_train(fashion_shards, run, *common, "resume=auto"))
    want, got = _ckpt(reference / "run", STEPS), _ckpt(run, STEPS)
    assert_same_tensors(weights(want), weights(got), "autoencoder weights (incl. the learned log-variance)")
    assert_same_tensors(disc_weights(want), disc_weights(got), "discriminator weights")
    for rank in range(2):
        assert_same_tensors(load_file(want / part_tensor_file("ema", rank)), load_file(got / part_tensor_file("ema", rank)),
                            f"EMA of rank {rank}")


def test_nan_discriminator_loss_on_one_rank_skips_its_update_on_every_rank(reference, fashion_shards, tmp_path):
    run = tmp_path / "run"
    log = ok(start_train(fashion_shards, run, *TOKENIZER, "distributed.zero_stage=2", f"train.max_steps={STEPS}",
                         f"loss.disc_start={DISC_START}", "checkpoint.every_steps=1", faults={"disc_nan": "1:4"}))
    # the verdict is every rank's: ZeRO's overflow check (an all-reduce) or the gate catches the NaN gradients
    assert log.count("step 4: discriminator update skipped on every rank: non-finite") == 2, log[-3000:]
    assert_same_tensors(disc_weights(_ckpt(run, 4)), disc_weights(_ckpt(run, 5)), "discriminator across the skipped step")
    # the autoencoder's step went on, exactly as in the run without the fault
    assert_same_tensors(weights(_ckpt(reference / "run", 5)), weights(_ckpt(run, 5)), "autoencoder weights")
    assert _rows(run)[5]["disc_skipped_steps"] == 1


def test_elastic_resume_2_to_1_restores_discriminator_and_ema_exactly(reference, fashion_shards, tmp_path):
    saved = load_file(reference / "saved-4.safetensors")
    assert any(k.startswith("disc:exp_avg_sq/") for k in saved) and any(k.startswith("ema/") for k in saved)
    log = ok(start_train(fashion_shards, tmp_path / "run", *TOKENIZER, "distributed.zero_stage=2",
                         f"train.max_steps={STEPS}", f"loss.disc_start={DISC_START}",
                         f"resume={_ckpt(reference / 'run', 4)}", nproc=1,
                         faults={"out": str(tmp_path), "dump_after_load": True}))
    assert "fault_train: loaded step 4 elastic=True" in log
    assert_same_tensors(saved, load_file(tmp_path / "loaded.safetensors"),
                        "weights, Adam moments, discriminator and its Adam state, EMA after 2 -> 1")


def test_adaptive_weight_is_the_same_under_zero3_and_zero0_and_ema_matches_float64(fashion_shards, tmp_path):
    runs = {}
    for stage in (0, 3):
        runs[stage] = tmp_path / f"z{stage}"
        ok(start_train(fashion_shards, runs[stage], *TOKENIZER, f"distributed.zero_stage={stage}", "train.max_steps=3",
                       "loss.disc_start=0", "checkpoint.every_steps=1", "ema.decay=0.5"))
    zero0, zero3 = _rows(runs[0]), _rows(runs[3])
    for step in (1, 2, 3):
        assert zero3[step]["adaptive_weight"] > 0
        assert zero3[step]["adaptive_weight"] == pytest.approx(zero0[step]["adaptive_weight"], rel=1e-4), step
    # the ZeRO-3 EMA is partitioned (each rank holds about half) and equals a float64 EMA of the weights
    states = ema_states(_ckpt(runs[3], 3))
    assert all(s["partitioned"] for s in states)
    total = sum(torch.Size(shape).numel() for shape in states[0]["shapes"].values())
    for s in states:
        assert sum(t.numel() for t in s["tensors"].values()) < 0.6 * total
    reference_ema: dict[str, torch.Tensor] = {}
    for step in (1, 2, 3):  # ema.start_step=0, every step: the first update copies, then lerp with 1 - decay
        w = {k: v.double() for k, v in weights(_ckpt(runs[3], step)).items()}
        reference_ema = w if not reference_ema else {k: 0.5 * reference_ema[k] + 0.5 * w[k] for k in w}
    got = full_weights(states)
    assert sorted(got) == sorted(reference_ema)
    for name, value in got.items():
        torch.testing.assert_close(value.double(), reference_ema[name], rtol=0, atol=1e-6, msg=name)
    # the commands' --weights: EMA by default, raw on request; exports hold the set they were made with
    ckpt = _ckpt(runs[3], 3)
    model_only = {k: v for k, v in got.items() if not k.startswith("loss_logvar.")}
    assert_same_tensors(model_only, load_model(ckpt).state_dict(), "load_model default (EMA)")
    raw = {k: v for k, v in weights(ckpt).items() if not k.startswith("loss_logvar.")}
    assert_same_tensors(raw, load_model(ckpt, weights="raw").state_dict(), "load_model --weights raw")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export"), "--weights", "raw"]) == 0
    assert_same_tensors(raw, load_model(tmp_path / "export").state_dict(), "export --weights raw")
    with pytest.raises(ExportError, match="export of the raw weights"):
        load_model(tmp_path / "export", weights="ema")


def test_bf16_run_trains_the_discriminator_in_its_own_bf16_engine(fashion_shards, tmp_path):
    """distributed.precision=bf16 on the CPU (DeepSpeed refuses fp16 here: the GPU check covers it), 2 ranks,
    ZeRO-2, the discriminator from step 0: both engines hold bf16 weights, every step applies both updates,
    the adaptive weight and the GAN terms are finite, and the EMA stays fp32."""
    run = tmp_path / "run"
    ok(start_train(fashion_shards, run, *TOKENIZER, "distributed.precision=bf16", "distributed.zero_stage=2",
                   "train.max_steps=3", "loss.disc_start=0", "checkpoint.every_steps=1",
                   faults={"out": str(tmp_path), "dump_at_save": [1, 2, 3]}))
    assert json.loads((run / "run_info.json").read_text())["precision"] == "bf16"
    rows = _rows(run)
    for step in (1, 2, 3):
        row = rows[step]
        assert row["adaptive_weight"] > 0 and row["d_loss"] > 0, row
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "g_loss", "d_loss", "logits_real", "logits_fake"))
        assert row["skipped_steps"] == 0 and row["disc_skipped_steps"] == 0, row
    with restricted_torch_load():
        module = torch.load(_ckpt(run, 3) / "disc" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"]
    assert {v.dtype for v in module.values() if v.is_floating_point()} == {torch.bfloat16}
    # its fp32 master weights (a bf16 weight can round an Adam step away) move at every step
    saved = [load_file(tmp_path / f"saved-{s}.safetensors") for s in (1, 2, 3)]
    masters = [{k: v for k, v in state.items() if k.startswith("disc:w/")} for state in saved]
    assert masters[0] and all(v.dtype == torch.float32 for v in masters[0].values())
    for before, after in zip(masters, masters[1:]):
        assert all(not torch.equal(before[k], after[k]) for k in after), "a discriminator step left weights unchanged"
    states = ema_states(_ckpt(run, 3))
    assert {t.dtype for t in states[0]["tensors"].values()} == {torch.float32}
    raw = weights(_ckpt(run, 3))
    assert any(not torch.equal(states[0]["tensors"][k], raw[k]) for k in raw)


def test_checkpoint_without_discriminator_is_refused_unless_a_fresh_one_is_asked(fashion_shards, tmp_path):
    run = tmp_path / "run"
    no_disc = [o for o in TOKENIZER if not o.startswith("loss.disc_weight")]
    ok(start_train(fashion_shards, run, *no_disc, "train.max_steps=2", "checkpoint.every_steps=2", nproc=1))
    result = reap(start_train(fashion_shards, run, *TOKENIZER, "train.max_steps=4", "loss.disc_start=2",
                              "resume=auto", nproc=1))
    assert result.returncode != 0
    assert "has no saved state for 'disc'" in result.stdout and "resume=none" in result.stdout, result.stdout[-3000:]
    log = ok(start_train(fashion_shards, run, *TOKENIZER, "train.max_steps=4", "loss.disc_start=2", "resume=auto",
                         "loss.fresh_discriminator=true", "checkpoint.every_steps=2", nproc=1))
    assert "a fresh one starts at step 2" in log
    assert "disc" in read_manifest(_ckpt(run, 4)).parts


def test_perceptual_weight_without_backbone_weights_stops_at_start_up(fashion_shards, tmp_path):
    result = reap(start_train(fashion_shards, tmp_path / "run", *TOKENIZER, "loss.perceptual_weight=1.0",
                              "train.max_steps=2", env={"TORCH_HOME": str(tmp_path / "empty")}, nproc=1), 120)
    assert result.returncode != 0
    assert "loss.lpips_backbone_path" in result.stdout and str(tmp_path / "empty") in result.stdout
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _command_outputs(checkpoint: Path, shards: Path, out: Path, weights: str | None) -> dict[str, object]:
    """What each model-reading command writes for ``checkpoint`` (``--weights`` when given): the
    eval metrics, the sample / reconstruct / interpolate grids' pixels, the score CSV's text."""
    out.mkdir(parents=True)
    common = ["--checkpoint", str(checkpoint), *(["--weights", weights] if weights else [])]
    data = ["--data", str(shards), "--batch-size", "16"]
    argvs = {
        "eval": ["eval", *common, *data, "--max-batches", "1", "--out", str(out / "eval.json")],
        "sample": ["sample", *common, "--n", "4", "--seed", "3", "--out", str(out / "sample.png")],
        "reconstruct": ["reconstruct", *common, *data, "--n", "4", "--out", str(out / "reconstruct.png")],
        "interpolate": ["interpolate", *common, *data, "--pairs", "2", "--steps", "3", "--out", str(out / "interpolate.png")],
        "score": ["score", *common, *data, "--max-images", "16", "--out", str(out / "score.csv")],
    }
    for name, argv in argvs.items():
        assert main([*argv, "data.num_workers=0"]) == 0, name
    metrics = json.loads((out / "eval.json").read_text())
    metrics.pop("checkpoint")
    outputs: dict[str, object] = {"eval": metrics, "score": (out / "score.csv").read_text()}
    for name in ("sample", "reconstruct", "interpolate"):
        outputs[name] = np.asarray(Image.open(out / f"{name}.png"))
    return outputs


def _same(a: object, b: object) -> bool:
    return bool(np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b


def test_commands_use_the_ema_weights_by_default_and_the_raw_ones_on_request(reference, fashion_shards, tmp_path):
    """eval, sample, reconstruct, interpolate, score and export: ``--weights ema`` (the default when the
    checkpoint has an EMA) and ``--weights raw`` give what the model ``load_model`` builds with that
    choice gives (through an export of it), and the two differ."""
    ckpt = _ckpt(reference / "run", STEPS)  # ZeRO-2, 2 ranks, EMA decay 0.9 since step 0
    got = {choice: _command_outputs(ckpt, fashion_shards, tmp_path / f"ckpt-{choice}", None if choice == "default" else choice)
           for choice in ("default", "ema", "raw")}
    for choice in ("ema", "raw"):
        export = tmp_path / f"export-{choice}"
        assert main(["export", str(ckpt), "--out", str(export), "--weights", choice]) == 0
        assert_same_tensors(load_model(ckpt, weights=choice).state_dict(), load_model(export).state_dict(),
                            f"export --weights {choice} vs load_model(weights={choice!r})")
        want = _command_outputs(export, fashion_shards, tmp_path / f"export-out-{choice}", None)
        for name, value in want.items():
            assert _same(got[choice][name], value), f"{name} --weights {choice} differs from its export's"
    default_export = tmp_path / "export-default"
    assert main(["export", str(ckpt), "--out", str(default_export)]) == 0
    assert json.loads((default_export / "config.json").read_text())["weights"] == "ema"
    for name in got["ema"]:
        assert _same(got["default"][name], got["ema"][name]), f"{name}: the default is not the EMA"
        assert not _same(got["raw"][name], got["ema"][name]), f"{name}: --weights raw gives the EMA's output"
