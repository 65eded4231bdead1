"""``vae-train encode`` throughput against a bare ``model.encode`` loop over the same images.

Run::

    OMP_NUM_THREADS=1 python benchmarks/encode_throughput.py [--work-dir DIR] [--repeats 3] [--device cpu]

For each model below, side by side in one run (alternating, best of ``--repeats``):

* **bare**: the images of the Fashion-MNIST ``val`` split (6,000), decoded beforehand into
  one tensor already on the device, then ``model.encode`` in batches of ``--batch-size``
  under ``torch.no_grad()``: the model's own speed, with no data loading and no output.
* **encode**: :func:`vae_train.encode.encode`, the library call ``vae-train encode`` makes
  (in this process, so interpreter start-up and imports are not counted), from the shards
  on disk to latent shards with index.json: read, decode (``data.num_workers`` DataLoader
  workers), encode, serialize, write, hash; ``--latents mean_logvar``, fp32.

The ratio is encode throughput / bare throughput; the goal is at least 0.9. On a shared
2-core machine the loader workers and the writer thread compete with the model for the same
cores, so the small model is the hard case; the ratio, not the absolute numbers, matters.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli_runs import fashion_mnist_work_dir  # noqa: E402

MODELS = {
    "configs/tiny.yaml model (8 ch)": dict(base_channels=8, channel_mult=[1, 2], latent_channels=4, norm_groups=4),
    "default ConvVAE (32 ch)": {},
}


def _images(shards: Path, model, device: torch.device, batch_size: int) -> torch.Tensor:
    from vae_train.config import DataConfig
    from vae_train.data import build_val_stream

    data = DataConfig(val=f"{shards}#val", num_workers=0, binarize="none")
    stream = build_val_stream(data, image_size=model.config.image_size, channels=model.config.in_channels,
                              value_range=model.likelihood.value_range, batch_size=batch_size, rank=0,
                              world_size=1, s3_cfg=None)
    return torch.cat([b["image"][b["mask"]] for b in stream]).to(device)


@torch.no_grad()
def _bare(model, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        mu, logvar = model.encode(images[start:start + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _encode(model, shards: Path, out: Path, batch_size: int, workers: int) -> tuple[float, int]:
    from vae_train.config import DataConfig
    from vae_train.encode import EncodeOptions, encode

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = encode(model, checkpoint="benchmark", data=f"{shards}#val", out=str(out), options=EncodeOptions(),
                     data_cfg=DataConfig(num_workers=workers, binarize="none"), batch_size=batch_size)
    return time.perf_counter() - started, summary["samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=None, help="keep the shards here between runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers of the encode run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from vae_train.config import ModelConfig
    from vae_train.model import ConvVAE

    work, _, shards = fashion_mnist_work_dir(args.work_dir, "vae-train-encode-bench-")
    device = torch.device(args.device)
    rows = []
    for name, overrides in MODELS.items():
        torch.manual_seed(0)
        model = ConvVAE(ModelConfig(**overrides)).to(device).eval()
        images = _images(shards, model, device, args.batch_size)
        _bare(model, images[: args.batch_size], args.batch_size, device)  # warm-up
        bare, enc = [], []
        for _ in range(args.repeats):
            bare.append(_bare(model, images, args.batch_size, device))
            seconds, samples = _encode(model, shards, work / "latents", args.batch_size, args.workers)
            assert samples == len(images), (samples, len(images))
            enc.append(seconds)
        bare_ips, enc_ips = len(images) / min(bare), len(images) / min(enc)
        rows.append((name, len(images), bare_ips, enc_ips, enc_ips / bare_ips))
        print(f"  {name}: bare {[round(t, 2) for t in bare]} s, encode {[round(t, 2) for t in enc]} s", flush=True)
    print(f"\ndevice {device}, batch {args.batch_size}, data.num_workers {args.workers}, torch threads "
          f"{torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'model':34s} {'images':>7s} {'bare img/s':>11s} {'encode img/s':>13s} {'ratio':>6s} {'goal':>6s}")
    for name, n, bare_ips, enc_ips, ratio in rows:
        print(f"{name:34s} {n:7d} {bare_ips:11.0f} {enc_ips:13.0f} {ratio:6.2f} {'>=0.9':>6s}"
              f"{'' if ratio >= 0.9 else '  (below goal)'}")


if __name__ == "__main__":
    main()
