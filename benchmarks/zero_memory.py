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
torch AdamW, gloo) at the moment the optimizer step runs, when every buffer
exists: distinct tensor storages (counted once) of the module's parameters (their
ZeRO-3 partitions), of the gradients DeepSpeed hands the optimizer plus any still
attached to the module, and of Adam's state plus the fp32 master partition.

Run: ``python benchmarks/zero_memory.py`` (launches 1, 2 and 4 ranks with torchrun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"base_channels": 32, "channel_mult": [1, 2, 2], "latent_channels": 4, "num_res_blocks": 1}
RANKS = (1, 2, 4)
STAGES = (0, 1, 2, 3)


def _storage_bytes(tensors: list) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(stage: int) -> dict[str, int]:
    """Train two steps with ZeRO ``stage``; return this rank's bytes at the second optimizer step."""
    import torch

    from vae_train.config import config_from_dict
    from vae_train.engine import setup_engine
    from vae_train.model import ConvVAE, vae_loss

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config_from_dict({"model": MODEL, "distributed": {"zero_stage": stage},
                            "train": {"global_batch_size": 4 * world}})
    torch.manual_seed(0)
    model = ConvVAE(cfg.model)
    psi = model.num_parameters()
    engine = setup_engine(cfg, model)
    module_params = list(engine.module.parameters())
    result: dict[str, int] = {}
    gate = engine.gate

    def measuring_gate(optimizer: torch.optim.Optimizer) -> bool:
        inner = [p for group in optimizer.param_groups for p in group["params"]]
        local_params = [getattr(p, "ds_tensor", p) for p in module_params]
        grads = [p.grad for p in inner] + [p.grad for p in module_params]
        masters = [p for p in inner if p.untyped_storage().data_ptr() not in
                   {q.untyped_storage().data_ptr() for q in local_params}]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        result.update(parameters=_storage_bytes(local_params), gradients=_storage_bytes(grads),
                      optimizer=_storage_bytes(state) + _storage_bytes(masters), psi=psi)
        return gate(optimizer)

    engine.optimizer.step_gate = measuring_gate
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    for step in range(2):
        terms = vae_loss(engine.forward(x), beta=1.0, free_bits=0.0)
        engine.backward(terms.loss)
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
    header = f"{'ZeRO':>4} {'ranks':>5} | {'params MB':>9} {'formula':>8} | {'grads MB':>8} {'formula':>8} | " \
             f"{'optim MB':>8} {'formula':>8} | {'max |ratio-1|':>13}"
    lines = [header, "-" * len(header)]
    worst = 0.0
    for ranks in RANKS:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(ranks), __file__, "--worker", out], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
        for stage in STAGES:
            measured = {key: max(rank[str(stage)][key] for rank in per_rank)
                        for key in ("parameters", "gradients", "optimizer")}
            expected = formula(stage, ranks, per_rank[0][str(stage)]["psi"])
            dev = max(abs(measured[k] / expected[k] - 1) for k in expected)
            worst = max(worst, dev)
            mb = 1 / 2**20
            lines.append(f"{stage:>4} {ranks:>5} | {measured['parameters'] * mb:9.3f} {expected['parameters'] * mb:8.3f} | "
                         f"{measured['gradients'] * mb:8.3f} {expected['gradients'] * mb:8.3f} | "
                         f"{measured['optimizer'] * mb:8.3f} {expected['optimizer'] * mb:8.3f} | {dev:13.2%}")
    psi = per_rank[0]["0"]["psi"]
    print(f"per-rank bytes (largest rank), ConvVAE {MODEL}, Psi = {psi:,} parameters, fp32, torch AdamW")
    print("\n".join(lines))
    print(f"worst deviation from the formulas: {worst:.2%} (goal: within 5%) -> {'OK' if worst <= 0.05 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit(main())
