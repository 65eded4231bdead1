"""Training and validation streams: shards -> per-rank, per-worker batches, resumable exactly.

Usage (what the trainer and ``vae-train eval`` call)::

    train = build_train_stream(cfg.data, image_size=28, channels=1, value_range=(0.0, 1.0),
                               micro_batch_size=64, rank=rank, world_size=world, seed=cfg.seed,
                               s3_cfg=cfg.s3)
    for batch in train:                       # infinite; batch["image"]: float32 [B,C,H,W]
        ...                                   # batch["key"]: list[str], batch["label"]: int64 [B]
    state = train.state_dict()                # JSON-serializable; store it in the checkpoint
    train.load_state_dict(state)              # continue with exactly the batches that came next
    train.stats()                             # images/s, time waiting for data, skipped samples

    # latent shards of `vae-train encode` (index.json meta latent_shape = [C, h, h]): sample_kind="latents"
    latents = build_train_stream(cfg.data, image_size=h, channels=C, value_range=(0.0, 0.0),
                                 micro_batch_size=64, rank=rank, world_size=world, seed=cfg.seed,
                                 s3_cfg=cfg.s3, sample_kind="latents")
    for batch in latents:                     # batch["latents"]: float32 [B,C,h,h] instead of "image"
        ...

    val = build_val_stream(cfg.data, image_size=28, channels=1, value_range=(0.0, 1.0),
                           batch_size=256, rank=rank, world_size=world, s3_cfg=cfg.s3)
    for batch in val:                         # finite; same keys plus batch["mask"]: bool [B]
        ...                                   # count only batch["mask"] samples

How the training stream is built, and why (choices made against webdataset's
``WebDataset(resampled=True)`` pipeline, whose shuffle buffer and shard iterator
hold state that cannot be saved):

* **Resampled shards, per rank and worker.** Every DataLoader worker of every rank
  draws shards with replacement, the d-th draw from a generator seeded by
  ``(seed, rank, worker, source, d)``, weighted by the shards' sample counts. No
  shard list is split, so fewer shards than ranks x workers is fine, and
  determinism does not depend on webdataset's per-process random seeds.
* **Shuffling inside a shard.** ``prepare`` shuffles samples across shards, so a
  shard is already a random subset; the stream reads it in blocks of
  ``data.shuffle_buffer`` samples and emits each block in a permutation seeded by
  ``(seed, rank, worker, source, draw, block)``. A worker's position is therefore
  just ``(draw, samples consumed)`` per source, plus its numpy generator (crops,
  flips, dynamic binarization, source mixing): a few numbers, not a buffer of
  images.
* **Exact resume.** Each worker attaches a copy of its state to every batch; the
  main process keeps the newest state per worker and which worker is next.
  DataLoader hands out batches round-robin over workers in order, so on restore
  worker ``p`` takes over the stream of logical worker ``(p + next) % W`` and the
  batches continue exactly; each worker re-reads at most the current block's
  shard up to its position (raw bytes, no decoding). A state from another world
  size, worker count, batch size, seed or data source is refused.
* **Equal batch counts.** The stream is infinite on every rank, so collectives
  never wait on a rank that ran dry; ``train.max_steps`` ends a run, not an epoch.
  No sample counts are needed, so shards made elsewhere (a brace pattern without
  an index.json) train as they are.

**Aspect-ratio buckets** (``data.aspect_buckets``, :mod:`vae_train.data.buckets`; ``auto``
keeps the shapes the sources' index.json aspect-ratio histograms map images to):
each sample read goes, by its image header's aspect ratio, to the nearest bucket's
pending list, and a bucket that holds a micro-batch is decoded to its shape and
emitted, so every batch has one shape. Rare buckets wait rather than drop or repeat
samples, so the sample frequencies and the sources' mixing weights are those of the
unbucketed stream. Exact resume stays cheap: the state names each pending sample by
``[bucket, source, draw, pos, key]`` (not its pixels) and a restore reads those back
from their shards; each sample's augmentation draws from a generator seeded by that
reference, so it decodes the same again. Ranks still get equal batch counts (the
stream is infinite), each rank's batch of a step may have another shape, which
data-parallel training allows (gradients are reduced per parameter, not per activation).

The validation stream reads every sample exactly once over all ranks and
workers: index.json gives each shard's count, rank r takes the contiguous sample
range ``[r*N/R, (r+1)*N/R)``, split into batches, and each worker takes a
contiguous run of those batches. Every rank yields the same number of batches;
the tail is padded with ``mask=False`` slots.

``data.classes`` (:mod:`vae_train.data.classes`) keeps only samples of those labels:
the training stream reads past the others (its batches stay full, its state counts
them, so resume stays exact), the validation stream masks them (so its layout, and
the equal batch counts, do not change). Both count them as ``filtered``, apart from
damage. A sample that cannot be read or
decoded also becomes a masked slot, counted in ``stats()`` and warned about with
its shard and key (``data.strict`` makes it an error).

Damaged input is skipped and counted, never silently: ``stats()["skipped"]``
counts by reason, and the first skip of each shard and reason in a worker logs a
warning naming the shard and key (a shard drawn again, or the same problem again
in it, is only counted; at most 20 warnings per worker), and a source
that keeps giving nothing (32 shards in a row without a sample, or 256 samples in
a row rejected) stops the run with a :class:`DataError` instead of spinning. A
DataLoader that delivers nothing for ``data.timeout_s`` seconds is an error too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vae_train.data import s3_opener
from vae_train.data.classes import MAX_CONSECUTIVE_FILTERED, check_labels_occur, keeps, too_many_filtered
from vae_train.data.buckets import nearest_bucket, resolve_buckets
from vae_train.data.decode import (SAMPLE_KINDS, DecodeSpec, Prepared, SampleRejected, decode_sample, finish_batch,
                                   finish_sample, image_dimensions, prepare_sample)
from vae_train.data.errors import DataError
from vae_train.data.sources import Source, aspect_ratios, fingerprint, resolve_sources
from vae_train.data.tario import RawSample, ShardReadError, iter_shard
from vae_train.preemption import shield_worker_from_job_signals

if TYPE_CHECKING:
    from vae_train.config import DataConfig, S3Config

log = logging.getLogger("vae_train.data")

STATE_VERSION = 1
MAX_EMPTY_SHARDS = 32
"""Shards in a row without a single sample before a source is declared unreadable."""
MAX_CONSECUTIVE_REJECTS = 256
"""Samples in a row rejected by the decoder before the data is declared unusable."""
MAX_WARNINGS_PER_WORKER = 20
"""Skip warnings logged per worker (one per shard and reason); later skips are only counted (see stats())."""

# Purposes mixed into seeds, so the generators of one (rank, worker) are independent.
_SHARD_PICK, _BLOCK_ORDER, _WORKER_RNG, _SAMPLE_RNG = 1, 2, 3, 4


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs; pickled into DataLoader workers."""

    sources: tuple[Source, ...]
    spec: DecodeSpec
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    block_size: int
    strict: bool
    s3_cfg: Any
    classes: frozenset[int] = frozenset()  # data.classes; empty = keep every sample
    buckets: tuple[tuple[int, int], ...] = ()  # aspect buckets (H, W); empty = every image spec.image_size
    cache_mb: float = 0.0  # data.cache_mb: decoded samples kept per worker (0 = off; unbucketed train stream only)

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)


