"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO 0-3, beside the ZeRO paper.

Goal: measured bytes within 5% of the formulas of Rajbhandari et al. 2020
("ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", sec. 5):
with Psi parameters and N data-parallel ranks, per rank

    parameters  P * Psi / (N if stage 3 else 1)
    gradients   G * Psi / (N if stage >= 2 else 1)
    optimizer   K * Psi / (N if stage >= 1 else 1)

The paper's mixed-precision example has P = G = 2 (fp16) and K = 12 (fp32 master
weights + Adam m and v). This benchmark trains in fp32 on CPU (what runs here), so
P = G = 4; K = 12 for stages 1-3 (DeepSpeed keeps an fp32 master partition plus m
and v) and K = 8 for stage 0 (the fp32 weights are their own master copy).

Measured inside the real engine (``vae_train.engine.setup_engine``: gated
torch AdamW, gloo), counting distinct tensor storages once: the module's
parameters (their ZeRO-3 partitions) and Adam's state plus the fp32 master
partition inside the optimizer step; gradients while accumulating (after the
first of two micro-batches: ZeRO-0/1 hold them whole, ZeRO-2/3 only their
partition).

Run: ``python benchmarks/zero_memory.py`` (launches 1, 2 and 4 ranks with torchrun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL = {"base_channels": 32, "channel_mult": [1, 2, 2], "latent_channels": 4, "num_res_blocks": 1}
RANKS = (1, 2, 4)
STAGES = (0, 1, 2, 3)


def _storage_bytes(tensors: list) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _tensors(value: Any) -> list:
    import torch

    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _gradient_tensors(engine: Any, module_params: list) -> list:
    """Every gradient buffer this rank holds now: the module's ``.grad`` and DeepSpeed's partitions.

    DeepSpeed's ZeRO optimizers keep gradient partitions in attributes named
    ``*grad*`` (``averaged_gradients``, ``grads_in_partition``, ...); reduction
    bucket scratch (``ipg``) is communication buffer, not gradient state.
    """
    found = [p.grad for p in module_params]
    zero_optimizer = engine.ds.optimizer
    if zero_optimizer is not engine.optimizer:
        for name, value in vars(zero_optimizer).items():
            if "grad" in name.lower() and "ipg" not in name.lower():
                found.extend(_tensors(value))
    found.extend(p.grad for group in engine.optimizer.param_groups for p in group["params"])
    return found


def measure(stage: int) -> dict[str, int]:
    """Two optimizer steps of two accumulated micro-batches each with ZeRO ``stage``; this rank's bytes.

    Gradients are measured after the first micro-batch's backward: the gradient
    state held between micro-batches (the step's own short-lived fp32 copies are
    not state). Parameters and optimizer state are measured inside the second step.
    """
    import torch

    from vae_train.config import config_from_dict
    from vae_train.engine import setup_engine
    from vae_train.model import build_model, vae_loss

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config_from_dict({"model": MODEL, "distributed": {"zero_stage": stage},
                            "train": {"global_batch_size": 4 * world, "grad_accum_steps": 2}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    psi = model.num_parameters()
    engine = setup_engine(cfg, model)
    module_params = list(engine.module.parameters())
    result: dict[str, int] = {"psi": psi, "largest_tensor": max(p.numel() for p in model.parameters())}
    gate = engine.gate

    def measuring_gate(optimizer: torch.optim.Optimizer) -> bool:
        inner = [p for group in optimizer.param_groups for p in group["params"]]
        local_params = [getattr(p, "ds_tensor", p) for p in module_params]
        own = {q.untyped_storage().data_ptr() for q in local_params}
        masters = [p for p in inner if p.untyped_storage().data_ptr() not in own]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        result.update(parameters=_storage_bytes(local_params), optimizer=_storage_bytes(state) + _storage_bytes(masters))
        return gate(optimizer)

    engine.optimizer.step_gate = measuring_gate
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    for step in range(2):
        for micro in range(2):
            engine.backward(vae_loss(engine.forward(x), beta=1.0, free_bits=0.0).loss)
            if micro == 0:
                result["gradients"] = _storage_bytes(_gradient_tensors(engine, module_params))
        engine.step(step, True)
    return result


def formula(stage: int, ranks: int, psi: int) -> dict[str, float]:
    k = 8 if stage == 0 else 12
    return {
        "parameters": 4 * psi / (ranks if stage == 3 else 1),
        "gradients": 4 * psi / (ranks if stage >= 2 else 1),
        "optimizer": k * psi / (ranks if stage >= 1 else 1),
    }


def worker(out_dir: str) -> None:
    """One rank: every stage in turn (a fresh engine per stage), results to out_dir/rank.json."""
    rows = {stage: measure(stage) for stage in STAGES}
    Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rows))


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    header = f"{'ZeRO':>4} {'ranks':>5} | {'params MB':>9} {'formula':>8} | {'grads MB':>8} {'mean':>6} " \
             f"{'formula':>8} | {'optim MB':>8} {'formula':>8} | {'max |ratio-1|':>13}"
    lines = [header, "-" * len(header)]
    worst, worst_key = 0.0, ""
    for ranks in RANKS:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(ranks), __file__, "--worker", out], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
        for stage in STAGES:
            measured = {key: max(rank[str(stage)][key] for rank in per_rank)
                        for key in ("parameters", "gradients", "optimizer")}
            mean_grads = sum(rank[str(stage)]["gradients"] for rank in per_rank) / ranks
            expected = formula(stage, ranks, per_rank[0][str(stage)]["psi"])
            devs = {k: abs(measured[k] / expected[k] - 1) for k in expected}
            key = max(devs, key=devs.get)
            if devs[key] > worst:
                worst, worst_key = devs[key], f"ZeRO-{stage} {key} at {ranks} ranks"
            mb = 1 / 2**20
            lines.append(f"{stage:>4} {ranks:>5} | {measured['parameters'] * mb:9.3f} {expected['parameters'] * mb:8.3f} | "
                         f"{measured['gradients'] * mb:8.3f} {mean_grads * mb:6.3f} {expected['gradients'] * mb:8.3f} | "
                         f"{measured['optimizer'] * mb:8.3f} {expected['optimizer'] * mb:8.3f} | {devs[key]:13.2%}")
    psi = per_rank[0]["0"]["psi"]
    print(f"per-rank MB (largest rank; 'mean' = mean over ranks), ConvVAE {MODEL}, Psi = {psi:,} parameters, "
          "fp32, torch AdamW")
    print("\n".join(lines))
    print(f"worst deviation: {worst:.2%} ({worst_key}); goal within 5% -> {'OK' if worst <= 0.05 else 'MISSED'}")
    biggest = per_rank[0]["0"]["largest_tensor"]
    print("ZeRO-2 while accumulating keeps whole gradients of every parameter that overlaps its partition "
          "(DeepSpeed's all_grad_tensors), so a rank holds up to one extra tensor per partition edge: "
          f"here the largest tensor has {biggest:,} of {psi:,} parameters.")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit(main())
