"""Engine set-up: launcher environments, batch arithmetic, DeepSpeed JSON, option checks, the skip gate.

The pure functions are tested in-process; the bad-input cases also run as real
processes (plain python and torchrun) to prove they end with our message and
exit status 2, quickly, instead of a rank waiting for a peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launching import clean_env, run, torchrun
from vae_train.config import Config, OptimizerConfig, config_from_dict
from vae_train.distributed import LaunchError, detect_launch_env
from vae_train.engine import (
    EngineError,
    StepGate,
    apply_launcher_settings,
    build_deepspeed_config,
    build_discriminator_deepspeed_config,
    check_compatibility,
    choose_device,
    load_user_deepspeed_config,
    native_bf16,
    resolve_auto_precision,
    merge_deepspeed_config,
    plan_batch,
    set_cpu_threads,
)

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

pytestmark = pytest.mark.timeout(120)


# -- launcher environments --------------------------------------------------------------


def test_no_launcher_means_one_process() -> None:
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "python")
    assert env.master_port > 0


def test_torchrun_environment() -> None:
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("10.0.0.1", 29500, "torchrun")


def test_accelerate_environment_is_recognised() -> None:
    env = detect_launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": "1234", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert env.launcher == "accelerate"


@pytest.mark.parametrize(
    "environ, words",
    [
        ({"RANK": "1"}, ["half set", "WORLD_SIZE missing"]),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, ["half set", "RANK"]),
        ({"RANK": "0", "WORLD_SIZE": "2"}, ["MASTER_ADDR", "MASTER_PORT"]),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["not inside WORLD_SIZE"]),
        ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x' is not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "0"}, ["MASTER_PORT=0", "--standalone"]),
    ],
)
def test_half_set_launcher_environment_is_an_error(environ: dict[str, str], words: list[str]) -> None:
    with pytest.raises(LaunchError) as info:
        detect_launch_env(environ)
    for word in words:
        assert word in str(info.value)


def test_srun_one_task_per_gpu_is_mapped() -> None:
    env = detect_launch_env({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                             "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
                             "SLURM_JOB_ID": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu07", 21234, "slurm")


def test_sbatch_shell_without_srun_is_one_process() -> None:
    # The batch shell of a 2-task allocation has SLURM_NTASKS=2 but only one process runs.
    env = detect_launch_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})
    assert env.world_size == 1


# -- accelerate launch settings ------------------------------------------------------------

ACCEL = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
         "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,mixed_precision"}


def test_accelerate_settings_fill_unset_keys() -> None:
    cfg, notes = apply_launcher_settings(Config(), ACCEL)
    assert (cfg.distributed.zero_stage, cfg.distributed.precision, notes) == (3, "bf16", [])


def test_explicit_config_wins_over_accelerate_with_a_note() -> None:
    cfg = config_from_dict({"distributed": {"zero_stage": 1}})
    cfg, notes = apply_launcher_settings(cfg, ACCEL)
    assert (cfg.distributed.zero_stage, cfg.distributed.precision) == (1, "bf16")
    assert len(notes) == 1 and "zero_stage=3" in notes[0] and "using 1" in notes[0]


def test_accelerate_deepspeed_json_counts_as_the_launcher_choice(tmp_path: Path) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": True}}))
    cfg, notes = apply_launcher_settings(Config(), {"ACCELERATE_USE_DEEPSPEED": "true",
                                                    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)})
    assert (cfg.distributed.zero_stage, cfg.distributed.precision) == (3, "bf16")
    assert cfg.distributed.deepspeed_config == str(ds_json) and notes == []
    merged = merge_deepspeed_config(_ds(cfg), load_user_deepspeed_config(str(ds_json)), "ds.json")
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}


def test_without_accelerate_nothing_changes() -> None:
    cfg = Config()
    assert apply_launcher_settings(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"}) == (cfg, [])


# -- batch arithmetic --------------------------------------------------------------------------


def test_global_batch_splits_into_micro_x_accum_x_world() -> None:
    plan = plan_batch(128, 2, 4)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.world_size) == (16, 2, 4)
    assert plan.micro_batch_size * plan.grad_accum_steps * plan.world_size == plan.global_batch_size


def test_global_batch_that_does_not_divide_is_an_error() -> None:
    with pytest.raises(EngineError, match=r"global_batch_size=100 does not divide into train.grad_accum_steps=3 x 2 ranks = 6; use a multiple of 6 \(e.g. 96 or 102\)"):
        plan_batch(100, 3, 2)


# -- DeepSpeed JSON ------------------------------------------------------------------------------


def _ds(cfg: Config) -> dict:
    return build_deepspeed_config(cfg.distributed, plan_batch(cfg.train.global_batch_size, cfg.train.grad_accum_steps, 2))


def test_generated_deepspeed_config() -> None:
    cfg = config_from_dict({"train": {"global_batch_size": 64, "grad_accum_steps": 2},
                            "distributed": {"zero_stage": 3, "precision": "bf16"}})
    ds = _ds(cfg)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0  # the StepGate clips after its skip decision
    fp16 = _ds(config_from_dict({"distributed": {"precision": "fp16"}}))["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    # the StepGate's all-reduce gives the norm and the non-finite verdict: DeepSpeed's own ones are off
    assert ds["bf16"]["check_grad_overflow"] is False and "check_grad_overflow" not in ds["fp16"]
    for stage in (0, 1, 2, 3):
        zero = _ds(config_from_dict({"distributed": {"zero_stage": stage}}))["zero_optimization"]
        assert zero.get("compute_grad_norm", True) is (stage not in (1, 2)), stage  # an option of ZeRO-1/2 only


def test_offloaded_optimizer_keeps_deepspeeds_grad_norm() -> None:
    """DeepSpeed refuses compute_grad_norm=false with a CPU-offloaded optimizer: the merge gives it back."""
    cfg = config_from_dict({"distributed": {"zero_stage": 2}})
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert "compute_grad_norm" not in merge_deepspeed_config(_ds(cfg), offload, "test")["zero_optimization"]
    asked = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "compute_grad_norm": False}}
    assert merge_deepspeed_config(_ds(cfg), asked, "test")["zero_optimization"]["compute_grad_norm"] is False
    assert merge_deepspeed_config(_ds(cfg), {}, "test")["zero_optimization"]["compute_grad_norm"] is False


def test_discriminator_engine_config_has_its_own_dynamic_fp16_scaling_and_zero_2_at_most(tmp_path: Path) -> None:
    """The PatchGAN's engine: ZeRO min(stage, 2), the autoencoder's batch plan and precision, its own dynamic
    fp16 loss scaling (not a user JSON's static scale, which is the autoencoder's). That its scaler then acts
    on its own (an overflow lowers one engine's scale only) needs fp16, i.e. a GPU: the GPU check's
    train:tokenizer_tiny:fp16 stage reports both engines' scales."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"fp16": {"loss_scale": 128}, "zero_optimization": {"overlap_comm": True}}))
    for stage in (0, 1, 2, 3):
        cfg = config_from_dict({"train": {"global_batch_size": 64, "grad_accum_steps": 2},
                                "distributed": {"zero_stage": stage, "precision": "fp16", "deepspeed_config": str(user)}})
        plan = plan_batch(64, 2, 2)
        disc = build_discriminator_deepspeed_config(cfg.distributed, plan)
        assert disc["zero_optimization"]["stage"] == min(stage, 2)
        assert "overlap_comm" not in disc["zero_optimization"]  # nothing of the user's JSON
        assert disc["fp16"]["enabled"] and not disc["bf16"]["enabled"]
        assert disc["fp16"]["loss_scale"] == 0 and disc["fp16"]["min_loss_scale"] >= 1  # dynamic, its own
        vae = build_deepspeed_config(cfg.distributed, plan)
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16"):
            assert disc[key] == vae[key], key
    bf16 = config_from_dict({"distributed": {"zero_stage": 3, "precision": "bf16"}}).distributed
    disc = build_discriminator_deepspeed_config(bf16, plan_batch(64, 1, 2))
    assert disc["bf16"]["enabled"] and not disc["fp16"]["enabled"] and disc["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2_overlap.json", 2), ("deepspeed_zero3_offload.json", 3)])
