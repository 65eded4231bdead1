"""Typed configuration: one section per component, YAML files plus dotted overrides.

A run is described by one :class:`Config`. It is read from a YAML file
(``configs/*.yaml``), then command-line overrides such as
``train.max_steps=500 distributed.zero_stage=2`` are applied, and the result is
validated by pydantic. Every field has a default and a description (shown by
``vae-train config keys``), and every rejection names the key, the bad value and
what is allowed, with a suggestion for a misspelt key.

The config is final before anything is built: ``data.binarize: auto`` is resolved
here, from ``model.likelihood`` (:func:`resolve_binarize`, the one place that
decides it), and the settings an ``accelerate launch`` config carries are folded in
at the entry (:mod:`vae_train.commands.train`, which ``train.py`` runs too, calls
:func:`vae_train.engine.apply_launcher_settings`). Nothing downstream rewrites it.

Why pydantic: it gives typed, documented fields, range checks and readable errors
for nested models for free; the alternatives (dataclasses + hand-written checks,
OmegaConf) either duplicate that validation or validate only types.

Sections are owned by the component that reads them (``model`` by
:mod:`vae_train.model`, ``data`` by :mod:`vae_train.data`, ``kl`` and
``optimizer`` by :mod:`vae_train.schedules`, ``logging`` by
:mod:`vae_train.logging`, ...); components take their own section plus the few
values they need from elsewhere as plain arguments, not the whole tree, so they
stay testable alone. Only the assemblers (the trainer, the engine set-up and the
command-line entries) read the whole tree.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vae_train.errors import VaeTrainError


class ConfigError(VaeTrainError):
    """A config file or override that cannot be used as given."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    """The autoencoder (``arch``: vae-train's ConvVAE or the LDM/diffusers AutoencoderKL) and its likelihood."""

    arch: Literal["convvae", "compact", "ldm"] = Field(
        "convvae",
        description="Architecture: convvae (vae-train's ConvVAE: base_channels, channel_mult, num_res_blocks, "
        "norm_groups, size_mode; LDM-style ResNet stages and a spatial latent map), compact (the ConvVAE with "
        "one plain convolution per resolution and a global latent vector of latent_channels units: "
        "base_channels, channel_mult; a decoder pass costs a few MFLOPs, which keeps the K decoder passes of "
        "the IWAE bound cheap) or ldm (the AutoencoderKL of LDM/diffusers, with mid-block attention and "
        "quant_conv/post_quant_conv: block_out_channels, layers_per_block, norm_num_groups, ...). The keys of "
        "the other architectures are ignored.",
    )
    init_from: str = Field(
        "",
        description="Start a fresh run from the weights of an export directory (vae-train export or vae-train "
        "import; local or s3://); its architecture must equal this model section's. Read at every start; a "
        "resumed run's checkpoint weights then replace it. Empty = random initialization.",
    )
    in_channels: int = Field(1, ge=1, le=16, description="Image channels (1 grayscale, 3 RGB).")
    image_size: int | tuple[int, int] = Field(
        28,
        description="Training image size in pixels: one int for H = W (square), or [H, W]. Each side 4..4096. "
        "The model also takes any other H x W divisible by the downsampling factor (aspect buckets, larger images).",
    )
    base_channels: int = Field(32, ge=4, description="Channels of the first ResNet stage; later stages multiply it.")
    channel_mult: list[int] = Field(
        default_factory=lambda: [1, 2, 2],
        min_length=1,
        description="Channel multiplier per resolution; the image is downsampled 2^(len-1) times.",
    )
    num_res_blocks: int = Field(1, ge=1, le=8, description="ResNet blocks per resolution.")
    latent_channels: int = Field(4, ge=1, description="Channels of the latent map z.")
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every stage's channels.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside ResNet blocks.")
    likelihood: Literal["bernoulli", "gaussian_fixed", "gaussian_learned", "logistic"] = Field(
        "bernoulli",
        description="p(x|z): bernoulli for binary images in [0,1]; gaussian_* for data in [-1,1]; "
        "logistic = 8-bit discretized logistic for data in [-1,1].",
    )
    gaussian_std: float = Field(0.1, gt=0.0, description="Standard deviation of the gaussian_fixed likelihood.")
    size_mode: Literal["pad", "crop", "error"] = Field(
        "pad",
        description="What to do when image_size is not divisible by the downsampling factor: "
        "pad the input (and crop the output back), crop it, or refuse.",
    )
    reparam: Literal["fused", "reference"] = Field(
        "fused", description="Reparameterization/KL implementation: the fused C++/CUDA op or plain PyTorch."
    )
    autoregressive_channels: int = Field(
        0,
        ge=0,
        description="Width of the local autoregressive path (PixelCNN-style masked convolutions over the image "
        "itself, whose output is added to the decoder's logits): each pixel then depends on z and on the pixels "
        "above and to its left. 0 = pixels independent given z. Needs likelihood bernoulli.",
    )
    autoregressive_layers: int = Field(
        3, ge=1, le=8, description="Masked convolutions of the autoregressive path (the first one excludes the pixel itself)."
    )
    autoregressive_kernel: int = Field(
        5, ge=3, le=11, description="Kernel size (odd) of the first masked convolution: how far back each pixel looks."
    )
    autoregressive_gates: int = Field(
        0, ge=0, le=16,
        description="Products between the latent and the autoregressive path: the decoder emits this many more maps "
        "g_m(z), the path as many c_m(x_<i), and each pixel's logit adds sum_m g_m * c_m, so z sets how much each "
        "local feature counts at each pixel. Costs the importance-weighted bound a few multiply-adds per pixel. "
        "0 = the two parts are only added. Needs model.autoregressive_channels > 0.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the ResNet (and attention) blocks' activations in the backward pass instead "
        "of storing them: less activation memory for about one more forward pass of compute.",
    )
    channels_last: bool = Field(
        False, description="Run the network's activations in channels-last (NHWC) memory format (faster convolutions "
        "on tensor-core GPUs; same results up to floating-point rounding). Weights stay contiguous (DeepSpeed needs it).",
    )
    compile: bool = Field(
        False, description="torch.compile the encoder and decoder in place (state-dict names unchanged); the first "
        "steps pay the compilation, and each new input shape (aspect bucket) compiles once more.",
    )

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size_form(cls, value: Any) -> Any:
        """One clear message for a malformed size (instead of one per member of the union)."""
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, (list, tuple)) and len(value) == 2
                                       and all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
            raise ValueError(f"must be an int (square) or [H, W] of two ints, got {value!r}")
        return value

    @property
    def hw(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def downsampling_factor(self) -> int:
        """How much the encoder shrinks each side: ``2^(levels - 1)``, levels being ``channel_mult``
        (convvae) or ``block_out_channels`` (ldm)."""
        levels = self.block_out_channels if self.arch == "ldm" else self.channel_mult
        return 2 ** (len(levels) - 1)

    @model_validator(mode="after")
    def _check_size(self) -> "ModelConfig":
        if any(not 4 <= side <= 4096 for side in self.hw):
            raise ValueError(f"model.image_size sides must be in 4..4096, got {list(self.hw)}")
        return self

    block_out_channels: list[int] = Field(
        default_factory=lambda: [128, 256, 512, 512],
        min_length=1,
        description="ldm: channels of each encoder/decoder block (diffusers' block_out_channels); the image is "
        "downsampled 2^(len-1) times.",
    )
    layers_per_block: int = Field(
        2, ge=1, le=8, description="ldm: ResNet layers per encoder block (the decoder has one more), as in diffusers."
    )
    norm_num_groups: int = Field(32, ge=1, description="ldm: GroupNorm groups; must divide every block_out_channels entry.")
    mid_block_add_attention: bool = Field(True, description="ldm: self-attention in the encoder's and decoder's mid block.")
    use_quant_conv: bool = Field(True, description="ldm: the 1x1 quant_conv after the encoder (FLUX's autoencoder has none).")
    use_post_quant_conv: bool = Field(True, description="ldm: the 1x1 post_quant_conv before the decoder (FLUX: none).")

    @model_validator(mode="after")
    def _check_groups(self) -> "ModelConfig":
        if self.autoregressive_channels and self.likelihood != "bernoulli":
            raise ValueError(
                f"model.autoregressive_channels={self.autoregressive_channels} is implemented for the bernoulli "
                f"likelihood only (got model.likelihood={self.likelihood}); set model.autoregressive_channels=0"
            )
        if self.autoregressive_channels and self.arch == "ldm":
            raise ValueError("model.autoregressive_channels is a decoder of model.arch convvae or compact, not ldm; "
                             "set model.autoregressive_channels=0 or choose model.arch=compact")
        if self.autoregressive_gates and not self.autoregressive_channels:
            raise ValueError(f"model.autoregressive_gates={self.autoregressive_gates} multiplies the decoder's maps "
                             "with the autoregressive path's; set model.autoregressive_channels > 0 or "
                             "model.autoregressive_gates=0")
        if self.autoregressive_kernel % 2 == 0:
            raise ValueError(f"model.autoregressive_kernel must be odd, got {self.autoregressive_kernel}")
        if self.arch == "ldm":
            return self._check_ldm()
        if self.arch == "compact":
            if self.channels_last:
                raise ValueError("model.channels_last is for the convolutional stacks of convvae and ldm; the compact "
                                 "model's decoder starts with a fully-connected layer: set model.channels_last=false")
            return self  # no GroupNorm in the compact family
        for mult in self.channel_mult:
            if mult < 1:
                raise ValueError(f"channel_mult entries must be >= 1, got {self.channel_mult}")
            channels = self.base_channels * mult
            if channels % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} does not divide stage channels {channels} "
                    f"(base_channels={self.base_channels} x {mult}); pick norm_groups dividing all of them"
                )
        return self

    def _check_ldm(self) -> "ModelConfig":
        if any(width < 1 for width in self.block_out_channels):
            raise ValueError(f"block_out_channels entries must be >= 1, got {self.block_out_channels}")
        bad = [width for width in self.block_out_channels if width % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad} "
                f"(of {self.block_out_channels}); pick norm_num_groups dividing all of them"
            )
        factor = self.downsampling_factor
        if any(side % factor for side in self.hw):
            raise ValueError(
                f"model.arch=ldm needs model.image_size divisible by its downsampling factor {factor} "
                f"(2^(len(block_out_channels)-1)), got image_size={self.image_size}; use a multiple of {factor} "
                "(data.resize or data.random_crop bring the images to it)"
            )
        return self


