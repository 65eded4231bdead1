"""vae_train.preemption: the signal flag, its all-rank agreement, worker shielding, requeue rules."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.launching import clean_env, run, torchrun
from vae_train.preemption import PreemptionHandler, requeue_if_slurm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def saved_handlers() -> Iterator[None]:
    """Put SIGTERM/SIGUSR1 back as they were (a requested handler leaves them ignored)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.timeout(30)
def test_signal_sets_flag_instead_of_killing(saved_handlers: None) -> None:
    with PreemptionHandler() as handler:
        assert not handler.requested and handler.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # still alive: only the first signal is recorded
        deadline = time.monotonic() + 5
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.requested and handler.signal_name == "SIGUSR1"
        assert handler.any_rank_requested() is True  # no process group: the local flag
    # After a request the process is shutting down: further signals stay harmless.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


@pytest.mark.timeout(30)
def test_uninstall_restores_previous_handlers_when_nothing_arrived(saved_handlers: None) -> None:
    def mine(signum, frame):  # noqa: ANN001
        pass

    signal.signal(signal.SIGUSR1, mine)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR1) != mine
    assert not handler.requested
    assert signal.getsignal(signal.SIGUSR1) is mine


_AGREE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch.distributed as dist
    from vae_train.preemption import PreemptionHandler
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with PreemptionHandler() as handler:
        seen = []
        for step in range(6):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.2)
            seen.append(handler.any_rank_requested())
    print(f"rank {rank} local={handler.requested} agreed={seen}", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.timeout(120)
def test_all_ranks_stop_at_the_same_step_when_one_rank_is_signalled(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    out = run(torchrun(str(script)), env=clean_env(PYTHONPATH=str(REPO)), timeout_s=100)
    assert out.returncode == 0, out.stderr
    expected = "agreed=[False, False, False, True, True, True]"
    assert f"rank 0 local=False {expected}" in out.stdout, out.stdout + out.stderr
    assert f"rank 1 local=True {expected}" in out.stdout, out.stdout + out.stderr


_WORKER_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from vae_train.preemption import PreemptionHandler, shield_worker_from_job_signals

    class Counting(IterableDataset):
        def __iter__(self):
            i = 0
            while True:
                time.sleep(0.01)
                yield torch.tensor(i)
                i += 1

    handler = PreemptionHandler().install()
    shield = shield_worker_from_job_signals if sys.argv[1] == "shield" else None
    batches = iter(DataLoader(Counting(), batch_size=2, num_workers=2, worker_init_fn=shield))
    next(batches), next(batches)  # in-order batches: both workers are up (init_fn done)
    workers = [str(w.pid) for w in batches._workers]
    # What SLURM does on preemption: the signal goes to every process of the step.
    subprocess.run(["kill", "-TERM", str(os.getpid()), *workers], check=True)
    subprocess.run(["kill", "-USR1", *workers], check=True)
    for _ in range(30):
        next(batches)
    print("still loading after", handler.signal_name, flush=True)
    # exit with the iterator alive: multiprocessing stops the workers with SIGTERM
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["shield", "plain"])
def test_dataloader_workers_survive_job_wide_sigterm_only_when_shielded(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "workers.py"
    script.write_text(_WORKER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=90)
    if mode == "shield":
        # survives, and still exits promptly (the parent's SIGTERM at shutdown is obeyed)
        assert out.returncode == 0, out.stderr
        assert "still loading after SIGTERM" in out.stdout
    else:
        # the failure the shield exists for: torch reports the dead worker in the trainer
        assert out.returncode != 0
        assert "exited unexpectedly" in out.stderr or "killed by signal" in out.stderr, out.stderr


def test_requeue_rules_outside_or_inside_slurm(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_if_slurm(5, 10, rank=0) is False  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    assert requeue_if_slurm(5, 10, rank=1) is False  # only global rank 0 asks
    with caplog.at_level(logging.INFO, logger="vae_train.preemption"):
        assert requeue_if_slurm(10, 10, rank=0) is False  # finished runs never requeue
    assert "reached train.max_steps=10" in caplog.text


@pytest.mark.timeout(120)
def test_requeue_of_a_job_that_forbids_it_is_a_warning_not_a_crash(slurm_cluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        PYTHONPATH={REPO} {sys.executable} -c '
        import logging; logging.basicConfig(level=logging.INFO)
        from vae_train.preemption import requeue_if_slurm
        print("requeued:", requeue_if_slurm(1, 10, rank=0))'
        """))
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch("--no-requeue", "--output", str(out), "--chdir", str(tmp_path), str(script))
    assert slurm_cluster.wait_done(job, timeout=60) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert "requeued: False" in text and "was the job submitted with --requeue?" in text, text
    assert slurm_cluster.job_info(job)["Restarts"] == "0"


@pytest.mark.timeout(120)
def test_a_cancelled_job_is_not_requeued(slurm_cluster, tmp_path: Path) -> None:
    """`scancel` sends SIGTERM too: the trainer checkpoints, but the user's cancel must stick."""
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        PYTHONPATH={REPO} exec {sys.executable} -c '
        import logging, time; logging.basicConfig(level=logging.INFO)
        from vae_train.preemption import PreemptionHandler, requeue_if_slurm
        with PreemptionHandler() as handler:
            print("ready", flush=True)
            while not handler.requested:
                time.sleep(0.05)
        print("requeued:", requeue_if_slurm(1, 10, rank=0), flush=True)'
        """))
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch("--requeue", "--output", str(out), "--chdir", str(tmp_path), str(script))
    deadline = time.monotonic() + 60
    while not (out.exists() and "ready" in out.read_text()):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.1)
    slurm_cluster.run("scancel", str(job))
    assert slurm_cluster.wait_done(job, timeout=60) == "CANCELLED"
    time.sleep(2)  # a requeue would show up here as PENDING with Restarts=1
    info = slurm_cluster.job_info(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    text = out.read_text()
    assert "requeued: False" in text and "not RUNNING" in text, text
