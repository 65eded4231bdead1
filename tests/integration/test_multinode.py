"""Multi-node without SLURM: two ``torchrun --nnodes=2`` agents meet through c10d rendezvous.

Each agent plays one node (``--node_rank`` 0 and 1, one rank each) on this
machine; they find each other at ``127.0.0.1:PORT`` exactly as two hosts would at
the first host's address, and train a few DeepSpeed ZeRO-2 steps of the real
trainer together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launching import finish, free_port, kill_group, start, torchrun

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_two_torchrun_nodes_train_zero2_steps(fashion_shards: Path, tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    nodes = []
    for node_rank in (0, 1):
        cmd = torchrun("train.py", "--config", "configs/tiny.yaml",
                       f"run_dir={run_dir}", f"data.train={fashion_shards}", f"data.val={fashion_shards}",
                       "distributed.zero_stage=2", "train.max_steps=4", "checkpoint.every_steps=4",
                       nproc=1, launcher_args=["--nnodes=2", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                                               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=vae-multinode-test"])
        log = open(tmp_path / f"node{node_rank}.log", "w")
        nodes.append((start(cmd, stdout=log), log))
    try:
        codes = [finish(proc, timeout_s=240).returncode for proc, _ in nodes]
    finally:
        for proc, log in nodes:
            kill_group(proc)
            proc.wait()
            log.close()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text() for i in (0, 1))
    assert codes == [0, 0], logs

    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["launcher"], info["world_size"], info["zero_stage"]) == ("torchrun", 2, 2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2, 3, 4]
    # ZeRO-2 partitions the optimizer state: one shard per rank, i.e. per "node" here.
    ckpt = run_dir / "checkpoints" / "step-00000004"
    assert (ckpt / "manifest.json").exists()
    assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2, sorted(p.name for p in ckpt.iterdir())
