"""Launching ranks and servers from tests: free ports, a clean distributed environment, torchrun.

Every test that starts processes goes through here, so the rules live in one place:

- ``free_port()`` / ``free_ports(n)``: TCP ports on 127.0.0.1 that nothing listens on right now.
- ``clean_env(**extra)``: this process's environment without any launcher's variables
  (``RANK``, ``MASTER_*``, ``ACCELERATE_*``, ``SLURM_*`` ...), so a child never believes it
  is rank 3 of someone else's job because pytest itself runs under a launcher or in a SLURM
  allocation; CPU DeepSpeed and one OpenMP thread per process (the machine is small).
- ``torchrun(*args)``: the ``python -m torch.distributed.run`` command line for ``args``.
- ``start`` / ``finish`` / ``run``: a child in its own process group (a test may SIGKILL
  that group, ranks and launcher together, without touching pytest), and a wait with a
  timeout that kills the whole group and fails with the output's tail instead of hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vae_train.distributed import free_port, free_ports  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Variables a launcher (torchrun, deepspeed, accelerate, mpirun, srun) sets for its ranks.
# SLURM_CONF is kept: it is how the SLURM fixture points client commands at its cluster.
_LAUNCHER_PREFIXES = ("MASTER_", "TORCHELASTIC_", "ACCELERATE_", "SLURM_", "OMPI_", "PMI_", "PMIX_")
_LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "CROSS_RANK", "CROSS_SIZE",
                   "DS_ACCELERATOR_LAUNCH", "PDSH_RCMD_TYPE"}
_KEEP = {"SLURM_CONF"}


def _is_launcher_var(name: str) -> bool:
    return name not in _KEEP and (name in _LAUNCHER_NAMES or name.startswith(_LAUNCHER_PREFIXES))


def clean_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: ``os.environ``) without launcher variables, on CPU with one thread, plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not _is_launcher_var(k)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def torchrun(*args: str, nproc: int = 2, launcher_args: Sequence[str] | None = None) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` ranks running ``args`` (a script or ``-m module``).

    Without ``launcher_args`` the ranks meet at 127.0.0.1 on a free port (one node);
    multi-node tests pass their own rendezvous flags instead.
    """
    if launcher_args is None:
        launcher_args = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launcher_args, *args]


def start(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = REPO,
          merge_stderr: bool = True, stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start ``cmd`` in its own session (process group) with ``clean_env()`` unless ``env`` is given.

    ``stdout`` may be an open file (e.g. a per-node log) instead of a pipe.
    """
    return subprocess.Popen(list(cmd), cwd=cwd, env=clean_env() if env is None else env, stdout=stdout,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True)


def _processes() -> list[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process we can see, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        found.append((int(entry.name), ppid, cmdline))
    return found


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent, _ in _processes():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _sigkill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every descendant, if it still runs.

    Descendants too: torchrun starts each rank in its own session, so a
    process-group kill alone would leave the ranks running.
    """
    if proc.poll() is None:
        ranks = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _sigkill(ranks)


def kill_matching(text: str) -> int:
    """SIGKILL every process whose command line contains ``text`` (e.g. a job's unique run dir); how many.

    For ranks orphaned when a fault killed their launcher (their parent link is gone).
    """
    needle = text.encode()
    victims = [pid for pid, _, cmdline in _processes() if needle in cmdline and pid != os.getpid()]
    _sigkill(victims)
    return len(victims)


def finish(proc: subprocess.Popen, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Wait for a job started by :func:`start`; on timeout kill its whole group and fail with its output."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        tail = ((out or "") + (err or ""))[-4000:]
        raise AssertionError(f"job timed out after {timeout_s}s:\n{tail}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, timeout_s: float = 240,
        merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """:func:`start` then :func:`finish`: ``stdout`` and ``stderr`` captured (separately unless merged)."""
    return finish(start(cmd, env=env, cwd=cwd, merge_stderr=merge_stderr), timeout_s)
