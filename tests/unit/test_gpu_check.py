"""benchmarks/gpu_check.py, the GPU check's driver: its FLOP counter, its time boxes, its report.

The full CPU dry run of every stage is tests/integration/test_gpu_check.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def test_flop_counter_counts_a_convolution_forward_and_backward():
    """2 FLOPs per multiply-add; the backward computes the input's and the weight's gradients,
    each a convolution of the forward's size."""
    batch, cin, cout, size, k = 3, 5, 7, 12, 3
    conv = torch.nn.Conv2d(cin, cout, k, padding=1, bias=False)
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    forward = 2 * batch * cout * size * size * cin * k * k
    assert gpu_check.count_flops(lambda: conv(x)) == forward
    assert gpu_check.count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    linear = torch.nn.Linear(16, 4)
    h = torch.randn(8, 16)
    assert gpu_check.count_flops(lambda: linear(h)) == 2 * 8 * 16 * 4


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _hanging_stage(pid_file: Path, result_file: Path, saved: dict) -> str:
    """A stage process that starts a child, saves ``saved`` as its result file, then hangs."""
    return (f"import json, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            f"open({str(result_file)!r}, 'w').write(json.dumps({saved!r}))\n"
            f"time.sleep(120)\n")


def test_a_stage_past_its_limit_is_killed_with_its_children_and_keeps_its_partial_results(tmp_path):
    pid_file, result_file = tmp_path / "child.pid", tmp_path / "r.json"
    hang = _hanging_stage(pid_file, result_file, {"status": "running", "result": {"fp32": {"fused_vs_eager": 4.0}}})
    start = time.perf_counter()
    with (tmp_path / "log").open("w") as log:
        report = gpu_check.run_stage([sys.executable, "-c", hang], 3.0, log, dict(os.environ), result_file)
    assert report.status == "timeout" and "3 s limit" in report.error
    assert report.result == {"fp32": {"fused_vs_eager": 4.0}}
    assert time.perf_counter() - start < 30
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's own child outlived the time box"


def test_a_stage_that_finished_but_did_not_exit_keeps_its_verdict(tmp_path):
    result_file = tmp_path / "r.json"
    hang = _hanging_stage(tmp_path / "child.pid", result_file, {"status": "ok", "result": {"images_per_s": 9.0}})
    with (tmp_path / "log").open("w") as log:
        report = gpu_check.run_stage([sys.executable, "-c", hang], 3.0, log, dict(os.environ), result_file)
    assert report.status == "ok" and report.result == {"images_per_s": 9.0}
    assert "did not exit" in report.error


def test_a_stage_that_dies_is_reported_failed_with_its_exit_status(tmp_path):
    with (tmp_path / "log").open("w") as log:
        report = gpu_check.run_stage([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30.0, log,
                                     dict(os.environ), tmp_path / "r.json")
    assert report.status == "failed" and "exited 3" in report.error
    assert "boom" in (tmp_path / "log").read_text()


STAGE_FIELDS = {"status", "seconds", "limit_s", "error", "result"}
REPORT_FIELDS = {"schema", "date", "mode", "device", "device_name", "torch", "budget_s", "wall_s", "peaks",
                 "stages", "targets"}


def test_the_report_lists_every_stage_and_target_even_when_none_ran(tmp_path):
    """A spent budget skips every stage; the JSON and the table still say so, stage by stage."""
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--budget-s", "0"])
    assert status == 1  # not everything passed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert REPORT_FIELDS <= report.keys()
    expected = {"env", "build", "op_tests", "op_bench", "train:fashion_mnist", "train:fashion_mnist:fp16",
                "train:fashion_mnist:fused_adam"}
    assert expected <= report["stages"].keys()
    for name, stage in report["stages"].items():
        assert STAGE_FIELDS <= stage.keys(), name
        assert stage["status"] == "skipped", name
    assert [t["met"] for t in report["targets"]] == [None] * len(report["targets"])
    assert {t["name"] for t in report["targets"]} >= {"KL-f8 tokenizer step MFU (256x256 bf16)",
                                                       "fused fwd+bwd vs eager (fp32)"}
    table = (tmp_path / "gpu_check.txt").read_text()
    assert all(name in table for name in expected) and "not measured" in table
