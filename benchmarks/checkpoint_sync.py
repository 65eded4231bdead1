"""Checkpoint sync cost: step time during a background upload, upload throughput, resume time.

Run::

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_sync.py [--base-channels 64] [--steps 30]

What it measures, side by side in one run, against a SeaweedFS S3 server on
127.0.0.1 (started here, like the tests do) and one DeepSpeed rank (ZeRO-2, fp32,
gloo, CPU) training a ConvVAE on random 16x16 RGB batches of 8 (small steps, so an upload spans many):

1. Mean training-step time while a checkpoint uploads in the background
   (CheckpointManager's uploader thread) against the mean step time with no upload
   in flight, same process, same model. Goal: under 5% slower. The blocking part
   of a save (DeepSpeed's local write + hashing) is reported separately.
2. Upload throughput of the checkpoint's files through our uploader path
   (transfer manager, SHA-256 metadata, verify-after-upload, manifest commit)
   against plain ``boto3 upload_file`` of the same files to the same server.
   Goal: at least 0.9x.
3. Resume from S3 into an empty directory (parallel verified download + load)
   against plain ``boto3 download_file`` of the same files plus the same local load.

Caveat: on a 2-core machine the S3 server, the upload thread and the training step
share the same two cores, so (1) measures CPU contention as much as overlap; on a
real node the server is elsewhere and the uploader is I/O-bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _init_single_rank() -> None:
    from vae_train.distributed import free_port

    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _engine(cfg):
    import deepspeed
    import torch

    from vae_train.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return engine, sum(p.numel() for p in model.parameters())


def _step(engine) -> float:
    import torch

    from vae_train.model import vae_loss

    x = torch.rand(8, 3, 16, 16) * 2 - 1
    start = time.perf_counter()
    loss = vae_loss(engine(x), beta=1.0, free_bits=0.0).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=64, help="model width (sets the checkpoint size)")
    parser.add_argument("--steps", type=int, default=10, help="baseline steps before each save")
    parser.add_argument("--repeats", type=int, default=3, help="uploads measured")
    args = parser.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig

    from tests.fixtures.s3 import S3Server
    from vae_train import checkpoint as ck
    from vae_train.checkpoint.transfer import RetentionPolicy, Uploader, UploadJob
    from vae_train.config import config_from_dict
    from vae_train.storage import S3Store

    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    server = S3Server(root / "s3")
    server.start()
    try:
        os.environ.update(server.env())
        _init_single_rank()
        cfg = config_from_dict({
            "run_dir": str(root / "run"),
            "model": {"image_size": 16, "in_channels": 3, "base_channels": args.base_channels,
                      "channel_mult": [1, 2, 2], "num_res_blocks": 2, "latent_channels": 4, "norm_groups": 8,
                      "likelihood": "gaussian_fixed", "reparam": "reference"},
            "checkpoint": {"every_steps": 0, "keep_last": 100, "remote": f"s3://{server.bucket}/bench",
                           "max_pending_uploads": 4},
            "distributed": {"zero_stage": 2},
        })
        engine, params = _engine(cfg)
        manager = ck.CheckpointManager(cfg, rank=0, world_size=1, local_rank=0)
        manager.register("model", ck.DeepSpeedState(engine))
        for _ in range(3):
            _step(engine)  # warm-up

        # 1. step time with and without an upload in flight, interleaved (the machine's load drifts)
        baseline, during, save_times, upload_walls, step_no = [], [], [], [], 100
        for _ in range(args.repeats):
            baseline += [_step(engine) for _ in range(args.steps)]
            t0 = time.perf_counter()
            manager.save(step_no)
            save_times.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            while manager._uploader.pending():
                during.append(_step(engine))
            upload_walls.append(time.perf_counter() - t1)
            step_no += 1
        manager.wait_for_uploads(300)
        ckpt_dir = Path(cfg.run_dir) / "checkpoints" / ck.step_name(step_no - 1)
        manifest = ck.read_manifest(ckpt_dir)
        nbytes = sum(e.size for e in manifest.files.values())

        # 2. upload throughput: our path (upload + verify + commit) vs plain boto3 upload_file
        client = server.client()
        store = S3Store(server.bucket, "through", boto3.client("s3", endpoint_url=server.endpoint_url,
                                                                  region_name=server.region,
                                                                  config=client.meta.config))
        ours, plain = [], []
        for i in range(args.repeats):
            uploader = Uploader(store, 0, manager.writer, RetentionPolicy(cfg.checkpoint.keep_last,
                                cfg.checkpoint.keep_every), cfg.checkpoint.upload_deadline_s)
            t0 = time.perf_counter()
            uploader.submit(UploadJob(i, ckpt_dir, manifest.files, ck.Manifest(
                i, 1, 2, manifest.files, "", "", writer=manager.writer), time.monotonic()))
            uploader.wait_idle(600)
            ours.append(time.perf_counter() - t0)
            uploader.stop()
            t0 = time.perf_counter()
            for name in manifest.files:
                client.upload_file(str(ckpt_dir / name), server.bucket, f"plain/{i}/{name}", Config=TransferConfig())
            plain.append(time.perf_counter() - t0)

        # 3. resume from S3 into an empty dir vs plain download + the same local load
        remote_step = step_no - 1
        resume_ours, resume_plain = [], []
        for i in range(args.repeats):
            dest = root / f"resume{i}" / ck.step_name(remote_step)
            t0 = time.perf_counter()
            ck.download_checkpoint(manager.store, remote_step, dest)
            with ck.restricted_torch_load():
                engine.load_checkpoint(str(dest.parent), tag=dest.name)
            resume_ours.append(time.perf_counter() - t0)
            plain_dir = root / f"plain{i}" / ck.step_name(remote_step)
            plain_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            for name in manifest.files:
                client.download_file(server.bucket, f"bench/{manifest.remote_key(name)}", str(plain_dir / name))
            engine.load_checkpoint(str(plain_dir.parent), tag=plain_dir.name)
            resume_plain.append(time.perf_counter() - t0)
        manager.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    base_ms, during_ms = med(baseline) * 1e3, med(during) * 1e3 if during else float("nan")
    mb = nbytes / 1e6
    print(f"\nConvVAE base_channels={args.base_channels}: {params / 1e6:.2f} M params, checkpoint {mb:.1f} MB "
          f"({len(manifest.files)} files), 1 rank ZeRO-2 fp32, SeaweedFS on 127.0.0.1, 2 shared CPU cores\n")
    rows = [
        ("step time, median (ms)", f"{base_ms:.1f} (no upload)", f"{during_ms:.1f} (uploading, {len(during)} steps)",
         during_ms / base_ms, "< 1.05"),
        ("upload throughput (MB/s)", f"{mb / med(plain):.0f} (boto3 upload_file)",
         f"{mb / med(ours):.0f} (ours, verify+commit)", med(plain) / med(ours), ">= 0.9"),
        ("resume from S3 (s)", f"{med(resume_plain):.2f} (download_file + load)",
         f"{med(resume_ours):.2f} (ours, verified)", med(resume_ours) / med(resume_plain), "(report)"),
    ]
    print(f"{'measure':26s} {'reference':34s} {'vae-train':38s} {'ratio':>7s}  goal")
    for name, ref, ours_s, ratio, goal in rows:
        print(f"{name:26s} {ref:34s} {ours_s:38s} {ratio:7.3f}  {goal}")
    print(f"\nblocking save (DeepSpeed write + SHA-256 + manifest): median {med(save_times):.2f}s; "
          f"background upload wall time: median {med(upload_walls):.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
