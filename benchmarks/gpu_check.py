"""The GPU readiness check (issue 18): one command that proves the fused op and training on a GPU.

Stages, in order of priority, each in its own process with its own time limit, so a
stage that crashes, hangs or runs long leaves the report of every other one intact:

- ``env``: versions (Python, torch, CUDA, deepspeed, pydantic, webdataset), the GPU, that
  every project module imports, and two ceilings measured here: a device-to-device copy
  (bytes read + written per second) and a bf16 matrix product (FLOP/s).
- ``build``: builds the fused op for the local GPU (``VAE_TRAIN_CUDA_ARCHS`` = its compute
  capability), fallback disabled (``VAE_TRAIN_REQUIRE_FUSED=1``).
- ``op_tests``: ``tests/unit/test_ops.py`` (every kernel test runs on the CPU and on CUDA:
  fused vs reference in fp32/bf16/fp16 with extreme log-variances, gradcheck in float64, the
  fp16 overflow case, CUDA noise vs the CPU's), plus the measured CUDA-vs-CPU noise difference.
- ``op_bench``: fused forward+backward against eager PyTorch and ``torch.compile`` of the
  textbook code (fp32, bf16): ratios, and the fraction of the memory bandwidth the fused op
  reaches (8 bytes-per-element moves of the minimum traffic over the datasheet bandwidth).
- ``train:<config>[:ckpt][:fp16]``: the trainer's own ``train_step`` under DeepSpeed ZeRO-2,
  one rank, bf16 (and one fp16 run of Fashion-MNIST for DeepSpeed's loss scaler), on a fixed
  synthetic batch on the device (the step is measured, not the data path): images/s, peak
  GPU memory, MFU = counted FLOPs per second (``torch.utils.flop_counter``, every matmul and
  convolution of one real step, forward and backward) over the GPU's dense bf16 peak.
  ``:ckpt`` = ``model.gradient_checkpointing`` on, where the config schema has that key.
  A config with ``loss.pixel`` l1/l2 (the tokenizers) runs the trainer's ``autoencoder_step``
  with its whole objective as the trainer builds it: pixel + LPIPS (a random VGG16 saved
  in the work folder: no ImageNet weights on the machine, and the cost does not depend on
  them) + KL + the PatchGAN in its own DeepSpeed engine from the first step
  (``loss.disc_start=0``) + the EMA update; ``train:tokenizer_tiny:fp16`` proves each
  engine's own fp16 loss scaler.
- ``tokenizer_step``: ``benchmarks/tokenizer_step.py`` on the device: one step of the full autoencoder
  objective against reconstruction-only (and + LPIPS) at 64x64, as ratios.

Writes ``gpu_check.json`` (every stage: status, seconds, limit, error, result) and
``gpu_check.log`` (every stage's output) into ``--out``, and prints one table.

``--dry-run`` (implies ``--device cpu`` unless given) runs every stage small on the CPU:
the same code paths, for testing this script where there is no GPU.

Usage::

    bash benchmarks/gpu_check.sh                     # on the GPU machine, with the carried wheels
    python benchmarks/gpu_check.py --out DIR         # the driver alone (deps already importable)
    python benchmarks/gpu_check.py --dry-run --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the parent process never imports torch: only the stage processes do
    import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1

# NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 tensor core "with sparsity" (2:4); dense is half.
# The H200 has the H100 SXM's Hopper SMs and clocks; the H100 whitepaper gives 989.4 dense.
H200_BF16_DENSE_FLOPS = 989.4e12
H200_PEAK_SOURCE = "NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with 2:4 sparsity, dense = half (989.4)"
# The same datasheet: 4.8 TB/s of HBM3e.
H200_HBM_BYTES_PER_S = 4.8e12
H200_HBM_SOURCE = "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e"

# Targets of issue 18.
TARGET_FUSED_VS_EAGER = 3.0
TARGET_FUSED_VS_COMPILE = 1.0
TARGET_TOKENIZER_MFU = 0.35

TRAIN_CONFIGS = ("fashion_mnist", "tokenizer_f8", "tokenizer_tiny")
# Configs trained at the tokenizer size (--tokenizer-image, batch --tokenizer-batch); ldm_finetune is
# SD's KL-f8 AutoencoderKL (model.arch ldm), decoder-only as configured, from random weights.
IMAGE_CONFIGS = ("tokenizer_f8", "tokenizer_tiny", "ldm_finetune")
# Configs of the latent-diffusion autoencoder objective (loss.pixel l1/l2): trained with autoencoder_step.
TOKENIZER_CONFIGS = ("tokenizer_f8", "tokenizer_tiny")
RANDOM_VGG16 = "vgg16-random.pth"  # LPIPS's backbone for the check, written into --work (see stage_train)
NOT_ON_DEVICE = "not run on"  # the error of a stage skipped because this device cannot run it


@dataclass
class Sizes:
    """How big each stage runs: the GPU sizes, or the dry run's."""

    matmul_n: int
    copy_bytes: int
    op_shape: tuple[int, ...]
    op_reps: int
    noise_n: int
    steps: int
    warmup: int
    max_train_s: float
    fashion_batch: int
    tokenizer_batch: int
    tokenizer_image: int
    compile_backend: str  # torch.compile's: inductor on the GPU; the dry run only checks the path
    objective_batch: int  # tokenizer_step: benchmarks/tokenizer_step.py's 64x64 batch, timed steps, rounds
    objective_steps: int
    objective_rounds: int