def test_shipped_templates_merge(name: str, stage: int) -> None:
    cfg = config_from_dict({"distributed": {"zero_stage": stage}})
    merged = merge_deepspeed_config(_ds(cfg), load_user_deepspeed_config(str(ROOT / "launch" / name)), name)
    assert merged["zero_optimization"]["stage"] == stage
    assert merged["train_batch_size"] == cfg.train.global_batch_size  # "auto" filled from the config
    assert merged["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize(
    "user, stage, match",
    [
        ({"zero_optimization": {"stage": 3}}, 2, r"zero_optimization.stage=3 but the config gives 2 \(from distributed.zero_stage\)"),
        ({"train_batch_size": 7}, 2, r"train_batch_size=7 .* train.global_batch_size"),
        ({"optimizer": {"type": "Adam"}}, 2, r"'optimizer'.*optimizer.deepspeed_fused"),
        ({"gradient_clipping": 1.0}, 2, r"train.grad_clip"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, 2, r"offload_param needs ZeRO stage 3"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, 0, r"offload_optimizer needs ZeRO stage 1-3"),
    ],
)
def test_user_json_conflicts_are_errors(user: dict, stage: int, match: str) -> None:
    cfg = config_from_dict({"distributed": {"zero_stage": stage}})
    with pytest.raises(EngineError, match=match):
        merge_deepspeed_config(_ds(cfg), user, "user.json")


