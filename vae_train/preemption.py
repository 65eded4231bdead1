"""Preemption and time limits: catch the warning signal, stop at a step boundary, requeue.

Clusters take machines away with a signal, not a conversation: SLURM sends the
``--signal=USR1@N`` warning N seconds before the time limit, and SIGTERM when a
job is preempted or cancelled (followed by SIGKILL after ``KillWait``).  Dying on
that signal loses everything since the last periodic checkpoint, so the trainer
instead:

1. installs :class:`PreemptionHandler` before its loop (the handler only sets a
   flag: nothing else is safe inside a signal handler, and the loop may be in the
   middle of a collective that every rank must finish);
2. asks once per step on every rank whether any rank was signalled, so all ranks
   stop at the *same* step even when the signal reached only some of them or
   arrived between two ranks' checks. The trainer sends :attr:`requested` along
   with the optimizer step's own all-reduce (``Engine.step(..., flags=...)``);
   a loop without that engine calls :meth:`any_rank_requested` (one tiny
   all-reduce of its own);
3. when it is true, saves a checkpoint, waits for its upload to commit (with a
   deadline shorter than the grace time), and then calls
   :func:`requeue_if_slurm` so the job runs again and resumes (``resume=auto``)
   from the newest committed checkpoint;
4. returns normally (exit code 0).

``scontrol requeue`` itself sends SIGTERM to the job: the handler (which turns
into "ignore" once a signal was received) absorbs it, so the ranks finish
exiting cleanly. A plain ``scancel`` also arrives as SIGTERM: the run still
saves its checkpoint, but it is not requeued (see :func:`requeue_if_slurm`).

A rank also stops when its launcher dies. Launchers that stay the parent of
their ranks are watched (a thread looks once a second, :data:`LAUNCHER_POLL_S`):
``torchrun`` and ``accelerate launch`` (the agent process), ``deepspeed`` (the
per-node ``deepspeed.launcher.launch`` and the ``deepspeed`` runner above it)
and ``srun`` (``slurmstepd``). torchrun starts its ranks in sessions of their
own, so a SIGKILL of the launcher alone does not reach them; without the watch
they would train on as orphans beside a requeued incarnation. When the launcher
is gone the flag is set as if a signal had arrived: the ranks agree on a step,
save a final checkpoint (which :mod:`vae_train.checkpoint` refuses to write if a
newer incarnation already owns the location) and exit. A plain ``python`` run
has no launcher and is not watched.

DataLoader workers and other helper processes get the same job-wide signals;
start them with :func:`shield_worker_from_job_signals` so they do not die under
the trainer while it checkpoints.

Usage in a training loop without :class:`vae_train.engine.Engine` (the trainer folds the
question into its step, see 2.)::

    with PreemptionHandler() as preempt:
        while step < max_steps:
            ...train one step...
            if preempt.any_rank_requested():
                checkpoints.save(step, final=True)   # all ranks
                checkpoints.wait_for_uploads()
                requeue_if_slurm(step, max_steps, rank)   # acts on global rank 0 only
                break
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable

from vae_train.distributed import LaunchError, any_rank, detect_launch_env

log = logging.getLogger(__name__)

#: SIGUSR1 is the time-limit warning our sbatch script asks for; SIGTERM is preemption/cancel.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)

#: Launchers that stay alive as the parent of their ranks (``python``: no launcher; ``env``: unknown).
WATCHED_LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "slurm")
#: How often a rank looks whether its launcher is still there.
LAUNCHER_POLL_S = 1.0

_Handler = Callable[[int, FrameType | None], Any] | int | None


def _process_start(pid: int) -> str:
    """The start time of a live process (``/proc``), "" when it is gone or a zombie: pid reuse cannot fool it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (22nd field)
    return "" if fields[0] in ("Z", "X") else fields[19]