GPU_SIZES = Sizes(matmul_n=8192, copy_bytes=2 << 30, op_shape=(128, 16, 128, 128), op_reps=30, noise_n=1 << 24,
                  steps=300, warmup=10, max_train_s=30.0, fashion_batch=128, tokenizer_batch=32, tokenizer_image=256,
                  compile_backend="inductor", objective_batch=32, objective_steps=10, objective_rounds=3)
DRY_SIZES = Sizes(matmul_n=256, copy_bytes=16 << 20, op_shape=(8, 4, 16, 16), op_reps=3, noise_n=1 << 12,
                  steps=3, warmup=1, max_train_s=20.0, fashion_batch=8, tokenizer_batch=2, tokenizer_image=32,
                  compile_backend="aot_eager", objective_batch=1, objective_steps=1, objective_rounds=1)

# Time limits (s) per stage on the GPU; the whole check also stops at --budget-s.
GPU_LIMITS = {"env": 60, "build": 180, "op_tests": 150, "op_bench": 120, "train": 75, "tokenizer_step": 60}
DRY_LIMITS = {"env": 120, "build": 300, "op_tests": 300, "op_bench": 200, "train": 300, "tokenizer_step": 200}


@dataclass
class StageReport:
    """What the report holds for one stage, whatever happened to it."""

    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ measurements (in the stage process)


def _device(args: argparse.Namespace) -> torch.device:
    import torch

    return torch.device(args.device)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of every matmul and convolution ``fn`` runs, forward and backward (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_step: int, step_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: counted FLOPs per second over the peak."""
    return flops_per_step / step_s / peak_flops


def peaks(args: argparse.Namespace, measured: dict[str, Any]) -> dict[str, Any]:
    """The FLOP/s and bytes/s ceilings MFU and bandwidth fractions are taken against.

    An H200 gets its datasheet numbers; any other device (the CPU of a dry run) the
    ceilings the env stage measured, said so in ``source``.
    """
    name = measured.get("device_name", "")
    if "H200" in name:
        return {"flops": H200_BF16_DENSE_FLOPS, "flops_source": H200_PEAK_SOURCE,
                "bytes_per_s": H200_HBM_BYTES_PER_S, "bytes_source": H200_HBM_SOURCE}
    return {"flops": measured["matmul_bf16_flops"], "flops_source": f"measured bf16 matmul on {name}",
            "bytes_per_s": measured["copy_bytes_per_s"], "bytes_source": f"measured device copy on {name}"}


def stage_env(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    import importlib
    import importlib.metadata as md
    import platform
    import pkgutil

    import torch

    device = _device(args)
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {},
    }
    for dist in ("deepspeed", "pydantic", "pydantic-core", "webdataset", "accelerate", "numpy", "triton"):
        try:
            result["packages"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            result["packages"][dist] = None
    import vae_train

    # __main__ would run the CLI on import.
    modules = sorted(m.name for m in pkgutil.walk_packages(vae_train.__path__, "vae_train.")
                     if not m.name.endswith("__main__"))
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the report names every module that does not import
            failed[name] = f"{type(exc).__name__}: {exc}"
    result["modules_imported"] = len(modules) - len(failed)
    result["modules_failed"] = failed
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                      multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    else:
        result.update(device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", capability=None)
    numel = sizes.copy_bytes // 4
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=10)
    result["copy_bytes_per_s"] = 2 * sizes.copy_bytes / (ms / 1e3)  # read + written
    n = sizes.matmul_n
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, reps=10)
    result["matmul_bf16_flops"] = 2 * n**3 / (ms / 1e3)
    if failed:
        raise StageFailure(f"{len(failed)} module(s) did not import: {', '.join(failed)}", result)
    return result


def save_partial(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write what a stage has measured so far: if it then runs past its limit, the report keeps it."""
    Path(args.result).write_text(json.dumps({"status": "running", "result": result}))


class StageFailure(Exception):
    """A stage ran but its check failed; ``result`` still goes into the report."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def stage_build(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    import torch

    from vae_train.ops import backend, build

    with_cuda = args.device == "cuda"
    if with_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    plan = build.plan(with_cuda)
    cached = (plan.build_dir / f"{build.EXTENSION_NAME}.so").exists()
    t0 = time.perf_counter()
    build.build(with_cuda=with_cuda, verbose=True)
    seconds = time.perf_counter() - t0
    name = backend()
    result = {"backend": name, "build_dir": str(plan.build_dir), "cached": cached, "build_s": seconds,
              "cuda_archs": os.environ.get("VAE_TRAIN_CUDA_ARCHS"), "cuda_cflags": list(plan.cuda_cflags)}
    expected = "cuda-fused" if with_cuda else "cpu-fused"
    if name != expected:
        raise StageFailure(f"backend is {name!r}, expected {expected!r}", result)
    return result


def _junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, cuda_cases = [], 0
    for case in suite.iter("testcase"):
        name = case.get("name", "")
        ran = case.find("skipped") is None
        cuda_cases += ran and "cuda" in name  # the [cuda] parametrizations and the CUDA-only tests
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["cuda_cases"] = cuda_cases
    counts["failed_tests"] = failed
    return counts


def noise_difference(device: torch.device, n: int) -> dict[str, Any]:
    """The device kernel's noise against the CPU's per-element ``normal_at`` (same seed)."""
    import torch

    from vae_train.ops import backend

    backend()  # loads the extension
    seed = torch.tensor(20261130)
    expected = torch.ops.vae_train_ops.normal_at(seed, n)
    zeros = torch.zeros(1, 1, n, device=device)
    z, _, _ = torch.ops.vae_train_ops.reparam_kl_fwd(zeros, zeros, None, seed)
    got = z.flatten().cpu()
    ulps = (got.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
    return {"noise_elements": n, "noise_equal": bool(torch.equal(got, expected)),
            "noise_max_abs_diff": float((got - expected).abs().max()), "noise_max_ulps": int(ulps.max()),
            "noise_fraction_differing": float((ulps > 0).double().mean())}


def stage_op_tests(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    junit = Path(args.work) / "op_tests.xml"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "unit" / "test_ops.py"), "-q",
           "-p", "no:cacheprovider", f"--junitxml={junit}"] + (["-k", args.op_tests_k] if args.op_tests_k else [])
    proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stdout, stderr=sys.stderr)
    result = _junit_counts(junit) if junit.exists() else {}
    result["pytest_exit"] = proc.returncode
    result.update(noise_difference(_device(args), sizes.noise_n))
    if proc.returncode != 0:
        raise StageFailure(f"pytest exited {proc.returncode}: failed {result.get('failed_tests')}", result)
    if args.device == "cuda" and result.get("cuda_cases", 0) == 0:
        raise StageFailure("no test ran on CUDA", result)
    return result


def textbook(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reparameterization and KL as most VAE code writes them (benchmarks/fused_op.py's baseline)."""
    import torch

    std = torch.exp(0.5 * logvar)
    z = mu + torch.randn_like(std) * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=tuple(range(1, mu.dim())))
    return z, kl


