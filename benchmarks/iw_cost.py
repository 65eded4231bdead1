"""Cost per image of the IWAE bound: ``vae-train eval`` against the library call, same model, images and seed.

Goal (issue 13): the CLI costs at most 1.1x ``vae_train.evaluate.iw_nll`` per image, and
reports the same value. Both run single-threaded; times are CPU seconds (user + system),
which a shared machine inflates less than wall time. The command's fixed cost (start-up,
loading the checkpoint, the data stream) is measured by the same command with K=1 and
subtracted, so the ratio compares the per-image work.

Run: ``python benchmarks/iw_cost.py --checkpoint RUN/checkpoints/step-N --data SHARDS [--images 64] [--iw-samples 1000]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cli_runs import command  # noqa: E402


def _eval_cpu_s(checkpoint: str, data: str, images: int, k: int, out: Path) -> float:
    """CPU seconds (user + system) of ``vae-train eval`` with K=k on the first ``images`` images."""
    cmd, env = command(("eval", "--checkpoint", checkpoint, "--data", data, "--iw-samples", str(k),
                        "--batch-size", str(images), "--max-batches", "1", "--out", str(out), "data.num_workers=0"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint or exported model")
    parser.add_argument("--data", required=True, help="data source as the eval command takes it, e.g. SHARDS#test")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--iw-samples", type=int, default=1000)
    args = parser.parse_args()

    import torch

    import vae_train
    from vae_train.commands.evaluate import _settings, _stream, _take
    from vae_train.evaluate import auto_iw_batch_size, iw_nll

    torch.set_num_threads(1)
    stream_args = argparse.Namespace(checkpoint=args.checkpoint, data=args.data, batch_size=args.images,
                                     binarize="auto", config=None, overrides=["data.num_workers=0"])
    cfg = _settings(stream_args)
    model = vae_train.load_model(args.checkpoint).eval()
    x = _take(_stream(stream_args, cfg, model), args.images)[0]
    started = time.process_time()
    library = iw_nll(model, x, args.iw_samples, generator=torch.Generator().manual_seed(0))
    library_s = time.process_time() - started

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "eval.json")
        fixed_s = _eval_cpu_s(args.checkpoint, args.data, args.images, 1, out)
        cli_s = _eval_cpu_s(args.checkpoint, args.data, args.images, args.iw_samples, out) - fixed_s
        cli_value = json.loads(out.read_text())["iw_nll_nats"]

    n = args.images
    print(f"{n} images, K={args.iw_samples}, IWAE chunk {auto_iw_batch_size(model)} latents, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':34s} {'CPU s/image':>12s} {'ratio':>7s} {'IWAE nats':>10s}")
    print(f"{'vae_train.evaluate.iw_nll':34s} {library_s / n:12.4f} {1.0:7.3f} {float(library.mean()):10.3f}")
    print(f"{'vae-train eval (minus K=1 run)':34s} {cli_s / n:12.4f} {cli_s / library_s:7.3f} {cli_value:10.3f}")
    print(f"command fixed cost (start-up, load, stream): {fixed_s:.1f} CPU s; goal: ratio <= 1.1 -> "
          f"{'OK' if cli_s <= 1.1 * library_s else 'MISSED'}; same value: {abs(cli_value - float(library.mean())) < 1e-6 * abs(cli_value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
