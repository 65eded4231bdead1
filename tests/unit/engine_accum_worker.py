"""Worker for tests/unit/test_engine.py (run under torchrun): the same global batch as 1 micro-batch or 2.

Prints one JSON line on rank 0: {"accum": [grad norms per step], ...} for accumulation 1 and 2,
and "flags": the step decisions' flags as rank 0 saw them (rank 1 alone raises the first flag in step 1).
"""

import json
import sys

import torch

from vae_train.config import config_from_dict
from vae_train.engine import setup_engine
from worker_exit import exit_after_teardown


FLAGS: list[list[bool]] = []


def run(accum: int, stage: int) -> list[float]:
    cfg = config_from_dict({"distributed": {"zero_stage": stage},
                            "train": {"global_batch_size": 8, "grad_accum_steps": accum, "grad_clip": 0},
                            "optimizer": {"warmup_steps": 0, "schedule": "constant"}})
    torch.manual_seed(0)
    engine = setup_engine(cfg, torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    data = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    rank = engine.env.rank
    mine = data[rank * 4 : (rank + 1) * 4]
    micro = 4 // accum
    norms = []
    for step in range(3):
        for m in range(accum):
            x = mine[m * micro : (m + 1) * micro]
            engine.backward(((engine.forward(x) - x.sum(1, keepdim=True)) ** 2).mean())
        decision = engine.step(step, True, flags=(rank == 1 and step == 1, False))
        norms.append(decision.grad_norm)
        FLAGS.append(list(decision.flags))
    return norms


if __name__ == "__main__":
    stage = int(sys.argv[1])
    result: dict = {accum: run(accum, stage) for accum in (1, 2)}
    result["flags"] = FLAGS
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result))
    exit_after_teardown()
