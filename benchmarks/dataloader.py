"""Data-loading speed: decoded samples/s per worker (local disk vs. S3) and the step time spent waiting.

Run::

    OMP_NUM_THREADS=1 python benchmarks/dataloader.py [--batches 20] [--steps 20] [--no-s3]

What it measures, side by side in one run:

1. Decoded samples per second of ONE DataLoader worker (``data.num_workers=1``,
   micro-batch 64, the default shuffle buffer and dynamic binarization for gray
   images) for 28x28 grayscale PNG (real Fashion-MNIST), 256x256 RGB PNG and
   256x256 RGB JPEG (synthetic smooth images), read from local shards and from a
   SeaweedFS S3 server on 127.0.0.1 (started here, like the tests do).
2. The fraction of training-step time spent waiting for data at the default
   config (``configs``' defaults: ConvVAE 28x28, batch 128, 2 workers), over real
   forward/backward/AdamW steps. Goal: under 5%.

Numbers from a shared 2-core machine are noisy; the ratios matter more than the
absolute values.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Photo-like test images: smooth colour gradients and waves plus mild noise (compress like photos)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        freq, phase = rng.uniform(1, 6, 3), rng.uniform(0, 6.3, 3)
        channels = [np.sin(freq[c] * (u + v * rng.uniform(-1, 1)) * 3.1 + phase[c]) for c in range(3)]
        img = (np.stack(channels, -1) * 0.5 + 0.5) * 255 + rng.normal(0, 4, (size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_datasets(root: Path) -> dict[str, Path]:
    """gray28-png (Fashion-MNIST subset), rgb256-png and rgb256-jpeg shard directories with index.json."""
    from PIL import Image

    from vae_train.cli import main
    from vae_train.data.prepare import write_index
    from vae_train.data.tario import ShardWriter

    out = {"gray28-png": root / "gray28", "rgb256-png": root / "rgb256png", "rgb256-jpeg": root / "rgb256jpg"}
    assert main(["prepare", "fashion-mnist", "--out", str(out["gray28-png"]), "--limit", "8000",
                 "--samples-per-shard", "1000", "--no-progress"]) == 0
    images = _smooth_images(600, 256, 0)
    np.save(root / "rgb.npy", images)
    assert main(["prepare", "arrays", str(root / "rgb.npy"), "--out", str(out["rgb256-png"]), "--val-fraction", "0",
                 "--samples-per-shard", "150", "--no-progress"]) == 0
    out["rgb256-jpeg"].mkdir()
    for k in range(4):
        with ShardWriter(out["rgb256-jpeg"] / f"train-{k:06d}.tar") as writer:
            for i in range(k * 150, (k + 1) * 150):
                buffer = io.BytesIO()
                Image.fromarray(images[i]).save(buffer, format="JPEG", quality=90)
                writer.add(f"{i:06d}", {"jpg": buffer.getvalue()})
            writer.commit()
    write_index(str(out["rgb256-jpeg"]))
    return out


def upload(datasets: dict[str, Path], server) -> dict[str, str]:
    """Copy every dataset directory to the S3 server; returns s3:// prefixes."""
    from vae_train.storage import open_store

    bucket = server.new_bucket()
    uris = {}
    for name, directory in datasets.items():
        uri = f"s3://{bucket}/{name}"
        store = open_store(uri)
        for path in directory.iterdir():
            if path.is_file():
                store.put_file(path, path.name)
        uris[name] = uri
    return uris


def samples_per_second(source: str, name: str, batches: int) -> float:
    """Throughput of one worker: time ``batches`` micro-batches of 64 after a warm-up."""
    from vae_train.config import DataConfig, S3Config
    from vae_train.data import build_train_stream

    gray = name.startswith("gray")
    data = DataConfig(train=source, num_workers=1, binarize="dynamic" if gray else "none")
    stream = build_train_stream(data, image_size=28 if gray else 256, channels=1 if gray else 3,
                                value_range=(0.0, 1.0) if gray else (-1.0, 1.0), micro_batch_size=64,
                                rank=0, world_size=1, seed=0, s3_cfg=S3Config())
    for _ in range(3):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * 64 / (time.perf_counter() - start)
    stream.close()
    return rate


def wait_fraction(source: str, steps: int) -> tuple[float, float]:
    """(fraction of step time blocked on data, mean step seconds) for real VAE steps at the default config."""
    import torch

    from vae_train.config import Config
    from vae_train.data import build_train_stream
    from vae_train.model import build_model, likelihood_value_range, vae_loss

    cfg = Config()
    cfg.data.train = source
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    stream = build_train_stream(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.in_channels,
                                value_range=likelihood_value_range(cfg.model.likelihood),
                                micro_batch_size=cfg.train.global_batch_size, rank=0, world_size=1,
                                seed=cfg.seed, s3_cfg=cfg.s3)

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        vae_loss(model(batch["image"]), 1.0, 0.0).loss.backward()
        optimizer.step()

    for _ in range(5):
        step(next(stream))
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(stream)
        waited += time.perf_counter() - t0
        step(batch)
    total = time.perf_counter() - start
    stream.close()
    return waited / total, total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="timed micro-batches per throughput row")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps for the wait fraction")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="vae-train-bench-data-"))
    server = None
    try:
        datasets = make_datasets(root)
        remote: dict[str, str] = {}
        if not args.no_s3:
            from tests.fixtures.s3 import S3Server

            server = S3Server(root / "s3")
            server.start()
            for key, value in server.env().items():
                os.environ[key] = value
            remote = upload(datasets, server)
        print(f"\n{'images':14s} {'local img/s/worker':>19s} {'S3 img/s/worker':>16s} {'S3/local':>9s}")
        for name, directory in datasets.items():
            local = samples_per_second(str(directory), name, args.batches)
            s3 = samples_per_second(remote[name], name, args.batches) if remote else float("nan")
            print(f"{name:14s} {local:19.0f} {s3:16.0f} {s3 / local:9.2f}")
        print(f"\n{'default config (batch 128, 2 workers)':40s} {'wait fraction':>14s} {'step ms':>8s} {'goal':>6s}")
        for where, source in [("local", str(datasets["gray28-png"])), ("S3", remote.get("gray28-png"))]:
            if source is None:
                continue
            fraction, step_s = wait_fraction(source, args.steps)
            print(f"{'gray28-png from ' + where:40s} {fraction:14.1%} {step_s * 1000:8.1f} {'< 5%':>6s}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
