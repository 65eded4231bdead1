"""Ranks notice their launcher's death (``PreemptionHandler``'s launcher watch), with real process trees:
torchrun-like (the parent), deepspeed-like (the ``deepspeed`` runner above ``deepspeed.launcher.launch``),
and a plain ``python`` run, which has no launcher and is not watched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.launching import REPO, clean_env

pytestmark = pytest.mark.timeout(120)


_RANK = textwrap.dedent("""
    import time
    from vae_train.preemption import PreemptionHandler
    with PreemptionHandler() as handler:
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        print("stopped:", handler.signal_name, flush=True)
""")
# Starts its child in a session of its own (as torchrun does), prints the child's pid, and waits.
_SPAWN = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
    print("pid", child.pid, flush=True)
    time.sleep(600)
""")
_LAUNCHERS = {
    "torchrun": ({"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "t"}, [_SPAWN, _RANK]),
    # runner -> "python -c SPAWN deepspeed.launcher.launch" -> rank: the runner alone is killed.
    "deepspeed": ({"RANK": "0", "WORLD_SIZE": "1", "CROSS_RANK": "0"},
                  [_SPAWN, _SPAWN, _RANK, "deepspeed.launcher.launch"]),
    "python": ({}, [_SPAWN, _RANK]),
}


@pytest.mark.parametrize("launcher", sorted(_LAUNCHERS))
def test_a_rank_stops_when_its_launcher_is_sigkilled(launcher: str) -> None:
    extra, argv = _LAUNCHERS[launcher]
    env = clean_env(**extra, PYTHONPATH=str(REPO))
    top = subprocess.Popen([sys.executable, "-c", *argv], env=env, stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    pids = []
    try:
        while True:  # every spawner prints its child's pid; the rank prints "ready"
            line = top.stdout.readline()
            assert line, "the process tree ended early"
            if line.startswith("pid "):
                pids.append(int(line.split()[1]))
            if line.strip() == "ready":
                break
        os.kill(top.pid, signal.SIGKILL)  # the launcher only (its children live in sessions of their own)
        top.wait()
        start = time.monotonic()
        if launcher == "python":
            time.sleep(3)  # no launcher to watch: the process goes on (nohup-style runs stay alive)
            assert Path(f"/proc/{pids[-1]}").exists()
            return
        line = top.stdout.readline()
        assert line.strip() == "stopped: launcher exit", line
        assert time.monotonic() - start < 5
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
