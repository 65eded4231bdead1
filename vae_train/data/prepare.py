"""``vae-train prepare``: write a dataset as WebDataset shards plus ``index.json``.

Layout of the output (a directory or ``s3://bucket/prefix``)::

    train-000000.tar ... train-NNNNNN.tar   samples: KEY.png (+ KEY.cls when labelled)
    val-000000.tar ...                      carved from the train pool with --val-fraction
    test-000000.tar ...                     Fashion-MNIST only: the t10k files
    index.json                              per-split shard names, sample counts, sha256, aspect ratios
    prepare.json                            the plan (options + fingerprint): resume/overwrite check

How shards are cut, and why:

* The train split is shuffled with ``--seed`` before sharding, so each shard is a
  random subset and the stream only needs to shuffle inside shards (which keeps
  its resumable state tiny). Validation/test keep their source order.
* Shard k of a split holds samples ``[k*S, (k+1)*S)`` of the split's order. S is
  ``--samples-per-shard``, lowered if needed so that a shard stays under
  ``--max-shard-bytes`` by a deterministic estimate (64 samples encoded up front).
  Because boundaries depend only on the plan, any subset of shards can be written
  by any process: ``--num-slices N --slice I`` (a SLURM job array) writes the
  shards i with ``i % N == I``, and ``vae-train prepare index OUT`` then writes the
  same index.json a single-process run writes. Shards are byte-identical too.
* Each shard is written to a hidden temporary name and renamed when complete
  (uploaded as one object for S3), so an interrupted run leaves no truncated shard
  under a final name. Re-running with the same options resumes (finished shards
  are kept); different options are refused unless ``--overwrite``.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vae_train.data.datasets import DatasetSource
from vae_train.data.decode import SampleRejected
from vae_train.data.errors import DataError
from vae_train.data.index import INDEX_NAME, ShardIndex, ShardRecord
from vae_train.data.tario import PARTIAL_SUFFIX, ShardWriter, scan_shard

if TYPE_CHECKING:
    from vae_train.config import S3Config

log = logging.getLogger("vae_train.data")

PLAN_NAME = "prepare.json"
SLICES_DIR = "_slices"
SHARD_NAME = re.compile(r"^([A-Za-z0-9_]+)-(\d{6})\.tar$")
_TAR_BLOCK = 512
MAX_METADATA_RATIOS = 1536
"""Longest aspect-ratio histogram (JSON bytes) stored in an S3 shard's metadata (S3 allows 2 KiB in all)."""


