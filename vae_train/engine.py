"""DeepSpeed set-up from the typed config, for every launcher, plus the coordinated step skip.

One code path serves ``accelerate launch``, ``torchrun``, ``deepspeed``, ``srun``
(one task per GPU) and plain ``python``: the launcher only decides *how many*
processes run and writes the standard environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :mod:`vae_train.distributed`
reads it and starts the process group, and this module generates the DeepSpeed
JSON from the config and calls ``deepspeed.initialize`` with a ``torch.optim``
optimizer.

Why not Accelerate's ``Accelerator``/DeepSpeed plugin objects: on CPU they fail
as shipped (accelerate 1.15 looks up the ``transformers`` version, and leaves the
backend unset so each rank believes it is alone). The settings an ``accelerate
launch --config_file`` carries (ZeRO stage, mixed precision, a DeepSpeed JSON)
arrive as ``ACCELERATE_*`` environment variables; :func:`apply_launcher_settings`
folds them into the config at the entry (``vae-train train`` / ``train.py``),
before anything is built, so users keep their accelerate configs and the gotchas
never reach them. The engine itself never changes the config.

Usage::

    cfg, notes = apply_launcher_settings(load_config(...))   # at the entry
    engine = setup_engine(cfg, model)                        # every rank
    for i, micro_batch in enumerate(...):
        loss = ...engine.forward(x)...
        if i == last:
            engine.arm(loss_is_finite)    # the step's verdicts, before its last backward
        engine.backward(loss)
    decision = engine.step(global_step)   # all ranks apply or skip together
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from vae_train.config import Config, DistributedConfig, OptimizerConfig
from vae_train.distributed import LaunchEnv, detect_launch_env, init_process_group, peer_group
from vae_train.errors import VaeTrainError
from vae_train.schedules import build_lr_schedule

log = logging.getLogger(__name__)


class EngineError(VaeTrainError):
    """The distributed set-up cannot work as configured (raised before any rank waits for a peer)."""


# ------------------------------------------------------------------ accelerate launch


def apply_launcher_settings(cfg: Config, environ: dict[str, str] | None = None) -> tuple[Config, list[str]]:
    """Fold the DeepSpeed settings of an ``accelerate launch --config_file`` into the config.

    ``accelerate launch`` passes its YAML's DeepSpeed fields as ``ACCELERATE_*``
    variables. They fill every ``distributed`` key the experiment config left at
    its default; a key the config sets explicitly wins (the experiment file and
    command-line overrides are the user's most specific statement), with a note
    saying so. Returns the effective config and human-readable notes; the
    training entry (:mod:`vae_train.commands.train`) calls it once, before
    anything is built, and the trainer logs the notes as warnings.
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return cfg, []
    from_launcher: dict[str, Any] = {}
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in environ:
        from_launcher["zero_stage"] = int(environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    fields = environ.get("ACCELERATE_CONFIG_DS_FIELDS", "")
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if "mixed_precision" in fields.split(",") or mixed != "no":
        precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(mixed)
        if precision is None:
            raise EngineError(f"accelerate mixed_precision={mixed!r} is not supported; use no, bf16 or fp16")
        from_launcher["precision"] = precision
    if environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        # A DeepSpeed JSON named by the accelerate config: merged like distributed.deepspeed_config,
        # and its ZeRO stage / precision count as the launcher's choice.
        path = environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        from_launcher["deepspeed_config"] = path
        user = load_user_deepspeed_config(path)
        stage = _get_path(user, ("zero_optimization", "stage"))
        if isinstance(stage, int):
            from_launcher.setdefault("zero_stage", stage)
        for precision in ("bf16", "fp16"):
            if _get_path(user, (precision, "enabled")) is True:
                from_launcher.setdefault("precision", precision)
    notes, update = [], {}
    explicit = cfg.distributed.model_fields_set
    for key, value in from_launcher.items():
        current = getattr(cfg.distributed, key)
        if key in explicit:
            if current != value:
                notes.append(
                    f"accelerate config asks for distributed.{key}={value!r} but the experiment config sets "
                    f"{current!r}: using {current!r} (make them agree to silence this)"
                )
        else:
            update[key] = value
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in environ:
        accum = int(environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
        if accum != cfg.train.grad_accum_steps:
            notes.append(
                f"accelerate gradient_accumulation_steps={accum} is ignored: accumulation comes from "
                f"train.grad_accum_steps={cfg.train.grad_accum_steps}"
            )
    if not update:
        return cfg, notes
    new_cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update=update)})
    return new_cfg, notes