def test_missing_or_broken_user_json(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        load_user_deepspeed_config(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        load_user_deepspeed_config(str(tmp_path / "bad.json"))


# -- device checks --------------------------------------------------------------------------------


def test_fp16_and_fused_adam_need_a_gpu() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(EngineError, match="fp16 needs a GPU.*bf16 or fp32"):
        check_compatibility(config_from_dict({"distributed": {"precision": "fp16"}}), cpu)
    with pytest.raises(EngineError, match="deepspeed_fused=true .* needs a GPU"):
        check_compatibility(config_from_dict({"optimizer": {"deepspeed_fused": True}}), cpu)
    check_compatibility(config_from_dict({"distributed": {"precision": "bf16"}}), cpu)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32"),
])
def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool,
                                        expected: str) -> None:
    """auto = bf16 only on CPUs that compute it natively; the note says which and why; other values pass."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg, notes = resolve_auto_precision(config_from_dict({"distributed": {"precision": "auto", "zero_stage": 2}}))
    assert (cfg.distributed.precision, cfg.distributed.zero_stage) == (expected, 2)
    assert len(notes) == 1 and notes[0].startswith(f"distributed.precision=auto -> {expected}: ")
    assert ("emulated" in notes[0]) == (expected == "fp32")
    explicit = config_from_dict({"distributed": {"precision": "fp32"}})
    assert resolve_auto_precision(explicit) == (explicit, [])


def test_auto_precision_on_this_machine_and_undecided_auto_refused() -> None:
    cfg, _ = resolve_auto_precision(config_from_dict({"distributed": {"precision": "auto"}}))
    assert cfg.distributed.precision == ("bf16" if native_bf16()[0] else "fp32")
    check_compatibility(cfg, torch.device("cpu"))
    with pytest.raises(EngineError, match="precision=auto reached the engine undecided"):
        check_compatibility(config_from_dict({"distributed": {"precision": "auto"}}), torch.device("cpu"))


def test_backend_follows_the_device() -> None:
    env = detect_launch_env({})
    assert choose_device(env, "auto") == (torch.device("cpu"), "gloo")
    with pytest.raises(EngineError, match="backend=nccl needs GPUs"):
        choose_device(env, "nccl")


def test_cpu_threads_are_shared_between_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    env = detect_launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        threads = set_cpu_threads(env, torch.device("cpu"))
        assert threads == max(1, len(os.sched_getaffinity(0)) // 2) == int(os.environ["OMP_NUM_THREADS"])
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
        assert set_cpu_threads(env, torch.device("cpu")) == 3
    finally:
        torch.set_num_threads(before)


# -- the skip gate (one process: the all-reduce is the identity) --------------------------------


def _optimizer_with_grads(grads: list[list[float]]) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return torch.optim.SGD(params, lr=1.0)


@pytest.mark.parametrize("replicated", [False, True])
def test_gate_accepts_and_clips_with_the_unclipped_norm(replicated: bool) -> None:
    gate = StepGate(clip=1.0, skip_above=0.0, device=torch.device("cpu"), replicated=replicated)
    opt = _optimizer_with_grads([[3.0, 0.0], [4.0]])
    gate.arm(loss_is_finite=True)
    assert gate(opt) is True
    assert gate.decision.grad_norm == pytest.approx(5.0)
    clipped = torch.cat([p.grad for p in opt.param_groups[0]["params"]])
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "grads, finite, skip_above, reason",
    [
        ([[1.0]], False, 0.0, "non-finite loss on 1 rank(s)"),
        ([[float("inf")]], True, 0.0, "non-finite gradient norm"),
        ([[float("nan")]], True, 0.0, "non-finite gradient norm"),
        ([[30.0, 40.0]], True, 10.0, "gradient norm 50 > train.skip_grad_norm=10"),
    ],
)
@pytest.mark.parametrize("replicated", [False, True])
def test_gate_skips(grads: list[list[float]], finite: bool, skip_above: float, reason: str, replicated: bool) -> None:
    gate = StepGate(clip=0.0, skip_above=skip_above, device=torch.device("cpu"), replicated=replicated)
    opt = _optimizer_with_grads(grads)
    gate.arm(loss_is_finite=finite)
    assert gate(opt) is False
    assert gate.decision.reason == reason


@pytest.mark.parametrize("replicated", [False, True])
def test_gate_returns_its_flags_with_the_decision(replicated: bool) -> None:
    """Without a process group the flags come back as they went in, on accepted and skipped steps alike."""
    gate = StepGate(clip=0.0, skip_above=0.0, device=torch.device("cpu"), replicated=replicated)
    gate.arm(loss_is_finite=True, flags=(False, True))
    assert gate(_optimizer_with_grads([[1.0]])) is True and gate.decision.flags == (False, True)
    gate.arm(loss_is_finite=False, flags=(True, False))
    assert gate(_optimizer_with_grads([[1.0]])) is False and gate.decision.flags == (True, False)
    gate.arm(loss_is_finite=True)
    assert gate(_optimizer_with_grads([[1.0]])) is True and gate.decision.flags == ()


def test_gate_takes_the_loss_verdict_as_a_device_tensor() -> None:
    """The trainer leaves its finiteness verdict on the device; the gate's all-reduce carries it."""
    gate = StepGate(clip=0.0, skip_above=0.0, device=torch.device("cpu"), replicated=False)
    gate.arm(torch.isfinite(torch.tensor(float("nan"))))
    assert gate(_optimizer_with_grads([[1.0]])) is False
    assert gate.decision.reason == "non-finite loss on 1 rank(s)"
    gate.arm(torch.isfinite(torch.tensor(1.0)))
    assert gate(_optimizer_with_grads([[1.0]])) is True


