"""The GPU check's CPU dry run: every stage of benchmarks/gpu_check.py runs small on the CPU
and the JSON report has every field the README's GPU table is made of."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)

RESULT_FIELDS = {
    "env": {"python", "torch", "cuda", "packages", "modules_imported", "modules_failed", "device_name",
            "copy_bytes_per_s", "matmul_bf16_flops"},
    "build": {"backend", "build_dir", "cached", "build_s", "cuda_archs"},
    "op_tests": {"tests", "passed", "failures", "errors", "skipped", "cuda_cases", "failed_tests", "pytest_exit",
                 "noise_equal", "noise_max_abs_diff", "noise_max_ulps"},
    "op_bench": {"backend", "shape", "compile_backend", "fp32", "bf16"},
    "train:fashion_mnist": {"config", "precision", "zero_stage", "gradient_checkpointing", "image_size", "batch",
                            "steps_timed", "step_ms", "images_per_s", "peak_memory_gib", "flops_per_step",
                            "flops_per_image", "mfu", "peak_flops", "peak_source", "loss_first", "loss_last",
                            "skipped_steps"},
}
TOKENIZER_FIELDS = {"objective", "perceptual", "discriminator", "adaptive_weight", "ema", "ema_updates",
                    "disc_skipped_steps", "disc_zero_stage", "last_terms"}
BENCH_FIELDS = {"compile_s", "eager", "compile", "fused", "fused_vs_eager", "fused_vs_compile", "fused_bytes_per_s",
                "fused_bandwidth_fraction", "bandwidth_source"}


def test_dry_run_runs_every_stage_and_reports_every_field(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work", str(tmp_path / "w"),
           "--op-tests-k", "float32_forward or gradcheck_float64_with or noise_depends",
           # One training config keeps CI short; the others run the same stage code with their own config.
           "--stages", "env,build,op_tests,op_bench,train:fashion_mnist,train:fashion_mnist:fp16,"
                       "train:fashion_mnist:fused_adam,train:tokenizer_tiny,train:tokenizer_tiny:fp16,tokenizer_step"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=580)
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    stages = report["stages"]
    for name, fields in RESULT_FIELDS.items():
        assert stages[name]["status"] == "ok", (name, stages[name]["error"], log[-3000:])
        assert fields <= stages[name]["result"].keys(), (name, fields - stages[name]["result"].keys())
    for gpu_only in ("train:fashion_mnist:fp16", "train:fashion_mnist:fused_adam", "train:tokenizer_tiny:fp16"):
        assert stages[gpu_only]["status"] == "skipped"  # fp16 loss scaling and FusedAdam need a GPU
    assert proc.returncode == 0 and "targets:" in proc.stdout  # stages this device cannot run do not fail it

    assert stages["build"]["result"]["backend"] == "cpu-fused"
    tests = stages["op_tests"]["result"]
    assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0 and tests["cuda_cases"] == 0
    assert tests["noise_equal"] and tests["noise_max_ulps"] == 0  # the CPU kernel against the CPU normal_at
    for dtype in ("fp32", "bf16"):
        bench = stages["op_bench"]["result"][dtype]
        assert BENCH_FIELDS <= bench.keys()
        assert bench["fused_vs_eager"] > 0 and 0 < bench["fused_bandwidth_fraction"] < 10
    train = stages["train:fashion_mnist"]["result"]
    assert train["precision"] == "bf16" and train["zero_stage"] == 2 and train["steps_timed"] >= 1
    assert train["images_per_s"] > 0 and 0 < train["mfu"] < 1 and train["flops_per_step"] > 0
    assert math.isfinite(train["loss_last"]) and train["skipped_steps"] == 0
    assert train["objective"] == "elbo"
    # a tokenizer config trains the latent-diffusion objective: pixel + LPIPS + KL + PatchGAN + EMA, all on
    tok = stages["train:tokenizer_tiny"]
    assert tok["status"] == "ok", (tok["error"], log[-3000:])
    tok = tok["result"]
    assert TOKENIZER_FIELDS <= tok.keys(), TOKENIZER_FIELDS - tok.keys()
    assert tok["objective"] == "autoencoder" and tok["perceptual"] and tok["discriminator"] and tok["adaptive_weight"]
    assert tok["ema"] and tok["ema_updates"] == tok["steps_timed"] + 2  # warm-up, the counted step, the timed ones
    assert tok["skipped_steps"] == tok["disc_skipped_steps"] == 0 and tok["disc_zero_stage"] == 2
    terms = tok["last_terms"]
    assert terms["perceptual"] > 0 and terms["adaptive_weight"] > 0 and terms["logits_real"] != terms["logits_fake"]
    assert all(math.isfinite(v) for v in terms.values())
    cost = stages["tokenizer_step"]
    assert cost["status"] == "ok", (cost["error"], log[-3000:])
    assert [v["ratio"] for v in cost["result"]["variants"]][0] == 1.0 and cost["result"]["full_vs_recon"] > 0
    for name in ("env", "build", "op_tests", "op_bench", "train:fashion_mnist", "train:tokenizer_tiny", "tokenizer_step"):
        assert name in proc.stdout
    assert {t["met"] is not None for t in report["targets"] if "MFU" not in t["name"]} == {True}
