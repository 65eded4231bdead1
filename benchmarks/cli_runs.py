"""Running `vae-train` commands from the benchmarks that drive the product through its CLI.

Each command runs as ``python -m vae_train ...`` on the CPU with its output appended to one
log file per benchmark, so a table stays readable and a failure shows the log's tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(args: tuple[str, ...], ranks: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``vae-train ARGS`` (CPU DeepSpeed, one OpenMP thread unless set),
    under ``torchrun --standalone --nproc_per_node RANKS`` when ``ranks > 1``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "vae_train", *args], env


def failed(args: tuple[str, ...], status: int, log: Path) -> SystemExit:
    """The error that ends a benchmark when ``vae-train ARGS`` failed: the status and the log's last lines."""
    tail = log.read_text().splitlines()[-20:]
    return SystemExit(f"vae-train {args[0]} failed (status {status}); last lines of {log}:\n" + "\n".join(tail))


def vae_train(*args: str, log: Path, ranks: int = 1) -> float:
    """Run ``vae-train ARGS`` on ``ranks`` processes (output appended to ``log``); returns its wall time in seconds."""
    cmd, env = command(args, ranks)
    started = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ vae-train {' '.join(args)}\n")
        f.flush()
        status = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise failed(args, status, log)
    return time.perf_counter() - started


def fashion_mnist_work_dir(work_dir: str | None, prefix: str) -> tuple[Path, Path, Path]:
    """``(work dir, command log, Fashion-MNIST shards)``; the shards are made once and kept in the work dir."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    print(f"work dir {work} (command output in {log})", flush=True)
    shards = work / "fashion-shards"
    if not (shards / "index.json").is_file():
        vae_train("prepare", "fashion-mnist", "--out", str(shards), "--workers", "2", "--no-progress", log=log)
    return work, log, shards


def fashion_mnist_subset(data: str, tmp: str, limit: int = 12_000) -> str:
    """``data`` when given, else a ``limit``-image Fashion-MNIST shard set prepared under ``tmp``
    (the CPU-cost benchmarks' default data: enough shards for 2 ranks, quick to make)."""
    if data:
        return data
    out = str(Path(tmp, "shards"))
    subprocess.run([sys.executable, "-m", "vae_train", "prepare", "fashion-mnist", "--out", out, "--limit", str(limit),
                    "--no-progress"], cwd=Path(__file__).resolve().parents[1], check=True, stdout=subprocess.DEVNULL)
    return out
