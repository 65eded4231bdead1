"""ZeRO 0-3 and 1 vs 2 ranks compute the same training step as plain PyTorch: loss, gradient norm, weights.

The real trainer (``torchrun``, DeepSpeed, the step gate, checkpoints) runs
``configs/tiny.yaml`` for a few steps with clipping off (``train.grad_clip=0``),
fp32, the fused op required, through ``tests/integration/train_fixed_batches.py``:
the batches and the reparameterization noise depend only on (step, the sample's
place in the global batch of 16), so 2 ranks x 8 and 1 rank x 16 train on the
same numbers. The reference replays the same 16 images and noise in one process
with a plain ``torch.optim.AdamW`` and ``loss.backward()`` on the global-batch
mean -- no DeepSpeed, no engine, no ranks.

What each comparison can see:

- the logged ``grad_norm`` is the unclipped global norm of the gradients the
  optimizer received; a gradient reduction that sums instead of averaging over 2
  ranks (x2), or a norm that counts replicated gradients twice (x sqrt 2), misses
  the reference's by 41-100 %, against a tolerance of ``GRAD_NORM_RTOL``
  (``test_the_grad_norm_check_would_catch_a_wrong_scale`` shows it on the data);
- Adam's update is nearly invariant to a constant gradient scale, so the final
  weights alone could not catch that; they catch a wrong or missing update on
  any partition (ZeRO-1/2/3 shard the optimizer state; weight decay is on).
  Tried once by hand: a ZeRO-2 run whose gradients a test-side hook doubled
  logged grad norms 2.000x the reference's (this check fails) while its final
  weights stayed within 3.3e-7 of the reference's;
- the loss catches a wrong batch split or a forward on stale weights;
- the learning rate each AdamW update applied, read inside the optimizer's step
  on every rank, equals the schedule's and the logged one.

Tolerances: float32 sums in a different order (per-rank means, then the
all-reduce) after 4 Adam steps; the trainer's AdamW runs torch's fused kernel, the reference
the per-tensor loop. Measured on 2 CPU cores: loss rel 1.1e-7, grad norm rel 6.7e-7, weights
abs 1.5e-7 for every ZeRO stage with 2 ranks (1 rank: 1.0e-7, the kernels' rounding);
allowed: loss rel 1e-6, grad norm rel 1e-5, weights abs 5e-6 (one Adam step moves a weight
by up to lr = 2e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.train_fixed_batches import fixed_batch, noise_from
from tests.launching import clean_env, run, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 4
GLOBAL_BATCH = 16
RUNS = {"zero0": (2, 0), "zero1": (2, 1), "zero2": (2, 2), "zero3": (2, 3), "one_rank": (1, 0)}
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-5
WEIGHT_ATOL = 5e-6


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


def _train(shards: Path, run_dir: Path, world: int, stage: int, *extra: str) -> None:
    overrides = [f"run_dir={run_dir}", f"data.train={shards}", f"train.max_steps={STEPS}",
                 f"train.global_batch_size={GLOBAL_BATCH}", "train.grad_accum_steps=1", "train.grad_clip=0",
                 "train.val_every=0", f"distributed.zero_stage={stage}", "distributed.precision=fp32",
                 "optimizer.weight_decay=0.01", "logging.every_steps=1", "logging.image_every=0",
                 "logging.histogram_every=0", f"checkpoint.every_steps={STEPS}", *extra]
    cmd = torchrun("-m", "tests.integration.train_fixed_batches", "--config", "configs/tiny.yaml", *overrides,
                   nproc=world)
    done = run(cmd, env=clean_env(VAE_TEST_RECORD_DIR=str(run_dir / "record"), VAE_TRAIN_REQUIRE_FUSED="1"),
               timeout_s=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(fashion_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (world, stage) in RUNS.items():
        out[name] = tmp_path_factory.mktemp(name)
        _train(fashion_shards, out[name], world, stage)
    return out


@pytest.fixture(scope="module")
def reference(runs: dict[str, Path]) -> dict:
    return replay(runs["zero0"] / "config.yaml")


def replay(config_yaml: Path) -> dict:
    """One process, plain PyTorch: the same init, batches, noise, schedules and AdamW settings as the run."""
    from vae_train.config import load_config
    from vae_train.model import ConvVAE
    from vae_train.schedules import build_beta_schedule, build_lr_schedule

    cfg = load_config(str(config_yaml))
    assert cfg.kl.free_bits == 0  # the loss below is recon + beta * KL
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    model = ConvVAE(cfg.model).train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = cfg.optimizer
    adamw = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                              weight_decay=opt.weight_decay)
    max_steps = cfg.train.max_steps
    beta, lr_multiplier = build_beta_schedule(cfg.kl, max_steps), build_lr_schedule(cfg.optimizer, max_steps)
    losses, norms, lrs = [], [], []
    for step in range(STEPS):
        images, eps = fixed_batch(step, range(GLOBAL_BATCH), tuple(model.latent_shape))
        with noise_from(eps):
            out = model(images)
        loss = out.recon_nll.mean() + beta(step) * out.kl.mean()
        adamw.zero_grad()
        loss.backward()
        norms.append(float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))))
        lrs.append(opt.lr * lr_multiplier(step))
        for group in adamw.param_groups:
            group["lr"] = lrs[-1]
        adamw.step()
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms, "lr": lrs, "initial": initial,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from vae_train.export import consolidated_state_dict

    weights, _ = consolidated_state_dict(run_dir / "checkpoints" / f"step-{STEPS:08d}")
    return weights


def _grad_norms_match(got: list[float], want: list[float]) -> bool:
    return got == pytest.approx(want, rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("name", list(RUNS))
def test_loss_and_grad_norm_equal_the_plain_pytorch_reference(runs: dict[str, Path], reference: dict,
                                                              name: str) -> None:
    info = json.loads((runs[name] / "run_info.json").read_text())
    assert (info["world_size"], info["zero_stage"], info["reparam_backend"]) == (*RUNS[name], "cpu-fused")
    assert (info["backend"], info["precision"]) == ("gloo", "fp32")
    rows = _rows(runs[name])
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(row["skipped_steps"] == 0 for row in rows)
    assert [row["loss"] for row in rows] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    got = [row["grad_norm"] for row in rows]
    assert _grad_norms_match(got, reference["grad_norm"]), (got, reference["grad_norm"])
    assert min(reference["grad_norm"]) > 1.0  # clipping at tiny.yaml's 1.0 would have been active


@pytest.mark.parametrize("name", list(RUNS))
def test_final_weights_equal_the_plain_pytorch_reference(runs: dict[str, Path], reference: dict, name: str) -> None:
    got, want = _final_weights(runs[name]), reference["weights"]
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= WEIGHT_ATOL, (name, worst)
    moved = max((want[k] - v).abs().max().item() for k, v in reference["initial"].items())
    assert moved > 100 * WEIGHT_ATOL  # the steps really changed the weights


def test_one_rank_and_two_ranks_agree(runs: dict[str, Path]) -> None:
    one, two = _rows(runs["one_rank"]), _rows(runs["zero2"])
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=LOSS_RTOL)
    assert _grad_norms_match([r["grad_norm"] for r in one], [r["grad_norm"] for r in two])
    a, b = _final_weights(runs["one_rank"]), _final_weights(runs["zero2"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL


def test_the_grad_norm_check_would_catch_a_wrong_scale(runs: dict[str, Path], reference: dict) -> None:
    """The same comparison fails for gradients summed over 2 ranks (x2) or a norm counting them twice (x sqrt 2)."""
    logged = [row["grad_norm"] for row in _rows(runs["zero2"])]
    assert _grad_norms_match(logged, reference["grad_norm"])
    for factor in (2.0, 2.0**0.5, 0.5):
        assert not _grad_norms_match([g * factor for g in logged], reference["grad_norm"]), factor


def test_applied_learning_rate_equals_the_schedule(runs: dict[str, Path], reference: dict) -> None:
    """The LR each AdamW update used (read inside the optimizer's step on every rank) is the schedule's and the logged one."""
    for name, (world, _) in RUNS.items():
        rows = _rows(runs[name])
        for rank in range(world):
            applied = json.loads((runs[name] / "record" / f"lr.rank{rank}.json").read_text())
            assert applied == pytest.approx(reference["lr"], rel=1e-12), (name, rank)
        assert [row["lr"] for row in rows] == pytest.approx(reference["lr"], rel=1e-12)
    assert len(set(reference["lr"])) >= 3  # warm-up, then cosine decay: not a constant
