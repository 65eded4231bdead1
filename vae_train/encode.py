"""``vae-train encode``: a data set -> WebDataset shards of latents, each input exactly once over all ranks.

Output layout (a directory or ``s3://bucket/prefix``), the same as ``vae-train prepare``'s::

    train-000000.tar ...    one output shard per input shard of the split, same samples, same order;
                            each sample: KEY.safetensors (tensor "latents") + every non-image member
                            of the input (KEY.cls, KEY.json, ...) byte for byte
    _stats/train-000000.json  per-shard float64 latent sums (statistics survive a resume)
    index.json              shard names, counts, sha256; meta: latent_shape, latents, dtype,
                            scaling_factor, shift_factor, latents_mean, latents_std, ...
    encode.json             the plan (model hash + data + options): resume/overwrite check

The ``latents`` tensor is ``[2C, h, w]`` for ``--latents mean_logvar``: the posterior mean
and the soft-clamped log-variance stacked along the channels, LDM's "moments" layout
(``DiagonalGaussianDistribution(moments)`` splits it in two), so a diffusion trainer can
draw a fresh sample each read; or ``[C, h, w]`` for ``--latents sample``: one draw with
noise seeded by ``(--seed, key)`` (:func:`vae_train.latents.keyed_noise`), so a draw does
not depend on the rank or on a resume. The scaling factor in index.json is measured on
the latents written: the posterior means (``mean_logvar``) or the samples.

Why one output shard per input shard: shard boundaries then depend on the input alone,
so rank r of R encodes the shards ``i % R == r`` (every input exactly once, no
coordination), and a shard is the unit of atomic writing and of resume -- prepare's
writer (:class:`vae_train.data.tario.ShardWriter`: a hidden temporary file renamed when
complete, one object upload for S3) and output handling
(:class:`vae_train.data.prepare.ShardOutput`) are reused as they are. A rerun with the
same plan keeps every finished shard; another model or other options are refused
unless ``--overwrite``.

Speed: DataLoader workers read and decode the input shards, the main process only
encodes, and a writer process serializes, writes and uploads, so the model is busy
while the rest happens (``benchmarks/encode_throughput.py`` compares it with a bare
``model.encode`` loop).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vae_train import distributed
from vae_train.data.decode import IMAGE_EXTENSIONS, LATENT_MEMBER, LATENT_TENSOR, DecodeSpec, SampleRejected, decode_sample
from vae_train.data.errors import DataError
from vae_train.data.index import INDEX_NAME, ShardIndex, ShardRecord
from vae_train.data.prepare import SHARD_NAME, ShardOutput, upload_shard
from vae_train.data.sources import Source, split_name
from vae_train.data.tario import PARTIAL_SUFFIX, ShardReadError, ShardWriter, iter_shard
from vae_train.latents import LatentMoments, draw, posterior
from vae_train.preemption import shield_worker_from_job_signals

if TYPE_CHECKING:
    from vae_train.config import DataConfig, S3Config

log = logging.getLogger("vae_train.encode")

ENCODE_PLAN = "encode.json"
STATS_DIR = "_stats"
LATENT_KINDS = ("mean_logvar", "sample")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_QUEUE_BATCHES = 8  # encoded batches waiting for the writer process (bounds memory, keeps the model busy)


@dataclass(frozen=True)
class EncodeOptions:
    """What decides the output (with the model and the data)."""

    latents: str = "mean_logvar"
    dtype: str = "fp32"
    seed: int = 0

    def check(self) -> None:
        if self.latents not in LATENT_KINDS:
            raise DataError(f"--latents must be one of {', '.join(LATENT_KINDS)}, got {self.latents!r}")
        if self.dtype not in DTYPES:
            raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class EncodeJob:
    """One input shard and the output shard it becomes."""

    url: str
    name: str
    num_samples: int | None = None  # from the input's index.json; checked after reading


def plan_jobs(sources: Sequence[Source], default_split: str = "train") -> list[EncodeJob]:
    """Output ``SPLIT-NNNNNN.tar`` for every input shard, numbered per split in source order."""
    jobs, numbers = [], Counter()
    for source in sources:
        split = split_name(source.spec, default_split)
        for shard in source.shards:
            jobs.append(EncodeJob(shard.url, f"{split}-{numbers[split]:06d}.tar", shard.num_samples))
            numbers[split] += 1
    return jobs


def model_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's weights (names, dtypes, shapes, bytes): which model made the latents."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


# -------------------------------------------------------------------------------- reading


class _ShardBatches(IterableDataset):
    """Each DataLoader worker reads whole input shards (jobs ``w::W``) into batches of decoded images.

    Items: ``{"job", "key", "image", "extras", "last", "skipped"}``; the last batch of a
    shard (``last``) may be empty. Errors travel as ``{"__error__": message}``.
    """

    def __init__(self, jobs: list[tuple[int, EncodeJob]], spec: DecodeSpec, batch_size: int, strict: bool,
                 s3_cfg: Any) -> None:
        super().__init__()
        self.jobs, self.spec, self.batch_size, self.strict, self.s3_cfg = jobs, spec, batch_size, strict, s3_cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from vae_train.data import s3_opener

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s3_opener.configure(self.s3_cfg)
        try:
            for index, job in self.jobs[worker::workers]:
                yield from self._shard(index, job)
        except DataError as exc:
            yield {"__error__": str(exc)}

    def _shard(self, index: int, job: EncodeJob) -> Iterator[dict[str, Any]]:
        images: list[np.ndarray] = []
        keys: list[str] = []
        extras: list[dict[str, bytes]] = []
        skipped: Counter[str] = Counter()

        def batch(last: bool) -> dict[str, Any]:
            shape = (0, self.spec.channels, self.spec.image_size, self.spec.image_size)
            stacked = torch.from_numpy(np.stack(images)) if images else torch.zeros(shape)
            item = {"job": index, "key": list(keys), "image": stacked, "extras": list(extras), "last": last,
                    "skipped": dict(skipped)}
            images.clear(), keys.clear(), extras.clear(), skipped.clear()
            return item

        read = 0
        try:
            for key, members in iter_shard(job.url):
                read += 1
                try:
                    image, _ = decode_sample(key, members, self.spec, None)
                except SampleRejected as rej:
                    if self.strict:
                        raise DataError(f"sample {key!r} of {job.url}: {rej} (data.strict=true)") from None
                    log.warning("skipping sample %r of %s: %s", key, job.url, rej)
                    skipped[rej.reason] += 1
                    continue
                images.append(image)
                keys.append(key)
                extras.append({ext: data for ext, data in members.items() if ext not in IMAGE_EXTENSIONS})
                if len(images) == self.batch_size:
                    yield batch(last=False)
        except ShardReadError as exc:
            raise DataError(f"cannot read input shard {exc}; its output shard {job.name} is not written "
                            "(finished shards are kept: fix the input and run the same command again)") from None
        if job.num_samples is not None and read != job.num_samples:
            raise DataError(f"input shard {job.url} holds {read} samples but its index.json says {job.num_samples} "
                            f"(truncated or replaced?); its output shard {job.name} is not written (finished shards "
                            "are kept: fix the input and run the same command again)")
        yield batch(last=True)


def _loader(dataset: _ShardBatches, num_workers: int, timeout_s: float) -> Iterator[dict[str, Any]]:
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                           worker_init_fn=shield_worker_from_job_signals if num_workers > 0 else None,
                           timeout=timeout_s if num_workers > 0 else 0,
                           prefetch_factor=4 if num_workers > 0 else None))


# -------------------------------------------------------------------------------- writing


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _safetensors_parts(latents: torch.Tensor) -> tuple[bytes, np.ndarray]:
    """``(prefix, rows)``: the header every sample of the batch shares, and each row's raw bytes ``[B, n]``."""
    raw = latents.detach().cpu().contiguous().view(torch.uint8).reshape(len(latents), -1).numpy()
    header = json.dumps({LATENT_TENSOR: {"dtype": _SAFETENSORS_DTYPES[latents.dtype], "shape": list(latents.shape[1:]),
                                         "data_offsets": [0, raw.shape[1]]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header, raw


def safetensors_members(latents: torch.Tensor) -> list[bytes]:
    """One safetensors file per row of ``latents`` ``[B, ...]``, each holding tensor ``latents``.

    The bytes ``safetensors.torch.save({"latents": row})`` writes (8-byte header length, JSON
    header padded with spaces to 8 bytes, raw little-endian data), with the header built once
    per batch: calling ``save`` per sample cost more than encoding a 28x28 image with a small model.
    """
    if len(latents) == 0:
        return []
    prefix, raw = _safetensors_parts(latents)
    return [prefix + row.tobytes() for row in raw]


@dataclass
class _OpenShard:
    writer: ShardWriter
    sums: np.ndarray
    skipped: Counter = field(default_factory=Counter)


def _sink_process(tasks: Any, results: Any, out: str, s3_cfg: Any, local_dir: str, fingerprint: str) -> None:
    """The writer process: batches -> shards (stats sidecar stored first, then commit, then upload).

    A separate process, not a thread: tar writing is Python code that would hold the GIL
    the encoding thread needs between its kernels (measured: a busy writer thread halved
    a small model's encode speed). Uses no torch (it may be forked after torch started threads).
    """
    from vae_train.storage import open_store

    store = open_store(out, s3_cfg)
    remote = out.startswith("s3://")
    shards: dict[str, _OpenShard] = {}
    try:
        while (task := tasks.get()) is not None:
            name, keys, prefix, raw, extras, sums, last, skipped = task
            shard = shards.get(name)
            if shard is None:
                shard = shards[name] = _OpenShard(ShardWriter(Path(local_dir) / name), np.zeros_like(sums))
            shard.sums += sums
            for key, row, members in zip(keys, raw, extras):
                shard.writer.add(key, {**members, LATENT_MEMBER: prefix + row.tobytes()})
            shard.skipped.update(skipped)
            if last:
                shards.pop(name)
                stats = {"fingerprint": fingerprint, "sums": shard.sums.tolist(),
                         "num_samples": shard.writer.num_samples, "skipped": dict(shard.skipped)}
                store.put_bytes(json.dumps(stats).encode(), _stats_name(name))
                record = shard.writer.commit()
                if remote:
                    upload_shard(store, Path(local_dir) / name, record)
                results.put(("record", record.__dict__, stats["sums"], stats["skipped"]))
    except BaseException as exc:  # noqa: BLE001 - reported to the encoding process
        results.put(("error", f"writing latent shards failed: {type(exc).__name__}: {exc}"))
    finally:
        for shard in shards.values():  # only after an error or an abort: no partial shard is left
            shard.writer.abort()
        results.put(("done",))


class _ShardSink:
    """The encoding process's end of the writer process: bounded hand-over, errors raised here."""

    def __init__(self, output: ShardOutput, fingerprint: str, s3_cfg: Any) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._tasks = context.Queue(maxsize=_QUEUE_BATCHES)
        self._results = context.Queue()
        self.records: list[ShardRecord] = []
        self.sums: list[list[list[float]]] = []
        self.skipped: Counter[str] = Counter()
        self._done = False
        self._process = context.Process(target=_sink_process, name="encode-writer", daemon=True,
                                        args=(self._tasks, self._results, output.out, s3_cfg,
                                              str(output.local_dir), fingerprint))
        self._process.start()

    def put(self, name: str, keys: list[str], latents: torch.Tensor, sums: np.ndarray,
            extras: list[dict[str, bytes]], last: bool, skipped: dict[str, int]) -> None:
        """Hand one encoded batch to the writer (blocks while it is ``_QUEUE_BATCHES`` behind)."""
        prefix, raw = _safetensors_parts(latents) if keys else (b"", np.zeros((0, 0), np.uint8))
        task = (name, keys, prefix, raw, extras, sums, last, skipped)
        while True:
            self._drain(block=False)
            try:
                self._tasks.put(task, timeout=1.0)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every handed-over batch is written; raise the writer's error if it had one."""
        self._tasks.put(None)
        while not self._done:
            self._drain(block=True)
        self._process.join()

    def abort(self) -> None:
        """Stop the writer after an error here; it deletes the temporary files of unfinished shards."""
        try:
            self._tasks.put(None, timeout=5.0)
            self._process.join(timeout=60)
        except (queue.Full, ValueError, OSError):
            pass
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()

    def _drain(self, block: bool) -> None:
        """Collect the writer's messages: shard records, an error (raised), or its end."""
        while not self._done:
            try:
                message = self._results.get(timeout=1.0) if block else self._results.get_nowait()
            except queue.Empty:
                if block and not self._process.is_alive():
                    raise DataError(f"the latent shard writer process died (exit code {self._process.exitcode}); "
                                    "finished shards are kept: run the same command again") from None
                if not block:
                    return
                continue
            if message[0] == "record":
                self.records.append(ShardRecord(**message[1]))
                self.sums.append(message[2])
                self.skipped.update(message[3])
            elif message[0] == "error":
                self._done = True
                raise DataError(message[1])
            else:
                self._done = True


def _stats_name(shard_name: str) -> str:
    return f"{STATS_DIR}/{shard_name.removesuffix('.tar')}.json"


# ------------------------------------------------------------------------------ the pass


@dataclass
class EncodeResult:
    """What one rank did: shard records (new and kept), its float64 latent sums, skipped samples."""

    records: list[ShardRecord]
    moments: LatentMoments
    skipped: Counter
    written: int = 0
    kept: int = 0


def _finished(output: ShardOutput, job: EncodeJob, fingerprint: str, channels: int
              ) -> tuple[ShardRecord, LatentMoments, dict[str, int]] | None:
    """A shard of this plan that a previous run completed (shard and statistics present), else None."""
    stats = output.read_json(_stats_name(job.name))
    if stats is None or stats.get("fingerprint") != fingerprint:
        return None
    record = output.finished(job.name)
    if record is None or record.num_samples != stats["num_samples"]:
        return None
    moments = LatentMoments(channels)
    moments.sums = torch.tensor(stats["sums"], dtype=torch.float64)
    return record, moments, stats.get("skipped", {})


@torch.no_grad()
def encode_jobs(
    model: Any, jobs: list[tuple[int, EncodeJob]], output: ShardOutput, spec: DecodeSpec, options: EncodeOptions,
    *, fingerprint: str, batch_size: int, num_workers: int = 0, strict: bool = False, timeout_s: float = 120.0,
    s3_cfg: S3Config | None = None, progress: bool = False,
) -> EncodeResult:
    """Encode this rank's ``jobs`` into ``output``; finished shards of the same plan are kept."""
    from tqdm import tqdm

    channels = _stats_channels(model)
    result = EncodeResult([], LatentMoments(channels), Counter())
    if not output.remote:  # temporary files of an interrupted run of these shards
        for _, job in jobs:
            for partial in output.local_dir.glob(f".{job.name}.*{PARTIAL_SUFFIX}"):
                partial.unlink(missing_ok=True)
    todo = []
    for index, job in jobs:
        done = _finished(output, job, fingerprint, channels)
        if done is None:
            todo.append((index, job))
            continue
        result.records.append(done[0])
        result.moments.sums += done[1].sums
        result.skipped.update(done[2])
        result.kept += 1
    if result.kept:
        log.info("resuming: %d of %d shard(s) of this rank already encoded", result.kept, len(jobs))
    if not todo:
        return result
    device = next(model.parameters()).device
    target = DTYPES[options.dtype]
    by_index = dict(todo)
    sink = _ShardSink(output, fingerprint, s3_cfg)
    bar = tqdm(unit="img", desc="encode", disable=not progress or None)
    try:
        loader = _loader(_ShardBatches(todo, spec, batch_size, strict, s3_cfg), min(num_workers, len(todo)),
                         timeout_s)
        for item in loader:
            if "__error__" in item:
                raise DataError(item["__error__"])
            job, keys = by_index[item["job"]], item["key"]
            batch_moments = LatentMoments(channels)
            latents = torch.zeros(0)
            if keys:
                mean, logvar = posterior(model, item["image"].to(device, non_blocking=True))
                if options.latents == "mean_logvar":
                    latents, stats_of = torch.cat([mean, logvar], dim=1), mean
                else:
                    latents = stats_of = draw(mean, logvar, keys, options.seed)
                batch_moments.add(stats_of)
                latents = latents.to(target)
            sink.put(job.name, keys, latents, batch_moments.sums.numpy(), item["extras"], item["last"],
                     item["skipped"])
            bar.update(len(keys))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    result.records += sink.records
    for sums in sink.sums:
        result.moments.sums += torch.tensor(sums, dtype=torch.float64)
    result.skipped.update(sink.skipped)
    result.written = len(sink.records)
    return result


def _stats_channels(model: Any) -> int:
    """Latent channels C (the statistics are those of the C-channel mean or sample)."""
    shape = getattr(model, "latent_shape", None)
    if shape is None:
        raise DataError(f"{type(model).__name__} has no latent_shape; encode needs a vae-train model")
    return int(shape[0])


def stored_shape(model: Any, latents: str) -> list[int]:
    """The ``latents`` tensor's shape per sample: ``[2C, h, w]`` (mean_logvar) or ``[C, h, w]`` (sample)."""
    c, *rest = (int(v) for v in model.latent_shape)
    return [2 * c if latents == "mean_logvar" else c, *rest]


def write_encode_index(output: ShardOutput, jobs: list[EncodeJob], records: list[ShardRecord],
                       meta: dict[str, Any]) -> ShardIndex:
    """index.json over every split's output shards in job order (all shards must be finished)."""
    by_name = {r.name: r for r in records}
    missing = [job.name for job in jobs if job.name not in by_name]
    if missing:
        raise DataError(f"{len(missing)} output shard(s) are not finished (first: {missing[0]}); run encode again")
    splits: dict[str, list[ShardRecord]] = {}
    for job in jobs:
        splits.setdefault(job.name.rsplit("-", 1)[0], []).append(by_name[job.name])
    index = ShardIndex(splits=splits, meta=meta)
    output.write_text(INDEX_NAME, index.to_json())
    return index


def previous_plan_problem(output: ShardOutput, plan: dict[str, Any], overwrite: bool) -> str | None:
    """Rank 0's check of ``encode.json``: None to go on (old outputs deleted on ``overwrite``), else why not."""
    previous = output.read_json(ENCODE_PLAN)
    if previous is not None and previous.get("fingerprint") != plan["fingerprint"]:
        if not overwrite:
            return (f"{output.out} holds latents encoded with another model, data or options (plan "
                    f"{previous.get('fingerprint')} != {plan['fingerprint']}); pass --overwrite to replace them, "
                    "or choose another --out")
        stale = [o.key for o in output.store.list() if SHARD_NAME.match(o.key) or o.key.startswith(STATS_DIR + "/")]
        output.delete_shards([*stale, INDEX_NAME])
    output.write_text(ENCODE_PLAN, json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return None


def make_plan(model_hash: str, checkpoint: str, data: str, jobs: list[EncodeJob], spec: DecodeSpec,
              options: EncodeOptions, latent_shape: list[int]) -> dict[str, Any]:
    """The plan document (encode.json): everything that decides the output bytes, and its fingerprint."""
    body = {
        "model_sha256": model_hash,
        "checkpoint": checkpoint,
        "data": data,
        "inputs": [[job.url, job.name] for job in jobs],
        "decode": {"image_size": spec.image_size, "channels": spec.channels, "value_range": list(spec.value_range),
                   "binarize": spec.binarize, "resize": spec.resize},
        "options": options.__dict__,
        "latent_shape": latent_shape,
    }
    text = json.dumps(body, sort_keys=True)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], **body}


def rank_jobs(jobs: list[EncodeJob]) -> list[tuple[int, EncodeJob]]:
    """This rank's share: jobs ``i % world_size == rank`` with their global index."""
    rank, world = distributed.rank(), distributed.world_size()
    return [(i, job) for i, job in enumerate(jobs) if i % world == rank]


def encode(
    model: Any, *, checkpoint: str, data: str, out: str, options: EncodeOptions, data_cfg: DataConfig,
    batch_size: int, overwrite: bool = False, s3_cfg: S3Config | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Encode every input shard of ``data`` once over all ranks into ``out``; rank 0 writes index.json.

    ``data_cfg`` gives the decoding (``binarize`` resolved for the model, ``resize``,
    ``num_workers``, ``strict``, ``timeout_s``). Under a process group every rank calls
    this; a failure on any rank is raised on every rank (after each stopped), never a
    hang. Returns (on every rank) the index meta plus ``written``/``kept`` shard counts.
    """
    from vae_train.data.sources import resolve_sources
    from vae_train.data.stream import decode_spec

    options.check()
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    sources = resolve_sources(data, default_split="train", s3_cfg=s3_cfg)
    jobs = plan_jobs(sources)
    cfg = model.config
    spec = decode_spec(data_cfg, cfg.image_size, cfg.in_channels, model.likelihood.value_range, train=False)
    shape = stored_shape(model, options.latents)
    plan = make_plan(model_sha256(model), checkpoint, data, jobs, spec, options, shape)
    output = ShardOutput(out, s3_cfg)
    try:
        problem = None
        if distributed.rank() == 0:
            try:
                problem = previous_plan_problem(output, plan, overwrite)
            except Exception as exc:  # noqa: BLE001 - told to every rank instead of leaving them waiting
                problem = f"cannot check or write {ENCODE_PLAN} in {out}: {type(exc).__name__}: {exc}"
        problem = distributed.broadcast_json(problem)
        if problem:
            raise DataError(problem)
        result, failure = None, None
        try:
            result = encode_jobs(model, rank_jobs(jobs), output, spec, options, fingerprint=plan["fingerprint"],
                                 batch_size=batch_size, num_workers=data_cfg.num_workers, strict=data_cfg.strict,
                                 timeout_s=data_cfg.timeout_s, s3_cfg=s3_cfg, progress=progress)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            failure = exc
        mine = {"error": f"rank {distributed.rank()}: {failure}" if failure else None}
        if result is not None:
            mine.update(records=[r.__dict__ for r in result.records], sums=result.moments.sums.tolist(),
                        skipped=dict(result.skipped), written=result.written, kept=result.kept)
        gathered = distributed.all_gather_json(mine)
        if failure is not None:
            raise failure
        errors = [g["error"] for g in gathered if g["error"]]
        if errors:
            raise DataError(f"encoding failed on another rank ({errors[0]}); finished shards are kept: run again")
        moments = LatentMoments(_stats_channels(model))
        skipped: Counter[str] = Counter()
        records = []
        for g in gathered:
            moments.sums += torch.tensor(g["sums"], dtype=torch.float64)
            skipped.update(g["skipped"])
            records += [ShardRecord(**r) for r in g["records"]]
        meta = {
            "source": "vae-train encode", "sample_kind": "latents", "latents": options.latents,
            "dtype": options.dtype, "latent_shape": shape, "latent_channels": _stats_channels(model),
            "statistics_of": "mean" if options.latents == "mean_logvar" else "sample",
            **moments.summary(), "checkpoint": checkpoint, "data": data, "model_sha256": plan["model_sha256"],
            "plan": plan["fingerprint"], "seed": options.seed, "skipped": dict(skipped),
        }
        problem = None
        if distributed.rank() == 0:
            try:
                write_encode_index(output, jobs, records, meta)
            except Exception as exc:  # noqa: BLE001 - told to every rank instead of leaving them waiting
                problem = f"cannot write {INDEX_NAME} in {out}: {type(exc).__name__}: {exc}"
        problem = distributed.broadcast_json(problem)
        if problem:
            raise DataError(problem)
        return {**meta, "written": sum(g["written"] for g in gathered), "kept": sum(g["kept"] for g in gathered),
                "shards": len(jobs), "samples": sum(r.num_samples for r in records)}
    finally:
        output.close()
