"""Model quality on binarized Fashion-MNIST, end to end through the CLI: the issue-13 protocol.

Run::

    python benchmarks/quality.py [--ranks 2] [--iw-samples 1000] [--iw-images 0] [--steps 0]
        [--config configs/fashion_mnist.yaml] [--work-dir DIR] [--classes 0,1,...] [overrides...]

The protocol of ``docs/DESIGN.md`` / the shared design notes (section 5): training images
dynamically binarized, the 10,000 test images binarized once with a fixed seed,
Bernoulli likelihood, nats per image. Every step is a user-facing command, so the
numbers are what a user gets:

1. ``vae-train prepare fashion-mnist`` (all 70,000 images; kept in the work dir);
2. the default job: ``vae-train train --config configs/fashion_mnist.yaml`` under
   ``torchrun --nproc_per_node 2`` (what ``launch/quickstart.sh`` trains), with the
   config's own step budget unless ``--steps`` is given;
3. ``vae-train eval --iw-samples 1000`` on the test split (all 10,000 images unless
   ``--iw-images``), on the same 2 ranks.

One table: training wall time (the train command end to end, start-up included) and
the trainer's images/s, test negative ELBO and IWAE-K NLL (nats and bits/dim), active
units, eval wall time, and the load average of the machine during each phase (the
timings are only comparable at equal load).

Optional, ``--classes``: the one-class anomaly protocol (train on the training images
of class c, score every test image by its negative ELBO, AUROC of "not class c").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cli_runs import fashion_mnist_work_dir, vae_train  # noqa: E402
from vae_train.data.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES, FashionMnist  # noqa: E402

TEST_IMAGES = 10_000


def _train(config: str, shards: Path, run_dir: Path, steps: int, overrides: list[str], log: Path,
           ranks: int = 1) -> tuple[Path, float]:
    """Train (``steps`` > 0 overrides the config's budget); returns the final checkpoint and the wall time."""
    budget = [f"train.max_steps={steps}", f"checkpoint.every_steps={steps}"] if steps else []
    wall = vae_train("train", "--config", config, f"data.train={shards}", "data.val=", f"run_dir={run_dir}",
                     "resume=none", "logging.progress_bar=false", *budget, *overrides, log=log, ranks=ranks)
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    if not checkpoints:
        raise SystemExit(f"the training run left no checkpoint in {run_dir / 'checkpoints'}; see {log}")
    return checkpoints[-1], wall


def _trainer_images_per_s(run_dir: Path) -> float:
    """The trainer's throughput over the whole run: total images / total time of its logging windows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("split") == "train" and r.get("images_per_s")]
    return len(rates) / sum(1 / r for r in rates)  # equal images per window: the harmonic mean


def quality(args: argparse.Namespace, work: Path, shards: Path, log: Path) -> dict:
    """The default job on ``args.ranks`` ranks, then one eval of the test split with the IWAE bound."""
    run_dir = work / "main-run"
    load_before = os.getloadavg()[0]
    checkpoint, train_s = _train(args.config, shards, run_dir, args.steps, args.overrides, log, args.ranks)
    load_train = os.getloadavg()[1]  # 5-minute average, mostly the training
    out = work / "eval.json"
    eval_args = ["eval", "--checkpoint", str(checkpoint), "--data", f"{shards}#test", "--out", str(out),
                 "--iw-samples", str(args.iw_samples)]
    if args.iw_images:
        per_rank = -(-args.iw_images // args.ranks)
        batch = min(256, per_rank)
        eval_args += ["--batch-size", str(batch), "--max-batches", str(-(-per_rank // batch))]
    eval_s = vae_train(*eval_args, log=log, ranks=args.ranks)
    load_eval = os.getloadavg()[1]
    return {"eval": json.loads(out.read_text()), "checkpoint": checkpoint.name, "train_s": train_s,
            "eval_s": eval_s, "images_per_s": _trainer_images_per_s(run_dir),
            "load": (load_before, load_train, load_eval)}


def one_class(args: argparse.Namespace, work: Path, shards: Path, log: Path) -> dict[int, float]:
    """AUROC per class of the one-class protocol (train on class c, score the whole test split)."""
    images, labels = FashionMnist().arrays["train"]
    results = {}
    for c in args.classes:
        npz = work / f"class{c}.npz"
        np.savez(npz, images=images[labels == c], labels=labels[labels == c].astype(np.int64))
        class_shards = work / f"class{c}-shards"
        vae_train("prepare", "arrays", str(npz), "--out", str(class_shards), "--workers", "1",
                   "--val-fraction", "0.05", "--no-progress", "--overwrite", log=log)
        overrides = args.overrides + args.anomaly_overrides.split()
        checkpoint, _ = _train(args.config, class_shards, work / f"class{c}-run", args.anomaly_steps, overrides, log)
        metrics = work / f"class{c}-score.json"
        vae_train("score", "--checkpoint", str(checkpoint), "--data", f"{shards}#test", "--normal-classes", str(c),
                   "--out", str(work / f"class{c}-scores.csv"), "--metrics-out", str(metrics),
                   "--max-images", str(args.anomaly_test_images), log=log)
        results[c] = json.loads(metrics.read_text())["auroc"]
        print(f"  class {c} ({CLASS_NAMES[c]}): AUROC {results[c]:.4f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist.yaml"), help="training config")
    parser.add_argument("--ranks", type=int, default=2, help="processes for training and eval (torchrun)")
    parser.add_argument("--steps", type=int, default=0, help="training budget in steps (0 = the config's own)")
    parser.add_argument("--iw-samples", type=int, default=1000, help="K of the IWAE bound")
    parser.add_argument("--iw-images", type=int, default=0, help="test images evaluated (0 = all 10,000)")
    parser.add_argument("--anomaly-steps", type=int, default=300, help="training budget per one-class model")
    parser.add_argument("--classes", default="", help="classes of the one-class benchmark ('' = skip), e.g. 0,1,2")
    parser.add_argument("--anomaly-overrides", default="", help="extra overrides for the one-class runs, e.g. 'train.global_batch_size=32'")
    parser.add_argument("--anomaly-test-images", type=int, default=2000, help="test images scored per class (0 = all 10,000)")
    parser.add_argument("--work-dir", default=None, help="keep shards, runs and logs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every training run, e.g. model.base_channels=16")
    args = parser.parse_args()
    args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
    if not Path(args.config).is_file():
        raise SystemExit(f"config {args.config} not found; pass --config")

    work, log, shards = fashion_mnist_work_dir(args.work_dir, "vae-quality-")
    result = quality(args, work, shards, log)
    (work / "quality.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    started = time.perf_counter()
    aurocs = one_class(args, work, shards, log) if args.classes else {}
    anomaly_s = time.perf_counter() - started

    ev = result["eval"]
    settings = " ".join(args.overrides) or "(no overrides)"
    budget = f"{args.steps} steps" if args.steps else "the config's budget"
    print()
    print(f"config: {Path(args.config).name} {settings}; {budget} (ended at {result['checkpoint']}); "
          f"{args.ranks} ranks; eval on {ev['images']} test images")
    print(f"{'metric':46s} {'value':>14s}")
    rows = [
        ("training wall time (s, train command end to end)", f"{result['train_s']:.0f}"),
        ("trainer images/s", f"{result['images_per_s']:.0f}"),
        ("test negative ELBO (nats/image)", f"{ev['nelbo_nats']:.2f}"),
        ("  reconstruction / KL (nats/image)", f"{ev['recon_nats']:.2f} / {ev['kl_nats']:.2f}"),
        (f"IWAE NLL, K={ev['iw_samples']} (nats/image)", f"{ev['iw_nll_nats']:.2f}"),
        ("bits/dim: negative ELBO / IWAE", f"{ev['nelbo_bpd']:.4f} / {ev['iw_nll_bpd']:.4f}"),
        ("active units (of latent units)", f"{ev['active_units']} / {ev['latent_units']}"),
        ("eval wall time (s, eval command end to end)", f"{result['eval_s']:.0f}"),
        ("load average: start / training / eval", "{:.1f} / {:.1f} / {:.1f}".format(*result["load"])),
    ]
    for label, value in rows:
        print(f"{label:46s} {value:>14s}")
    if aurocs:
        print()
        scored = args.anomaly_test_images or TEST_IMAGES
        print(f"one-class anomaly detection: {args.anomaly_steps} steps per class {args.anomaly_overrides} "
              f"({anomaly_s / 60:.1f} min), score = negative ELBO bits/dim on the first {scored} test images")
        print(f"{'normal class':24s} {'AUROC':>8s}")
        for c, value in aurocs.items():
            print(f"{f'{c} {CLASS_NAMES[c]}':24s} {value:8.4f}")
        print(f"{'mean':24s} {sum(aurocs.values()) / len(aurocs):8.4f}")


if __name__ == "__main__":
    main()