class _Skips:
    """Counts skipped samples by reason; warns once per shard and reason (a redrawn shard stays quiet)."""

    def __init__(self, counts: dict[str, int] | None, strict: bool) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.strict = strict
        self._warned: set[tuple[str, str]] = set()

    def skip(self, shard: str, reason: str, message: str, n: int = 1) -> None:
        """Count ``n`` skipped samples of ``shard``; raise instead when ``data.strict`` is on."""
        if self.strict:
            raise DataError(f"{message} (data.strict=true; set it to false to skip and count damaged data)")
        self.counts[reason] += n
        if (shard, reason) in self._warned or len(self._warned) >= MAX_WARNINGS_PER_WORKER:
            return
        self._warned.add((shard, reason))
        log.warning("skipping %s (further %r problems in this shard are only counted)", message, reason)
        if len(self._warned) == MAX_WARNINGS_PER_WORKER:
            log.warning("further skipped samples in this worker are only counted (see data stats)")


def _take(raw: Iterator[RawSample], n: int) -> tuple[list[RawSample], ShardReadError | None, bool]:
    """Up to ``n`` samples -> (samples, the error that stopped reading, whether the shard ended)."""
    items: list[RawSample] = []
    if n <= 0:
        return items, None, False
    try:
        for item in raw:
            items.append(item)
            if len(items) == n:
                return items, None, False
    except ShardReadError as exc:
        return items, exc, True
    return items, None, True


_PREPARED = "__prepared__"
"""The members entry where a sample read from a shard keeps its :class:`Prepared` decoding (or rejection)."""
_ENTRY_OVERHEAD = 128
"""Bytes counted per cached sample on top of its pixels and strings (list slots, the array's header)."""


@dataclass
class _CachedShard:
    """One shard's samples in stored order, column-wise: a few lists of untracked objects (str, bytes, arrays),
    so the garbage collector does not walk tens of thousands of cached dicts on every full collection."""

    keys: list[str] = field(default_factory=list)
    arrays: list[np.ndarray | None] = field(default_factory=list)  # Prepared.array; None: see ``others``
    labels: list[int] = field(default_factory=list)
    cls: list[bytes | None] = field(default_factory=list)
    others: dict[int, Any] = field(default_factory=dict)  # index -> its SampleRejected, or its members as read
    nbytes: int = 0

    def add(self, key: str, members: dict[str, Any]) -> None:
        prepared = members.get(_PREPARED)
        cls = members.get("cls")
        self.keys.append(key)
        self.cls.append(cls)
        if isinstance(prepared, Prepared):
            self.arrays.append(prepared.array)
            self.labels.append(prepared.label)
            self.nbytes += prepared.nbytes
        else:
            self.arrays.append(None)
            self.labels.append(-1)
            if isinstance(prepared, SampleRejected):
                self.others[len(self.keys) - 1] = prepared
            else:  # never decoded here (left out by data.classes, or skipped over on resume): kept as read
                self.others[len(self.keys) - 1] = {**members, _PREPARED: None}
                self.nbytes += sum(len(v) for v in members.values() if isinstance(v, bytes))
        self.nbytes += _ENTRY_OVERHEAD + len(key) + (len(cls) if cls else 0)

    def samples(self) -> Iterator[RawSample]:
        """The samples as the cursor reads them: (key, members) with the decoding under ``_PREPARED``."""
        for i, key in enumerate(self.keys):
            array = self.arrays[i]
            if array is None:
                other = self.others[i]
                members = other if isinstance(other, dict) else {_PREPARED: other}
            else:
                members = {_PREPARED: Prepared(array, self.labels[i])}
            if self.cls[i] is not None and "cls" not in members:
                members["cls"] = self.cls[i]  # what data.classes reads
            yield key, members


