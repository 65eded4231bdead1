"""Worker for tests/unit/test_engine.py (run under torchrun, 2 ranks): collectives per step and the bf16 skip.

``python engine_collectives_worker.py STAGE``: bf16 at ZeRO ``STAGE``, stepped as the trainer
steps (``Engine.arm`` before the backward, then ``Engine.step``). The
``torch.distributed.all_reduce`` calls are counted in ``Engine.arm`` (asynchronous ones) and
in ``Engine.step`` (blocking ones: the gate's, plus whatever DeepSpeed adds there); rank 1's
loss is NaN at step 1, where rank 1 also raises the step's one flag. Prints one JSON line on
rank 0: {"arm_all_reduces": [per step], "step_all_reduces": [per step], "reasons": [per step,
"" when applied], "flags": [per step: the decision's flag], "weights_equal": [per step:
unchanged across the step], "finite": all weights finite at the end}.
"""

import json
import sys

import torch
import torch.distributed as dist

from vae_train.config import config_from_dict
from vae_train.engine import setup_engine
from worker_exit import exit_after_teardown

CALLS: list[str] = []


def _counting(collective):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        CALLS.append("async" if kwargs.get("async_op") else "blocking")
        return collective(*args, **kwargs)
    return wrapper


if __name__ == "__main__":
    stage = int(sys.argv[1])
    cfg = config_from_dict({"distributed": {"zero_stage": stage, "precision": "bf16"},
                            "train": {"global_batch_size": 8, "grad_accum_steps": 1},
                            "optimizer": {"warmup_steps": 0, "schedule": "constant"}})
    torch.manual_seed(0)
    engine = setup_engine(cfg, torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    dist.all_reduce = _counting(dist.all_reduce)  # DeepSpeed's comm layer and the gate both call through here
    rank = engine.env.rank
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))[rank * 4:(rank + 1) * 4].to(torch.bfloat16)
    out: dict = {"arm_all_reduces": [], "step_all_reduces": [], "reasons": [], "flags": [], "weights_equal": []}
    for step in range(3):
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        loss = ((engine.forward(x).float() - 1) ** 2).mean()
        if rank == 1 and step == 1:
            loss = loss * float("nan")
        CALLS.clear()
        engine.arm(torch.isfinite(loss), flags=(rank == 1 and step == 1,))
        out["arm_all_reduces"].append(CALLS.count("async"))
        engine.backward(loss)
        CALLS.clear()
        decision = engine.step(step)
        out["step_all_reduces"].append(CALLS.count("blocking"))
        out["reasons"].append("" if decision.applied else decision.reason)
        out["flags"].append(decision.flags[0])
        out["weights_equal"].append(all(torch.equal(b, p.detach().float())
                                        for b, p in zip(before, engine.module.parameters())))
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    if rank == 0:
        print(json.dumps(out))
    exit_after_teardown()