def test_gate_refuses_a_step_without_the_verdicts() -> None:
    """A step nobody armed has no loss verdict to decide on: a clear error, not a silent accept."""
    gate = StepGate(clip=0.0, skip_above=0.0, device=torch.device("cpu"), replicated=True)
    with pytest.raises(RuntimeError, match="without StepGate.arm"):
        gate(_optimizer_with_grads([[1.0]]))
    gate.arm(loss_is_finite=True)
    assert gate.armed and gate(_optimizer_with_grads([[1.0]])) is True and not gate.armed


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_torch_optimizer_runs_fused_and_matches_a_float64_reference(name: str) -> None:
    """The fused kernel is chosen on the CPU and makes the same updates as the per-tensor loop in float64."""
    from vae_train.engine import build_optimizer

    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1)
    start = [torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.randn(7)]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    reference = [torch.nn.Parameter(t.double()) for t in start]
    opt = build_optimizer(params, cfg)
    ref_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref = ref_cls(reference, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    assert opt.defaults["fused"] is True
    grads = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, r in zip(params, reference):
            g = torch.randn(p.shape, generator=grads)
            p.grad, r.grad = g.clone(), g.double()
        opt.step()
        ref.step()
    for p, r, s in zip(params, reference, start):
        assert not torch.equal(p.detach(), s)
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=0, atol=1e-6)


def test_gated_optimizer_does_not_move_on_a_skip() -> None:
    from vae_train.engine import build_optimizer

    param = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([param], Config().optimizer)
    gate = StepGate(clip=0.0, skip_above=0.0, device=torch.device("cpu"), replicated=False)
    opt.step_gate = gate
    param.grad = torch.full((3,), float("nan"))
    gate.arm(loss_is_finite=True)
    opt.step()
    assert torch.equal(param.detach(), torch.ones(3)) and not opt.state  # weights and Adam state untouched
    param.grad = torch.ones(3)
    gate.arm(loss_is_finite=True)
    opt.step()
    assert not torch.equal(param.detach(), torch.ones(3))


