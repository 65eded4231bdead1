"""Images/s of the trainer against a bare DDP loop and a bare DeepSpeed loop, same model and batch, same run.

Goal (issue 13): the trainer's step at least 0.95x a bare DistributedDataParallel loop of the
same model and batch. Its overhead -- data stream, KL/LR schedules, the coordinated skip
all-reduce, DeepSpeed ZeRO, logging (scalars, histograms, image grids at the config's cadence),
progress bar -- is what the ratio measures. Also reports the data-wait fraction (time the loop
blocked on the data stream).

The bare loops are what a minimal script would do, on one fixed in-memory batch (no data
loading at all), forward / ``vae_loss`` / backward / optimizer step with torch AdamW:

* DDP: ``torch.nn.parallel.DistributedDataParallel`` over fp32 weights, the forward under
  ``torch.autocast`` in bf16 when the run is bf16 (mixed precision as torch does it);
* DeepSpeed: ``deepspeed.initialize`` with the trainer's generated DeepSpeed config (same
  ZeRO stage and precision), no gate.

The trainer is ``vae_train.trainer.train`` on real shards with the default config's model
and batch. To cancel drift on a shared machine, the bare loops run before and after the
trainer and the two are averaged.

The trainer's stream decodes each PNG on its first read and keeps the decoded shard
(``data.cache_mb``); later reads only crop, flip and binarize (~10 us per image
against ~150). Shards are drawn at random, so a rank meets its last new shard after
a thousand-odd steps of a 12,400-step job; the trainer is timed twice: over its first
``--warmup`` steps (cold: mostly first reads, decoding) and over the ``--steps`` after
them (warm: the steady state of most of a run; the README's runs use --warmup 1500). The bare
loops have nothing to warm beyond their first 10 steps.

The bare loops move by up to 20% between two measurements of one run on the 2-core machine, so
``--repeats N`` trains N times, each run between two pairs of bare loops, and reports the median ratio.

Run: ``python benchmarks/train_throughput.py [--data DIR] [--ranks 2] [--steps 200] [--warmup 600] [--repeats 1]
[overrides...]``
(shards are made in a temporary directory when --data is not given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
WARMUP_STEPS = 10

from benchmarks.cli_runs import fashion_mnist_subset  # noqa: E402


def _timed(step: Callable[[], None], steps: int, images_per_step: int) -> float:
    """Images/s of ``steps`` calls of ``step`` on every rank, after WARMUP_STEPS untimed ones."""
    import torch

    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            torch.distributed.barrier()
            start = time.perf_counter()
        step()
    torch.distributed.barrier()
    return steps * images_per_step / (time.perf_counter() - start)


def bare_deepspeed_loop(cfg, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s of forward/backward/step with plain DeepSpeed (all ranks); warm-up excluded."""
    import deepspeed
    import torch

    from vae_train.engine import build_deepspeed_config, plan_batch
    from vae_train.model import build_model, vae_loss

    plan = plan_batch(cfg.train.global_batch_size, cfg.train.grad_accum_steps, torch.distributed.get_world_size())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_deepspeed_config(cfg.distributed, plan),
                                           dist_init_required=False)
    # in the dtype DeepSpeed gave the weights (bf16/fp16 runs), as the trainer casts its batches
    x = torch.bernoulli(torch.full((plan.micro_batch_size, 1, 28, 28), 0.3)).to(next(engine.module.parameters()).dtype)

    def step() -> None:
        engine.backward(vae_loss(engine(x), beta=1.0, free_bits=0.0).loss)
        engine.step()

    return _timed(step, steps, plan.global_batch_size)


