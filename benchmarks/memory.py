"""Peak memory and step time of one training step with and without activation checkpointing.

Goal: ``model.gradient_checkpointing`` cuts the activation memory of a training step
at 256x256 (and more at 512x512 and above), for a bounded slowdown (about one more
forward pass of the ResNet blocks: at most ~1.5x the step time). Each setting runs in
a fresh process, side by side, so the numbers are comparable:

- on CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps, minus the
  memory allocated before them (weights, gradients, Adam state), i.e. the step's
  activation peak;
- on CPU (no allocator statistics): the process's peak resident set over the measured
  steps (``VmHWM``, reset after the warm-up through ``/proc/self/clear_refs``) minus its
  resident set before them, the same quantity as far as the OS sees it.

The model is a tokenizer-sized ConvVAE (RGB, 2 ResNet blocks per level, channel_mult
[1, 2, 2, 4], f8 latents), plain PyTorch AdamW on one device: checkpointing is a
property of the module, the same under DeepSpeed (see
``tests/integration/test_gradient_checkpointing.py`` for ZeRO-3 correctness).

Run: ``python benchmarks/memory.py`` (256x256, batch 2, on the GPU when there is one);
the GPU check runs ``python benchmarks/memory.py --sizes 512 1024 --batch 4 --device cuda``.
``--channels-last`` and ``--compile`` add those settings as rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = {"in_channels": 3, "base_channels": 64, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
         "latent_channels": 4, "norm_groups": 32, "likelihood": "gaussian_fixed", "reparam": "fused"}


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0), so the warm-up does not count."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(size: int, batch: int, steps: int, device: str, settings: dict[str, bool]) -> dict[str, float]:
    """Warm-up step, then ``steps`` timed steps; the step's peak memory above what was held before it."""
    import torch

    from vae_train.config import ModelConfig
    from vae_train.model import ConvVAE, vae_loss

    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(image_size=size, **MODEL, **settings)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        vae_loss(model(x, check_range=False), beta=1e-6, free_bits=0.0).loss.backward()
        opt.step()

    step()  # warm-up: Adam state, gradient buffers, kernels (and compilation) exist from here on
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    return {"peak_bytes": float(peak - before), "step_s": seconds, "parameters": float(model.num_parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channels-last", action="store_true", help="also measure model.channels_last")
    parser.add_argument("--compile", action="store_true", help="also measure model.compile")
    args = parser.parse_args()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = [("plain", {}), ("checkpointing", {"gradient_checkpointing": True})]
    if args.channels_last:
        rows.append(("checkpointing+channels_last", {"gradient_checkpointing": True, "channels_last": True}))
    if args.compile:
        rows.append(("checkpointing+compile", {"gradient_checkpointing": True, "compile": True}))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    print(f"ConvVAE {MODEL}, batch {args.batch}, {args.steps} timed steps after one warm-up, device {device}; "
          f"peak = {'CUDA max_memory_allocated' if device.startswith('cuda') else 'peak RSS'} above the memory "
          f"held before the steps; load {os.getloadavg()[0]:.1f}")
    header = f"{'size':>6} {'setting':>28} | {'peak MiB':>9} {'ratio':>6} | {'step s':>7} {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for size in args.sizes:
        base: dict[str, float] | None = None
        for name, settings in rows:
            job = json.dumps({"size": size, "batch": args.batch, "steps": args.steps, "device": device,
                              "settings": settings})
            done = subprocess.run([sys.executable, __file__, "--worker", job], cwd=root, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{size:>6} {name:>28} | failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            base = base or row
            print(f"{size:>6} {name:>28} | {row['peak_bytes'] / 2**20:9.1f} {row['peak_bytes'] / base['peak_bytes']:6.2f} | "
                  f"{row['step_s']:7.2f} {row['step_s'] / base['step_s']:6.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        print(json.dumps(measure(job["size"], job["batch"], job["steps"], job["device"], job["settings"])))
    else:
        sys.exit(main())
