"""``model.arch: ldm`` under ZeRO-0 and ZeRO-1, with both objectives: real 2-rank DeepSpeed runs on Fashion-MNIST.

ZeRO-2 and ZeRO-3 training of the AutoencoderKL (likelihood ELBO) are covered by
``test_ldm_training.py``; here the other two stages, one objective each: the likelihood
ELBO (``gaussian_learned``: the two-parameter output head) under ZeRO-0, and the
latent-diffusion tokenizer objective (pixel l1, learned log-variance, PatchGAN from
``loss.disc_start``, EMA) under ZeRO-1. Each run checkpoints at steps 2 and 4 and dumps
its live training state when step 4 is saved (``fault_train.py``'s ``dump_at_save``), so the
consolidated checkpoint and ``load_model`` are compared with the weights the engine
actually held; the tokenizer checkpoint is then resumed on one rank (elastic, 2 -> 1) and
the loaded state must equal the saved one, discriminator and EMA included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_autoencoder_training import TOKENIZER, disc_weights, ema_states
from tests.integration.trainer_runs import assert_same_tensors, ok, start_train, weights
from vae_train.checkpoint import read_manifest, step_name
from vae_train.ema import full_weights
from vae_train.export import TRAINING_ONLY, load_model
from vae_train.model import AutoencoderKL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

LDM_TINY = ("model.arch=ldm", "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=4")
STEPS = 4
DISC_START = 2
OBJECTIVES = {"likelihood": ("model.likelihood=gaussian_learned",),
              "tokenizer": (*TOKENIZER, f"loss.disc_start={DISC_START}")}


def _model_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the training-only tensors (the learned log-variance) that ``load_model`` drops."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}


@pytest.mark.parametrize("stage,objective", [(0, "likelihood"), (1, "tokenizer")])
def test_ldm_trains_commits_and_loads(fashion_shards: Path, tmp_path: Path, stage: int, objective: str):
    run = tmp_path / "run"
    common = (*LDM_TINY, *OBJECTIVES[objective], f"distributed.zero_stage={stage}", f"train.max_steps={STEPS}")
    ok(start_train(fashion_shards, run, *common, "checkpoint.every_steps=2",
                   faults={"out": str(tmp_path), "dump_at_save": [STEPS]}))
    ckpt, earlier = (run / "checkpoints" / step_name(s) for s in (STEPS, 2))
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows.values()), rows

    manifest = read_manifest(ckpt)
    assert manifest is not None and manifest.world_size == 2
    tokenizer = objective == "tokenizer"
    assert ({"disc", "ema"} <= set(manifest.parts)) == tokenizer

    # the consolidated checkpoint is what the engine held, and every tensor trained
    saved = load_file(tmp_path / f"saved-{STEPS}.safetensors")
    trained = weights(ckpt)
    assert_same_tensors({k[2:]: v for k, v in saved.items() if k.startswith("w/")}, trained, "live vs consolidated")
    before = weights(earlier)
    assert [k for k in trained if torch.equal(trained[k], before[k])] == []
    assert saved["adam_step"].tolist() == [STEPS]

    model = load_model(ckpt)
    assert isinstance(model, AutoencoderKL)
    raw = _model_only(trained)
    if not tokenizer:
        assert_same_tensors(raw, model.state_dict(), "load_model of a checkpoint without EMA")
        return

    # the EMA is the default of load_model, the raw weights on request
    ema = full_weights(ema_states(ckpt))
    assert_same_tensors(_model_only(ema), model.state_dict(), "load_model default (EMA)")
    assert_same_tensors(raw, load_model(ckpt, weights="raw").state_dict(), "load_model weights=raw")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)

    # the discriminator: untouched before disc_start, then every tensor trained, its terms logged
    assert all(rows[s]["g_loss"] == 0 and rows[s]["d_loss"] == 0 for s in range(1, DISC_START + 1))
    for s in range(DISC_START + 1, STEPS + 1):
        assert rows[s]["adaptive_weight"] > 0 and rows[s]["d_loss"] > 0 and rows[s]["g_loss"] != 0, rows[s]
        assert all(math.isfinite(rows[s][k]) for k in ("g_loss", "d_loss", "adaptive_weight", "logvar"))
    assert saved["disc:adam_step"].tolist() == [STEPS - DISC_START]
    disc_before, disc_after = disc_weights(earlier), disc_weights(ckpt)
    assert [k for k in disc_after if torch.equal(disc_after[k], disc_before[k])] == []

    # resume on one rank: weights, Adam moments, discriminator and EMA come back exactly
    log = ok(start_train(fashion_shards, tmp_path / "resumed", *common, f"resume={ckpt}", nproc=1,
                         faults={"out": str(tmp_path), "dump_after_load": True}))
    assert f"fault_train: loaded step {STEPS} elastic=True" in log
    assert_same_tensors(saved, load_file(tmp_path / "loaded.safetensors"), "state after a 2 -> 1 resume")