class _ShardCache:
    """A worker's decoded samples of whole shards (``data.cache_mb``), so a shard drawn again skips tar and decoding.

    Why whole shards: the cursor reads a shard in blocks, and replaying a stored list
    of its samples in stored order gives the very blocks, permutations and positions a
    re-read would, so batches and resume stay exact with or without the cache. A shard
    is stored only once read to its end without error (a damaged shard is read again,
    and counted again, as without the cache). What is kept per sample is what
    :func:`prepare_sample` made of it (or its rejection) plus its label member: the
    random half (crop, flip, binarization) still runs on every read. Shards that would
    overflow the budget are not kept; nothing is ever evicted (the first shards drawn
    stay: with resampling, any shard is as likely as another to come again).
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self._shards: dict[str, _CachedShard] = {}

    def get(self, url: str) -> _CachedShard | None:
        return self._shards.get(url)

    def has_room(self) -> bool:
        return self.used < self.budget

    def fits(self, shard: _CachedShard) -> bool:
        return self.used + shard.nbytes <= self.budget

    def store(self, url: str, shard: _CachedShard) -> None:
        """Keep ``shard`` (all of it, in stored order) if it fits the budget."""
        if self.fits(shard):
            self._shards[url] = shard
            self.used += shard.nbytes


class _ShardCursor:
    """One worker's resampled walk over one source: shard draw ``draw``, ``pos`` samples into it."""

    def __init__(self, plan: _Plan, worker: int, index: int, draw: int = 0, pos: int = 0,
                 cache: _ShardCache | None = None) -> None:
        self.plan, self.worker, self.index = plan, worker, index
        self.cache = cache
        self.source = plan.sources[index]
        self.draw, self.pos = draw, pos
        counts = [shard.num_samples for shard in self.source.shards]
        self._p = None if any(c is None for c in counts) else np.asarray(counts, float) / max(1, sum(counts))

    def _rng(self, *words: int) -> np.random.Generator:
        plan = self.plan
        return np.random.default_rng([plan.seed, plan.rank, self.worker, self.index, *words])

    def _shard_url(self, draw: int) -> str:
        shards = self.source.shards
        if len(shards) == 1:
            return shards[0].url
        choice = self._rng(draw, _SHARD_PICK).choice(len(shards), p=self._p)
        return shards[int(choice)].url

    def _keep(self, record: _CachedShard | None, items: list[RawSample]) -> _CachedShard | None:
        """``record`` with ``items`` added, or None once the shard can no longer fit the cache."""
        if record is None:
            return None
        for key, members in items:
            record.add(key, members)
        return record if self.cache.fits(record) else None  # type: ignore[union-attr]

    def samples(self, skips: _Skips) -> Iterator[tuple[str, RawSample]]:
        """Yield (shard url, raw sample) forever, keeping ``draw``/``pos`` current."""
        block = self.plan.block_size
        empty, last_problem = 0, ""
        while True:
            url = self._shard_url(self.draw)
            cached = self.cache.get(url) if self.cache is not None else None
            raw = cached.samples() if cached is not None else iter_shard(url)
            # a shard read from storage is kept block by block, once its samples are decoded (budget allowing)
            record = _CachedShard() if cached is None and self.cache is not None and self.cache.has_room() else None
            produced, error = 0, None
            try:
                first_block = self.pos // block
                skipped, error, ended = _take(raw, first_block * block)
                record = self._keep(record, skipped)
                if len(skipped) < first_block * block:
                    ended = True
                b = first_block
                while not ended:
                    items, error, ended = _take(raw, block)
                    order = self._rng(self.draw, b, _BLOCK_ORDER).permutation(len(items)) if block > 1 else [0]
                    for j in range(self.pos - b * block, len(items)):
                        self.pos = b * block + j + 1
                        produced += 1
                        yield url, items[order[j]]
                    record = self._keep(record, items)  # the consumer has decoded them by now
                    b += 1
            finally:
                raw.close()
            if record is not None and error is None:
                self.cache.store(url, record)  # type: ignore[union-attr]
            if error is not None:
                last_problem = str(error)
                skips.skip(url, "shard_error", f"the rest of shard {error}")
            if produced == 0:
                empty += 1
                last_problem = last_problem or f"{url}: no samples"
                if empty >= MAX_EMPTY_SHARDS:
                    raise DataError(
                        f"source {self.source.spec!r}: {empty} shards in a row gave no samples (last: {last_problem}); "
                        "check that the shards exist, are readable and are tar files of samples")
            else:
                empty = 0
            self.draw, self.pos = self.draw + 1, 0


def _batch(images: np.ndarray, keys: list[str], labels: list[int], mask: list[bool] | None = None,
           field: str = "image") -> dict[str, Any]:
    """A batch as numpy arrays; :func:`_tensors` makes them tensors where the batch is consumed.

    Why not tensors here: DataLoader hands a worker's tensors over as shared-memory
    file descriptors, one socket round trip to the worker per tensor in the consuming
    process (~0.5 ms each, measured: most of the training process's cost per batch),
    while arrays are pickled by value through the worker's pipe (a copy of a few
    hundred KB). ``_loader`` passes items through as they are (no default conversion).
    """
    batch: dict[str, Any] = {field: images, "key": keys, "label": np.asarray(labels, dtype=np.int64)}
    if mask is not None:
        batch["mask"] = np.asarray(mask, dtype=bool)
    return batch