def native_bf16() -> tuple[bool, str]:
    """Whether this machine's training device computes bf16 natively, and in words why (for the log).

    On a CPU without AVX512-BF16 or AMX, oneDNN emulates bf16 and a run would be
    slower than fp32, so ``auto`` keeps fp32 there.
    """
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        return supported, f"this GPU {'computes' if supported else 'cannot compute'} bf16"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return True, "this CPU has AVX512-BF16/AMX"
    return False, "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"


def resolve_auto_precision(cfg: Config) -> tuple[Config, list[str]]:
    """``distributed.precision=auto`` made concrete for this machine (:func:`native_bf16`): bf16 or fp32.

    Called at the training entry with the rest of the launcher settings, so the config
    is final before anything is built and every rank (same hardware) decides alike;
    returns the config and a note for the log. Other values pass through unchanged.
    """
    if cfg.distributed.precision != "auto":
        return cfg, []
    bf16, why = native_bf16()
    precision = "bf16" if bf16 else "fp32"
    resolved = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"precision": precision})})
    return resolved, [f"distributed.precision=auto -> {precision}: {why}"]


# ------------------------------------------------------------------ batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    """global batch = micro batch x accumulation steps x world size, exactly."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int


def plan_batch(global_batch_size: int, grad_accum_steps: int, world_size: int) -> BatchPlan:
    """Split the global batch over ranks and accumulation steps, or say how to fix it."""
    per_step = grad_accum_steps * world_size
    if global_batch_size % per_step:
        lower = max(per_step, global_batch_size // per_step * per_step)
        raise EngineError(
            f"train.global_batch_size={global_batch_size} does not divide into train.grad_accum_steps="
            f"{grad_accum_steps} x {world_size} ranks = {per_step}; use a multiple of {per_step} "
            f"(e.g. {lower} or {lower + per_step}) or change the accumulation steps"
        )
    return BatchPlan(global_batch_size, global_batch_size // per_step, grad_accum_steps, world_size)


# ------------------------------------------------------------------ device and checks


def choose_device(env: LaunchEnv, backend_setting: str) -> tuple[torch.device, str]:
    """(device, backend): the rank's GPU with nccl, else the CPU with gloo."""
    cuda = torch.cuda.is_available()
    backend = backend_setting if backend_setting != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise EngineError("distributed.backend=nccl needs GPUs but none is visible; use distributed.backend=auto or gloo")
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise EngineError(
                f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most one process per GPU"
            )
        return torch.device("cuda", env.local_rank), backend
    return torch.device("cpu"), backend


def check_compatibility(cfg: Config, device: torch.device) -> None:
    """Refuse option combinations that cannot work, before any collective starts."""
    dist_cfg = cfg.distributed
    if dist_cfg.precision == "auto":
        raise EngineError("distributed.precision=auto reached the engine undecided: the training entry makes it "
                          "concrete (vae_train.engine.resolve_auto_precision); call that on the config first")
    if dist_cfg.precision == "fp16" and device.type != "cuda":
        raise EngineError(
            "distributed.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling and kernels do not run on "
            "the CPU); use distributed.precision=bf16 or fp32 on this machine"
        )
    if dist_cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineError("this GPU cannot do bf16; use distributed.precision=fp16 or fp32")
    if cfg.optimizer.deepspeed_fused and device.type != "cuda":
        raise EngineError(
            "optimizer.deepspeed_fused=true builds DeepSpeed's CUDA FusedAdam, which needs a GPU; "
            "set optimizer.deepspeed_fused=false (torch.optim is used on the CPU)"
        )


# ------------------------------------------------------------------ DeepSpeed config

# Keys the typed config decides; a user JSON may repeat them only with the same value.
_OWNED_KEYS = (
    ("train_batch_size",),
    ("train_micro_batch_size_per_gpu",),
    ("gradient_accumulation_steps",),
    ("zero_optimization", "stage"),
    ("bf16", "enabled"),
    ("fp16", "enabled"),
)
_OWNED_HINTS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size / grad_accum_steps / world size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "zero_optimization.stage": "distributed.zero_stage",
    "bf16.enabled": "distributed.precision",
    "fp16.enabled": "distributed.precision",
}


def build_deepspeed_config(dist_cfg: DistributedConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, from the ``distributed`` section and the batch plan.

    ``gradient_clipping`` is 0 because :class:`StepGate` clips after deciding
    whether to skip (it needs the unclipped norm); ``zero_allow_untested_optimizer``
    admits the gated ``torch.optim`` subclasses. The gate's one all-reduce also gives
    every rank the global norm and the non-finite verdict, so DeepSpeed's own ZeRO-1/2
    norm (``compute_grad_norm``) and bf16 overflow check (``check_grad_overflow``) are
    off: each was an all-reduce per step that decided nothing (the default job's ranks
    spent ~3% of their time waiting in them; a bare DeepSpeed loop of its model runs
    ~7% faster without them: README, "Trainer overhead"). fp16 keeps DeepSpeed's
    overflow check: its loss scaler needs it.
    """
    precision = dist_cfg.precision
    zero: dict[str, Any] = {"stage": dist_cfg.zero_stage}
    if dist_cfg.zero_stage in (1, 2):
        zero["compute_grad_norm"] = False
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def _get_path(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def merge_deepspeed_config(generated: dict[str, Any], user: dict[str, Any], source: str) -> dict[str, Any]:
    """Merge a user DeepSpeed JSON over the generated one; conflicts on owned keys are errors.

    The user JSON may add anything DeepSpeed knows (offload, bucket sizes,
    communication dtype...). Keys the typed config owns may only repeat its
    values (or say ``"auto"``); the optimizer, scheduler and clipping are built
    by the trainer and cannot come from the JSON.
    """
    for key, hint in (("optimizer", "the optimizer section (optimizer.deepspeed_fused for FusedAdam)"),
                      ("scheduler", "optimizer.schedule / warmup_steps"),
                      ("gradient_clipping", "train.grad_clip")):
        if key in user:
            raise EngineError(f"{source} sets {key!r}; the trainer builds it from {hint}: remove it from the JSON")
    for path in _OWNED_KEYS:
        theirs = _get_path(user, path)
        ours = _get_path(generated, path)
        dotted = ".".join(path)
        if theirs is not None and theirs != "auto" and theirs != ours:
            raise EngineError(
                f"{source} sets {dotted}={theirs!r} but the config gives {ours!r} (from {_OWNED_HINTS[dotted]}); "
                "remove it from the JSON or change the config so they agree"
            )
    cleaned = copy.deepcopy(user)
    for path in _OWNED_KEYS:
        node = cleaned
        for part in path[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(path[-1]) == "auto":
            del node[path[-1]]
    merged = _deep_merge(generated, cleaned)
    stage = merged["zero_optimization"]["stage"]
    zero = merged["zero_optimization"]
    if stage == 0 and "offload_optimizer" in zero:
        raise EngineError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1-3; set distributed.zero_stage")
    if stage < 3 and "offload_param" in zero:
        raise EngineError(f"{source}: zero_optimization.offload_param needs ZeRO stage 3; set distributed.zero_stage=3")
    if "offload_optimizer" in zero and "compute_grad_norm" not in user.get("zero_optimization", {}):
        zero.pop("compute_grad_norm", None)  # DeepSpeed's CPU-offloaded optimizer needs its own norm
    return merged


def load_user_deepspeed_config(path: str) -> dict[str, Any]:
    """Read ``distributed.deepspeed_config`` (a JSON object) with a clear error."""
    file = Path(path)
    if not file.is_file():
        raise EngineError(f"distributed.deepspeed_config={path!r} does not exist (see launch/deepspeed_*.json)")
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"distributed.deepspeed_config={path!r} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise EngineError(f"distributed.deepspeed_config={path!r} must hold a JSON object")
    return loaded


# ------------------------------------------------------------------ process group


def set_cpu_threads(env: LaunchEnv, device: torch.device) -> int:
    """Give each CPU rank its share of the cores unless the user chose (OMP_NUM_THREADS).

    Several ranks each using every core thrash (ZeRO-3 step 232 ms -> 54 ms at
    one thread per rank on 2 cores, measured).
    """
    if device.type != "cpu":
        return torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, env.local_world_size)))
    threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    torch.set_num_threads(threads)
    return threads


class _ExpectedNoise(logging.Filter):
    """Drops DeepSpeed's warning about our gated torch.optim optimizers (expected, not a risk)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with its accelerator chosen and its CPU JIT builds disabled."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    ds_logger = logging.getLogger("DeepSpeed")
    if ds_logger.level < logging.WARNING:
        ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _ExpectedNoise) for f in ds_logger.filters):
        ds_logger.addFilter(_ExpectedNoise())
    # DeepSpeed's ZeRO calls a torch collective that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    if device.type == "cpu":
        # DeepSpeed would JIT-build its shared-memory comm op (~40 s on 2 cores) at init.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


