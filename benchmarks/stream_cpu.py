"""CPU time per image of each stage of the training stream, old and new paths side by side.

Issue 13: the trainer's step should reach 0.95x a bare loop of the same model, and the
data stream's work in the DataLoader workers competes with the ranks for the cores.
CPU time (``time.process_time``, and the worker processes' user+sys from psutil) is
what the stream takes from the ranks, and it is meaningful on a busy machine, unlike
wall time. Stages, each over the same shard of real Fashion-MNIST (28x28 PNG, dynamic
binarization, the default config's stream settings):

* tar reading: webdataset's ``tar_file_iterator`` + ``group_by_keys`` (what
  ``iter_shard`` used before) against ``iter_shard``'s own header parser;
* decoding: ``prepare_sample`` (PNG decode, mode, size) and ``finish_sample``
  (crop, flip, scale, binarize), the two halves of ``decode_sample``; the second one
  sample at a time against ``finish_batch`` over batches of 64 (what the stream does);
* the whole worker loop in one process, with ``data.cache_mb`` off and on (second
  pass over the same shard: what a shard drawn again costs);
* the real stream (one DataLoader worker, micro-batch 64): CPU of the worker process
  and of the consuming (training) process per image, cache off and on, long enough
  that shards are drawn again.

Run: ``OMP_NUM_THREADS=1 python benchmarks/stream_cpu.py [--data DIR] [--batches 400]``
(a 12,000-image subset is prepared in a temporary directory when --data is not given).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
BATCH = 64

from benchmarks.cli_runs import fashion_mnist_subset  # noqa: E402


def _cpu_us(fn: Callable[[], object], images: int) -> float:
    """CPU microseconds per image of ``fn()`` in this process."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) / images * 1e6


def _webdataset_read(url: str) -> list:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(url, "rb") as stream:
        return list(group_by_keys({**m, "__url__": url} for m in tar_file_iterator(stream)))


def stage_rows(data: str) -> list[tuple[str, float, float]]:
    """(stage, old us/image, new us/image) measured in this process on one shard."""
    import numpy as np

    from vae_train.config import load_config
    from vae_train.data import stream as S
    from vae_train.data.decode import finish_batch, finish_sample, prepare_sample
    from vae_train.data.tario import iter_shard

    cfg = load_config(CONFIG, [f"data.train={data}", "data.val="])
    url = S.resolve_sources(cfg.data.train, default_split="train")[0].shards[0].url
    raws = list(iter_shard(url))
    n = len(raws)
    assert [(s.pop("__key__"), s.pop("__url__"), s)[::2] for s in _webdataset_read(url)] == raws  # same samples
    spec = S.decode_spec(cfg.data, 28, 1, (0.0, 1.0), train=True)
    rng = np.random.default_rng(0)
    prepared = [prepare_sample(k, m, spec) for k, m in raws]
    keys = [k for k, _ in raws]
    rows = [
        ("tar reading", _cpu_us(lambda: _webdataset_read(url), n), _cpu_us(lambda: list(iter_shard(url)), n)),
        ("decode: prepare (PNG, mode, size)", _cpu_us(lambda: [prepare_sample(k, m, spec) for k, m in raws], n),
         float("nan")),
        ("decode: finish (scale, binarize)", _cpu_us(lambda: [finish_sample(p, k, spec, rng)
                                                              for p, (k, _) in zip(prepared, raws)], n),
         _cpu_us(lambda: [finish_batch(prepared[i:i + BATCH], keys[i:i + BATCH], spec, rng)
                          for i in range(0, n, BATCH)], n)),
    ]
    stats = {}
    for cache_mb in (0.0, 1024.0):
        plan = S.build_train_stream(cfg.data.model_copy(update={"cache_mb": cache_mb}), image_size=28, channels=1,
                                    value_range=(0.0, 1.0), micro_batch_size=BATCH, rank=0, world_size=1, seed=0,
                                    s3_cfg=None)._plan
        plan = S.dataclasses.replace(plan, sources=(S.dataclasses.replace(plan.sources[0], shards=(
            plan.sources[0].shards[0],)),))  # one shard: the second pass is a shard drawn again
        worker = S._train_worker(plan, 0, None)
        per_pass = n // BATCH
        first = _cpu_us(lambda: [next(worker) for _ in range(per_pass)], per_pass * BATCH)
        second = _cpu_us(lambda: [next(worker) for _ in range(per_pass)], per_pass * BATCH)
        stats[cache_mb] = (first, second)
    rows.append(("worker loop, first read of a shard", stats[0.0][0], stats[1024.0][0]))
    rows.append(("worker loop, shard drawn again", stats[0.0][1], stats[1024.0][1]))
    return rows


def stream_cpu(data: str, cache_mb: float, batches: int) -> tuple[float, float]:
    """(worker process, consuming process) CPU us/image of the real stream with one DataLoader worker."""
    import psutil

    from vae_train.config import load_config
    from vae_train.data import build_train_stream

    cfg = load_config(CONFIG, [f"data.train={data}", "data.val=", "data.num_workers=1", f"data.cache_mb={cache_mb}"])
    stream = build_train_stream(cfg.data, image_size=28, channels=1, value_range=(0.0, 1.0), micro_batch_size=BATCH,
                                rank=0, world_size=2, seed=0, s3_cfg=None)
    next(stream)
    workers = psutil.Process().children(recursive=True)

    def worker_cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in workers)

    main0, work0 = time.process_time(), worker_cpu()
    for _ in range(batches):
        next(stream)
    main1, work1 = time.process_time(), worker_cpu()
    stream.close()
    images = batches * BATCH
    return (work1 - work0) / images * 1e6, (main1 - main0) / images * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="shard directory (default: prepare a subset in a temp dir)")
    parser.add_argument("--batches", type=int, default=400, help="batches of 64 per real-stream measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = fashion_mnist_subset(args.data, tmp)
        rows = stage_rows(data)
        off, on = stream_cpu(data, 0.0, args.batches), stream_cpu(data, 1024.0, args.batches)
    print(f"CPU us/image (load {os.getloadavg()[0]:.1f}); 'before' = webdataset tar reading / one sample at a time / "
          "data.cache_mb=0")
    print(f"{'stage':<40} {'before':>8} {'after':>8} {'ratio':>6}")
    for name, old, new in rows:
        after = f"{new:8.1f}" if new == new else f"{'':>8}"
        ratio = f"{new / old:6.2f}" if new == new else f"{'':>6}"
        print(f"{name:<40} {old:8.1f} {after} {ratio}")
    print(f"{f'real stream, worker ({args.batches} batches)':<40} {off[0]:8.1f} {on[0]:8.1f} {on[0] / off[0]:6.2f}")
    print(f"{'real stream, training process':<40} {off[1]:8.1f} {on[1]:8.1f} {on[1] / off[1]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