def _tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its arrays copied into tensors of torch's allocator.

    Why a copy (~10 us per batch): unpickled arrays are only 16-byte aligned, and
    vectorised kernels may sum in another order on data of another alignment; torch's
    64-byte aligned memory keeps the model's numbers independent of where an array landed.
    """
    return {name: torch.from_numpy(value).clone() if isinstance(value, np.ndarray) else value
            for name, value in batch.items()}


class _Reader:
    """One logical worker's read position over its sources, shared by the plain and the bucketed batch loops.

    :meth:`samples` draws a source per sample with the worker's generator (the sources'
    mixing weights), reads on through its shard cursor and leaves out what
    ``data.classes`` does not keep; the batch loops only decide what a batch is. The
    same counters (skips, ``filtered``, rejections in a row) and the same state keys
    (:meth:`snapshot`) then serve both, so the two loops cannot drift apart.
    """

    def __init__(self, plan: _Plan, worker: int, state: dict[str, Any], hint: str,
                 cache: _ShardCache | None = None) -> None:
        self.plan = plan
        n_sources = len(plan.sources)
        self.cursors = [_ShardCursor(plan, worker, i, *state.get("cursors", [[0, 0]] * n_sources)[i], cache=cache)
                        for i in range(n_sources)]
        self._caching = cache is not None
        self.rng = np.random.default_rng([plan.seed, plan.rank, worker, _WORKER_RNG])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self.skips = _Skips(state.get("skipped"), plan.strict)
        self.filtered = int(state.get("filtered", 0))
        self._hint = hint  # what to check when the decoder keeps rejecting samples
        self._rejected_in_row = 0

    def samples(self) -> Iterator[tuple[int, str, str, dict[str, bytes]]]:
        """(source index, shard url, key, members) of every sample ``data.classes`` keeps, forever."""
        plan = self.plan
        n_sources = len(plan.sources)
        streams = [cursor.samples(self.skips) for cursor in self.cursors]
        weights = np.asarray([s.weight for s in plan.sources], float)
        weights /= weights.sum()
        filtered_in_row = 0
        while True:
            s = int(self.rng.choice(n_sources, p=weights)) if n_sources > 1 else 0
            url, (key, members) = next(streams[s])
            if plan.classes and not keeps(plan.classes, key, members, url):
                self.filtered, filtered_in_row = self.filtered + 1, filtered_in_row + 1
                if filtered_in_row >= MAX_CONSECUTIVE_FILTERED:
                    raise too_many_filtered(plan.classes, filtered_in_row, plan.sources[s].spec)
                continue
            filtered_in_row = 0
            yield s, url, key, members

    def rejected(self, url: str, key: str, rej: SampleRejected) -> None:
        """Count a sample the decoder refused; too many in a row is an error naming what to check."""
        self.skips.skip(url, rej.reason, f"sample {key!r} of shard {url}: {rej}")
        self._rejected_in_row += 1
        if self._rejected_in_row >= MAX_CONSECUTIVE_REJECTS:
            raise DataError(
                f"{self._rejected_in_row} samples in a row were rejected (last: {key!r} of {url}: {rej}); "
                f"the data does not {self._hint} — see data.resize / data.random_crop or re-run "
                "`vae-train prepare`") from None

    def prepare(self, url: str, key: str, members: dict[str, bytes], spec: DecodeSpec) -> Prepared | None:
        """The deterministic decoding of one sample, or None when the decoder refused it (counted by
        :meth:`rejected`); :func:`finish_batch` / :func:`finish_sample` do the random half.

        A sample read from a shard keeps its deterministic decoding (or rejection) in
        ``members`` (for :class:`_ShardCache`); one replayed from the cache reuses it.
        """
        prepared = members.get(_PREPARED)
        if prepared is None:
            try:
                prepared = prepare_sample(key, members, spec)
            except SampleRejected as rej:
                prepared = rej
            if self._caching and _PREPARED not in members:  # a fresh read, not a cached sample kept undecoded
                members[_PREPARED] = prepared  # type: ignore[assignment]
        if isinstance(prepared, SampleRejected):
            self.rejected(url, key, prepared)
            return None
        self._rejected_in_row = 0
        return prepared

    def snapshot(self) -> dict[str, Any]:
        """The position after the samples read so far (JSON-serializable)."""
        return {
            "cursors": [[c.draw, c.pos] for c in self.cursors],
            "rng": self.rng.bit_generator.state,
            "skipped": dict(self.skips.counts),
            "filtered": self.filtered,
        }


def _train_worker(plan: _Plan, worker: int, state: dict[str, Any] | None) -> Iterator[tuple[Any, ...]]:
    """One logical worker's infinite batch stream; yields (batch, worker, state after the batch)."""
    if plan.buckets:
        yield from _bucketed_worker(plan, worker, state)
        return
    cache = _ShardCache(plan.cache_mb) if plan.cache_mb > 0 else None
    reader = _Reader(plan, worker, state or {}, "match the model (model.image_size, model.in_channels)", cache)
    samples = reader.samples()
    while True:
        prepared, keys = [], []
        while len(prepared) < plan.batch_size:
            _, url, key, members = next(samples)
            sample = reader.prepare(url, key, members, plan.spec)
            if sample is not None:
                prepared.append(sample)
                keys.append(key)
        images = finish_batch(prepared, keys, plan.spec, reader.rng)
        yield _batch(images, keys, [p.label for p in prepared], field=plan.spec.field), worker, reader.snapshot()


def _sample_rng(plan: _Plan, worker: int, source: int, draw: int, pos: int) -> np.random.Generator:
    """The generator of one sample's augmentation in a bucketed stream, seeded by where the sample was read."""
    return np.random.default_rng([plan.seed, plan.rank, worker, source, draw, pos, _SAMPLE_RNG])


