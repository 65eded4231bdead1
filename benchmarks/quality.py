"""Model quality on Fashion-MNIST: test bits/dim (ELBO and IW), PSNR, active units; one-class anomaly AUROC.

Run::

    OMP_NUM_THREADS=1 python benchmarks/quality.py [--steps 2000] [--iw-samples 1000 --iw-images 500]
        [--anomaly-steps 300] [--classes 0,1,...] [--config configs/fashion_mnist.yaml] [--work-dir DIR]

Everything goes through the user-facing commands, so the numbers are what a user
gets: ``vae-train prepare fashion-mnist`` (all 70,000 images), ``vae-train train``
with the given config for a fixed step budget, then ``vae-train eval`` on the
test split (negative ELBO over all 10,000 test images; the IWAE bound, which costs
K decoder passes per image, on the first ``--iw-images``), and ``vae-train score``.

One-class anomaly detection (the usual protocol): for each class c, train on the
training images of class c only (``vae-train prepare arrays``), score every test
image by its negative ELBO per dimension, and report the AUROC of "not class c"
against "class c"; the mean over classes is the summary number.

The printed table states the config and budget that produced it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cli_runs import fashion_mnist_work_dir, vae_train  # noqa: E402
from vae_train.data.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES, FashionMnist  # noqa: E402


def _train(config: str, shards: Path, run_dir: Path, steps: int, overrides: list[str], log: Path) -> Path:
    """Train for ``steps`` steps; returns the final checkpoint directory."""
    vae_train("train", "--config", config, f"data.train={shards}", "data.val=", f"run_dir={run_dir}",
               f"train.max_steps={steps}", f"checkpoint.every_steps={steps}", "resume=none",
               "logging.progress_bar=false", *overrides, log=log)
    return run_dir / "checkpoints" / f"step-{steps:08d}"


def quality(args: argparse.Namespace, work: Path, shards: Path, log: Path) -> dict[str, float]:
    """Train the config for the budget; ELBO over the whole test split, IW-NLL on its first images."""
    checkpoint = _train(args.config, shards, work / "main-run", args.steps, args.overrides, log)
    full, iw = work / "eval-full.json", work / "eval-iw.json"
    vae_train("eval", "--checkpoint", str(checkpoint), "--data", f"{shards}#test", "--out", str(full), log=log)
    batch = min(100, args.iw_images)
    vae_train("eval", "--checkpoint", str(checkpoint), "--data", f"{shards}#test", "--out", str(iw),
               "--iw-samples", str(args.iw_samples), "--batch-size", str(batch),
               "--max-batches", str(max(1, args.iw_images // batch)), log=log)
    return {"full": json.loads(full.read_text()), "iw": json.loads(iw.read_text())}


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
        checkpoint = _train(args.config, class_shards, work / f"class{c}-run", args.anomaly_steps, overrides, log)
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
    parser.add_argument("--steps", type=int, default=2000, help="training budget of the quality run (steps)")
    parser.add_argument("--iw-samples", type=int, default=1000, help="K of the IWAE bound")
    parser.add_argument("--iw-images", type=int, default=500, help="test images the IWAE bound is computed on")
    parser.add_argument("--anomaly-steps", type=int, default=300, help="training budget per one-class model")
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="classes of the one-class benchmark ('' = skip)")
    parser.add_argument("--anomaly-overrides", default="", help="extra overrides for the one-class runs, e.g. 'train.global_batch_size=32'")
    parser.add_argument("--anomaly-test-images", type=int, default=2000, help="test images scored per class (0 = all 10,000)")
    parser.add_argument("--work-dir", default=None, help="keep shards, runs and logs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every training run, e.g. model.base_channels=16")
    args = parser.parse_args()
    args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
    if not Path(args.config).is_file():
        raise SystemExit(f"config {args.config} not found; pass --config")

    work, log, shards = fashion_mnist_work_dir(args.work_dir, "vae-quality-")

    started = time.perf_counter()
    result = quality(args, work, shards, log)
    quality_s = time.perf_counter() - started
    started = time.perf_counter()
    aurocs = one_class(args, work, shards, log) if args.classes else {}
    anomaly_s = time.perf_counter() - started

    full, iw = result["full"], result["iw"]
    settings = " ".join(args.overrides) or "(no overrides)"
    print()
    print(f"config: {args.config} {settings}; budget: {args.steps} steps ({quality_s / 60:.1f} min incl. eval)")
    print(f"{'metric':44s} {'value':>12s}")
    print(f"{'test negative ELBO (nats/image, 10k images)':44s} {full['nelbo_nats']:12.2f}")
    print(f"{'test negative ELBO (bits/dim)':44s} {full['nelbo_bpd']:12.4f}")
    print(f"{'  reconstruction / KL (nats/image)':44s} {full['recon_nats']:6.2f} / {full['kl_nats']:5.2f}")
    iw_label = f"IW NLL, K={args.iw_samples}, first {iw['images']} images (nats)"
    print(f"{iw_label:44s} {iw['iw_nll_nats']:12.2f}")
    print(f"{'  (negative ELBO on the same images, nats)':44s} {iw['nelbo_nats']:12.2f}")
    print(f"{'IW NLL (bits/dim)':44s} {iw['iw_nll_bpd']:12.4f}")
    print(f"{'PSNR of reconstructions (dB)':44s} {full['psnr_db']:12.2f}")
    print(f"{'SSIM of reconstructions':44s} {full['ssim']:12.4f}")
    print(f"{'active units (of latent units)':44s} {full['active_units']:>6d} / {full['latent_units']}")
    print(f"{'active latent channels':44s} {full['active_channels']:>6d} / {full['latent_channels']}")
    if aurocs:
        print()
        scored = args.anomaly_test_images or 10000
        print(f"one-class anomaly detection: {args.anomaly_steps} steps per class {args.anomaly_overrides} "
              f"({anomaly_s / 60:.1f} min), score = negative ELBO bits/dim on the first {scored} test images")
        print(f"{'normal class':24s} {'AUROC':>8s}")
        for c, value in aurocs.items():
            print(f"{f'{c} {CLASS_NAMES[c]}':24s} {value:8.4f}")
        print(f"{'mean':24s} {sum(aurocs.values()) / len(aurocs):8.4f}")


if __name__ == "__main__":
    main()