class DataConfig(Section):
    """Where the shards are and how samples become tensors."""

    train: str = Field(
        "",
        description="Training source: a directory with index.json (train split), DIR#split, a brace "
        "pattern of .tar shards, pipe:COMMAND, s3://bucket/prefix or http(s) URL. Several sources "
        "are separated by ' + '.",
    )
    train_weights: list[float] = Field(
        default_factory=list, description="Mixing weights for several training sources (empty = equal)."
    )
    val: str = Field("", description="Validation source (same forms as train; a directory means its val split).")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes per rank.")
    shuffle_buffer: int = Field(1000, ge=0, description="Samples held for shuffling in each worker (0 = off).")
    cache_mb: float = Field(
        0.0, ge=0, description="Memory per training DataLoader worker, in MB, for decoded samples of whole shards "
        "(0 = off): a shard drawn again is replayed from memory, skipping tar reading and image decoding; the random "
        "part (crops, flips, dynamic binarization) still runs on every read, so the batches are identical with or "
        "without it. Shards that do not fit are read from storage as usual. Not used with data.aspect_buckets.",
    )
    binarize: Literal["auto", "none", "dynamic", "fixed"] = Field(
        "auto",
        description="Binarize pixels for a Bernoulli likelihood: a fresh draw per read (dynamic), a "
        "fixed-seed draw (fixed), or keep intensities (none); auto = dynamic for bernoulli, else none "
        "(resolved when the Config is built: the components see dynamic, fixed or none).",
    )
    random_flip: bool = Field(False, description="Random horizontal flips of training images.")
    random_crop: bool = Field(False, description="Random crops of training images to model.image_size (else centre).")
    resize: bool = Field(
        False, description="Resize images whose size differs from the target (model.image_size, or the image's aspect "
        "bucket) instead of refusing: scaled (bicubic, antialiased) to the smallest size that covers the target on "
        "both sides, keeping the aspect ratio, then cropped to it (random with data.random_crop, else centred).",
    )
    aspect_buckets: list[tuple[int, int]] | Literal["auto"] = Field(
        default_factory=list,
        description="Aspect-ratio buckets for training: a list of [H, W] shapes (each divisible by the model's "
        "downsampling factor), or auto (shapes of about model.image_size's pixel area with aspect ratios from 1:2 to "
        "2:1, keeping those some training image is nearest to by the aspect-ratio histograms in the shards' "
        "index.json; all of them when the index has none). Each training image goes to the bucket nearest its aspect "
        "ratio and every batch holds one shape. "
        "Empty = off (every image is model.image_size). Validation stays at model.image_size.",
    )
    classes: list[int] = Field(
        default_factory=list,
        description="Keep only samples with these labels in the train and validation streams (e.g. [6] for a "
        "one-class anomaly model); others are skipped and counted as filtered. Empty = every sample.",
    )
    val_batch_size: int = Field(256, ge=1, description="Per-rank batch size of the validation stream.")
    strict: bool = Field(False, description="Fail on a damaged sample or shard instead of skipping and counting it.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for a batch before declaring the loader stuck.")

    @model_validator(mode="after")
    def _check_classes(self) -> "DataConfig":
        if any(label < 0 for label in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes must be distinct labels >= 0, got {self.classes}")
        return self


class TrainConfig(Section):
    """Batch sizes, step budget and the loop's cadence."""

    max_steps: int = Field(2000, ge=1, description="Optimizer steps to train (the run ends there).")
    max_time_s: float = Field(
        0.0, ge=0.0, description="Also end the run after this many seconds of the training loop (agreed by all "
        "ranks; final validation and checkpoint as at max_steps; schedules still follow max_steps). 0 = off.",
    )
    global_batch_size: int = Field(128, ge=1, description="Images per optimizer step over all ranks.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value (0 = off).")
    skip_grad_norm: float = Field(
        0.0, ge=0.0, description="Skip the update (on all ranks) when the gradient norm exceeds this (0 = off)."
    )
    max_consecutive_skips: int = Field(
        10, ge=1, description="Stop the run with an error after this many skipped updates in a row."
    )
    trainable: Literal["all", "decoder", "encoder"] = Field(
        "all",
        description="Which part trains: all, decoder (decoder + post_quant_conv; keeps a latent space a diffusion "
        "model was trained on) or encoder (encoder + quant_conv). Frozen parameters get no gradients, no "
        "optimizer state and no optimizer partitions; the checkpoint records what was frozen.",
    )
    val_every: int = Field(500, ge=0, description="Run validation every N steps (0 = only at the end).")
    val_batches: int = Field(0, ge=0, description="Validation batches per rank (0 = the whole validation split).")


class OptimizerConfig(Section):
    """The torch.optim optimizer and the learning-rate schedule."""

    name: Literal["adamw", "adam"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warm-up: cosine decay or constant.")
    warmup_steps: int = Field(100, ge=0, description="Linear LR warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR of the cosine decay, as a fraction of lr.")
    deepspeed_fused: bool = Field(
        False, description="Use DeepSpeed's FusedAdam (GPU only; compiled at start-up) instead of torch.optim."
    )


class KLConfig(Section):
    """The KL weight beta(step) and free bits."""

    schedule: Literal["constant", "linear", "sigmoid", "cyclical"] = Field(
        "linear", description="Shape of beta(step)."
    )
    beta: float = Field(1.0, ge=0.0, description="Final (maximum) KL weight.")
    beta_start: float = Field(0.0, ge=0.0, description="KL weight at step 0 (linear, sigmoid, cyclical).")
    warmup_steps: int = Field(1000, ge=0, description="Steps to reach beta (linear, sigmoid).")
    sigmoid_steepness: float = Field(10.0, gt=0.0, description="Steepness of the sigmoid ramp.")
    cycles: int = Field(4, ge=1, description="Number of cycles over train.max_steps (cyclical).")
    ramp_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of each cycle spent ramping up (cyclical).")
    free_bits: float = Field(0.0, ge=0.0, description="Minimum KL per latent channel in nats (0 = off).")


class DistributedConfig(Section):
    """DeepSpeed ZeRO, precision and process-group settings."""

    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="Training precision (bf16/fp16: DeepSpeed keeps fp32 master weights). auto = bf16 where "
        "the hardware computes it natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, about twice fp32's "
        "speed there), else fp32; decided when training starts, and logged.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Process-group backend (auto: nccl on GPU, gloo on CPU).")
    deepspeed_config: str = Field("", description="Path of a DeepSpeed JSON merged over the generated one.")
    timeout_s: int = Field(300, ge=10, description="Collective timeout: a dead peer ends the job after this long.")


class CheckpointConfig(Section):
    """When and where checkpoints are written, and how many are kept."""

    every_steps: int = Field(500, ge=0, description="Save every N steps (0 = off).")
    every_minutes: float = Field(0.0, ge=0.0, description="Also save when this many minutes passed since the last save (0 = off).")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept locally and remotely.")
    keep_every: int = Field(0, ge=0, description="Also keep every checkpoint whose step is a multiple of this (0 = off).")
    remote: str = Field("", description="s3://bucket/prefix to sync checkpoints to (empty = local only).")
    upload_deadline_s: float = Field(600.0, gt=0, description="Seconds to wait for uploads at exit or on a signal.")
    max_pending_uploads: int = Field(2, ge=1, description="Checkpoints queued for upload before older ones are skipped.")


class S3Config(Section):
    """S3 client settings; credentials come only from the standard AWS chain."""

    endpoint_url: str = Field("", description="Endpoint of an S3-compatible store (empty = AWS_ENDPOINT_URL or AWS).")
    region: str = Field("", description="Region (empty = the AWS chain's default, else us-east-1).")
    max_attempts: int = Field(5, ge=1, description="Attempts per request before giving up.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Connect timeout per request.")
    read_timeout_s: float = Field(60.0, gt=0, description="Read timeout per request.")


class WandbConfig(Section):
    """Weights & Biases beside TensorBoard (rank 0 only). Credentials never enter the config: online
    mode reads WANDB_API_KEY (or ~/.netrc) itself."""

    enabled: bool = Field(False, description="Also log to wandb (needs the extra: pip install 'vae-train[wandb]').")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline writes the run under logging.wandb.dir only (air-gapped clusters; upload later with "
        "`wandb sync DIR`); online streams to the server. WANDB_MODE in the environment overrides it.",
    )
    project: str = Field("vae-train", min_length=1, description="wandb project name.")
    entity: str = Field("", description="wandb entity (team or user; empty = the account's default).")
    name: str = Field("", description="Display name of the run (empty = the run directory's name).")
    tags: list[str] = Field(default_factory=list, description="Tags of the run.")
    dir: str = Field("", description="Where wandb writes its files (empty = {run_dir}/wandb).")


class LoggingConfig(Section):
    """TensorBoard and console output (rank 0 only), and optionally wandb."""

    every_steps: int = Field(10, ge=1, description="Log scalars every N steps.")
    image_every: int = Field(200, ge=0, description="Log image grids every N steps (0 = only at the end).")
    histogram_every: int = Field(200, ge=0, description="Log per-channel KL histograms every N steps (0 = off).")
    progress_bar: bool = Field(True, description="Show a progress bar on the console.")
    active_unit_threshold: float = Field(
        0.01, ge=0.0, description="A latent channel is active when its KL (nats) exceeds this."
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases tracker.")


class EvalConfig(Section):
    """Evaluation defaults used by training validation and `vae-train eval`."""

    iw_samples: int = Field(0, ge=0, description="Importance samples for IW-NLL during training validation (0 = off).")
    metrics: list[Literal["psnr", "ssim", "lpips", "rfid"]] = Field(
        default_factory=lambda: ["psnr", "ssim"],
        description="Reconstruction metrics of training validation and the default of `vae-train eval --metrics` "
        "(uint8 round trip first; lpips needs eval.lpips_backbone_path, rfid eval.inception_weights).",
    )
    inception_weights: str = Field(
        "",
        description="FID Inception state dict (pt_inception-2015-12-05-6726825d.pth, as pytorch-fid/torchmetrics) "
        "for rfid; empty = $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth. Never downloaded.",
    )
    lpips_backbone_path: str = Field(
        "", description="VGG16 weights for the lpips metric (as loss.lpips_backbone_path); never downloaded."
    )

    @model_validator(mode="after")
    def _check_metrics(self) -> "EvalConfig":
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"eval.metrics lists a metric twice: {self.metrics}")
        return self


class LossConfig(Section):
    """The training objective: the model's likelihood ELBO, or the latent-diffusion autoencoder recipe.

    ``pixel: none`` trains ``model.likelihood``'s negative ELBO (the likelihood VAEs).
    ``pixel: l1 | l2`` trains an image tokenizer the way Stable Diffusion's KL-f8 was
    trained (CompVis ``LPIPSWithDiscriminator``): per pixel ``|x - x'|`` (or squared)
    plus ``perceptual_weight`` x LPIPS, read as an NLL with a learned scalar output
    log-variance when ``learned_logvar`` is on, summed over pixels; plus beta(step) x KL
    from the ``kl`` section (about 1e-6 for KL-f8); plus, from step ``disc_start``, a
    PatchGAN's adversarial term weighted by ``disc_weight`` x the adaptive weight.
    """

    pixel: Literal["none", "l1", "l2"] = Field(
        "none",
        description="Reconstruction term: none = the model.likelihood ELBO; l1 / l2 = the autoencoder recipe "
        "(needs model.likelihood=gaussian_fixed: the decoder output is the image in [-1, 1]).",
    )
    learned_logvar: bool = Field(
        False, description="Read the pixel (+ perceptual) loss as an NLL with a learned scalar output log-variance."
    )
    logvar_init: float = Field(0.0, ge=-10.0, le=10.0, description="Initial value of the learned output log-variance.")
    perceptual_weight: float = Field(
        0.0, ge=0.0, description="Weight of the LPIPS (VGG) term added to the per-pixel loss (0 = off; 1.0 in KL-f8)."
    )
    lpips_backbone_path: str = Field(
        "",
        description="torchvision VGG16 weights (vgg16-397923af.pth) for LPIPS; empty = "
        "$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth. Never downloaded.",
    )
    disc_weight: float = Field(0.0, ge=0.0, description="Weight of the adversarial term (0 = no discriminator; 0.5 in KL-f8).")
    disc_start: int = Field(0, ge=0, description="Optimizer step from which the discriminator trains and the "
                            "adversarial term is on (before it, neither).")
    disc_loss: Literal["hinge", "vanilla"] = Field(
        "hinge", description="Discriminator loss: hinge, or vanilla (non-saturating softplus, the original GAN loss)."
    )
    adaptive_weight: bool = Field(
        True, description="Scale the adversarial term by ||grad rec|| / ||grad adv|| at the decoder's last layer "
        "(Esser et al.); off = disc_weight alone."
    )
    adaptive_weight_max: float = Field(1e4, gt=0.0, description="Upper clamp of the adaptive weight.")
    disc_layers: int = Field(3, ge=1, le=6, description="Strided conv layers of the NLayer PatchGAN discriminator.")
    disc_channels: int = Field(64, ge=8, description="Channels of the discriminator's first layer (doubling per layer, max x8).")
    disc_lr: float = Field(1e-4, gt=0.0, description="Discriminator learning rate (constant, no warm-up).")
    disc_betas: tuple[float, float] = Field((0.5, 0.9), description="Discriminator Adam betas.")
    fresh_discriminator: bool = Field(
        False, description="Resuming from a checkpoint without a discriminator: start a fresh one instead of refusing."
    )

    @model_validator(mode="after")
    def _check_recipe(self) -> "LossConfig":
        if self.pixel == "none":
            wanted = [key for key, on in (("perceptual_weight", self.perceptual_weight > 0),
                                          ("disc_weight", self.disc_weight > 0),
                                          ("learned_logvar", self.learned_logvar)) if on]
            if wanted:
                raise ValueError(
                    f"loss.{', loss.'.join(wanted)} belong to the autoencoder objective, but loss.pixel=none trains "
                    "the likelihood ELBO (an adversarial or perceptual term has no place in a likelihood); "
                    "set loss.pixel=l1 or l2, or remove them")
        return self


class EMAConfig(Section):
    """Exponential moving average of the autoencoder's weights (fp32, partitioned like the weights)."""

    decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA decay per update (0 = no EMA; 0.999-0.9999 typical).")
    start_step: int = Field(0, ge=0, description="Step from which the EMA is updated (it copies the weights at that step).")
    every_steps: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")


REMOVED_KEYS = {
    "data.samples_per_epoch": "nothing read it (the training stream is infinite; train.max_steps ends a run)",
}
"""Keys older versions accepted, with why they went (a clearer error than 'unknown key')."""


def resolve_binarize(setting: str, likelihood: str) -> str:
    """``data.binarize`` as the data pipeline applies it: ``auto`` -> ``dynamic`` for the Bernoulli
    likelihood (binary pixels, a fresh draw per read), else ``none``; other settings unchanged.

    The one place ``auto`` is decided (the config and ``vae-train eval --binarize auto`` call it);
    validation streams draw ``dynamic`` as ``fixed``.
    """
    if setting != "auto":
        return setting
    return "dynamic" if likelihood == "bernoulli" else "none"


class Config(Section):
    """The whole run."""

    run_dir: str = Field("runs/default", description="Where logs, checkpoints and the resolved config go.")
    seed: int = Field(0, ge=0, description="Seed of every random stream (model init, data order, noise).")
    resume: str = Field(
        "auto",
        description="auto (newest committed checkpoint, remote first, else local, else fresh), none, "
        "a local checkpoint path or s3://.../step-NNNNNNNN.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer and LR schedule.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL weight schedule and free bits.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Distributed training.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 client.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Training objective (likelihood ELBO or tokenizer recipe).")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="EMA of the weights.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_removed_keys(cls, raw: Any) -> Any:
        """A key this version removed gets its own message (old saved ``config.yaml`` files carry them)."""
        if isinstance(raw, dict):
            for dotted, why in REMOVED_KEYS.items():
                section, _, key = dotted.partition(".")
                if isinstance(raw.get(section), dict) and key in raw[section]:
                    raise ValueError(f"'{dotted}' was removed: {why}; delete it from the config")
        return raw

    @model_validator(mode="after")
    def _check_buckets(self) -> "Config":
        """Every aspect bucket must be a shape the model takes (divisible by its downsampling factor)."""
        buckets = self.data.aspect_buckets
        factor = self.model.downsampling_factor
        if isinstance(buckets, list):
            bad = [list(b) for b in buckets if min(b) < 1 or b[0] % factor or b[1] % factor]
            if bad:
                raise ValueError(f"data.aspect_buckets {bad} are not positive multiples of the model's downsampling "
                                 f"factor {factor} (2^(len(model.channel_mult)-1)); round each side to a multiple")
            if len(set(buckets)) != len(buckets):
                raise ValueError(f"data.aspect_buckets lists a shape twice: {[list(b) for b in buckets]}")
        return self

    @model_validator(mode="after")
    def _resolve_binarize(self) -> "Config":
        """Binarization belongs to the Bernoulli likelihood: resolve ``auto``, refuse it elsewhere."""
        if self.data.binarize == "auto":
            self.data.binarize = resolve_binarize("auto", self.model.likelihood)
        elif self.data.binarize != "none" and self.model.likelihood != "bernoulli":
            raise ValueError(
                f"data.binarize={self.data.binarize} turns pixels into 0/1, which only the bernoulli likelihood "
                f"models; with model.likelihood={self.model.likelihood} set data.binarize=none (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _check_objective(self) -> "Config":
        """The autoencoder objective reads the decoder output as the image in [-1, 1]."""
        if self.loss.pixel != "none" and self.model.likelihood != "gaussian_fixed":
            raise ValueError(
                f"loss.pixel={self.loss.pixel} reads the decoder output as the image in [-1, 1], which is "
                f"model.likelihood=gaussian_fixed; model.likelihood={self.model.likelihood} cannot be used with it")
        if self.loss.pixel != "none" and self.model.size_mode == "crop":
            raise ValueError(f"loss.pixel={self.loss.pixel} compares whole images: model.size_mode=crop would score "
                             "a centre crop only; use model.size_mode=pad or an image_size the model divides")
        if self.loss.disc_weight > 0 and self.loss.disc_start >= self.train.max_steps:
            raise ValueError(
                f"loss.disc_start={self.loss.disc_start} is not before train.max_steps={self.train.max_steps}: the "
                "discriminator would never train; lower disc_start or set loss.disc_weight=0")
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable again with :func:`load_config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (it holds no credentials: those never enter the config)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, creating dicts on the way."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars (so 3, 1e-3, true, [1,2] work)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (for example train.max_steps=100)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML ({exc})") from None
        parsed.append((key, value))
    return parsed


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a model tree, for suggestions."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, dotted + "."))
    return keys


def _lookup(tree: Any, loc: tuple[Any, ...]) -> Any:
    """The raw value at ``loc`` in the unvalidated tree, or a marker when absent."""
    node = tree
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


def _format_validation_error(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    """One line per problem: the dotted key, the bad value, and what is allowed."""
    known = _known_keys(Config)
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        dotted = ".".join(str(part) for part in loc)
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - '{dotted}': unknown key{hint}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        if not loc:  # a check across sections: its message names the keys
            lines.append(f"  - {message}")
            continue
        lines.append(f"  - '{dotted}' = {_lookup(raw, loc)!r}: {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain dict as a :class:`Config`, with readable errors."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, raw, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(loaded).__name__}")
        raw = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " + overrides"
    return config_from_dict(raw, source)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: the config reference."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, dotted + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((dotted, repr(default), field.description or ""))
    return rows