def _refetch(plan: _Plan, worker: int, refs: list[list[Any]]) -> list[tuple[str, RawSample]]:
    """(shard url, raw sample) of each pending reference ``[bucket, source, draw, pos, key]``, read again.

    References of one shard draw are read in one pass over that shard (up to the last
    one needed); a sample that is not where the reference says (the shards changed)
    is an error, never a silent substitute.
    """
    found: dict[tuple[int, int, int], tuple[str, RawSample]] = {}
    groups: dict[tuple[int, int], set[int]] = {}
    for _bucket, source, draw, pos, _key in refs:
        groups.setdefault((source, draw), set()).add(pos)
    quiet = _Skips(None, strict=False)  # these samples were counted when first read
    for (source, draw), wanted in groups.items():
        cursor = _ShardCursor(plan, worker, source, draw, min(wanted) - 1)
        samples = cursor.samples(quiet)
        try:
            for url, raw in samples:
                if cursor.draw != draw:
                    break
                if cursor.pos in wanted:
                    found[(source, draw, cursor.pos)] = (url, raw)
                    wanted.discard(cursor.pos)
                    if not wanted:
                        break
        finally:
            samples.close()
    result = []
    for _bucket, source, draw, pos, key in refs:
        item = found.get((source, draw, pos))
        if item is None or item[1][0] != key:
            raise DataError(f"cannot resume the data stream: pending sample {key!r} (source {source}, shard draw "
                            f"{draw}, position {pos}) is not in its shard any more; the data changed since the "
                            "checkpoint was written: start a fresh run or restore the data")
        result.append(item)
    return result


def _bucketed_worker(plan: _Plan, worker: int, state: dict[str, Any] | None) -> Iterator[tuple[Any, ...]]:
    """A logical worker's infinite stream of one-shape batches (aspect buckets); yields (batch, worker, state).

    Each sample read goes, by its header's aspect ratio, to the nearest bucket's
    pending list; when a bucket holds a batch, it is decoded to the bucket's shape and
    emitted. No sample is dropped or repeated for being in a rare bucket (it waits), so
    the sources' mixing weights and the samples' frequencies are those of the
    unbucketed stream. The state holds the cursors, the source-mixing generator and a
    reference ``[bucket, source, draw, pos, key]`` per pending sample, which a restore
    reads back from its shard; each sample's crops, flips and binarization come from a
    generator seeded by its reference, so a restored sample decodes identically.
    """
    state = state or {}
    reader = _Reader(plan, worker, state, "fit the aspect buckets (data.aspect_buckets, model.in_channels)")
    refs: list[list[Any]] = [list(ref) for ref in state.get("pending", [])]
    raws = _refetch(plan, worker, refs) if refs else []
    specs = [dataclasses.replace(plan.spec, image_size=shape) for shape in plan.buckets]
    for s, url, key, members in reader.samples():
        try:
            width, height = image_dimensions(members)
        except SampleRejected as rej:
            reader.rejected(url, key, rej)
            continue
        bucket = nearest_bucket(width, height, plan.buckets)
        refs.append([bucket, s, reader.cursors[s].draw, reader.cursors[s].pos, key])
        raws.append((url, (key, members)))
        waiting = [i for i, ref in enumerate(refs) if ref[0] == bucket]
        if len(waiting) < plan.batch_size:
            continue
        images, keys, labels, used, dropped = [], [], [], [], []
        for i in waiting:
            ref, (src_url, (src_key, src_members)) = refs[i], raws[i]
            prepared = reader.prepare(src_url, src_key, src_members, specs[bucket])
            if prepared is None:
                dropped.append(i)
                continue
            image, label = finish_sample(prepared, src_key, specs[bucket], _sample_rng(plan, worker, *ref[1:4]))
            images.append(image)
            keys.append(src_key)
            labels.append(label)
            used.append(i)
        done = set(dropped) | (set(used) if len(images) == plan.batch_size else set())
        refs = [ref for i, ref in enumerate(refs) if i not in done]
        raws = [raw for i, raw in enumerate(raws) if i not in done]
        if len(images) < plan.batch_size:
            continue  # a rejected sample left the bucket short: it fills up again
        snapshot = {**reader.snapshot(), "pending": [list(ref) for ref in refs]}
        yield _batch(np.stack(images), keys, labels, field=plan.spec.field), worker, snapshot


class _WorkerDataset(IterableDataset):
    """Runs the plan's generator in each DataLoader worker; errors travel as a message, not a traceback."""

    def __init__(self, plan: _Plan, make, states: list[Any], rotation: int = 0) -> None:
        super().__init__()
        self.plan, self.make, self.states, self.rotation = plan, make, states, rotation

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.plan.logical_workers
        s3_opener.configure(self.plan.s3_cfg)
        try:
            yield from self.make(self.plan, worker, self.states[worker])
        except DataError as exc:
            yield {"__error__": str(exc)}


def _loader(dataset: _WorkerDataset, num_workers: int, timeout_s: float) -> Iterator[Any]:
    """A DataLoader over ready-made batches (batching happens in the workers)."""
    # A private generator: by default DataLoader draws its base seed from the global torch RNG
    # when iterated, which shifts the model's noise stream and breaks exact resume.
    # Workers ignore SLURM's job-wide SIGTERM/SIGUSR1 so they outlive the trainer's preemption save.
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                           worker_init_fn=shield_worker_from_job_signals if num_workers > 0 else None,
                           generator=torch.Generator().manual_seed(dataset.plan.seed),
                           timeout=timeout_s if num_workers > 0 else 0,
                           prefetch_factor=2 if num_workers > 0 else None))


def _as_is(item: Any) -> Any:
    """DataLoader's collate for ready-made items: none (its default would make the batch's arrays tensors in the
    worker, which then travel as shared-memory file descriptors, see :func:`_batch`)."""
    return item