def bare_ddp_loop(cfg, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s of forward/backward/step with torch DDP and AdamW over fp32 weights (bf16 autocast in bf16 runs)."""
    import torch

    from vae_train.engine import plan_batch
    from vae_train.model import build_model, vae_loss

    plan = plan_batch(cfg.train.global_batch_size, cfg.train.grad_accum_steps, torch.distributed.get_world_size())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    x = torch.bernoulli(torch.full((plan.micro_batch_size, 1, 28, 28), 0.3))
    bf16 = cfg.distributed.precision == "bf16"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = ddp(x)
        vae_loss(out, beta=1.0, free_bits=0.0).loss.backward()
        opt.step()

    return _timed(step, steps, plan.global_batch_size)


def bare_loops(cfg, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Both bare loops' images/s, one after the other in these ranks."""
    return {"ddp": bare_ddp_loop(cfg, steps), "deepspeed": bare_deepspeed_loop(cfg, steps)}


def _images_per_s(rows: list[dict]) -> float:
    """The images/s of metric windows that each hold the same number of images: total images / total time."""
    return len(rows) / sum(1 / r["images_per_s"] for r in rows)


def worker(data: str, steps: int, warmup: int, repeats: int, out: str, overrides: list[str]) -> None:
    """Bare loop, then ``repeats`` times (trainer, bare loop), all in these ranks; rank 0 writes the result."""
    from vae_train.allocator import keep_freed_memory
    from vae_train.config import load_config
    from vae_train.distributed import init_process_group
    from vae_train.engine import resolve, resolve_auto_precision
    from vae_train.trainer import train

    def config(run_dir: Path):  # type: ignore[no-untyped-def]
        cfg = load_config(CONFIG, [f"data.train={data}", "data.val=", f"run_dir={run_dir}", "resume=none",
                                   f"train.max_steps={warmup + steps}", "checkpoint.every_steps=0",
                                   "logging.progress_bar=false", *overrides])
        return resolve_auto_precision(cfg)[0]  # what the training entry does: bare loop and trainer alike

    cfg = config(Path(out).parent / "run0")
    keep_freed_memory()  # as the CLI does for every command: both loops on the same allocator settings
    job = resolve(cfg)
    env = job.env
    init_process_group(env, job.backend, job.device, cfg.distributed.timeout_s)
    bare = [bare_loops(cfg, steps)]
    results = []
    for repeat in range(repeats):
        run_dir = Path(out).parent / f"run{repeat}"  # shared by the ranks (rank 0 writes the metrics)
        train(config(run_dir))
        bare.append(bare_loops(cfg, steps))
        if env.rank != 0:
            continue
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if r["split"] == "train"]
        cold = [r for r in train_rows if WARMUP_STEPS < r["step"] <= warmup]
        warm = [r for r in train_rows if r["step"] > warmup]
        results.append({"bare_before": bare[-2], "bare_after": bare[-1],
                        "trainer_cold": _images_per_s(cold), "trainer": _images_per_s(warm),
                        "wait_cold": sum(r["data_wait_fraction"] for r in cold) / len(cold),
                        "wait": sum(r["data_wait_fraction"] for r in warm) / len(warm)})
    if env.rank == 0:
        Path(out).write_text(json.dumps({"repeats": results, "world_size": env.world_size,
                                         "zero_stage": cfg.distributed.zero_stage,
                                         "precision": cfg.distributed.precision,
                                         "global_batch": cfg.train.global_batch_size}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="shard directory (default: prepare a subset in a temp dir)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=600,
                        help="trainer steps timed as the cold phase, while shards are read for the first time")
    parser.add_argument("--repeats", type=int, default=1,
                        help="trainer runs, each between two bare loops; the ratios' median is the result")
    parser.add_argument("overrides", nargs="*", help="config overrides for both loops, e.g. data.num_workers=0")
    args = parser.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = fashion_mnist_subset(args.data, tmp)
        out = Path(tmp, "result.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(args.ranks), __file__, "--worker", data, str(args.steps), str(args.warmup),
                        str(args.repeats), str(out), *args.overrides],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    print(f"configs/fashion_mnist.yaml{' ' + ' '.join(args.overrides) if args.overrides else ''} model, "
          f"{result['world_size']} ranks, ZeRO-{result['zero_stage']}, {result['precision']}, "
          f"global batch {result['global_batch']}; {args.repeats} trainer run(s) of {args.warmup + args.steps} steps, "
          f"each between two runs of both bare loops, {args.steps} timed steps each")
    print("images/s; bare loops before / after each trainer run; ratios: trainer / the mean of the bare DDP loop "
          "(the goal's baseline) and of the bare DeepSpeed loop")
    print(f"{'run':>3} {'DDP':>13} {'DeepSpeed':>13} | {f'trainer 11-{args.warmup}':>16} {'/DDP':>6} {'/DS':>6} "
          f"{'wait':>5} | {f'trainer {args.warmup + 1}-{args.warmup + args.steps}':>16} {'/DDP':>6} {'/DS':>6} "
          f"{'wait':>5}")
    ratios: dict[str, list[float]] = {"cold ddp": [], "warm ddp": [], "cold deepspeed": [], "warm deepspeed": []}
    for i, r in enumerate(result["repeats"], 1):
        # each baseline averaged over its runs before and after the trainer, to cancel drift
        bare = {loop: (r["bare_before"][loop] + r["bare_after"][loop]) / 2 for loop in ("ddp", "deepspeed")}
        for phase, trainer in (("cold", r["trainer_cold"]), ("warm", r["trainer"])):
            for loop in bare:
                ratios[f"{phase} {loop}"].append(trainer / bare[loop])
        pairs = {loop: f"{r['bare_before'][loop]:.0f}/{r['bare_after'][loop]:.0f}" for loop in bare}
        print(f"{i:>3} {pairs['ddp']:>13} {pairs['deepspeed']:>13} | {r['trainer_cold']:16.1f} "
              f"{ratios['cold ddp'][-1]:6.3f} {ratios['cold deepspeed'][-1]:6.3f} {r['wait_cold']:5.1%} | "
              f"{r['trainer']:16.1f} {ratios['warm ddp'][-1]:6.3f} {ratios['warm deepspeed'][-1]:6.3f} {r['wait']:5.1%}")
    median = {key: statistics.median(values) for key, values in ratios.items()}
    print(f"median trainer/bare DeepSpeed loop: cold {median['cold deepspeed']:.3f}, warm {median['warm deepspeed']:.3f}")
    print(f"median trainer/bare DDP loop: cold {median['cold ddp']:.3f}, warm {median['warm ddp']:.3f} "
          f"(goal >= 0.95 -> {'met' if median['warm ddp'] >= 0.95 else 'not met'})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 7 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7:])
    else:
        sys.exit(main())
