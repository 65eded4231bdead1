"""The training loop, top to bottom, around a named :func:`train_step`.

Every launcher runs this same function (``train.py`` and ``vae-train train`` call it)::

    # one process (CPU or one GPU)
    python train.py --config configs/fashion_mnist.yaml train.max_steps=200
    # 2 processes on this machine, DeepSpeed ZeRO-2 (the default job)
    accelerate launch --config_file launch/accelerate_cpu.yaml train.py --config configs/fashion_mnist.yaml
    torchrun --nproc_per_node 2 train.py --config configs/fashion_mnist.yaml distributed.zero_stage=3
    deepspeed --num_gpus 8 train.py --config configs/fashion_mnist.yaml distributed.precision=bf16
    # two nodes
    torchrun --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 train.py ...

One optimizer step (:func:`train_step`): ``train.grad_accum_steps`` micro-batches
each go through the model (encoder -> fused reparameterization/KL op -> decoder ->
likelihood), the loss ``recon + beta(step) * KL`` (free bits per latent channel)
is backpropagated, then every rank takes -- or skips -- the update together (see
:class:`vae_train.engine.StepGate`: a non-finite loss or gradient norm on any
rank, or a norm above ``train.skip_grad_norm``, skips it everywhere; after
``train.max_consecutive_skips`` skips in a row the run stops with an error rather
than train on garbage). Then rank 0 logs, the loop validates and checkpoints on
schedule, and a SLURM/preemption signal leads to a final save and a clean exit.
The whole data path, shards to checkpoints, is drawn in ``docs/DESIGN.md``
("The data path").

Host syncs: the trainer reads nothing back from the device per micro-batch (after
the first step, whose batches the model range-checks). The loss terms and the
finiteness verdict stay on the device; the verdict rides the step gate's one
all-reduce, whose result the host reads once per optimizer step because it decides
whether the update runs; the logging window reads its sums at the logging boundary.

Randomness, so an interrupted and resumed run matches an uninterrupted one bit for
bit: initial weights from ``seed`` (same on every rank); the reparameterization
noise from the global torch RNG seeded per rank (its state is saved in every
checkpoint); the data order from the data stream's own state; prior samples for
image grids from a private generator that never touches the training streams.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_train.autoencoder_step import TERMS, AutoencoderStepResult, autoencoder_step
from vae_train.checkpoint import CheckpointManager, DeepSpeedState, Resize, StateFunctions, read_manifest
from vae_train.config import Config
from vae_train.distributed import all_reduce_sum
from vae_train.ema import EMA
from vae_train.engine import Engine, StepDecision, setup_discriminator_engine, setup_engine
from vae_train.losses import AutoencoderObjective, LastLayerTap, attach_output_logvar
from vae_train.errors import VaeTrainError
from vae_train.logging import RunLogger, diff_grid, log, pairs_grid, image_grid, save_png, setup_console
from vae_train.export import initialize_from
from vae_train.model import LossTerms, VAEOutput, bits_per_dim, build_model, freeze, likelihood_value_range, vae_loss
from vae_train.model.discriminator import PatchDiscriminator
from vae_train.recon_metrics import Extractors, ReconstructionMetrics, build_extractors
from vae_train.wandb_tracker import check_available
from vae_train.preemption import PreemptionHandler, requeue_if_slurm
from vae_train.schedules import build_beta_schedule

GRID_IMAGES = 16
PNG_MIN_WIDTH = 960
"""The end-of-run PNGs in ``run_dir`` are enlarged to at least this width (TensorBoard keeps the grids as they are)."""
ELBO_TERMS = ("loss", "recon", "kl")
"""Names of :attr:`StepResult.sums` (the autoencoder objective's are ``autoencoder_step.TERMS``)."""


class TrainingError(VaeTrainError):
    """Training cannot continue (it diverged)."""


@dataclass
class TrainResult:
    """How the run ended (same on every rank)."""

    step: int
    skipped_steps: int
    final_loss: float
    preempted: bool


@dataclass
class StepResult:
    """One optimizer step as this rank saw it; ``decision`` is the same on every rank.

    The sums stay on the device (no host sync to take a step); the logging window
    adds them up and reads them at its boundary.
    """

    decision: StepDecision  # applied or skipped (and why), with the global gradient norm
    micro_batches: int
    sums: torch.Tensor  # float64 [len(ELBO_TERMS)] on the device: loss, recon, kl summed over the micro-batches
    kl_per_channel: torch.Tensor  # float32 [latent_channels] on the device: micro-batch means, summed
    first_input: torch.Tensor  # the step's first micro-batch as the model got it (for image grids)


def train_step(engine: Engine, batches: Iterator[dict[str, Any]], step: int,
               loss_fn: Callable[[VAEOutput], LossTerms], *, check_range: bool = False,
               flags: Sequence[bool] = ()) -> StepResult:
    """Optimizer step ``step`` (0-based): the micro-batches' forward, loss and backward, then the gated update.

    ``loss_fn`` turns the model's output into the loss terms (the trainer binds
    beta(step) and the free bits; tests wrap it to inject a fault). ``check_range``
    has the model check the batches' pixel range, a host sync per micro-batch: the
    trainer asks for it on its first step only, because the stream decodes every
    image into the likelihood's range by construction. ``flags`` ride the step's
    all-reduce (:meth:`Engine.step`); the decision says which were true on any rank.
    """
    finite = torch.ones((), dtype=torch.bool, device=engine.device)
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    kl_channels: torch.Tensor | None = None
    first_input: torch.Tensor | None = None
    for micro in range(engine.plan.grad_accum_steps):
        batch = next(batches)
        x = batch["image"].to(engine.device, engine.compute_dtype, non_blocking=True)
        first_input = x if first_input is None else first_input
        # forward: encoder -> fused reparameterization + KL -> decoder -> likelihood
        out = engine.forward(x, check_range=check_range)
        terms = loss_fn(out)
        finite &= torch.isfinite(terms.loss)  # stays on the device: the step gate's all-reduce carries it
        if micro == engine.plan.grad_accum_steps - 1:
            engine.arm(finite, flags)  # the step's verdicts are known: their all-reduce may run during the backward
        # backward (DeepSpeed scales by the accumulation steps and reduces gradients)
        engine.backward(terms.loss)
        sums += torch.stack([terms.loss.detach(), terms.recon.detach(), terms.kl.detach()]).double()
        means = out.kl_per_channel.detach().float().mean(0)
        kl_channels = means if kl_channels is None else kl_channels + means
    # step: every rank applies it, or every rank skips it
    decision = engine.step(step)
    assert kl_channels is not None and first_input is not None  # grad_accum_steps >= 1
    return StepResult(decision, engine.plan.grad_accum_steps, sums, kl_channels, first_input)


def train(cfg: Config, notes: Sequence[str] = ()) -> TrainResult:
    """Train ``cfg`` to ``train.max_steps`` (resuming per ``cfg.resume``); every rank calls this.

    ``cfg`` is final (the entry folded the launcher's settings in, see
    :mod:`vae_train.commands.train`); ``notes`` are the entry's warnings about it,
    logged once the console knows this rank.
    """
    # -- the model and the engine: bad settings stop here, before any rank waits ----
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    if cfg.model.init_from:  # read at every start; a resumed run's checkpoint then replaces these weights
        initialize_from(model, cfg.model.init_from, cfg.s3)
    tokenizer = cfg.loss.pixel != "none"  # the latent-diffusion autoencoder objective
    if cfg.loss.learned_logvar:  # part of the decoder for train.trainable
        attach_output_logvar(model, cfg.loss.logvar_init)
    frozen = freeze(model, cfg.train.trainable)  # the engine hands only trainable parameters to DeepSpeed
    critic = (PatchDiscriminator(cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
              if cfg.loss.disc_weight > 0 else None)
    lpips = _build_lpips(cfg) if cfg.loss.perceptual_weight > 0 else None  # missing weights: stop here, every rank
    num_parameters = model.num_parameters()  # trainable ones, before ZeRO-3 partitions them
    # The trainer part also records what was frozen (train.trainable), in the checkpoint and run_info.json.
    trained = {"trainable": cfg.train.trainable, "frozen_parameters": len(frozen),
               "frozen_numel": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    engine = setup_engine(cfg, model)
    disc = setup_discriminator_engine(cfg, critic, engine) if critic is not None else None
    objective = AutoencoderObjective(cfg.loss, lpips.to(engine.device) if lpips is not None else None) if tokenizer else None
    tap = LastLayerTap(engine.module.last_decoder_layer()) if disc is not None and cfg.loss.adaptive_weight else None
    ema = (EMA(engine.module, cfg.ema.decay, cfg.ema.start_step, cfg.ema.every_steps,
               partitioned=engine.ds.zero_optimization_stage() == 3) if cfg.ema.decay > 0 else None)
    rank, world = engine.env.rank, engine.env.world_size
    setup_console(rank)
    for note in notes:
        log.warning(note)
    torch.manual_seed(_derive_seed(cfg.seed, "noise", rank))  # this rank's reparameterization noise

    # the validation metrics' networks and the tracker: missing weights or packages stop here, on every rank
    check_available(cfg.logging.wandb)
    extractors = _validation_extractors(cfg, lpips, engine.device)

    # -- data, checkpoints, resume ---------------------------------------------------
    train_stream, val_stream = _build_streams(cfg, engine)
    step, skipped_total, skipped_in_a_row, skipped_disc, disc_skipped_in_a_row = 0, 0, 0, 0, 0

    def restore_counters(state: dict[str, Any]) -> None:
        nonlocal skipped_total, skipped_disc
        skipped_total = int(state["skipped_steps"])
        skipped_disc = int(state.get("disc_skipped_steps", 0))  # absent from checkpoints of likelihood runs

    checkpoints = CheckpointManager(cfg, rank, world, engine.env.local_rank)
    checkpoints.register("model", DeepSpeedState(engine.ds))
    # At another world size the stream restarts from its seed-derived start (logged by the manager).
    checkpoints.register("data", train_stream, resize=Resize.RESTART)
    checkpoints.register("trainer", StateFunctions(lambda: {"skipped_steps": skipped_total,
                                                            "disc_skipped_steps": skipped_disc, **trained},
                                                   restore_counters),
                         resize=Resize.REPLICATED)
    if ema is not None:  # whole weights on every rank (ZeRO 0-2) map to any world size; ZeRO-3 partitions do not
        checkpoints.register("ema", ema, resize=Resize.REFUSE if ema.partitioned else Resize.REPLICATED)
    resume_path = checkpoints.resolve_resume()
    fresh_disc = (disc is not None and resume_path is not None and cfg.loss.fresh_discriminator
                  and "disc" not in read_manifest(Path(resume_path)).parts)  # type: ignore[union-attr]
    if disc is not None and not fresh_disc:
        checkpoints.register("disc", DeepSpeedState(disc.ds))  # a checkpoint without it is refused by name
    if resume_path:
        step = checkpoints.load(resume_path).step
    if fresh_disc:
        checkpoints.register("disc", DeepSpeedState(disc.ds))  # type: ignore[union-attr]
        log.warning("loss.fresh_discriminator=true: %s has no discriminator; a fresh one starts at step %d",
                    resume_path, step)
    _write_run_info(cfg, engine, num_parameters, resumed_from=resume_path, trained=trained)

    logger = RunLogger(cfg.run_dir, cfg.logging, max_steps=cfg.train.max_steps, start_step=step, is_main=rank == 0,
                       run_config=cfg.model_dump(mode="json"))
    logger.info(f"TensorBoard logs: {Path(cfg.run_dir, 'tb').resolve()}  (tensorboard --logdir {cfg.run_dir}/tb)")
    beta_at = build_beta_schedule(cfg.kl, cfg.train.max_steps)
    value_range = likelihood_value_range(cfg.model.likelihood)
    num_dims = model.num_dims  # pixels x channels the likelihood scores
    window = _Window()
    probe: torch.Tensor | None = None  # a fixed batch for the reconstruction grids
    last_loss, preempted = float("nan"), False
    batches = iter(train_stream)
    deadline = time.perf_counter() + cfg.train.max_time_s if cfg.train.max_time_s else None

    try:
        with PreemptionHandler() as preempt:
            while step < cfg.train.max_steps:
                beta = beta_at(step)
                # This rank's "was I signalled?" and "is my time up?": they ride the step's all-reduce,
                # and after it every rank knows whether any rank said yes.
                asked = (preempt.requested, deadline is not None and time.perf_counter() >= deadline)
                result: StepResult | AutoencoderStepResult
                if objective is not None:
                    result = autoencoder_step(engine, disc, objective, tap, batches, step, beta,
                                              check_range=probe is None, flags=asked)
                else:
                    loss_fn = functools.partial(vae_loss, beta=beta, free_bits=cfg.kl.free_bits)
                    result = train_step(engine, batches, step, loss_fn, check_range=probe is None, flags=asked)
                signalled, time_up = result.decision.flags
                if probe is None:
                    probe = result.first_input[:GRID_IMAGES].clone()
                decision = result.decision
                if decision.applied:
                    skipped_in_a_row = 0
                else:
                    skipped_total += 1
                    skipped_in_a_row += 1
                    log.warning(
                        "step %d skipped on every rank: %s (%d in a row, %d in total)",
                        step, decision.reason, skipped_in_a_row, skipped_total,
                    )
                    if skipped_in_a_row >= cfg.train.max_consecutive_skips:
                        raise TrainingError(
                            f"{skipped_in_a_row} updates in a row were skipped (last at step {step}: "
                            f"{decision.reason}); training is diverging. Lower optimizer.lr, raise "
                            "optimizer.warmup_steps, use distributed.precision=fp32, or check the data; "
                            "resume from the last checkpoint"
                        )
                disc_decision = getattr(result, "disc_decision", None)
                if disc_decision is not None and disc_decision.applied:
                    disc_skipped_in_a_row = 0
                elif disc_decision is not None:
                    skipped_disc += 1
                    disc_skipped_in_a_row += 1
                    log.warning("step %d: discriminator update skipped on every rank: %s", step, disc_decision.reason)
                    if disc_skipped_in_a_row >= cfg.train.max_consecutive_skips:
                        raise TrainingError(
                            f"{disc_skipped_in_a_row} discriminator updates in a row were skipped (last at step {step}: "
                            f"{disc_decision.reason}); the discriminator is diverging. Lower loss.disc_lr, use "
                            "distributed.precision=fp32 or bf16, or resume from the last checkpoint")
                window.add(result)
                step += 1
                if ema is not None and decision.applied:
                    ema.update(step)

                # log (scalars are averaged over the logging window and over ranks)
                if step % cfg.logging.every_steps == 0 or step == cfg.train.max_steps:
                    row = window.reduce(TERMS if objective is not None else ELBO_TERMS)
                    last_loss = row["loss"]
                    data_stats = train_stream.stats()
                    row.update(
                        data_wait_fraction=data_stats["data_wait_fraction"],
                        data_skipped_samples=float(data_stats["skipped_total"]),
                        beta=beta,
                        lr=engine.lr_at(step - 1),
                        skipped_steps=float(skipped_total),
                        images_per_s=row.pop("steps") * engine.plan.global_batch_size / max(row.pop("seconds"), 1e-9),
                    )
                    if objective is None:
                        row["bits_per_dim"] = bits_per_dim(row["recon"] + row["kl"], num_dims)
                    if disc is not None:
                        row["disc_skipped_steps"] = float(skipped_disc)
                    kl_channels = row.pop("kl_per_channel")
                    logger.scalars(step, row)
                    if _due(step, cfg.logging.histogram_every):
                        logger.latent_histogram(step, kl_channels)
                    logger.progress(step, last_loss)
                    window = _Window()
                if _due(step, cfg.logging.image_every) and probe is not None:
                    logger.images(step, _image_grids(engine, probe, value_range, cfg.seed, ema))
                if val_stream is not None and _due(step, cfg.train.val_every) and step < cfg.train.max_steps:
                    for prefix, metrics in validate(engine, val_stream, cfg, extractors, ema).items():
                        logger.scalars(step, metrics, prefix=prefix)

                # checkpoint, and stop cleanly when SLURM/the cluster asks for the machine back
                checkpoints.maybe_save(step)
                if signalled:
                    logger.info(f"{preempt.signal_name or 'signal'} received: saving step {step} and exiting")
                    checkpoints.save(step, final=True)
                    checkpoints.wait_for_uploads(cfg.checkpoint.upload_deadline_s)
                    requeue_if_slurm(step, cfg.train.max_steps, rank)
                    preempted = True
                    break
                if time_up:
                    logger.info(f"train.max_time_s={cfg.train.max_time_s:g} reached: ending the run at step {step}")
                    break

        if not preempted:
            if val_stream is not None:
                for prefix, metrics in validate(engine, val_stream, cfg, extractors, ema).items():
                    logger.scalars(step, metrics, prefix=prefix)
            if probe is not None:
                _final_grids(engine, logger, probe, value_range, cfg, step, ema)
            if _checkpointing_enabled(cfg):
                checkpoints.save(step, final=True)
                checkpoints.wait_for_uploads(cfg.checkpoint.upload_deadline_s)
            logger.info(f"done: {step} steps, {skipped_total} skipped; samples and reconstructions in {cfg.run_dir}")
    finally:
        if tap is not None:
            tap.close()
        train_stream.close()
        logger.close()
        checkpoints.close()
    return TrainResult(step, skipped_total, last_loss, preempted)


# ----------------------------------------------------------------------------- helpers


def _derive_seed(seed: int, stream: str, rank: int) -> int:
    """A 63-bit seed for one named random stream of one rank (independent of the others)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _checkpointing_enabled(cfg: Config) -> bool:
    ck = cfg.checkpoint
    return bool(ck.every_steps or ck.every_minutes or ck.remote)


def _build_streams(cfg: Config, engine: Engine) -> tuple[Any, Any]:
    """This rank's training stream and (when ``data.val`` is set) validation stream."""
    from vae_train.data import build_train_stream, build_val_stream

    common = dict(
        image_size=cfg.model.image_size,
        channels=cfg.model.in_channels,
        value_range=likelihood_value_range(cfg.model.likelihood),
        rank=engine.env.rank,
        world_size=engine.env.world_size,
        s3_cfg=cfg.s3,
    )
    train_stream = build_train_stream(cfg.data, micro_batch_size=engine.plan.micro_batch_size, seed=cfg.seed,
                                      size_multiple=cfg.model.downsampling_factor, **common)
    val_stream = build_val_stream(cfg.data, batch_size=cfg.data.val_batch_size, **common) if cfg.data.val else None
    return train_stream, val_stream


class _Window:
    """Sums between two log lines, kept on the device: read once, at the logging boundary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.micro = 0
        self.steps = 0
        self.sums: torch.Tensor | None = None
        self.kl_channels: torch.Tensor | None = None
        self.grad_norm = 0.0

    def add(self, result: StepResult | AutoencoderStepResult) -> None:
        self.micro += result.micro_batches
        self.steps += 1
        self.sums = result.sums if self.sums is None else self.sums + result.sums
        channels = result.kl_per_channel
        self.kl_channels = channels if self.kl_channels is None else self.kl_channels + channels
        self.grad_norm = result.decision.grad_norm

    def reduce(self, names: Sequence[str]) -> dict[str, Any]:
        """Window means over ranks (one all-reduce) of the terms ``names``; timing is rank 0's own."""
        n = len(names)
        sums = self.sums.tolist() if self.sums is not None else [0.0] * n  # the window's host sync
        channels = self.kl_channels.tolist() if self.kl_channels is not None else [0.0]
        totals = all_reduce_sum(torch.tensor([*sums, float(self.micro), *channels], dtype=torch.float64)).tolist()
        count = max(totals[n], 1.0)
        seconds = time.perf_counter() - self.start
        row: dict[str, Any] = {name: totals[i] / count for i, name in enumerate(names)}
        row.update(grad_norm=self.grad_norm, steps=self.steps, seconds=seconds,
                   kl_per_channel=torch.tensor(totals[n + 1:]) / count)
        return row


@contextlib.contextmanager
def _evaluating(engine: Engine) -> Iterator[torch.nn.Module]:
    """The model in eval mode with whole parameters (gathered under ZeRO-3), no autograd, autocast.

    Every rank must enter it together: under ZeRO-3 gathering is a collective.
    """
    module = engine.module
    gather: Any = contextlib.nullcontext()
    if engine.ds.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    # Reduced-precision weights: autocast lets float32 inputs made inside the model
    # (prior samples) meet bf16/fp16 layers.
    autocast: Any = contextlib.nullcontext()
    if engine.compute_dtype != torch.float32:
        autocast = torch.autocast(engine.device.type, dtype=engine.compute_dtype)
    was_training = module.training
    module.eval()
    try:
        with gather, autocast, torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def validate(engine: Engine, val_stream: Any, cfg: Config, extractors: Extractors,
             ema: EMA | None = None) -> dict[str, dict[str, float]]:
    """Validation metrics over the whole split (or ``train.val_batches`` per rank), same on every rank,
    by TensorBoard prefix: ``{"val": the training weights, "val_ema": the EMA weights}`` (the latter once
    the run keeps an EMA that has started).

    :func:`vae_train.evaluate.evaluate_stream` does the work (ELBO and bits/dim,
    optional IW-NLL, active units, and the reconstruction metrics of ``eval.metrics``
    with the networks in ``extractors``), so training validation and ``vae-train
    eval`` report identical numbers; its noise comes from its own generator, leaving
    the training RNG streams untouched. The ``"val_ema"`` entry is the same
    :func:`_validate_module` call with the EMA weights swapped in.
    """
    metrics = _validation_metrics(cfg)
    with _evaluating(engine) as module:
        results = {"val": _validate_module(module, val_stream, cfg, extractors, metrics)}
    if ema is not None and ema.initialized:
        with ema.swapped(), _evaluating(engine) as module:
            results["val_ema"] = _validate_module(module, val_stream, cfg, extractors, metrics)
    return results


def _validation_metrics(cfg: Config) -> tuple[str, ...]:
    """``eval.metrics``, plus ``lpips`` when the objective has a perceptual term (its network is loaded anyway)."""
    metrics = tuple(cfg.eval.metrics)
    return metrics + ("lpips",) if cfg.loss.perceptual_weight > 0 and "lpips" not in metrics else metrics


def _validation_extractors(cfg: Config, lpips: torch.nn.Module | None, device: torch.device) -> Extractors:
    """The validation metrics' networks; the objective's LPIPS network is reused rather than loaded twice."""
    metrics = _validation_metrics(cfg)
    reuse = lpips is not None and not cfg.eval.lpips_backbone_path
    extractors = build_extractors([m for m in metrics if not (reuse and m == "lpips")],
                                  inception_weights=cfg.eval.inception_weights,
                                  lpips_backbone_path=cfg.eval.lpips_backbone_path, device=device)
    if reuse:
        extractors.lpips = lpips
    return extractors


def _validate_module(module: torch.nn.Module, val_stream: Any, cfg: Config, extractors: Extractors,
                     metrics: Sequence[str]) -> dict[str, float]:
    """One evaluation of ``module`` (already in eval mode with whole parameters) on the validation split."""
    from vae_train.evaluate import evaluate_stream

    metrics = evaluate_stream(module, val_stream, cfg.eval.iw_samples, max_batches=cfg.train.val_batches,
                              active_threshold=cfg.logging.active_unit_threshold, seed=cfg.seed,
                              recon_metrics=ReconstructionMetrics(metrics, extractors))
    return {key: float(value) for key, value in metrics.items()}


def _build_lpips(cfg: Config) -> torch.nn.Module:
    """LPIPS for ``loss.perceptual_weight`` (missing weights: an error naming where it looked)."""
    from vae_train.model.perceptual import build_lpips

    lpips = build_lpips(cfg.loss.lpips_backbone_path or None)
    if not lpips.imagenet_backbone:
        log.warning("LPIPS backbone %s is not torchvision's ImageNet VGG16: the perceptual term and the logged "
                    "lpips values use a non-ImageNet (e.g. random) network and are NOT comparable with published "
                    "LPIPS", lpips.source)
    return lpips


def _image_grids(engine: Engine, probe: torch.Tensor, value_range: tuple[float, float], seed: int,
                 ema: EMA | None = None) -> dict[str, Any]:
    """Inputs beside reconstructions, input | reconstruction | amplified difference, and prior samples
    (a fixed generator: comparable over steps); the EMA weights when there are some."""
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    swap = ema.swapped() if ema is not None else contextlib.nullcontext()
    with swap, _evaluating(engine) as module:
        recon = module.reconstruct(probe)
        samples = module.sample(GRID_IMAGES * 2, generator=generator)
    return {"reconstructions": pairs_grid(probe, recon, value_range),
            "input_recon_diff": diff_grid(probe, recon, value_range),
            "samples": image_grid(samples, value_range)}


def _final_grids(engine: Engine, logger: RunLogger, probe: torch.Tensor, value_range: tuple[float, float],
                 cfg: Config, step: int, ema: EMA | None = None) -> None:
    """The end-of-run grids in TensorBoard and as PNGs users can open directly."""
    grids = _image_grids(engine, probe, value_range, cfg.seed, ema)
    logger.images(step, grids)
    if engine.env.rank == 0:
        save_png(grids["samples"], Path(cfg.run_dir) / "samples.png", min_width=PNG_MIN_WIDTH)
        save_png(grids["reconstructions"], Path(cfg.run_dir) / "reconstructions.png", min_width=PNG_MIN_WIDTH)
        save_png(grids["input_recon_diff"], Path(cfg.run_dir) / "input_recon_diff.png", min_width=PNG_MIN_WIDTH)


def _write_run_info(cfg: Config, engine: Engine, num_parameters: int, resumed_from: str | None,
                    trained: dict[str, Any]) -> None:
    """``run_info.json`` and ``config.yaml`` in the run dir, and one summary line (rank 0)."""
    from vae_train import ops

    info = engine.info()
    reparam = ops.backend() if cfg.model.reparam == "fused" else "reference"
    from vae_train.model.activation_checkpointing import is_checkpointed

    checkpointed = sum(is_checkpointed(m) for m in engine.module.modules())
    info.update(parameters=num_parameters, reparam_backend=reparam, resumed_from=resumed_from, **trained,
                checkpointed_blocks=checkpointed, channels_last=cfg.model.channels_last, compiled=cfg.model.compile)
    if engine.env.rank != 0:
        return
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    cfg.save(run_dir / "config.yaml")
    log.info(
        "engine: launcher=%s world_size=%d zero_stage=%d precision=%s backend=%s device=%s global_batch=%d "
        "micro_batch=%d grad_accum=%d threads/rank=%d parameters=%d reparam=%s",
        info["launcher"], info["world_size"], info["zero_stage"], info["precision"], info["backend"],
        info["device"], info["global_batch_size"], info["micro_batch_size"], info["grad_accum_steps"],
        info["omp_num_threads"], info["parameters"], info["reparam_backend"],
    )