def launcher_processes() -> list[tuple[int, str]]:
    """(pid, start time) of the launcher processes whose exit ends this rank.

    The parent (torchrun's / accelerate's agent, DeepSpeed's per-node
    ``deepspeed.launcher.launch``, srun's ``slurmstepd``), and for DeepSpeed also the
    ``deepspeed`` runner above it, which the user started and may kill alone.
    Without ``/proc`` (not Linux) the watch falls back to noticing a new parent pid.
    """
    parent = os.getppid()
    watched = [(parent, _process_start(parent))]
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return [(pid, start) for pid, start in watched if start]
    if any(b"deepspeed.launcher.launch" in part for part in cmdline):
        grandparent = int(stat[stat.rindex(")") + 2:].split()[1])
        if grandparent > 1:
            watched.append((grandparent, _process_start(grandparent)))
    return [(pid, start) for pid, start in watched if start]


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop polls.

    Why a flag: the signal can arrive while this rank is inside an all-reduce or
    a DeepSpeed step; stopping there would leave the other ranks waiting forever.
    The loop checks the flag at the next step boundary instead.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS, *, watch_launcher: bool = True) -> None:
        self.signals = signals
        self.watch_launcher = watch_launcher
        self._received: signal.Signals | None = None
        self._launcher_gone: str | None = None
        self._previous: dict[signal.Signals, _Handler] = {}
        self._stop_watch = threading.Event()
        self._watch_thread: threading.Thread | None = None

    # -- installation -------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only; elsewhere Python forbids it, so we warn)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption handler not installed: not on the main thread, "
                        "so SIGTERM/SIGUSR1 will end the process without a checkpoint")
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.watch_launcher and self._watch_thread is None:
            self._start_launcher_watch()
        return self

    def _start_launcher_watch(self) -> None:
        """Poll, in a daemon thread, whether the launcher that started this rank is still alive."""
        try:
            launcher = detect_launch_env().launcher
        except LaunchError:
            return
        if launcher not in WATCHED_LAUNCHERS or self._stop_watch.is_set():
            return
        self._watch_thread = threading.Thread(target=self._watch, args=(launcher, os.getppid(), launcher_processes()),
                                              name="launcher-watch", daemon=True)
        self._watch_thread.start()

    def _watch(self, launcher: str, parent: int, watched: list[tuple[int, str]]) -> None:
        while not self._stop_watch.wait(LAUNCHER_POLL_S):
            gone = [pid for pid, started in watched if _process_start(pid) != started]
            if os.getppid() != parent or gone:
                self._launcher_gone = f"{launcher} (pid {gone[0] if gone else parent})"
                log.warning("the launcher %s exited while this rank runs: it stops at the next step boundary "
                            "after a final checkpoint, instead of training on as an orphan", self._launcher_gone)
                return

    def uninstall(self) -> None:
        """Restore whatever handlers were there before :meth:`install`.

        Once a signal has been received the signals are ignored instead: the
        process is on its way out, and a second SIGTERM (``scontrol requeue``
        sends one right after rank 0 asks for the requeue; ``scancel`` and srun
        may repeat it) must not kill it while it closes loggers and upload
        threads, or during interpreter shutdown, where Python drops its own
        handlers (``SIG_IGN`` survives that). SIGKILL still ends it.
        """
        self._stop_watch.set()
        if self.requested:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only plain assignments here: logging takes locks and is not signal-safe.
        if self._received is None:
            self._received = signal.Signals(signum)

    # -- state ----------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """True once this process received one of the signals, or its launcher exited."""
        return self._received is not None or self._launcher_gone is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received (``"SIGUSR1"``), ``"launcher exit"``, or None."""
        if self._received is not None:
            return self._received.name
        return "launcher exit" if self._launcher_gone is not None else None

    def any_rank_requested(self) -> bool:
        """Collective: True on every rank when any rank has received a signal.

        Every rank must call it at the same step (it is one all-reduce of one
        number, :func:`vae_train.distributed.any_rank`). Without a process group
        it is just :attr:`requested`.
        """
        return any_rank(self.requested)


def shield_worker_from_job_signals(worker_id: int | None = None) -> None:
    """Keep a helper process (DataLoader worker, uploader) alive through job-wide signals.

    SLURM delivers SIGTERM/SIGUSR1 to *every* process of a job step, not just the
    trainer. A DataLoader worker that dies from it makes torch raise "DataLoader
    worker exited unexpectedly" asynchronously in the trainer, in the middle of
    the preemption checkpoint. Plain ``SIG_IGN`` is no fix: multiprocessing stops
    daemonic workers at interpreter exit with SIGTERM and then joins them without
    a timeout, so an ignoring worker would hang the exit.

    So both signals are blocked and a thread reads them with ``sigwaitinfo``,
    which tells who sent them: SIGTERM from the parent (torch or multiprocessing
    shutting the worker down) exits at once with status 0, as torch's own
    handler does; anything else (SLURM, ``scancel``) is ignored, because the
    trainer got it too and shuts its workers down when it is done.

    Use it as (or call it from) ``DataLoader(worker_init_fn=...)``. It must run
    before the process starts other threads, which is the case in a fresh worker.
    """
    wanted = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    parent = os.getppid()

    def wait_for_signals() -> None:
        while True:
            info = signal.sigwaitinfo(wanted)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_signals, name="job-signal-shield", daemon=True).start()


def under_slurm() -> bool:
    """True inside a SLURM job (batch script, srun task or torchrun started by one)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def _job_state(scontrol: str, job_id: str) -> str | None:
    """The job's state as the controller sees it now (``RUNNING``, ``COMPLETING``...), or None."""
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def requeue_if_slurm(step: int, max_steps: int, rank: int) -> bool:
    """Requeue this SLURM job so it resumes later; return True when a requeue was requested.

    Call it after the preemption checkpoint has committed (on all ranks with
    their global ``rank``; it acts on rank 0 only). It does nothing outside SLURM, on other ranks, when
    the run already reached ``max_steps`` (a finished run must not start again),
    or when the job is no longer RUNNING: after a plain ``scancel`` the job is
    COMPLETING and a requeue would turn the user's cancel into a restart (SLURM
    accepts it). So the time-limit warning (``--signal=USR1@N``) and signals that
    leave the job running (``scancel --signal=USR1|TERM``) requeue; a cancel does
    not, and preemption with ``PreemptMode=REQUEUE`` is requeued by SLURM itself.
    A failed requeue is logged, not raised: the checkpoint is safe either way and
    the user can resubmit.
    """
    if not under_slurm():
        return False
    if rank != 0:
        return False
    if step >= max_steps:
        log.info("not requeueing: step %d reached train.max_steps=%d", step, max_steps)
        return False
    job_id = os.environ["SLURM_JOB_ID"]
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("cannot requeue SLURM job %s: scontrol not found on PATH; resubmit it "
                    "to resume from the last checkpoint", job_id)
        return False
    state = _job_state(scontrol, job_id)
    if state not in (None, "RUNNING"):
        # COMPLETING/CANCELLED: the user ran `scancel` (or the time limit hit, or SLURM
        # preempts with its own requeue): a requeue now would undo the user's cancel.
        log.info("not requeueing SLURM job %s: it is %s, not RUNNING (cancelled, timed out, or "
                 "requeued by SLURM itself); resubmit it to resume", job_id, state)
        return False
    try:
        out = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        log.warning("scontrol requeue %s timed out; resubmit the job to resume", job_id)
        return False
    if out.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); was the job submitted with --requeue? "
                    "Resubmit it to resume from the last checkpoint", job_id,
                    out.stderr.strip() or f"exit {out.returncode}")
        return False
    log.info("requeued SLURM job %s at step %d/%d; it resumes from the last committed "
             "checkpoint", job_id, step, max_steps)
    return True