# -- bad input end to end: our message, exit 2, no hang --------------------------------------------


def _run(cmd: list[str], env_extra: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return run(cmd, env=clean_env(**env_extra), timeout_s=timeout)


def test_half_set_environment_fails_fast_in_a_real_process(tmp_path: Path) -> None:
    result = _run([PYTHON, "train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}"], {"RANK": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "launcher environment is half set" in result.stderr and "Traceback" not in result.stderr


def test_fp16_on_cpu_fails_fast_in_a_real_process(tmp_path: Path) -> None:
    result = _run([PYTHON, "train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}",
                   "distributed.precision=fp16"], {})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fp16 needs a GPU" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_global_batch_not_dividing_stops_both_torchrun_ranks(tmp_path: Path) -> None:
    result = _run(torchrun("train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}",
                           "train.global_batch_size=15"), {})
    assert result.returncode != 0
    assert result.stderr.count("global_batch_size=15 does not divide") == 2, result.stderr[-3000:]
    assert "vae_train/engine.py" not in result.stderr  # torchrun reports the failure; the ranks print no traceback


@pytest.mark.slow
def test_gradient_accumulation_matches_one_bigger_micro_batch() -> None:
    """2 ranks, ZeRO-2: 2 micro-batches of 2 per step give the gradients of 1 micro-batch of 4."""
    result = _run(torchrun("tests/unit/engine_accum_worker.py", "2"), {})
    assert result.returncode == 0, result.stderr[-3000:]
    norms = json.loads(result.stdout.strip().splitlines()[-1])
    assert norms["2"] == pytest.approx(norms["1"], rel=1e-5)
    assert len(set(norms["1"])) == 3  # three different steps really happened
    # the per-rank flags rode the step's all-reduce: rank 0 saw rank 1's, in that step only
    assert norms["flags"] == [[False, False], [True, False], [False, False]] * 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_all_reduce_per_step_and_the_gate_still_skips_in_bf16(stage: int) -> None:
    """2 ranks, bf16, stepped as the trainer steps. ZeRO-1/2: ``Engine.step`` makes one all-reduce (the
    gate's norm and verdicts; DeepSpeed's norm and overflow check were two more). ZeRO-0: none at all in
    the step (every rank holds the same reduced gradient); the verdicts' all-reduce is started by
    ``Engine.arm``, before the backward. Either way a NaN loss on rank 1 skips that step on both ranks,
    and rank 1's flag reaches rank 0 in that step only."""
    result = _run(torchrun("tests/unit/engine_collectives_worker.py", str(stage)), {})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["arm_all_reduces"] == ([1, 1, 1] if stage == 0 else [0, 0, 0])
    assert out["step_all_reduces"] == ([0, 0, 0] if stage == 0 else [1, 1, 1])
    applied, skipped, applied_again = out["reasons"]
    assert applied == "" and applied_again == ""
    # ZeRO-0 bf16: DeepSpeed's own overflow check sees the NaN gradient first (on every rank alike)
    assert skipped == ("non-finite gradients (DeepSpeed's overflow check)" if stage == 0
                       else "non-finite loss on 1 rank(s)")
    assert out["flags"] == [False, True, False]
    assert out["weights_equal"] == [False, True, False]  # the skipped step left the weights as they were
    assert out["finite"]


@pytest.mark.parametrize(
    "name, stage, processes, machines",
    [("accelerate_cpu.yaml", None, 2, 1), ("accelerate_1gpu.yaml", 0, 1, 1), ("accelerate_zero2.yaml", 2, 8, 1),
     ("accelerate_zero3.yaml", 3, 8, 1), ("accelerate_multinode.yaml", 2, 16, 2)],
)
def test_shipped_accelerate_configs_load(name: str, stage: int | None, processes: int, machines: int) -> None:
    """Each file is read by accelerate's own loader as a DeepSpeed launch (never use_cpu: it runs ONE process)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch" / name))
    assert cfg.distributed_type == "DEEPSPEED" and not cfg.use_cpu
    assert cfg.deepspeed_config.get("zero_stage") == stage  # None: the experiment config's distributed.zero_stage
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)