# ------------------------------------------------------------------ optimizer and skip gate


@dataclass
class StepDecision:
    """What happened to one optimizer step on every rank."""

    applied: bool
    grad_norm: float
    reason: str = ""  # why it was skipped
    flags: tuple[bool, ...] = ()  # Engine.step's per-rank flags, each true when it was true on any rank


class StepGate:
    """Decides inside the optimizer step, identically on every rank, whether to apply it.

    DeepSpeed calls the wrapped ``torch.optim`` step once per optimizer step,
    after reducing (and, under ZeRO, partitioning) the gradients and before
    touching the weights. There the gate needs the global gradient norm and every
    rank's verdicts (non-finite loss; the trainer's yes/no questions such as
    "was I signalled?"), so that every rank derives the same decision and no rank
    updates while another skips. Skipping = not calling the inner step: weights and
    Adam moments stay exactly as they were. Accepted steps are clipped here
    (``train.grad_clip``), because clipping needs the unclipped norm we just had.

    How the verdicts travel depends on where the gradients are:

    * partitioned (ZeRO-1/2/3): each rank holds a slice, so the norm needs a
      collective anyway; the squared norm of the slice and the verdicts go in ONE
      blocking all-reduce inside the step.
    * replicated (ZeRO-0, ``replicated=True``): DeepSpeed all-reduced the whole
      gradient, so every rank holds the same bytes and computes the same norm
      locally (DeepSpeed's own ZeRO-0 overflow check relies on the same fact). Only
      the verdicts need a collective, and they are known before the backward: :meth:`arm`
      starts their all-reduce asynchronously and the step waits for it, so it runs
      during the backward instead of after it (the default job's ranks spent ~5% of
      their time blocked in that all-reduce when it came after the gradients').
    """

    def __init__(self, clip: float, skip_above: float, device: torch.device, replicated: bool) -> None:
        self.clip = clip
        self.skip_above = skip_above
        self.device = device
        self.replicated = replicated
        self._verdicts: torch.Tensor | None = None  # [non-finite loss, *flags] of this rank, or of all once reduced
        self._pending: Any = None  # the verdicts' asynchronous all-reduce (replicated gradients)
        self.decision: StepDecision | None = None

    @property
    def armed(self) -> bool:
        """Whether :meth:`arm` gave the verdicts of the step about to be taken."""
        return self._verdicts is not None

    def arm(self, loss_is_finite: bool | torch.Tensor, flags: Sequence[bool] = ()) -> None:
        """This rank's verdicts on the step about to be taken: call before its optimizer step.

        ``loss_is_finite`` is a bool, or a 0-dim bool tensor left on the device (no host
        sync). ``flags`` are this rank's answers to yes/no questions every rank must settle
        at this step; the decision's ``flags`` say, for each, whether any rank answered yes.
        With replicated gradients the verdicts' all-reduce starts here.
        """
        finite = torch.as_tensor(loss_is_finite, device=self.device)
        verdicts = torch.cat([torch.logical_not(finite).float().reshape(1),
                              torch.tensor([float(flag) for flag in flags], device=self.device)])
        group = peer_group() if self.replicated else None
        self._pending = group.all_reduce(verdicts, async_op=True) if group is not None else None
        self._verdicts = verdicts
        self.decision = None

    def _take(self) -> tuple[torch.Tensor, Any]:
        """The armed verdicts and their pending all-reduce (if any); the gate is disarmed."""
        if self._verdicts is None:
            raise RuntimeError("the optimizer step ran without StepGate.arm(): call Engine.arm() before the "
                               "step's last backward, or pass the loss verdict to Engine.step()")
        taken = self._verdicts, self._pending
        self._verdicts, self._pending = None, None
        return taken

    def _reduce(self, local_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global squared gradient norm, verdicts summed over ranks) of the armed step."""
        verdicts, pending = self._take()
        if pending is not None:
            pending.wait()
        group = None if self.replicated else peer_group()
        if group is None:
            return local_sq, verdicts
        stats = torch.cat([local_sq.reshape(1), verdicts])
        group.all_reduce(stats)
        return stats[0], stats[1:]

    def settle(self) -> tuple[bool, ...]:
        """The flags of a step that DeepSpeed skipped before the gate ran, settled across ranks."""
        _, verdicts = self._reduce(torch.zeros((), device=self.device))
        return _any_rank(verdicts[1:])

    def __call__(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.decision is not None:
            raise RuntimeError(
                "the optimizer step was called twice in one training step (several DeepSpeed "
                "sub-groups); the skip gate needs one call: raise zero_optimization.sub_group_size"
            )
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        if grads:
            norms = torch._foreach_norm([g.float() for g in grads])
            sq = torch.stack(norms).pow(2).sum().to(self.device)
        global_sq, verdicts = self._reduce(sq)
        # The one host sync of an optimizer step: whether to call the inner step is a
        # host decision, and it needs the global norm and the non-finite count.
        norm = float(global_sq.sqrt())
        bad_losses = int(verdicts[0])
        flags = _any_rank(verdicts[1:])
        if bad_losses > 0:
            self.decision = StepDecision(False, norm, f"non-finite loss on {bad_losses} rank(s)", flags)
        elif not math.isfinite(norm):
            self.decision = StepDecision(False, norm, "non-finite gradient norm", flags)
        elif self.skip_above > 0 and norm > self.skip_above:
            self.decision = StepDecision(False, norm, f"gradient norm {norm:.3g} > train.skip_grad_norm={self.skip_above:g}",
                                         flags)
        else:
            self.decision = StepDecision(True, norm, flags=flags)
            if self.clip > 0 and norm > self.clip:
                torch._foreach_mul_(grads, self.clip / (norm + 1e-6))
        return self.decision.applied


def _any_rank(counts: torch.Tensor) -> tuple[bool, ...]:
    """Per flag, whether any rank raised it (``counts``: the flags summed over ranks)."""
    return tuple(count > 0 for count in counts.tolist())


class _GatedStep:
    """Mixin: ``step()`` runs only when the gate says so (the gate is an attribute, set after init)."""

    step_gate: Callable[[torch.optim.Optimizer], bool] | None = None

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.step_gate is not None and not self.step_gate(self):  # type: ignore[arg-type]
            return None
        return super().step(closure)  # type: ignore[misc]


class GatedAdamW(_GatedStep, torch.optim.AdamW):
    """AdamW whose step the :class:`StepGate` can veto."""


class GatedAdam(_GatedStep, torch.optim.Adam):
    """Adam whose step the :class:`StepGate` can veto."""


TORCH_FUSED_DEVICES = ("cpu", "cuda")
"""Devices whose parameters get torch's fused Adam/AdamW kernel (one kernel for all tensors instead of a
dozen ops per tensor: on the CPU the default model's optimizer step took 0.27 ms instead of 1.0 ms)."""