def _next_item(iterator: Iterator[Any], plan: _Plan, timeout_s: float) -> Any:
    """Next item of a loader, with loader failures and worker errors as :class:`DataError`."""
    try:
        item = next(iterator)
    except RuntimeError as exc:
        if "DataLoader" not in str(exc):
            raise
        specs = " + ".join(s.spec for s in plan.sources)
        if "timed out" in str(exc):
            raise DataError(f"no batch arrived within data.timeout_s={timeout_s:g}s while reading {specs!r}; "
                            "a worker is stuck (unreachable storage?) — check the endpoint, or raise "
                            "data.timeout_s for very slow storage") from None
        raise DataError(f"a data worker died while reading {specs!r} ({exc}); check memory limits "
                        "(lower data.num_workers or data.shuffle_buffer)") from None
    if isinstance(item, dict) and "__error__" in item:
        raise DataError(item["__error__"])
    return item


def decode_spec(data_cfg: "DataConfig", image_size: int | tuple[int, int], channels: int,
                value_range: tuple[float, float], train: bool, kind: str = "image") -> DecodeSpec:
    """How samples of ``data_cfg`` decode for a model (shape, range, binarization, augmentation when ``train``)."""
    if kind not in SAMPLE_KINDS:
        raise DataError(f"sample_kind must be one of {', '.join(SAMPLE_KINDS)}, got {kind!r}")
    if kind == "latents":  # stored tensors are read as they are: no augmentation, range or binarization
        if channels < 1 or min(_hw(image_size)) < 1:
            raise DataError(f"a latent stream needs the latent shape (channels={channels}, image_size={image_size}); "
                            "take it from the shards' index.json meta latent_shape")
        return DecodeSpec(image_size=image_size, channels=channels, value_range=(0.0, 0.0), kind=kind)
    if channels not in (1, 3):
        raise DataError(f"image shards hold grayscale or RGB images; model.in_channels={channels} is not supported "
                        "by the image decoder (use 1 or 3)")
    low, high = float(value_range[0]), float(value_range[1])
    binarize = data_cfg.binarize
    if binarize == "auto":
        raise DataError("data.binarize=auto is decided by the config from model.likelihood; build the DataConfig "
                        "inside a Config, or set it with vae_train.config.resolve_binarize(setting, likelihood)")
    if binarize != "none" and (low, high) != (0.0, 1.0) and train:
        log.warning("data.binarize=%s with value range %s: binarized pixels become {%g, %g}; "
                    "binarization is meant for the Bernoulli likelihood", binarize, value_range, low, high)
    return DecodeSpec(image_size=image_size, channels=channels, value_range=(low, high),
                      binarize=binarize, resize=data_cfg.resize,
                      random_crop=data_cfg.random_crop and train, random_flip=data_cfg.random_flip and train)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")


@dataclass
class _Timing:
    """Counters behind stats(): samples delivered and seconds spent waiting for them."""

    samples: int = 0
    wait_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)
    samples_at_last: int = 0
    wait_at_last: float = 0.0