def stage_op_bench(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    import torch

    from vae_train.ops import backend, reparam_kl

    device = _device(args)
    measured = json.loads(Path(args.env_result).read_text()) if args.env_result else None
    ceilings = peaks(args, measured) if measured else None
    result: dict[str, Any] = {"backend": backend(), "shape": list(sizes.op_shape),
                              "compile_backend": sizes.compile_backend}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator(device).manual_seed(0)
        mu = torch.randn(sizes.op_shape, generator=gen, device=device).to(dtype).requires_grad_()
        logvar = (torch.randn(sizes.op_shape, generator=gen, device=device) - 1).to(dtype).requires_grad_()
        grad_z = torch.randn(sizes.op_shape, generator=gen, device=device).to(dtype)
        t0 = time.perf_counter()
        compiled = torch.compile(textbook, dynamic=False, backend=sizes.compile_backend)
        impls = {"eager": textbook, "compile": compiled, "fused": lambda m, lv: reparam_kl(m, lv)}

        def fwd_bwd(fn: Callable) -> Callable[[], None]:
            def step() -> None:
                z, kl = fn(mu, logvar)
                torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl)))
            return step

        fwd_bwd(compiled)()  # compile outside the timing
        _sync(device)
        rows: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
        for name, fn in impls.items():
            # Forward as in training (inputs that require grad; no second compile for no_grad).
            rows[name] = {"fwd_ms": median_ms(lambda fn=fn: fn(mu, logvar), device, sizes.op_reps),
                          "fwd_bwd_ms": median_ms(fwd_bwd(fn), device, sizes.op_reps)}
        fused_ms = rows["fused"]["fwd_bwd_ms"]
        rows["fused_vs_eager"] = rows["eager"]["fwd_bwd_ms"] / fused_ms
        rows["fused_vs_compile"] = rows["compile"]["fwd_bwd_ms"] / fused_ms
        # The least traffic of forward + backward: read mu, logvar, write z; read dz, mu, logvar,
        # write dmu, dlogvar (the per-image KL sums are negligible): 8 element-sized moves.
        moved = 8 * mu.numel() * mu.element_size()
        rows["fused_bytes_per_s"] = moved / (fused_ms / 1e3)
        if ceilings:
            rows["fused_bandwidth_fraction"] = rows["fused_bytes_per_s"] / ceilings["bytes_per_s"]
            rows["bandwidth_source"] = ceilings["bytes_source"]
            # Against the device copy the env stage measured (a reachable ceiling).
            rows["fused_vs_measured_copy"] = rows["fused_bytes_per_s"] / measured["copy_bytes_per_s"]
        result[dtype_name] = rows
        save_partial(args, result)
        torch._dynamo.reset()
    return result


