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

The ratio is encode throughput / bare throughput; the goal is at least 0.9. Two more columns
say where a gap comes from: the model's own speed inside the encode run (images / seconds
inside ``model.encode``, synchronized on a GPU) and the encode run's seconds outside the
model. With the model on a GPU the loader workers and the writer process use otherwise idle
CPU cores; with the model on the CPU they share its cores, so on a small, loaded CPU machine
the model itself runs slower inside the encode run and the ratio measures the spare cores.
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


def _encode(model, shards: Path, out: Path, batch_size: int, workers: int, device: torch.device
            ) -> tuple[float, float, int]:
    """(wall seconds, seconds inside the model's encode, samples) of one ``encode`` call."""
    import vae_train.encode as encode_module
    from vae_train.config import DataConfig

    inside = [0.0]
    posterior = encode_module.posterior

    def timed_posterior(*args, **kwargs):  # the model's share of the wall time (synchronized on a GPU)
        started = time.perf_counter()
        result = posterior(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        inside[0] += time.perf_counter() - started
        return result

    shutil.rmtree(out, ignore_errors=True)
    encode_module.posterior = timed_posterior
    try:
        started = time.perf_counter()
        summary = encode_module.encode(model, checkpoint="benchmark", data=f"{shards}#val", out=str(out),
                                       options=encode_module.EncodeOptions(),
                                       data_cfg=DataConfig(num_workers=workers, binarize="none"),
                                       batch_size=batch_size)
        wall = time.perf_counter() - started
    finally:
        encode_module.posterior = posterior
    return wall, inside[0], summary["samples"]


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
        bare, enc, inside = [], [], []
        for _ in range(args.repeats):
            bare.append(_bare(model, images, args.batch_size, device))
            seconds, model_seconds, samples = _encode(model, shards, work / "latents", args.batch_size, args.workers,
                                                      device)
            assert samples == len(images), (samples, len(images))
            enc.append(seconds)
            inside.append(model_seconds)
        best = min(range(args.repeats), key=enc.__getitem__)
        rows.append((name, len(images), len(images) / min(bare), len(images) / enc[best],
                     len(images) / inside[best], enc[best] - inside[best]))
        print(f"  {name}: bare {[round(t, 2) for t in bare]} s, encode {[round(t, 2) for t in enc]} s "
              f"(model inside encode {[round(t, 2) for t in inside]} s)", flush=True)
    print(f"\ndevice {device}, batch {args.batch_size}, data.num_workers {args.workers}, torch threads "
          f"{torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'model':32s} {'images':>6s} {'bare img/s':>10s} {'encode img/s':>12s} {'ratio':>6s} {'goal':>6s} "
          f"{'model img/s in encode':>21s} {'s not in model':>14s}")
    for name, n, bare_ips, enc_ips, inside_ips, outside in rows:
        ratio = enc_ips / bare_ips
        print(f"{name:32s} {n:6d} {bare_ips:10.0f} {enc_ips:12.0f} {ratio:6.2f} {'>=0.9':>6s} {inside_ips:21.0f} "
              f"{outside:14.2f}{'' if ratio >= 0.9 else '  (below goal)'}")
    print("model img/s in encode: images / seconds inside model.encode during the encode run; below bare img/s "
          "means the model itself ran slower beside the loader and writer processes (shared cores), "
          "s not in model: the encode run's wall time outside the model (start-up, waits, the tail)")

if __name__ == "__main__":
    main()