def build_optimizer(params: list[torch.nn.Parameter], opt: OptimizerConfig) -> torch.optim.Optimizer:
    """A gated ``torch.optim`` optimizer (no JIT build), or DeepSpeed's FusedAdam on GPU when asked.

    The torch optimizer runs its fused kernel (``fused=True``, the same update as the
    per-tensor loop up to rounding) when every parameter is on a device of
    :data:`TORCH_FUSED_DEVICES`; torch's default otherwise. DeepSpeed may later hand it
    other tensors (fp32 master copies, flat ZeRO partitions): on the same device, or on the
    CPU when the optimizer is offloaded; the fused kernel runs on both.
    """
    kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.deepspeed_fused:
        from deepspeed.ops.adam import FusedAdam

        gated_fused = type("GatedFusedAdam", (_GatedStep, FusedAdam), {})
        return gated_fused(params, adam_w_mode=opt.name == "adamw", **kwargs)
    cls = GatedAdamW if opt.name == "adamw" else GatedAdam
    fused = bool(params) and all(p.device.type in TORCH_FUSED_DEVICES for p in params)
    return cls(params, fused=fused or None, **kwargs)


# ------------------------------------------------------------------ the engine


@dataclass
class Engine:
    """DeepSpeed engine plus what the trainer needs around it (it holds no config: the caller's is final)."""

    ds: Any  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # the inner, gated torch optimizer
    gate: StepGate
    env: LaunchEnv
    device: torch.device
    backend: str
    plan: BatchPlan
    precision: str  # distributed.precision: fp32 | bf16 | fp16
    lr_at: Callable[[int], float]

    @property
    def module(self) -> torch.nn.Module:
        """The model (DeepSpeed's wrapped module: call it on every rank under ZeRO-3)."""
        return self.ds.module

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (DeepSpeed divides by the accumulation steps).

        DeepSpeed counts micro-batches in its ``step()``: off the accumulation
        boundary that call only advances the count (no reduction, no update), so
        it is made here; the boundary's ``step()`` is :meth:`step`.
        """
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        if not boundary:
            self.ds.step()

    def arm(self, loss_is_finite: bool | torch.Tensor, flags: Sequence[bool] = ()) -> None:
        """This rank's verdicts on the coming optimizer step (see :meth:`StepGate.arm`).

        Call it before the backward of the step's last micro-batch: under ZeRO-0 the
        verdicts' all-reduce then runs during that backward. ``loss_is_finite`` may stay
        on the device (a 0-dim bool tensor); ``flags`` are the trainer's "signalled?" and
        "time up?", settled by the same collective.
        """
        self.gate.arm(loss_is_finite, flags)

    def step(self, global_step: int, loss_is_finite: bool | torch.Tensor | None = None,
             flags: Sequence[bool] = ()) -> StepDecision:
        """Finish the optimizer step ``global_step`` (0-based) on every rank; returns the shared decision.

        Call it after the backward of the last micro-batch of the step, having called
        :meth:`arm`; or give the verdicts here (``loss_is_finite``, ``flags``), which arms
        the gate now (simpler for callers without a backward to overlap).
        """
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("Engine.step() called before the last micro-batch's backward of the step")
        if loss_is_finite is not None:
            self.arm(loss_is_finite, flags)
        elif not self.gate.armed:
            raise RuntimeError("Engine.step() needs the step's loss verdict: call Engine.arm() first, or pass "
                               "loss_is_finite")
        lr = self.lr_at(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        if self.gate.decision is None:
            # DeepSpeed's own overflow check (fp16 loss scaling, or a non-finite norm
            # under ZeRO; itself an all-reduce) skipped the inner step on every rank
            # before the gate ran.
            norm = self.ds.get_global_grad_norm()
            reason = "non-finite gradients (DeepSpeed's overflow check" + (
                "; fp16 loss scale lowered)" if self.precision == "fp16" else ")")
            return StepDecision(False, float(norm) if norm is not None else float("nan"), reason, self.gate.settle())
        return self.gate.decision

    def info(self) -> dict[str, Any]:
        """Facts about the running job, written to ``run_info.json`` and logged."""
        import deepspeed

        return {
            "launcher": self.env.launcher,
            "world_size": dist.get_world_size(),
            "rank": self.env.rank,
            "local_world_size": self.env.local_world_size,
            "backend": self.backend,
            "device": str(self.device),
            "zero_stage": int(self.ds.zero_optimization_stage()),
            "precision": self.precision,
            "global_batch_size": self.plan.global_batch_size,
            "micro_batch_size": self.plan.micro_batch_size,
            "grad_accum_steps": self.plan.grad_accum_steps,
            "omp_num_threads": torch.get_num_threads(),
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "optimizer": type(self.optimizer).__name__,
        }


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` decided for this process, before any collective."""

    env: LaunchEnv
    device: torch.device
    backend: str
    plan: BatchPlan