def _train_overrides(args: argparse.Namespace, sizes: Sizes, run_dir: Path) -> list[str]:
    from vae_train.config import ModelConfig

    tokenizer = args.config in IMAGE_CONFIGS
    batch = sizes.tokenizer_batch if tokenizer else sizes.fashion_batch
    overrides = [f"run_dir={run_dir}", "resume=none", f"distributed.precision={args.precision}",
                 "distributed.zero_stage=2", f"train.global_batch_size={batch}", "train.grad_accum_steps=1",
                 "checkpoint.every_steps=0"]
    if tokenizer:
        # Random weights: the check never reads a model.init_from the config may name.
        overrides += [f"model.image_size={sizes.tokenizer_image}", "model.init_from="]
    if args.config in TOKENIZER_CONFIGS:
        # The whole objective in every timed step: the discriminator and the EMA from step 0, LPIPS on a
        # random VGG16 (no ImageNet weights there; the cost does not depend on them).
        overrides += ["loss.disc_start=0", "ema.start_step=0",
                      f"loss.lpips_backbone_path={Path(args.work) / RANDOM_VGG16}"]
    if args.fused_adam:
        overrides.append("optimizer.deepspeed_fused=true")
    if args.ckpt:
        if "gradient_checkpointing" not in ModelConfig.model_fields:
            raise RuntimeError("model.gradient_checkpointing is not a config key in this version")
        overrides.append("model.gradient_checkpointing=true")
    elif "gradient_checkpointing" in ModelConfig.model_fields:
        overrides.append("model.gradient_checkpointing=false")
    return overrides


def _loss_scale(engine: Any) -> float | None:
    """The engine's current fp16 loss scale (None where its optimizer keeps none)."""
    scale = getattr(engine.ds.optimizer, "loss_scale", None)
    return None if scale is None else float(scale)