class TrainStream:
    """Infinite, resumable per-rank batch stream (see the module docstring).

    ``batches``: batches delivered so far (restored by ``load_state_dict``).
    """

    def __init__(self, plan: _Plan, *, timeout_s: float) -> None:
        self._plan = plan
        self._timeout_s = timeout_s
        self._fingerprint = fingerprint(list(plan.sources))
        self._states: list[dict[str, Any] | None] = [None] * plan.logical_workers
        self._next_worker = 0
        self.batches = 0
        self._iterator: Iterator[Any] | None = None
        self._timing = _Timing()

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self._iterator is None:
            dataset = _WorkerDataset(self._plan, _train_worker, list(self._states), self._next_worker)
            self._iterator = _loader(dataset, self._plan.num_workers, self._timeout_s)
        try:
            batch, worker, state = _next_item(self._iterator, self._plan, self._timeout_s)
        except DataError:
            self.close()  # the workers are finished or stuck; a later next() restarts from the last state
            raise
        if worker != self._next_worker:  # DataLoader's in-order round-robin is what makes resume exact
            raise RuntimeError(f"batch came from worker {worker}, expected {self._next_worker}")
        batch = _tensors(batch)
        self._states[worker] = state
        self._next_worker = (worker + 1) % self._plan.logical_workers
        self.batches += 1
        self._timing.samples += len(batch["key"])
        self._timing.wait_s += time.perf_counter() - start
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` restarts them where the stream was)."""
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (JSON-serializable): restoring it continues with the very next batch."""
        plan = self._plan
        return {
            "version": STATE_VERSION,
            "world_size": plan.world_size,
            "rank": plan.rank,
            "num_workers": plan.num_workers,
            "micro_batch_size": plan.batch_size,
            "seed": plan.seed,
            "shuffle_buffer": plan.block_size,
            "sources": self._fingerprint,
            "classes": sorted(plan.classes),
            "aspect_buckets": [list(b) for b in plan.buckets],
            "batches": self.batches,
            "next_worker": self._next_worker,
            "workers": list(self._states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same rank); refuses an incompatible one."""
        plan = self._plan
        expected = {
            "version": STATE_VERSION, "world_size": plan.world_size, "rank": plan.rank,
            "num_workers": plan.num_workers, "micro_batch_size": plan.batch_size, "seed": plan.seed,
            "shuffle_buffer": plan.block_size, "sources": self._fingerprint, "classes": sorted(plan.classes),
            "aspect_buckets": [list(b) for b in plan.buckets],
        }
        for key, value in expected.items():
            if state.get(key, [] if key in ("classes", "aspect_buckets") else None) != value:
                raise DataError(
                    f"cannot resume the data stream: the checkpoint's {key} is {state.get(key)!r}, this run's is "
                    f"{value!r}. Exact resume needs the same world size, data.num_workers, micro-batch size, seed, "
                    "data.shuffle_buffer, data.classes, data.aspect_buckets and data sources (changing them is not supported yet); start a fresh run "
                    "or restore the old settings")
        if len(state["workers"]) != plan.logical_workers:
            raise DataError(f"data stream state has {len(state['workers'])} worker states, expected "
                            f"{plan.logical_workers}")
        self.close()
        self._states = list(state["workers"])
        self._next_worker = int(state["next_worker"])
        self.batches = int(state["batches"])

    def stats(self) -> dict[str, Any]:
        """Loader statistics since the previous call, plus cumulative skip counts.

        ``samples_per_s``: images delivered per second of wall time; ``data_wait_s``
        and ``data_wait_fraction``: time the caller spent blocked in ``next()``
        (and its share of the wall time); ``skipped``: samples skipped by reason
        over the whole run (``shard_error`` counts shards cut short); ``filtered``:
        samples left out by ``data.classes`` over the whole run (not damage).
        """
        t = self._timing
        now = time.perf_counter()
        elapsed = max(now - t.since, 1e-9)
        samples, wait = t.samples - t.samples_at_last, t.wait_s - t.wait_at_last
        t.since, t.samples_at_last, t.wait_at_last = now, t.samples, t.wait_s
        skipped: Counter[str] = Counter()
        for state in self._states:
            skipped.update((state or {}).get("skipped", {}))
        filtered = sum(int((state or {}).get("filtered", 0)) for state in self._states)
        return {
            "samples_per_s": samples / elapsed,
            "data_wait_s": wait,
            "data_wait_fraction": wait / elapsed,
            "skipped": dict(skipped),
            "skipped_total": sum(skipped.values()),
            "filtered": filtered,
        }


def build_train_stream(
    data_cfg: "DataConfig", *, image_size: int | tuple[int, int], channels: int, value_range: tuple[float, float],
    micro_batch_size: int, rank: int, world_size: int, seed: int, s3_cfg: "S3Config | None",
    size_multiple: int = 1,
    sample_kind: str = "image",
) -> TrainStream:
    """The training stream of ``rank`` of ``world_size``: infinite, resampled, resumable.

    Checks the sources now (missing shards, index, credentials raise
    :class:`DataError` before any worker starts); sample counts are not needed
    (shards without an index.json train as they are). ``value_range`` is the
    likelihood's: (0, 1) for Bernoulli, (-1, 1) otherwise; ``data_cfg.binarize``
    must be resolved (a DataConfig inside a Config is). ``seed`` with rank and
    worker seeds every random choice, so two runs with the same arguments produce
    identical batches. ``image_size`` is an int (square) or (H, W); with
    ``data.aspect_buckets`` each batch has one bucket's shape instead (``auto`` derives
    the shapes from ``image_size``, sides multiples of ``size_multiple``: the model's
    downsampling factor, and keeps those the sources' index.json histograms map images to).
    ``sample_kind="latents"`` reads latent shards of ``vae-train
    encode`` instead of images: ``channels`` x ``image_size``^2 is then the stored latent
    shape (index.json meta ``latent_shape``), batches carry ``latents`` instead of
    ``image``, and nothing is augmented.
    """
    _check_rank(rank, world_size)
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    sources = resolve_sources(data_cfg.train, default_split="train", weights=data_cfg.train_weights, s3_cfg=s3_cfg)
    classes = frozenset(data_cfg.classes)
    check_labels_occur(sources, classes, "data.train")
    plan = _Plan(
        sources=tuple(sources),
        spec=decode_spec(data_cfg, image_size, channels, value_range, train=True, kind=sample_kind),
        batch_size=micro_batch_size, rank=rank, world_size=world_size, num_workers=data_cfg.num_workers,
        seed=seed, block_size=max(1, data_cfg.shuffle_buffer), strict=data_cfg.strict, s3_cfg=s3_cfg,
        classes=classes, buckets=resolve_buckets(data_cfg.aspect_buckets, _hw(image_size), size_multiple,
                                                 aspect_ratios(sources) if data_cfg.aspect_buckets == "auto" else None),
        cache_mb=data_cfg.cache_mb,
    )
    return TrainStream(plan, timeout_s=data_cfg.timeout_s)


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _ValLayout:
    """Which global sample positions this rank's batches cover."""

    shard_starts: tuple[int, ...]  # global position of each shard's first sample
    rank_start: int
    rank_end: int
    num_batches: int  # per rank (equal on every rank)

    def worker_batches(self, worker: int, workers: int) -> range:
        return range(worker * self.num_batches // workers, (worker + 1) * self.num_batches // workers)


def _val_positions(plan: _Plan, layout: _ValLayout, lo: int, hi: int, skips: _Skips
                   ) -> Iterator[tuple[int, str, RawSample]]:
    """(global position, shard url, sample) for positions in [lo, hi), in order; gaps are counted."""
    shards = [shard for source in plan.sources for shard in source.shards]
    for shard, start in zip(shards, layout.shard_starts):
        count = shard.num_samples or 0
        first, last = max(lo, start), min(hi, start + count)
        if first >= last:
            continue
        got, error = 0, None
        raw = iter_shard(shard.url)
        try:
            for i, sample in enumerate(raw):
                pos = start + i
                if pos >= last:
                    break
                if pos >= first:
                    got += 1
                    yield pos, shard.url, sample
        except ShardReadError as exc:
            error = exc
        finally:
            raw.close()
        missing = (last - first) - got
        if missing:
            cause = str(error) if error else f"{shard.url}: shard has fewer samples than index.json says"
            skips.skip(shard.url, "missing", f"{missing} validation sample(s) that could not be read ({cause}); "
                       "they are masked out", missing)


def _val_worker(plan: _Plan, worker: int, _state: None, layout: _ValLayout) -> Iterator[tuple[Any, ...]]:
    """Batches ``layout.worker_batches(worker)`` of this rank, padded and masked; yields (batch, worker, counts):
    the skip counts by reason, plus ``filtered`` (samples left out by ``data.classes``, also masked)."""
    batches = layout.worker_batches(worker, plan.logical_workers)
    if not batches:
        return
    b = plan.batch_size
    skips = _Skips(None, plan.strict)
    first_pos = layout.rank_start + batches.start * b
    last_pos = min(layout.rank_end, layout.rank_start + batches.stop * b)
    samples = _val_positions(plan, layout, first_pos, last_pos, skips) if first_pos < last_pos else iter(())
    pending = next(samples, None)
    filtered = 0
    blank = np.zeros((plan.spec.channels, *plan.spec.hw), np.float32)
    for j in batches:
        start = layout.rank_start + j * b
        images, keys, labels, mask = [blank] * b, [""] * b, [-1] * b, [False] * b
        while pending is not None and pending[0] < start + b:
            pos, url, (key, members) = pending
            if plan.classes and not keeps(plan.classes, key, members, url):
                filtered += 1
                pending = next(samples, None)
                continue
            try:
                images[pos - start], labels[pos - start] = decode_sample(key, members, plan.spec, None)
                keys[pos - start], mask[pos - start] = key, True
            except SampleRejected as rej:
                skips.skip(url, rej.reason, f"validation sample {key!r} of shard {url}: {rej}; it is masked out")
            pending = next(samples, None)
        yield _batch(np.stack(images), keys, labels, mask, plan.spec.field), worker, {"skipped": dict(skips.counts), "filtered": filtered}


class ValStream:
    """Finite validation batches of one rank: every sample once over all ranks; equal batch counts.

    ``len()`` is the number of batches per rank; ``num_samples`` the real samples
    over all ranks; ``stats()`` the skip counts of the last full pass.
    """

    def __init__(self, plan: _Plan, layout: _ValLayout, num_samples: int, timeout_s: float) -> None:
        self._plan, self._layout = plan, layout
        self.num_samples = num_samples
        self._timeout_s = timeout_s
        self._skipped: Counter[str] = Counter()
        self._filtered = 0

    def __len__(self) -> int:
        return self._layout.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # No more worker processes than batches (an idle worker would only cost a fork).
        plan = dataclasses.replace(self._plan, num_workers=min(self._plan.num_workers, self._layout.num_batches))
        make = functools.partial(_val_worker, layout=self._layout)
        iterator = _loader(_WorkerDataset(plan, make, [None] * plan.logical_workers), plan.num_workers,
                           self._timeout_s)
        latest: dict[int, dict[str, Any]] = {}
        for _ in range(self._layout.num_batches):
            batch, worker, counts = _next_item(iterator, plan, self._timeout_s)
            latest[worker] = counts
            yield _tensors(batch)
        self._skipped = Counter()
        for counts in latest.values():
            self._skipped.update(counts["skipped"])
        self._filtered = sum(counts["filtered"] for counts in latest.values())

    def stats(self) -> dict[str, Any]:
        """Samples skipped (masked) in the last complete pass, by reason, and those ``data.classes`` filtered out."""
        return {"skipped": dict(self._skipped), "skipped_total": sum(self._skipped.values()),
                "filtered": self._filtered}


def build_val_stream(
    data_cfg: "DataConfig", *, image_size: int | tuple[int, int], channels: int, value_range: tuple[float, float],
    batch_size: int, rank: int, world_size: int, s3_cfg: "S3Config | None",
    sample_kind: str = "image",
) -> ValStream:
    """The validation stream of ``rank``: each sample exactly once over all ranks and workers.

    Needs per-shard sample counts (a directory or S3 prefix with index.json), so
    that ranks can split the samples without reading them first. No augmentation;
    ``binarize: dynamic`` validates with the ``fixed`` draw (the same bits every time).
    ``sample_kind="latents"``: as in :func:`build_train_stream`.
    """
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise DataError(f"validation batch size must be >= 1, got {batch_size}")
    sources = resolve_sources(data_cfg.val, default_split="val", s3_cfg=s3_cfg)
    shards = [shard for source in sources for shard in source.shards]
    if any(shard.num_samples is None for shard in shards):
        raise DataError(f"validation source {data_cfg.val!r} has no index.json with sample counts, which exact-once "
                        "validation over ranks needs; point data.val at a directory or s3:// prefix made by "
                        "`vae-train prepare`, or write an index with `vae-train prepare index DIR`")
    starts, total = [], 0
    for shard in shards:
        starts.append(total)
        total += shard.num_samples  # type: ignore[operator]
    if total == 0:
        raise DataError(f"validation source {data_cfg.val!r} holds no samples")
    classes = frozenset(data_cfg.classes)
    check_labels_occur(sources, classes, "data.val")
    per_rank = math.ceil(total / world_size)
    layout = _ValLayout(tuple(starts), rank * total // world_size, (rank + 1) * total // world_size,
                        math.ceil(per_rank / batch_size))
    plan = _Plan(
        sources=tuple(sources),
        spec=decode_spec(data_cfg, image_size, channels, value_range, train=False, kind=sample_kind),
        batch_size=batch_size, rank=rank, world_size=world_size, num_workers=data_cfg.num_workers,
        seed=0, block_size=1, strict=data_cfg.strict, s3_cfg=s3_cfg, classes=classes,
    )
    return ValStream(plan, layout, total, data_cfg.timeout_s)