def resolve(cfg: Config, environ: dict[str, str] | None = None) -> Resolved:
    """Everything that can be checked without talking to a peer: launcher, device, batch, options.

    Every rank computes the same answer from the same config and environment,
    so a bad setting stops all ranks here, before any of them blocks in a
    collective waiting for the others. ``cfg`` is final (launcher settings
    already folded in by :func:`apply_launcher_settings` at the entry).
    """
    env = detect_launch_env(environ)
    device, backend = choose_device(env, cfg.distributed.backend)
    check_compatibility(cfg, device)
    plan = plan_batch(cfg.train.global_batch_size, cfg.train.grad_accum_steps, env.world_size)
    return Resolved(env, device, backend, plan)


def setup_engine(cfg: Config, model: torch.nn.Module, environ: dict[str, str] | None = None) -> Engine:
    """Resolve the job, start the process group and wrap ``model`` in DeepSpeed.

    The learning rate of step ``s`` is ``optimizer.lr * lr_multiplier(s)`` from
    :mod:`vae_train.schedules`, set on the optimizer before every step: a pure
    function of the step, so resuming needs no scheduler state and a skipped
    step cannot shift the schedule.
    """
    job = resolve(cfg, environ)
    env, device = job.env, job.device
    multiplier = build_lr_schedule(cfg.optimizer, cfg.train.max_steps)
    base_lr = cfg.optimizer.lr
    ds_config = build_deepspeed_config(cfg.distributed, job.plan)
    if cfg.distributed.deepspeed_config:
        user = load_user_deepspeed_config(cfg.distributed.deepspeed_config)
        ds_config = merge_deepspeed_config(ds_config, user, f"distributed.deepspeed_config={cfg.distributed.deepspeed_config!r}")
    set_cpu_threads(env, device)
    deepspeed = _import_deepspeed(device)
    init_process_group(env, job.backend, device, cfg.distributed.timeout_s)  # DeepSpeed wraps this group
    model = model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer)
    gate = StepGate(cfg.train.grad_clip, cfg.train.skip_grad_norm, device, replicated=cfg.distributed.zero_stage == 0)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    optimizer.step_gate = gate  # type: ignore[attr-defined]
    return Engine(ds_engine, optimizer, gate, env, device, job.backend, job.plan, cfg.distributed.precision,
                  lambda step: base_lr * multiplier(step))