def _autoencoder_steps(cfg: Any, engine: Any, batches: Any) -> tuple[Callable[[int], Any], dict[str, Any], Any]:
    """``(one_step, facts, disc engine or None)`` for a ``loss.pixel`` l1/l2 config: the trainer's
    ``autoencoder_step`` with the parts :func:`vae_train.trainer.train` builds (change both together):
    LPIPS, the PatchGAN in its own engine, the adaptive weight's tap, the EMA updated after applied
    steps. ``facts`` (what ran, skipped discriminator steps, EMA updates) go into the stage's result."""
    from vae_train.autoencoder_step import autoencoder_step
    from vae_train.ema import EMA
    from vae_train.engine import setup_discriminator_engine
    from vae_train.losses import AutoencoderObjective, LastLayerTap
    from vae_train.model.discriminator import PatchDiscriminator
    from vae_train.model.perceptual import build_lpips, save_random_vgg16
    from vae_train.schedules import build_beta_schedule

    lpips = None
    if cfg.loss.perceptual_weight > 0:
        save_random_vgg16(cfg.loss.lpips_backbone_path)
        lpips = build_lpips(cfg.loss.lpips_backbone_path).to(engine.device)
    disc = None
    if cfg.loss.disc_weight > 0:
        critic = PatchDiscriminator(cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
        disc = setup_discriminator_engine(cfg, critic, engine)
    objective = AutoencoderObjective(cfg.loss, lpips)
    tap = LastLayerTap(engine.module.last_decoder_layer()) if disc is not None and cfg.loss.adaptive_weight else None
    ema = (EMA(engine.module, cfg.ema.decay, cfg.ema.start_step, cfg.ema.every_steps,
               partitioned=engine.ds.zero_optimization_stage() == 3) if cfg.ema.decay > 0 else None)
    beta_at = build_beta_schedule(cfg.kl, cfg.train.max_steps)
    facts: dict[str, Any] = {"objective": "autoencoder", "perceptual": lpips is not None,
                             "discriminator": disc is not None, "adaptive_weight": tap is not None,
                             "ema": ema is not None, "disc_skipped_steps": 0, "ema_updates": 0}
    if disc is not None:
        facts["disc_zero_stage"] = int(disc.ds.zero_optimization_stage())
    if disc is not None and cfg.distributed.precision == "fp16":  # two engines, two dynamic loss scalers
        scalers = [getattr(e.ds.optimizer, "loss_scaler", None) for e in (engine, disc)]
        facts["own_loss_scalers"] = None not in scalers and scalers[0] is not scalers[1]

    def one_step(step: int) -> Any:
        result = autoencoder_step(engine, disc, objective, tap, batches, step, beta_at(step))
        if result.disc_decision is not None and not result.disc_decision.applied:
            facts["disc_skipped_steps"] += 1
        if ema is not None and result.decision.applied and ema.due(step + 1):
            ema.update(step + 1)
            facts["ema_updates"] += 1
        return result

    return one_step, facts, disc


def stage_train(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """A few hundred of the trainer's steps of one config on a fixed synthetic batch, measured."""
    import functools
    import itertools

    import torch

    from vae_train.autoencoder_step import TERMS
    from vae_train.config import load_config
    from vae_train.engine import setup_engine
    from vae_train.losses import attach_output_logvar
    from vae_train.model import build_model, freeze, likelihood_value_range, vae_loss
    from vae_train.trainer import ELBO_TERMS, train_step

    setup_start = time.perf_counter()
    run_dir = Path(args.work) / f"run-{args.config}-{args.precision}-{int(args.ckpt)}-{int(args.fused_adam)}"
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml", _train_overrides(args, sizes, run_dir))
    tokenizer = cfg.loss.pixel != "none"
    torch.manual_seed(cfg.seed)
    # As vae_train.trainer.train builds it (change both together); random weights, no init_from.
    model = build_model(cfg.model)
    if cfg.loss.learned_logvar:
        attach_output_logvar(model, cfg.loss.logvar_init)
    freeze(model, cfg.train.trainable)
    engine = setup_engine(cfg, model)
    if engine.device.type != args.device:
        raise RuntimeError(f"the engine chose {engine.device}, expected {args.device}")
    lo, hi = likelihood_value_range(cfg.model.likelihood)
    gen = torch.Generator().manual_seed(0)
    shape = (engine.plan.micro_batch_size, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if cfg.model.likelihood == "bernoulli":
        x = torch.bernoulli(torch.full(shape, 0.3), generator=gen)
    else:
        x = lo + (hi - lo) * torch.rand(shape, generator=gen)
    batches = itertools.repeat({"image": x.to(engine.device)})
    losses: list[torch.Tensor] = []  # on the device, read once at the end
    last_sums: list[torch.Tensor] = []  # the last step's terms (one micro-batch: the sums are the values)
    skipped = 0
    facts: dict[str, Any] = {"objective": "elbo"}
    disc = None
    if tokenizer:
        autoencoder_one_step, facts, disc = _autoencoder_steps(cfg, engine, batches)
    else:
        loss_fn = functools.partial(vae_loss, beta=1.0, free_bits=cfg.kl.free_bits)

    def one_step(step: int) -> None:
        nonlocal skipped
        out = autoencoder_one_step(step) if tokenizer else train_step(engine, batches, step, loss_fn)
        skipped += not out.decision.applied
        losses.append(out.sums[0])
        last_sums[:] = [out.sums]

    setup_s = time.perf_counter() - setup_start
    for step in range(sizes.warmup):
        one_step(step)
    flops = count_flops(lambda: one_step(sizes.warmup))
    _sync(engine.device)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    steps, t0 = 0, time.perf_counter()
    while steps < sizes.steps and time.perf_counter() - t0 < sizes.max_train_s:
        one_step(sizes.warmup + 1 + steps)
        steps += 1
    _sync(engine.device)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / steps
    loss_first, loss_last = float(losses[0]), float(losses[-1])
    result: dict[str, Any] = {
        "config": args.config, "arch": cfg.model.arch, "precision": args.precision,
        "zero_stage": cfg.distributed.zero_stage,
        "optimizer": type(engine.optimizer).__name__,
        "gradient_checkpointing": bool(args.ckpt), "image_size": cfg.model.image_size,
        "batch": engine.plan.global_batch_size, "parameters": model.num_parameters(),
        "setup_s": setup_s, "steps_timed": steps, "step_ms": step_s * 1e3, "images_per_s": engine.plan.global_batch_size / step_s,
        "flops_per_step": flops, "flops_per_image": flops / engine.plan.global_batch_size,
        "achieved_flops": flops / step_s, "skipped_steps": skipped,
        "loss_first": loss_first, "loss_last": loss_last,
    }
    result.update(facts)
    result["last_terms"] = dict(zip(TERMS if tokenizer else ELBO_TERMS, last_sums[0].tolist()))
    if args.precision == "fp16":  # each engine's own dynamic loss scale after the run
        result["loss_scale"] = _loss_scale(engine)
        if disc is not None:
            result["disc_loss_scale"] = _loss_scale(disc)
    if engine.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
    else:
        import resource

        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS
    if args.env_result:
        measured = json.loads(Path(args.env_result).read_text())
        ceilings = peaks(args, measured)
        result["mfu"] = mfu(flops, step_s, ceilings["flops"])
        result["peak_flops"] = ceilings["flops"]
        result["peak_source"] = ceilings["flops_source"]
        # Against what a large bf16 matmul reached on this device in the env stage (a reachable ceiling).
        result["mfu_vs_measured_matmul"] = mfu(flops, step_s, measured["matmul_bf16_flops"])
    torch.distributed.destroy_process_group()  # an NCCL group left up can hold the process at exit
    if not all(math.isfinite(v) for v in (loss_first, loss_last)):
        raise StageFailure("the loss is not finite", result)
    if tokenizer and result["discriminator"] and not math.isfinite(result["last_terms"]["d_loss"]):
        raise StageFailure("the discriminator's loss is not finite", result)
    if result.get("own_loss_scalers") is False:
        raise StageFailure("the discriminator's engine shares the autoencoder's fp16 loss scaler", result)
    return result


def stage_tokenizer_step(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """The autoencoder objective's cost (issue 15): ``benchmarks/tokenizer_step.py``'s three objectives
    (reconstruction only, + LPIPS, full) on one model at 64x64, interleaved, as ratios to reconstruction-only."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenizer_step", ROOT / "benchmarks" / "tokenizer_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(_device(args), sizes.objective_batch, sizes.objective_steps, sizes.objective_rounds)
    base = rows[0][1]
    return {"image_size": 64, "batch": sizes.objective_batch, "steps": sizes.objective_steps,
            "rounds": sizes.objective_rounds,
            "variants": [{"name": name, "step_ms": seconds * 1e3, "ratio": seconds / base} for name, seconds in rows],
            "lpips_vs_recon": rows[1][1] / base, "full_vs_recon": rows[2][1] / base}


STAGES: dict[str, Callable[[argparse.Namespace, Sizes], dict[str, Any]]] = {
    "env": stage_env, "build": stage_build, "op_tests": stage_op_tests, "op_bench": stage_op_bench,
    "train": stage_train, "tokenizer_step": stage_tokenizer_step,
}


def run_stage_here(args: argparse.Namespace) -> int:
    """The stage process: run one stage and write its result (or its failure) as JSON."""
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    out = Path(args.result)
    try:
        result = STAGES[args.stage](args, sizes)
        out.write_text(json.dumps({"status": "ok", "result": result}))
        return 0
    except StageFailure as exc:
        out.write_text(json.dumps({"status": "failed", "error": str(exc), "result": exc.result}))
        return 1
    except Exception as exc:  # noqa: BLE001 - any error ends this stage only, with its message in the report
        import traceback

        traceback.print_exc()
        out.write_text(json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}))
        return 1


# ------------------------------------------------------------------ orchestration (the parent process)


def run_stage(cmd: list[str], limit_s: float, log: IO[str], env: dict[str, str], result_file: Path) -> StageReport:
    """Run one stage's process for at most ``limit_s`` (then kill its whole process group)."""
    result_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seconds = time.perf_counter() - t0
        data = json.loads(result_file.read_text()) if result_file.exists() else {}
        if data.get("status") in ("ok", "failed"):  # finished, then hung on its way out
            error = f"{data.get('error') or 'finished'}; the process did not exit within {limit_s:.0f} s (killed)"
            return StageReport(data["status"], seconds, limit_s, error, data.get("result", {}))
        return StageReport("timeout", seconds, limit_s, f"stopped after its {limit_s:.0f} s limit",
                           data.get("result", {}))
    seconds = time.perf_counter() - t0
    if not result_file.exists():
        return StageReport("failed", seconds, limit_s, f"the stage process exited {proc.returncode} without a result")
    data = json.loads(result_file.read_text())
    if data["status"] == "running":  # died after saving part of its results
        return StageReport("failed", seconds, limit_s, f"the stage process exited {proc.returncode} part-way",
                           data.get("result", {}))
    return StageReport(data["status"], seconds, limit_s, data.get("error"), data.get("result", {}))


def plan_stages(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(report name, stage arguments) in order of priority; no arguments: skipped on this device."""
    from vae_train.config import ModelConfig

    stages = [("env", ["--stage", "env"]), ("build", ["--stage", "build"]), ("op_tests", ["--stage", "op_tests"]),
              ("op_bench", ["--stage", "op_bench"])]
    has_ckpt = "gradient_checkpointing" in ModelConfig.model_fields
    for config in TRAIN_CONFIGS:
        if not (ROOT / "configs" / f"{config}.yaml").is_file():
            continue
        base = ["--stage", "train", "--config", config]
        stages.append((f"train:{config}", [*base, "--precision", "bf16"]))
        if has_ckpt and config in IMAGE_CONFIGS:
            stages.append((f"train:{config}:ckpt", [*base, "--precision", "bf16", "--ckpt"]))
    # DeepSpeed's fp16 loss scaling runs on GPUs only (the engine refuses fp16 on a CPU). The tokenizer's
    # run has two engines, each with its own loss scaler (the autoencoder's and the discriminator's).
    stages.append(("train:fashion_mnist:fp16", ["--stage", "train", "--config", "fashion_mnist", "--precision", "fp16"]
                   if args.device == "cuda" else []))
    if (ROOT / "configs" / "tokenizer_tiny.yaml").is_file():
        stages.append(("train:tokenizer_tiny:fp16", ["--stage", "train", "--config", "tokenizer_tiny", "--precision",
                                                     "fp16"] if args.device == "cuda" else []))
    stages.append(("tokenizer_step", ["--stage", "tokenizer_step"]))
    if (ROOT / "configs" / "ldm_finetune.yaml").is_file():
        stages.append(("train:ldm_finetune", ["--stage", "train", "--config", "ldm_finetune", "--precision", "bf16"]))
    # DeepSpeed's FusedAdam (optimizer.deepspeed_fused), JIT-built for this GPU: last, as its build is slow.
    stages.append(("train:fashion_mnist:fused_adam",
                   ["--stage", "train", "--config", "fashion_mnist", "--precision", "bf16", "--fused-adam"]
                   if args.device == "cuda" else []))
    if args.stages:
        wanted = set(args.stages.split(","))
        stages = [(n, a) for n, a in stages if n in wanted or n.split(":")[0] in wanted]
    return stages


def stage_env_vars(args: argparse.Namespace, env_result: dict[str, Any]) -> dict[str, str]:
    """The environment of every stage process: fused op required, built for this GPU, one rank."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["VAE_TRAIN_REQUIRE_FUSED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1" if args.dry_run else str(os.cpu_count() or 1))
    else:
        env.pop("DS_ACCELERATOR", None)
        capability = env_result.get("capability")
        if capability and "VAE_TRAIN_CUDA_ARCHS" not in env:
            env["VAE_TRAIN_CUDA_ARCHS"] = capability.replace(".", "")
    return env


def targets(stages: dict[str, StageReport]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured value and whether it is met (None: not measured)."""
    rows = []
    bench = stages.get("op_bench")
    for dtype in ("fp32", "bf16"):
        r = bench.result.get(dtype) if bench else None
        for key, goal, text in (("fused_vs_eager", TARGET_FUSED_VS_EAGER, "fused fwd+bwd vs eager"),
                                ("fused_vs_compile", TARGET_FUSED_VS_COMPILE, "fused fwd+bwd vs torch.compile")):
            value = r.get(key) if r else None
            met = None if value is None else (value >= goal if key == "fused_vs_eager" else value > goal)
            rows.append({"name": f"{text} ({dtype})", "value": value, "goal": f"{'>=' if key == 'fused_vs_eager' else '>'} {goal:g}x", "met": met})
    tok = stages.get("train:tokenizer_f8")
    value = tok.result.get("mfu") if tok and tok.status == "ok" else None
    rows.append({"name": "KL-f8 tokenizer step MFU (256x256 bf16)", "value": value,
                 "goal": f">= {TARGET_TOKENIZER_MFU:.0%}", "met": None if value is None else value >= TARGET_TOKENIZER_MFU})
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """The one table: a row per stage with its key figures, then the targets."""
    lines = [f"GPU check {report['date']}  mode={report['mode']}  device={report['device_name']}  "
             f"torch {report['torch']}  wall {report['wall_s']:.0f} s of {report['budget_s']:.0f}",
             f"{'stage':28s} {'status':8s} {'s':>6s}  figures"]
    for name, stage in report["stages"].items():
        r = stage["result"]
        if name == "env":
            figs = (f"copy {_fmt(r.get('copy_bytes_per_s', 0) / 1e12, '.2f')} TB/s, bf16 matmul "
                    f"{_fmt(r.get('matmul_bf16_flops', 0) / 1e12, '.0f')} TFLOP/s, modules {r.get('modules_imported')}")
        elif name == "build":
            figs = f"{r.get('backend')} in {_fmt(r.get('build_s'), '.1f')} s (archs {r.get('cuda_archs')})"
        elif name == "op_tests":
            figs = (f"{r.get('passed')} passed, {r.get('failures', 0) + r.get('errors', 0) if r else '-'} failed, "
                    f"{r.get('cuda_cases')} on CUDA; noise max {r.get('noise_max_ulps')} ulp vs CPU")
        elif name == "tokenizer_step":
            figs = (f"64x64 batch {r.get('batch')}: + LPIPS x{_fmt(r.get('lpips_vs_recon'), '.2f')}, full "
                    f"x{_fmt(r.get('full_vs_recon'), '.2f')} the reconstruction-only step") if r else ""
        elif name == "op_bench":
            parts = []
            for dtype in ("fp32", "bf16"):
                d = r.get(dtype)
                if d:
                    parts.append(f"{dtype}: fused {d['fused']['fwd_bwd_ms']:.3f} ms, x{d['fused_vs_eager']:.2f} eager, "
                                 f"x{d['fused_vs_compile']:.2f} compile, {_fmt(d.get('fused_bandwidth_fraction'), '.0%')} BW")
            figs = "; ".join(parts)
        else:
            figs = (f"{_fmt(r.get('images_per_s'), '.1f')} img/s, peak {_fmt(r.get('peak_memory_gib'), '.2f')} GiB, "
                    f"MFU {_fmt(r.get('mfu'), '.1%')}, {r.get('steps_timed')} steps, loss "
                    f"{_fmt(r.get('loss_first'), '.4g')}->{_fmt(r.get('loss_last'), '.4g')}") if r else ""
        if stage["status"] != "ok" and stage["error"]:
            figs = (figs + "  " if figs else "") + f"[{stage['error'][:160]}]"
        lines.append(f"{name:28s} {stage['status']:8s} {stage['seconds']:6.1f}  {figs}")
    lines.append("targets:")
    for t in report["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = "-" if value is None else (f"{value:.1%}" if "MFU" in t["name"] else f"{value:.2f}x")
        lines.append(f"  {t['name']:44s} {shown:>8s}  goal {t['goal']:8s} {verdict}")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    limits = DRY_LIMITS if args.dry_run else GPU_LIMITS
    deadline = time.perf_counter() + args.budget_s
    started = time.perf_counter()
    reports: dict[str, StageReport] = {}
    env_result: dict[str, Any] = {}
    env_file = work / "stage-env.json"
    common = ["--device", args.device, "--work", str(work)] + (["--dry-run"] if args.dry_run else [])
    if args.op_tests_k:
        common += ["--op-tests-k", args.op_tests_k]
    report: dict[str, Any] = {}
    log_path = out / "gpu_check.log"
    with log_path.open("w") as log:
        for name, stage_args in plan_stages(args):
            if not stage_args:
                reports[name] = StageReport("skipped", error=f"{NOT_ON_DEVICE} {args.device}")
                continue
            kind = stage_args[1]
            remaining = deadline - time.perf_counter()
            if remaining < 10:
                reports[name] = StageReport("skipped", 0.0, 0.0, "the check's time budget was spent")
                continue
            limit = min(limits[kind], remaining)
            result_file = work / f"stage-{name.replace(':', '_')}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *stage_args, *common, "--result", str(result_file)]
            if kind in ("op_bench", "train") and env_file.exists():
                cmd += ["--env-result", str(env_file)]
            log.write(f"\n===== stage {name} (limit {limit:.0f} s): {' '.join(cmd)}\n")
            log.flush()
            reports[name] = run_stage(cmd, limit, log, stage_env_vars(args, env_result), result_file)
            log.write(f"===== stage {name}: {reports[name].status} in {reports[name].seconds:.1f} s\n")
            log.flush()
            print(f"[gpu_check] {name}: {reports[name].status} ({reports[name].seconds:.1f} s)"
                  + (f" {reports[name].error[:200]}" if reports[name].error else ""), flush=True)
            if name == "env" and reports[name].result:
                env_result = reports[name].result
                env_file.write_text(json.dumps(env_result))
        report = {
            "schema": SCHEMA,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "dry-run" if args.dry_run else "gpu",
            "device": args.device,
            "device_name": env_result.get("device_name"),
            "torch": env_result.get("torch"),
            "budget_s": args.budget_s,
            "wall_s": time.perf_counter() - started,
            "peaks": peaks(args, env_result) if "matmul_bf16_flops" in env_result else None,
            "stages": {name: asdict(r) for name, r in reports.items()},
            "targets": targets(reports),
        }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = table(report)
    (out / "gpu_check.txt").write_text(text + "\n")
    print(text, flush=True)
    # Success: every stage passed, except those that cannot run on this device (fp16 on a CPU).
    passed = all(r.status == "ok" or (r.status == "skipped" and (r.error or "").startswith(NOT_ON_DEVICE))
                 for r in reports.values())
    return 0 if passed else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json/.log/.txt")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default) or cpu (default with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every stage small, for a machine without a GPU")
    parser.add_argument("--budget-s", type=float, default=470.0, help="the whole check's time budget (s)")
    parser.add_argument("--stages", default="", help="comma list of stages to run (env,build,op_tests,op_bench,train)")
    parser.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--op-tests-k", default="", help="run only the op tests matching this pytest -k expression")
    # The stage processes' own arguments.
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--env-result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fused-adam", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.dry_run else "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return run_stage_here(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