@dataclass(frozen=True)
class PrepareOptions:
    """The options that decide the output (anything else, e.g. workers, does not)."""

    samples_per_shard: int = 5000
    max_shard_bytes: int = 512 * 1024**2
    val_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: split, number and the (pool, index) of each sample in order."""

    split: str
    number: int
    pool: str
    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"


def split_pools(source: DatasetSource, options: PrepareOptions) -> dict[str, tuple[str, list[int]]]:
    """split -> (pool, sample indices in shard order).

    The ``train`` pool is permuted with the seed; its first ``val_fraction`` part
    (sorted back to source order) becomes ``val``, the rest, in permuted order,
    ``train``. Other pools become splits of their own name in source order.
    """
    splits: dict[str, tuple[str, list[int]]] = {}
    for pool, size in source.pools.items():
        if pool != "train":
            splits[pool] = (pool, list(range(size)))
            continue
        order = np.random.default_rng(options.seed).permutation(size)
        n_val = int(round(options.val_fraction * size))
        if options.val_fraction > 0 and size > 1:
            n_val = min(max(n_val, 1), size - 1)
        if n_val:
            splits["val"] = (pool, sorted(int(i) for i in order[:n_val]))
        splits["train"] = (pool, [int(i) for i in order[n_val:]])
    return splits


def _stored_bytes(members: dict[str, bytes]) -> int:
    """Tar bytes of one sample: a header block per member plus its data padded to 512."""
    return sum(_TAR_BLOCK + math.ceil(len(data) / _TAR_BLOCK) * _TAR_BLOCK for data in members.values())


def samples_per_shard(source: DatasetSource, splits: dict[str, tuple[str, list[int]]], options: PrepareOptions) -> int:
    """``options.samples_per_shard``, lowered so a shard fits ``max_shard_bytes`` (deterministic estimate)."""
    pool, indices = splits.get("train") or next(iter(splits.values()))
    probe = [indices[int(i)] for i in np.linspace(0, len(indices) - 1, num=min(64, len(indices)))]
    sizes = []
    for i in probe:
        try:
            sizes.append(_stored_bytes(source.encode(pool, i)[1]))
        except SampleRejected:
            continue
    if not sizes:
        return options.samples_per_shard
    per_sample = max(sizes) if len(sizes) < 8 else float(np.mean(sizes)) * 1.1
    # tar ends with two zero blocks and is padded to a 10 KiB record (tarfile.RECORDSIZE)
    room = options.max_shard_bytes - 2 * _TAR_BLOCK - tarfile.RECORDSIZE
    fit = int(room // per_sample)
    return max(1, min(options.samples_per_shard, fit))


def make_plan(source: DatasetSource, options: PrepareOptions) -> tuple[dict[str, Any], list[ShardJob]]:
    """The plan document (written as prepare.json) and every shard job in global order."""
    if not 0 <= options.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    splits = split_pools(source, options)
    per_shard = samples_per_shard(source, splits, options)
    jobs = []
    for split in sorted(splits):
        pool, indices = splits[split]
        for number, start in enumerate(range(0, len(indices), per_shard)):
            jobs.append(ShardJob(split, number, pool, tuple(indices[start:start + per_shard])))
    body = {
        "source": source.identity,
        "options": {**options.__dict__, "effective_samples_per_shard": per_shard},
        "splits": {split: {"planned_samples": len(idx), "shards": math.ceil(len(idx) / per_shard)}
                   for split, (_, idx) in sorted(splits.items())},
        "meta": {**source.meta, "seed": options.seed, "val_fraction": options.val_fraction,
                 "samples_per_shard": per_shard},
    }
    text = json.dumps(body, sort_keys=True)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], **body}, jobs


# ------------------------------------------------------------------------ output locations


class ShardOutput:
    """Where shards go: a local directory (written in place) or an S3 prefix (staged, then uploaded)."""

    def __init__(self, out: str, s3_cfg: "S3Config | None") -> None:
        from vae_train.storage import StorageError, open_store

        self.out, self.s3_cfg = out, s3_cfg
        self.remote = out.startswith("s3://")
        self.store = open_store(out, s3_cfg)
        try:
            self.store.check_access(write=True)
        except StorageError as exc:
            raise DataError(f"cannot write shards to {out}: {exc}") from None
        self.local_dir = Path(tempfile.mkdtemp(prefix="vae-train-prepare-")) if self.remote else Path(out)
        self.local_dir.mkdir(parents=True, exist_ok=True)

    def read_json(self, name: str) -> dict[str, Any] | None:
        if self.store.head(name) is None:
            return None
        return json.loads(self.store.get_bytes(name))

    def write_text(self, name: str, text: str) -> None:
        self.store.put_bytes(text.encode(), name)

    def finished(self, name: str) -> ShardRecord | None:
        """The record of an already complete shard (resume), else None."""
        if not self.remote:
            path = self.local_dir / name
            return scan_shard(path) if path.is_file() else None
        info = self.store.head(name)
        if info is None or "sha256" not in info.metadata or "num-samples" not in info.metadata:
            return None
        ratios = info.metadata.get("aspect-ratios")
        return ShardRecord(name, int(info.metadata["num-samples"]), info.size, info.metadata["sha256"],
                           json.loads(ratios) if ratios else None)

    def delete_shards(self, names: list[str]) -> None:
        self.store.delete(names)

    def existing_shards(self) -> list[str]:
        return [o.key for o in self.store.list() if "/" not in o.key and SHARD_NAME.match(o.key)]

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)


# -------------------------------------------------------------------------- the workers

_worker: dict[str, Any] = {}


def _init_worker(source: DatasetSource | None, out: str, s3_cfg: Any, local_dir: str) -> None:
    """Per-process set-up (with fork the source is inherited instead of pickled)."""
    if source is not None:
        _worker["source"] = source
    _worker.update(out=out, s3_cfg=s3_cfg, local_dir=Path(local_dir), store=None)


def _write_shard(job: ShardJob) -> tuple[ShardRecord, dict[str, int]]:
    """Encode and write one shard atomically (and upload it for S3); returns its record and skips."""
    source: DatasetSource = _worker["source"]
    path = _worker["local_dir"] / job.name
    skipped: Counter[str] = Counter()
    with ShardWriter(path) as writer:
        for i in job.indices:
            try:
                key, members = source.encode(job.pool, i)
            except SampleRejected as rej:
                log.warning("skipping %s sample %d: %s", job.pool, i, rej)
                skipped[rej.reason] += 1
                continue
            writer.add(key, members)
        record = writer.commit()
    if _worker["out"].startswith("s3://"):
        from vae_train.storage import open_store

        if _worker["store"] is None:
            _worker["store"] = open_store(_worker["out"], _worker["s3_cfg"])
        upload_shard(_worker["store"], path, record)
    return record, dict(skipped)


def upload_shard(store: Any, path: Path, record: ShardRecord) -> None:
    """Upload a committed local shard as one object whose metadata :meth:`ShardOutput.finished` reads; delete it."""
    from vae_train.storage import retry

    metadata = {"sha256": record.sha256, "num-samples": str(record.num_samples)}
    ratios = json.dumps(record.aspect_ratios, separators=(",", ":")) if record.aspect_ratios is not None else ""
    if ratios and len(ratios) <= MAX_METADATA_RATIOS:  # else a resumed prepare indexes it without (auto uses all shapes)
        metadata["aspect-ratios"] = ratios
    retry(lambda: store.put_file(path, record.name, metadata=metadata), what=f"uploading {record.name}")
    path.unlink()


def _run_jobs(source: DatasetSource, output: ShardOutput, jobs: list[ShardJob], workers: int,
              progress: bool) -> tuple[list[ShardRecord], Counter[str]]:
    from tqdm import tqdm

    records: list[ShardRecord] = []
    skipped: Counter[str] = Counter()
    bar = tqdm(total=sum(len(j.indices) for j in jobs), unit="img", desc="prepare", disable=not progress or None)
    args = (output.out, output.s3_cfg, str(output.local_dir))
    try:
        if workers <= 1:
            _init_worker(source, *args)
            results = (_write_shard(job) for job in jobs)
            for job, (record, skips) in zip(jobs, results):
                records.append(record)
                skipped.update(skips)
                bar.update(len(job.indices))
        else:
            _init_worker(source, *args)  # inherited by the forked workers
            context = multiprocessing.get_context("fork")
            with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(None, *args)) as pool:
                pending = {pool.submit(_write_shard, job): job for job in jobs}
                for done in futures.as_completed(pending):
                    record, skips = done.result()
                    records.append(record)
                    skipped.update(skips)
                    bar.update(len(pending[done].indices))
    finally:
        bar.close()
    return records, skipped


# ------------------------------------------------------------------------------ index


def _index_from(plan: dict[str, Any], records: list[ShardRecord]) -> ShardIndex:
    by_name = {r.name: r for r in records}
    splits: dict[str, list[ShardRecord]] = {}
    for split, info in plan["splits"].items():
        names = [f"{split}-{k:06d}.tar" for k in range(info["shards"])]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of split {split!r} are not finished (first: {missing[0]}); "
                            "run the missing slices (or prepare again) before writing the index")
        splits[split] = [by_name[n] for n in names]
    return ShardIndex(splits=splits, meta=plan["meta"])


def _slice_name(index: int, count: int) -> str:
    return f"{SLICES_DIR}/slice-{index:05d}-of-{count:05d}.json"


def prepare(source: DatasetSource, out: str, options: PrepareOptions, *, workers: int = 1,
            overwrite: bool = False, num_slices: int = 1, slice_index: int = 0, progress: bool = True,
            s3_cfg: "S3Config | None" = None) -> ShardIndex | None:
    """Write the shards of ``source`` to ``out``; returns the index (None for one slice of several).

    With ``num_slices > 1`` only shards ``i % num_slices == slice_index`` are
    written, plus a slice record; :func:`write_index` merges the slices.
    """
    if num_slices < 1 or not 0 <= slice_index < num_slices:
        raise DataError(f"--slice must be in [0, --num-slices), got slice {slice_index} of {num_slices}")
    plan, jobs = make_plan(source, options)
    output = ShardOutput(out, s3_cfg)
    try:
        previous = output.read_json(PLAN_NAME)
        mine = [job for i, job in enumerate(jobs) if i % num_slices == slice_index]
        if previous is not None and previous.get("fingerprint") != plan["fingerprint"]:
            if not overwrite:
                raise DataError(f"{out} holds shards prepared with other options or input (plan "
                                f"{previous.get('fingerprint')} != {plan['fingerprint']}); pass --overwrite to "
                                "replace them, or choose another --out")
            stale = output.existing_shards() if num_slices == 1 else [job.name for job in mine]
            output.delete_shards([*stale, INDEX_NAME])
        output.write_text(PLAN_NAME, json.dumps(plan, indent=1, sort_keys=True) + "\n")
        if not output.remote:  # temporary files of an interrupted run of these shards
            for job in mine:
                for partial in output.local_dir.glob(f".{job.name}.*{PARTIAL_SUFFIX}"):
                    partial.unlink(missing_ok=True)
        records, todo = [], []
        for job in mine:
            done = output.finished(job.name)
            (records.append(done) if done is not None else todo.append(job))
        if records:
            log.info("resuming: %d of %d shard(s) already written", len(records), len(mine))
        new_records, skipped = _run_jobs(source, output, todo, workers, progress)
        records += new_records
        if skipped:
            log.warning("skipped %d undecodable input(s): %s", sum(skipped.values()), dict(skipped))
        if num_slices > 1:
            body = {"fingerprint": plan["fingerprint"], "records": [r.__dict__ for r in records]}
            output.write_text(_slice_name(slice_index, num_slices), json.dumps(body, sort_keys=True))
            return None
        index = _index_from(plan, records)
        output.write_text(INDEX_NAME, index.to_json())
        return index
    finally:
        output.close()


def write_index(out: str, s3_cfg: "S3Config | None" = None) -> ShardIndex:
    """Write ``out/index.json``: from job-array slice records, or by scanning existing local shards.

    After a sliced prepare this checks that every slice finished with the same plan
    and writes exactly the index a single-process run writes (then removes the
    slice records). For shards made by other tools (``SPLIT-NNNNNN.tar`` in a local
    directory) it counts and hashes each shard.
    """
    output = ShardOutput(out, s3_cfg)
    try:
        plan = output.read_json(PLAN_NAME)
        slice_files = [o.key for o in output.store.list(SLICES_DIR + "/")]
        if plan is None:
            if output.remote:
                raise DataError(f"{out} has no {PLAN_NAME}: indexing S3 shards made by other tools is not "
                                "supported; use a brace pattern of shard URLs instead")
            return _scan_index(output)
        records: list[ShardRecord] = []
        counts = set()
        for name in slice_files:
            body = json.loads(output.store.get_bytes(name))
            if body["fingerprint"] != plan["fingerprint"]:
                raise DataError(f"{out}/{name} comes from another prepare plan; delete it and re-run that slice")
            counts.add(name.rsplit("-of-", 1)[-1])
            records += [ShardRecord(**r) for r in body["records"]]
        if not slice_files:  # a single-process run interrupted before its index: rescan
            records = [r for r in (output.finished(n) for n in output.existing_shards()) if r is not None]
        index = _index_from(plan, records)
        output.write_text(INDEX_NAME, index.to_json())
        output.store.delete(slice_files)
        return index
    finally:
        output.close()


def _scan_index(output: ShardOutput) -> ShardIndex:
    names = sorted(output.existing_shards())
    if not names:
        raise DataError(f"no shards named SPLIT-NNNNNN.tar in {output.out}")
    splits: dict[str, list[ShardRecord]] = {}
    for name in names:
        split = SHARD_NAME.match(name).group(1)  # type: ignore[union-attr]
        splits.setdefault(split, []).append(scan_shard(output.local_dir / name))
    index = ShardIndex(splits=splits, meta={"source": "scanned"})
    output.write_text(INDEX_NAME, index.to_json())
    return index


def default_workers() -> int:
    """Encoding processes by default: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))