DISC_MAX_ZERO_STAGE = 2
"""The discriminator's engine runs ZeRO ``min(distributed.zero_stage, 2)`` (docs/DESIGN.md, "The
autoencoder objective"): its optimizer state and gradients are partitioned, its parameters
(a few million) stay whole on every rank, so the decoder's pass through it needs no gather."""


def build_discriminator_deepspeed_config(dist_cfg: DistributedConfig, plan: BatchPlan) -> dict[str, Any]:
    """The discriminator engine's DeepSpeed JSON: the generated one at ZeRO ``min(stage, 2)``.

    Never merged with ``distributed.deepspeed_config``: that file tunes the autoencoder's engine
    (offload, buckets, a static loss scale), and its settings must not reach the discriminator's.
    Its ``fp16`` section is its own (dynamic scaling), so in fp16 the discriminator's engine keeps
    its own loss scaler: an overflow of one network's gradients lowers only that network's scale.
    """
    return build_deepspeed_config(
        dist_cfg.model_copy(update={"zero_stage": min(dist_cfg.zero_stage, DISC_MAX_ZERO_STAGE)}), plan)


def setup_discriminator_engine(cfg: Config, disc: torch.nn.Module, vae: Engine) -> Engine:
    """A second DeepSpeed engine for the PatchGAN: its own optimizer (Adam, ``loss.disc_lr``,
    ``loss.disc_betas``, constant LR), its own step gate (non-finite skips on every rank
    together, no clipping) and, in fp16, its own loss scale. Same batch plan and precision
    as the autoencoder's ``vae`` engine, whose process group it shares. The generated DeepSpeed
    config only: ``distributed.deepspeed_config`` (offload, buckets) tunes the autoencoder's engine.
    """
    deepspeed = _import_deepspeed(vae.device)
    ds_config = build_discriminator_deepspeed_config(cfg.distributed, vae.plan)
    disc = disc.to(vae.device)
    opt_cfg = OptimizerConfig(name="adam", lr=cfg.loss.disc_lr, betas=cfg.loss.disc_betas, schedule="constant",
                              warmup_steps=0)
    optimizer = build_optimizer(list(disc.parameters()), opt_cfg)
    gate = StepGate(0.0, 0.0, vae.device, replicated=cfg.distributed.zero_stage == 0)
    ds_engine, _, _, _ = deepspeed.initialize(model=disc, optimizer=optimizer, config=ds_config, dist_init_required=False)
    optimizer.step_gate = gate  # type: ignore[attr-defined]
    lr = cfg.loss.disc_lr
    return Engine(ds_engine, optimizer, gate, vae.env, vae.device, vae.backend, vae.plan, cfg.distributed.precision,
                  lambda step: lr)
