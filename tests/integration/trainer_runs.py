"""Starting the real trainer from fault tests: ``torchrun tests/integration/fault_train.py`` (= ``train.py``).

One tiny configuration (``configs/tiny.yaml``, fp32, real Fashion-MNIST shards,
the fused op required) so that runs with and without faults are comparable bit
for bit; the helpers also reap every process of a job, including a rank orphaned
when a fault SIGKILLed its launcher.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.launching import clean_env, kill_group, kill_matching, start, torchrun
from vae_train.export import consolidated_state_dict

SCRIPT = "tests/integration/fault_train.py"


@dataclass(frozen=True)
class ReferenceRun:
    """The uninterrupted run that fault and resume runs are compared with, bit for bit (same steps, same saves)."""

    steps: int = 20
    every: int = 5
    keep_last: int = 10  # every save of the run stays committed (20 / 5 = 4 of them)

    def overrides(self, stage: int) -> tuple[str, ...]:
        return (f"train.max_steps={self.steps}", f"checkpoint.every_steps={self.every}",
                f"checkpoint.keep_last={self.keep_last}", f"distributed.zero_stage={stage}", "resume=auto")


@dataclass(frozen=True)
class Reference:
    """A finished reference run: its final merged weights and the bucket its checkpoints went to (prefix ``run``)."""

    weights: dict[str, torch.Tensor]
    bucket: str


REFERENCE = ReferenceRun()


def start_train(shards: Path, run_dir: Path, *overrides: str, nproc: int = 2, env: dict[str, str] | None = None,
                faults: dict[str, Any] | None = None) -> subprocess.Popen:
    """A ``torchrun`` job of the real trainer on ``shards`` (``overrides`` are config ``key=value``)."""
    cmd = torchrun(SCRIPT, "--config", "configs/tiny.yaml", f"data.train={shards}", f"data.val={shards}",
                   f"run_dir={run_dir}", "distributed.precision=fp32", "logging.image_every=0",
                   "logging.histogram_every=0", *overrides, nproc=nproc)
    extra = dict(env or {}, VAE_TRAIN_REQUIRE_FUSED="1")
    if faults is not None:
        extra["VAE_TEST_FAULTS"] = json.dumps(faults)
    return start(cmd, env=clean_env(**extra))


def reap(proc: subprocess.Popen, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Wait for the launcher, then SIGKILL whatever is left of the job, and return the output.

    A fault that SIGKILLs the launcher can orphan a rank (torchrun starts each rank
    in its own session) that still holds the output pipe: every process whose
    command line names this job's run dir is killed.
    """
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    timed_out = proc.poll() is None
    kill_group(proc)
    run_dir = next((arg for arg in proc.args if str(arg).startswith("run_dir=")), None)
    if run_dir is not None:
        kill_matching(str(run_dir))
    out, _ = proc.communicate(timeout=60)
    if timed_out:
        raise AssertionError(f"job did not end within {timeout_s}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def ok(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    """The output of a job that must end cleanly."""
    result = reap(proc, timeout_s)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def killed(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    """The output of a job whose launcher must have been SIGKILLed by its fault."""
    result = reap(proc, timeout_s)
    assert result.returncode == -signal.SIGKILL, f"expected SIGKILL, got {result.returncode}:\n{result.stdout[-4000:]}"
    return result.stdout


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    """Wait until ``path`` exists; fail with the job's output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"job ended before {path.name} appeared:\n{reap(proc).stdout[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared:\n{reap(proc, 1).stdout[-4000:]}")
        time.sleep(0.05)


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The merged fp32 weights of a committed checkpoint (ZeRO partitions consolidated)."""
    state, _ = consolidated_state_dict(checkpoint_dir)
    return state


def assert_same_tensors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(want) == sorted(got), f"{what}: different keys"
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"{what} differ in {len(different)} tensors, e.g. {different[:5]}"


def has_object(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError:
        return False
