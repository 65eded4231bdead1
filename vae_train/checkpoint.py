"""Checkpoints: save, commit, upload in the background, find the newest, resume (also elastically).

A checkpoint is the directory ``{run_dir}/checkpoints/step-NNNNNNNN/`` holding

* DeepSpeed's files (``mp_rank_00_model_states.pt``, ``zero_pp_rank_R_...`` per rank),
* our trainer state, per rank: ``trainer_state.rankRRRRR.json`` (global step, the
  caller's state such as the data stream position, RNG states of Python/NumPy,
  and on rank 0 the resolved config and the library version) and
  ``rng.rankRRRRR.safetensors`` (the torch RNG states) -- JSON and safetensors,
  never pickle,
* ``manifest.json``: every file with its size and SHA-256, the world size, ZeRO
  stage, step and time. **It is written last**, by rank 0, after every rank's files
  are complete. A checkpoint without a valid manifest does not exist for resume, so
  a save killed half-way (SIGKILL, node loss) can never be resumed by mistake.

With ``checkpoint.remote = s3://bucket/prefix`` the same layout is mirrored there
by a background thread on every rank (each rank uploads the files it wrote:
multipart through boto3's transfer manager, retried with exponential backoff and
jitter; training continues meanwhile). Rank 0 uploads the manifest last, with a
conditional write (``If-None-Match``), only after every file it lists is present
remotely with the right size and SHA-256. A ``latest`` object is written as a hint
for humans; resolution never reads it. When uploads fall behind by more than
``checkpoint.max_pending_uploads`` checkpoints, intermediate uploads are skipped
(all ranks agree, and it is logged) instead of blocking training or filling disks.

Resume (``resume=auto``) takes the newest committed checkpoint in the remote, else
in the local run dir, downloads it in parallel if needed, verifies every file
against the manifest (a failing checkpoint is refused and ``auto`` falls back to
the previous one), and loads it. Same world size: exact (DeepSpeed state, RNG
states, data position). Different world size: DeepSpeed's universal checkpoint
conversion runs automatically, weights and optimizer state are restored exactly,
and the data stream is re-derived by the caller from ``all_rank_states``.

Trust: DeepSpeed stores its files with ``torch.save`` (pickle) and loads them with
``weights_only=False``. We load them with ``weights_only=True`` plus an allow-list of
four plain DeepSpeed data classes (:func:`restricted_torch_load`), and only after the
SHA-256 of each file matched the manifest. The residual assumption: whoever can
write the manifest and files in your bucket controls the checkpoint's *values*.

Usage from a training loop (every rank calls every method)::

    engine = ...deepspeed.initialize(...)            # a plain DeepSpeed engine
    ckpt = CheckpointManager(cfg, engine, rank, world_size, local_rank)   # checks S3 access now
    path = ckpt.resolve_resume()                     # None = start fresh
    if path:
        resumed = ckpt.load(engine, path)            # -> ResumedState
        step = resumed.step; stream.load_state_dict(resumed.rank_state["data"])
    while step < max_steps:
        ...; step += 1
        ckpt.maybe_save(step, lambda: {"data": stream.state_dict()})
    ckpt.save(step, {"data": stream.state_dict()}, final=True)
    ckpt.wait_for_uploads(cfg.checkpoint.upload_deadline_s)
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_train.errors import VaeTrainError
from vae_train.storage import ObjectStore, StorageError, backoff_delay, open_store, retry, temp_sibling, write_atomic

if TYPE_CHECKING:
    from vae_train.config import Config

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vae-train-checkpoint/1"
STEP_RE = re.compile(r"^step-(\d{8,})$")
UNIVERSAL_DIR = ".universal"
#: Niceness of the upload threads (training keeps priority on a busy node).
UPLOAD_NICE = 10
#: Longest pause between upload retries: an outage is noticed within this long after it ends.
RETRY_CAP_S = 15.0
#: Model-config keys that do not change the parameters (safe to differ on resume).
RUNTIME_ONLY_MODEL_KEYS = frozenset({"reparam"})
_OWNER_RES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"\.rank(\d+)\."))


class CheckpointError(VaeTrainError):
    """A checkpoint that cannot be used: missing, uncommitted, corrupted or incompatible."""


def step_name(step: int) -> str:
    """The directory (and S3 prefix) name of a checkpoint: ``step-00001234``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    match = STEP_RE.match(name)
    return int(match.group(1)) if match else None


# -- manifest -------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    rank: int


@dataclass
class Manifest:
    """What makes a checkpoint exist: written last, lists every file with its hash."""

    step: int
    world_size: int
    zero_stage: int
    files: dict[str, FileEntry]
    created: str = ""
    library_version: str = ""
    format: str = FORMAT

    def to_json(self) -> bytes:
        body = asdict(self)
        body["files"] = {name: asdict(entry) for name, entry in sorted(self.files.items())}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> Manifest:
        """Parse and validate; any deviation raises :class:`CheckpointError` naming ``where``."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
            files = {}
            for name, entry in raw["files"].items():
                if name.startswith("/") or ".." in Path(name).parts or name == MANIFEST:
                    raise ValueError(f"bad file name {name!r}")
                files[name] = FileEntry(int(entry["size"]), str(entry["sha256"]), int(entry["rank"]))
            if not files:
                raise ValueError("lists no files")
            return cls(int(raw["step"]), int(raw["world_size"]), int(raw["zero_stage"]), files,
                       str(raw.get("created", "")), str(raw.get("library_version", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"invalid manifest {where}: {exc}") from None

    def same_content(self, other: Manifest) -> bool:
        return (self.step, self.world_size, self.files) == (other.step, other.world_size, other.files)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_manifest(ckpt_dir: str | Path) -> Manifest | None:
    """The manifest of a local checkpoint, or None when it has none (= not committed)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_json(path.read_bytes(), str(path))


def verify_local(ckpt_dir: str | Path, manifest: Manifest, *, hashes: bool = True) -> list[str]:
    """Problems of a local checkpoint against its manifest (empty list = intact)."""
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{name}: size {path.stat().st_size} != {entry.size}")
        elif hashes and sha256_file(path) != entry.sha256:
            problems.append(f"{name}: SHA-256 mismatch")
    return problems


def _owner_rank(name: str) -> int:
    """Which rank wrote a checkpoint file (by DeepSpeed's and our naming); the rest is rank 0's."""
    for pattern in _OWNER_RES:
        match = pattern.search(Path(name).name)
        if match:
            return int(match.group(1))
    return 0


def list_local_committed(ckpt_root: str | Path) -> list[tuple[int, Path, Manifest]]:
    """Committed local checkpoints (valid manifest), oldest first."""
    out = []
    root = Path(ckpt_root)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        step = parse_step(child.name)
        if step is None or not child.is_dir():
            continue
        try:
            manifest = read_manifest(child)
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", child, exc)
            continue
        if manifest is not None:
            out.append((step, child, manifest))
    return sorted(out, key=lambda item: item[0])


def list_remote(store: ObjectStore) -> tuple[dict[int, list[str]], set[int]]:
    """All remote checkpoint keys grouped by step, and the steps that have a manifest."""
    by_step: dict[int, list[str]] = {}
    committed = set()
    for info in store.list("step-"):
        top, _, rest = info.key.partition("/")
        step = parse_step(top)
        if step is None or not rest:
            continue
        by_step.setdefault(step, []).append(info.key)
        if rest == MANIFEST:
            committed.add(step)
    return by_step, committed


def retention_victims(committed: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Committed steps to delete: all but the newest ``keep_last`` and multiples of ``keep_every``.

    The newest committed checkpoint is never a victim (``keep_last >= 1``).
    """
    ordered = sorted(committed)
    keep = set(ordered[-max(1, keep_last):])
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


# -- safe loading of DeepSpeed files ------------------------------------------------------
def _deepspeed_safe_globals() -> list[Any]:
    """The only non-tensor classes DeepSpeed puts into its checkpoint pickles (ZeRO 0-3, fp16/bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_RESTRICT_LOCK = threading.Lock()
_restrict_depth = 0


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Make every ``torch.load`` inside (DeepSpeed's included) use ``weights_only=True``.

    Why: DeepSpeed loads its own files with ``weights_only=False``, i.e. full pickle,
    which executes code from the file. Forcing the weights-only unpickler with an
    allow-list of DeepSpeed's plain data classes keeps a crafted checkpoint from
    running code even if it got past the manifest's hashes. Re-entrant (the
    universal conversion runs inside a load).
    """
    import pickle

    import torch

    global _restrict_depth
    with _RESTRICT_LOCK:
        _restrict_depth += 1
        if _restrict_depth == 1:
            original = torch.load

            def weights_only_load(*args: Any, **kwargs: Any) -> Any:
                kwargs["weights_only"] = True
                try:
                    return original(*args, **kwargs)
                except pickle.UnpicklingError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CheckpointError(
                        f"refusing to load {args[0] if args else kwargs.get('f')!s}: it holds objects outside "
                        f"the weights-only allow-list ({first}); it was not written by vae-train's DeepSpeed save"
                    ) from None

            weights_only_load.original = original  # type: ignore[attr-defined]
            torch.load = weights_only_load
            torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    try:
        yield
    finally:
        with _RESTRICT_LOCK:
            _restrict_depth -= 1
            if _restrict_depth == 0:
                torch.load = torch.load.original  # type: ignore[attr-defined]


# -- distributed helpers (no-ops in a single process) ------------------------------------
def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _comm_device() -> Any:
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (JSON on the wire, not pickle)."""
    import torch

    dist = _dist()
    if dist is None:
        return [obj]
    device = _comm_device()
    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(s.item())].cpu().tolist()).decode()) for c, s in zip(chunks, sizes)]


def _broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    return _all_gather_json(obj if _rank() == src else None)[src] if _dist() else obj


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny all-reduce)."""
    import torch

    dist = _dist()
    if dist is None:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


# -- trainer state (per rank, JSON + safetensors) ------------------------------------------
def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """RNG states as (JSON part, tensors) -- Python, NumPy, torch CPU and CUDA."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _reseed(seed: int, step: int, rank: int) -> None:
    """Deterministic fresh RNG streams for an elastic resume (old per-rank states do not map)."""
    import numpy as np
    import torch

    derived = int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little")
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def trainer_state_files(rank: int) -> tuple[str, str]:
    return f"trainer_state.rank{rank:05d}.json", f"rng.rank{rank:05d}.safetensors"


@dataclass
class ResumedState:
    """What :meth:`CheckpointManager.load` restored, for the training loop to continue from.

    ``rank_state`` is the dict this rank passed to ``save`` (None after an elastic
    resume, where rank r's old state has no meaning); ``all_rank_states`` holds every
    saved rank's dict in rank order, from which the data stream is re-derived for a
    new world size. ``config`` is the resolved config the checkpoint was trained with.
    """

    step: int
    path: str
    elastic: bool
    saved_world_size: int
    rank_state: dict[str, Any] | None
    all_rank_states: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


# -- background upload ----------------------------------------------------------------
@dataclass
class _UploadJob:
    step: int
    local_dir: Path
    files: dict[str, FileEntry]  # the files this rank uploads
    manifest: Manifest | None  # rank 0: commit it once every listed file is remote
    saved_at: float


class _Uploader:
    """One thread per rank that mirrors checkpoint files to the remote store, in save order."""

    def __init__(self, store: ObjectStore, rank: int, cfg: Config) -> None:
        self.store = store
        self.rank = rank
        self.keep_last = cfg.checkpoint.keep_last
        self.keep_every = cfg.checkpoint.keep_every
        self.peer_timeout_s = cfg.checkpoint.upload_deadline_s
        self._jobs: deque[_UploadJob] = deque()
        self._active: _UploadJob | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.committed: list[int] = []
        self.failed: list[int] = []
        self._thread = threading.Thread(target=self._run, name=f"ckpt-upload-rank{rank}", daemon=True)
        self._thread.start()

    def pending(self) -> list[int]:
        """Steps queued or uploading on this rank."""
        with self._cond:
            return [j.step for j in self._jobs] + ([self._active.step] if self._active else [])

    def submit(self, job: _UploadJob) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    def wait_for_room(self, max_pending: int, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.pending()) < max_pending, max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and self._active is None, timeout_s)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        # Lower this thread's CPU priority (Linux: per thread, inherited by the transfer manager's
        # worker threads): on a busy node the training step wins the CPU, the upload takes the rest.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICE)
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stop.is_set())
                if self._stop.is_set():
                    return
                self._active = self._jobs.popleft()
            job = self._active
            try:
                self._process(job)
            except Exception as exc:  # noqa: BLE001 - a failed upload must never kill training
                self.failed.append(job.step)
                log.error("rank %d: upload of checkpoint %s to %s failed: %s; it stays local only; the previous "
                          "committed checkpoint remains the one resumed", self.rank, step_name(job.step),
                          self.store.uri, exc)
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _process(self, job: _UploadJob) -> None:
        name = step_name(job.step)
        start = time.monotonic()
        nbytes = 0
        for rel, entry in sorted(job.files.items()):
            self._upload_one(job.local_dir / rel, f"{name}/{rel}", entry)
            nbytes += entry.size
        if job.manifest is None:
            return
        self._wait_for_peers(job)
        if self._stop.is_set():
            return
        committed = retry(lambda: self.store.put_bytes(job.manifest.to_json(), f"{name}/{MANIFEST}", if_none_match=True),
                          what=f"commit of {name}", attempts=0, cap_s=RETRY_CAP_S, should_stop=self._stop.is_set)
        if not committed:
            existing = Manifest.from_json(self.store.get_bytes(f"{name}/{MANIFEST}"), f"{self.store.uri}/{name}")
            if not existing.same_content(job.manifest):
                log.warning("%s/%s was already committed with different content (another run writes to this "
                            "prefix?); it was not overwritten", self.store.uri, name)
        with contextlib.suppress(Exception):
            self.store.put_bytes(name.encode(), "latest")  # a hint for humans; resolution never reads it
        self.committed.append(job.step)
        log.info("checkpoint %s committed to %s (%.1f MB from rank 0 in %.1fs; %.1fs after the save)",
                 name, self.store.uri, nbytes / 1e6, time.monotonic() - start, time.monotonic() - job.saved_at)
        self._apply_retention()

    def _upload_one(self, path: Path, key: str, entry: FileEntry) -> None:
        """Upload unless already there (idempotent across retries), then verify size and SHA-256."""

        tries = 0

        def attempt() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and self._matches(key, entry):  # a retry after a lost response: already there
                return
            self.store.put_file(path, key, metadata={"sha256": entry.sha256})
            if not self._matches(key, entry):
                raise OSError(f"{key}: the stored object does not match the local file after upload")

        retry(attempt, what=f"upload of {key} to {self.store.uri}", attempts=0, cap_s=RETRY_CAP_S,
              should_stop=self._stop.is_set)

    def _matches(self, key: str, entry: FileEntry) -> bool:
        info = self.store.head(key)
        if info is None or info.size != entry.size:
            return False
        # LocalStore has no metadata: size plus the local copy's hash was checked at save time.
        return not info.metadata or info.metadata.get("sha256") == entry.sha256

    def _wait_for_peers(self, job: _UploadJob) -> None:
        """Rank 0 commits only when every other rank's files are remote and verified."""
        name = step_name(job.step)
        others = {rel: e for rel, e in job.manifest.files.items() if rel not in job.files}
        deadline = time.monotonic() + self.peer_timeout_s
        attempt = 0
        while others and not self._stop.is_set():
            others = {rel: e for rel, e in others.items() if not self._safe_matches(f"{name}/{rel}", e)}
            if not others:
                return
            if time.monotonic() > deadline:
                raise CheckpointError(f"files of other ranks never arrived within {self.peer_timeout_s:.0f}s: "
                                      f"{sorted(others)[:3]}")
            attempt += 1
            time.sleep(backoff_delay(attempt, 0.1, 5.0))

    def _safe_matches(self, key: str, entry: FileEntry) -> bool:
        try:
            return self._matches(key, entry)
        except Exception:  # noqa: BLE001 - the endpoint may be down; keep waiting
            return False

    def _apply_retention(self) -> None:
        """Delete remote checkpoints beyond the policy; the manifest goes first (uncommit, then erase)."""
        try:
            by_step, committed = list_remote(self.store)
            newest = max(committed)
            victims = set(retention_victims(sorted(committed), self.keep_last, self.keep_every))
            # Leftovers of uploads that never committed and are older than a committed one.
            victims |= {s for s in by_step if s not in committed and s < newest}
            for step in sorted(victims):
                keys = by_step[step]
                manifest_key = f"{step_name(step)}/{MANIFEST}"
                if manifest_key in keys:
                    self.store.delete([manifest_key])
                self.store.delete([k for k in keys if k != manifest_key])
            if victims:
                log.info("remote retention removed %s", ", ".join(step_name(s) for s in sorted(victims)))
        except Exception as exc:  # noqa: BLE001 - retention is best effort; it retries next commit
            log.warning("remote retention in %s failed: %s", self.store.uri, exc)


# -- the manager ------------------------------------------------------------------------
class CheckpointManager:
    """Save / commit / upload / resolve / load for one rank; every rank makes the same calls."""

    def __init__(
        self,
        cfg: Config,
        engine: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        *,
        store: ObjectStore | None = None,
    ) -> None:
        """Set up and, when a remote is configured, check it now (clear error before training)."""
        self.cfg = cfg
        self.engine = engine
        self.rank = _rank() if rank is None else rank
        dist = _dist()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if dist else 1)
        self.local_rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        if self.store is None and cfg.checkpoint.remote:
            self.store = open_store(cfg.checkpoint.remote, cfg.s3)
        self._uploader: _Uploader | None = None
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        self._skipped_job: _UploadJob | None = None
        if self.store is not None:
            self._check_access_everywhere()
            self._uploader = _Uploader(self.store, self.rank, cfg)

    def _check_access_everywhere(self) -> None:
        error = None
        try:  # one write probe per node is enough; every rank checks it can reach and read the bucket
            self.store.check_access(write=self.local_rank == 0)
        except StorageError as exc:
            error = str(exc)
        errors = [e for e in _all_gather_json(error) if e]
        if errors:
            raise StorageError(f"checkpoint.remote is not usable: {errors[0]}")

    # -- saving ----------------------------------------------------------------------
    def maybe_save(self, step: int, trainer_state_fn: Callable[[], dict[str, Any]]) -> bool:
        """Save if ``checkpoint.every_steps`` or ``every_minutes`` says so (same decision on all ranks)."""
        ck = self.cfg.checkpoint
        due = bool(ck.every_steps) and step % ck.every_steps == 0
        if ck.every_minutes and not due:
            due = _any_rank(time.monotonic() - self._last_save_time >= ck.every_minutes * 60)
        if due:
            self.save(step, trainer_state_fn())
        return due

    def save(self, step: int, trainer_state: dict[str, Any], *, final: bool = False) -> Path:
        """Save checkpoint ``step`` on every rank, commit it locally, queue its upload.

        ``trainer_state`` is this rank's JSON-serialisable state (e.g. ``{"data":
        stream.state_dict()}``); RNG states, config and version are added here.
        ``final=True`` (end of training, SIGTERM/SIGUSR1) never skips the upload: it
        waits for queue room up to ``checkpoint.upload_deadline_s``. Follow it with
        :meth:`wait_for_uploads`.
        """
        if self.engine is None:
            raise CheckpointError("CheckpointManager.save needs the engine: pass engine= or call load(engine, ...)")
        name = step_name(step)
        ckpt_dir = self.root / name
        if self._last_save_step == step:
            if final and self._skipped_job is not None and self._uploader is not None:
                self._enqueue(self._skipped_job, final=True)
            return ckpt_dir
        start = time.monotonic()
        if self.local_rank == 0 and ckpt_dir.exists():
            if (ckpt_dir / MANIFEST).exists():
                log.warning("overwriting existing checkpoint %s", ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a killed save's leftovers: never mix old and new
        _barrier()
        self.engine.save_checkpoint(str(self.root), tag=name, save_latest=False)
        self._write_trainer_state(ckpt_dir, step, trainer_state)
        mine = self._hash_own_files(ckpt_dir)
        pending = self._uploader.pending() if self._uploader else []
        gathered = _all_gather_json({"files": {k: asdict(v) for k, v in mine.items()}, "pending": pending})
        files = {k: FileEntry(**v) for g in gathered for k, v in g["files"].items()}
        manifest = Manifest(step, self.world_size, self._zero_stage(), files,
                            datetime.now(timezone.utc).isoformat(timespec="seconds"), _library_version())
        self._commit_local(ckpt_dir, manifest)
        self._last_save_step, self._last_save_time = step, time.monotonic()
        all_pending = [s for g in gathered for s in g["pending"]]
        if self._uploader is not None:
            job = _UploadJob(step, ckpt_dir, mine, manifest if self.rank == 0 else None, time.monotonic())
            behind = max(len(g["pending"]) for g in gathered) >= self.cfg.checkpoint.max_pending_uploads
            if behind and not final:
                self._skipped_job = job
                if self.rank == 0:
                    log.warning("uploads are behind (%d checkpoints pending): %s stays local only; training "
                                "continues", max(len(g["pending"]) for g in gathered), name)
            else:
                self._skipped_job = None
                self._enqueue(job, final=final)
                all_pending.append(step)
        if self.local_rank == 0:
            self._apply_local_retention(protect_from=min(all_pending, default=None))
        if self.rank == 0:
            log.info("saved checkpoint %s in %.2fs%s", ckpt_dir, time.monotonic() - start,
                     " (upload queued)" if self._uploader and self._skipped_job is None else "")
        return ckpt_dir

    def _enqueue(self, job: _UploadJob, *, final: bool) -> None:
        assert self._uploader is not None
        if final:
            deadline = time.monotonic() + self.cfg.checkpoint.upload_deadline_s
            if not self._uploader.wait_for_room(self.cfg.checkpoint.max_pending_uploads, deadline):
                log.warning("rank %d: upload queue still full at the deadline; queueing %s anyway",
                            self.rank, step_name(job.step))
        self._uploader.submit(job)
        self._skipped_job = None

    def _zero_stage(self) -> int:
        getter = getattr(self.engine, "zero_optimization_stage", None)
        return int(getter()) if callable(getter) else int(self.cfg.distributed.zero_stage)

    def _write_trainer_state(self, ckpt_dir: Path, step: int, trainer_state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        json_name, rng_name = trainer_state_files(self.rank)
        rng_meta, rng_tensors = _rng_state()
        body: dict[str, Any] = {"step": step, "rank": self.rank, "world_size": self.world_size,
                                "library_version": _library_version(), "state": trainer_state, "rng": rng_meta}
        if self.rank == 0:
            body["config"] = self.cfg.model_dump(mode="json")  # holds no credentials (they never enter it)
        try:
            data = json.dumps(body, sort_keys=True).encode()
        except TypeError as exc:
            raise CheckpointError(f"trainer state must be JSON-serialisable (dicts, lists, numbers, strings): {exc}") from None
        write_atomic(ckpt_dir / json_name, data)
        tmp = temp_sibling(ckpt_dir / rng_name)
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp))
        os.replace(tmp, ckpt_dir / rng_name)

    def _hash_own_files(self, ckpt_dir: Path) -> dict[str, FileEntry]:
        """Size and SHA-256 of the files this rank wrote (attributed by file name)."""
        out = {}
        for path in sorted(ckpt_dir.rglob("*")):
            rel = path.relative_to(ckpt_dir).as_posix()
            if not path.is_file() or rel == MANIFEST or path.name.endswith(".tmp"):
                continue
            if _owner_rank(rel) == self.rank:
                out[rel] = FileEntry(path.stat().st_size, sha256_file(path), self.rank)
        return out

    def _commit_local(self, ckpt_dir: Path, manifest: Manifest) -> None:
        """Rank 0 writes the manifest; on node-local disks every node's local rank 0 writes its copy."""
        if self.rank == 0:
            write_atomic(ckpt_dir / MANIFEST, manifest.to_json())
        _barrier()
        if self.local_rank == 0 and self.rank != 0 and not (ckpt_dir / MANIFEST).exists():
            write_atomic(ckpt_dir / MANIFEST, manifest.to_json())

    def _apply_local_retention(self, protect_from: int | None) -> None:
        """Keep the newest ``keep_last`` (+ ``keep_every``) committed; never touch pending uploads."""
        committed = list_local_committed(self.root)
        if not committed:
            return
        newest = committed[-1][0]
        victims = set(retention_victims([s for s, _, _ in committed], self.cfg.checkpoint.keep_last,
                                        self.cfg.checkpoint.keep_every))
        for child in self.root.iterdir():  # uncommitted leftovers older than a committed save
            step = parse_step(child.name)
            if step is not None and step < newest and not (child / MANIFEST).exists():
                victims.add(step)
        for step in sorted(victims):
            if protect_from is not None and step >= protect_from:
                continue
            path = self.root / step_name(step)
            # Uncommit first: a crash half-way through rmtree must not leave a "committed" partial dir.
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    def wait_for_uploads(self, deadline_s: float | None = None) -> bool:
        """Block until this rank's queued uploads are done (True) or the deadline passed (False)."""
        if self._uploader is None:
            return True
        timeout = self.cfg.checkpoint.upload_deadline_s if deadline_s is None else deadline_s
        done = self._uploader.wait_idle(timeout)
        if not done:
            log.warning("rank %d: uploads still pending after %.0fs (%s); the newest committed remote "
                        "checkpoint is the one a resume will use", self.rank, timeout,
                        ", ".join(step_name(s) for s in self._uploader.pending()))
        return done

    @property
    def committed_remote(self) -> list[int]:
        """Steps this rank (rank 0) committed remotely during this run."""
        return list(self._uploader.committed) if self._uploader else []

    def close(self) -> None:
        """Stop the upload thread (call :meth:`wait_for_uploads` first to finish uploads)."""
        if self._uploader is not None:
            self._uploader.stop()

    # -- resolving -------------------------------------------------------------------
    def resolve_resume(self, cfg: Config | None = None) -> str | None:
        """The local path of the checkpoint to resume from (downloaded and verified), or None.

        ``resume``: ``auto`` (newest committed in the remote, else local, else None),
        ``none``, a local checkpoint directory, or ``s3://.../step-NNNNNNNN``. Rank 0
        decides; every node's local rank 0 makes sure the files are present locally.
        """
        cfg = cfg or self.cfg
        mode = cfg.resume.strip()
        if mode.lower() in ("none", ""):
            return None
        decision: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                decision = self._decide(mode)
            except VaeTrainError as exc:
                decision = {"error": str(exc)}
        decision = _broadcast_json(decision)
        if decision is None:
            return None
        if "error" in decision:
            raise CheckpointError(decision["error"])
        error = None
        if self.rank != 0 and self.local_rank == 0:
            try:
                self._ensure_local(decision)
            except VaeTrainError as exc:
                error = str(exc)
        errors = [e for e in _all_gather_json(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return decision["path"]

    def _decide(self, mode: str) -> dict[str, Any] | None:
        if mode == "auto":
            if self.store is not None:
                _, committed = list_remote(self.store)
                for step in sorted(committed, reverse=True):
                    decision = {"source": self.store.uri, "step": step, "path": str(self.root / step_name(step))}
                    try:
                        self._ensure_local(decision)
                        log.info("resume=auto: newest committed remote checkpoint is %s/%s", self.store.uri, step_name(step))
                        return decision
                    except CheckpointError as exc:
                        log.warning("refusing remote checkpoint %s: %s; falling back to the previous committed one",
                                    step_name(step), exc)
            for step, path, manifest in reversed(list_local_committed(self.root)):
                problems = verify_local(path, manifest)
                if not problems:
                    log.info("resume=auto: newest committed local checkpoint is %s", path)
                    return {"source": "", "step": step, "path": str(path)}
                log.warning("refusing local checkpoint %s (%s); falling back to the previous committed one",
                            path, "; ".join(problems[:3]))
            log.info("resume=auto: no committed checkpoint found; starting fresh")
            return None
        if mode.startswith("s3://"):
            parent, _, name = mode.rstrip("/").rpartition("/")
            step = parse_step(name)
            if step is None:
                raise CheckpointError(f"resume={mode!r} must end in a checkpoint name like step-00001000")
            decision = {"source": parent, "step": step, "path": str(self.root / name)}
            self._ensure_local(decision)
            return decision
        path = Path(mode)
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is None:
            raise CheckpointError(f"resume={mode!r} is not a committed checkpoint directory (no {MANIFEST}); "
                                  "use auto, none, a step-NNNNNNNN directory or s3://.../step-NNNNNNNN")
        problems = verify_local(path, manifest)
        if problems:
            raise CheckpointError(f"checkpoint {path} fails its manifest: {'; '.join(problems[:5])}")
        return {"source": "", "step": manifest.step, "path": str(path)}

    def _ensure_local(self, decision: dict[str, Any]) -> None:
        """Download (if needed) and verify the checkpoint named by ``decision`` into its local path."""
        path = Path(decision["path"])
        if not decision["source"]:
            manifest = read_manifest(path)
            if manifest is None or verify_local(path, manifest, hashes=False):
                raise CheckpointError(f"checkpoint {path} is not present on this node (use a shared filesystem "
                                      "or checkpoint.remote for multi-node resume)")
            return
        store = self.store if decision["source"] == getattr(self.store, "uri", None) else \
            open_store(decision["source"], self.cfg.s3)
        download_checkpoint(store, decision["step"], path)


    # -- loading ---------------------------------------------------------------------
    def load(self, engine: Any, path: str | Path) -> ResumedState:
        """Load checkpoint ``path`` into ``engine`` (every rank) and restore RNG states.

        Same world size and ZeRO stage: DeepSpeed's own files, this rank's RNG and
        state (exact resume). Otherwise the checkpoint is converted to DeepSpeed's
        universal format once per node and loaded from it (weights and optimizer
        state exact); RNGs are re-seeded from (seed, step, rank) and
        ``rank_state`` is None so the caller re-derives its data position.

        Exactness needs the caller not to draw from the global RNGs between this call
        and the first step in a way the uninterrupted run did not (e.g. a DataLoader
        drawing its base seed from the global torch RNG when first iterated: give it
        its own ``generator``).
        """
        from safetensors.torch import load_file

        self.engine = engine
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise CheckpointError(f"{path} is not a committed checkpoint (no {MANIFEST})")
        saved = [self._read_state(path, r) for r in range(manifest.world_size)]
        self._check_model_config(path, saved[0].get("config", {}))
        elastic = manifest.world_size != self.world_size or manifest.zero_stage != self._zero_stage()
        with restricted_torch_load():
            if elastic and manifest.zero_stage > 0:
                load_dir, tag = self._universal(path, manifest)
                engine._config.load_universal_checkpoint = True
                try:
                    loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
                finally:
                    engine._config.load_universal_checkpoint = False
                _barrier()
                if self.local_rank == 0:
                    shutil.rmtree(load_dir / tag, ignore_errors=True)
            else:
                loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        mine = saved[self.rank] if not elastic else None
        if mine is not None:
            _, rng_name = trainer_state_files(self.rank)
            _set_rng_state(mine["rng"], load_file(str(path / rng_name)))
        else:
            _reseed(self.cfg.seed, manifest.step, self.rank)
        self._last_save_step, self._last_save_time = manifest.step, time.monotonic()
        if self.rank == 0:
            if elastic:
                log.info("elastic resume from %s at step %d: world size %d -> %d, ZeRO stage %d -> %d (universal "
                         "checkpoint); the data stream is re-derived for the new world size", path, manifest.step,
                         manifest.world_size, self.world_size, manifest.zero_stage, self._zero_stage())
            else:
                log.info("resumed from %s at step %d (exact: same world size %d)", path, manifest.step,
                         self.world_size)
        return ResumedState(manifest.step, str(path), elastic, manifest.world_size,
                            mine["state"] if mine is not None else None, [s["state"] for s in saved],
                            saved[0].get("config", {}))

    @staticmethod
    def _read_state(path: Path, rank: int) -> dict[str, Any]:
        json_name, _ = trainer_state_files(rank)
        try:
            return json.loads((path / json_name).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read {json_name}: {exc}") from None

    def _check_model_config(self, path: Path, saved_cfg: dict[str, Any]) -> None:
        saved_model = saved_cfg.get("model", {})
        current = self.cfg.model.model_dump(mode="json")
        diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current.get(k)!r}"
                 for k in sorted(set(saved_model) | set(current))
                 if k not in RUNTIME_ONLY_MODEL_KEYS and saved_model.get(k) != current.get(k)]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was trained with an incompatible model config:\n  "
                                  + "\n  ".join(diffs)
                                  + "\nuse the checkpoint's model settings, or start fresh with resume=none")

    def _universal(self, path: Path, manifest: Manifest) -> tuple[Path, str]:
        """Convert ``path`` to DeepSpeed's universal format (local rank 0 of each node; cached by step)."""
        load_dir = self.root / UNIVERSAL_DIR
        tag = f"{path.name}-ws{manifest.world_size}"
        error = None
        if self.local_rank == 0 and not (load_dir / tag).is_dir():
            try:
                convert_to_universal(path, load_dir / tag)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"universal conversion of {path} failed: {exc}"
        errors = [e for e in _all_gather_json(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return load_dir, tag


def convert_to_universal(src: Path, dest: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in-process (serial, weights-only loads), atomically into ``dest``."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = temp_sibling(dest)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with restricted_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another node on a shared filesystem finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _library_version() -> str:
    from vae_train import __version__

    return __version__


def download_checkpoint(store: ObjectStore, step: int, dest: str | Path, workers: int = 8) -> Path:
    """Fetch a committed remote checkpoint into ``dest`` in parallel, verified against its manifest.

    A local copy that already matches the remote manifest is reused. Files land in a
    staging directory that is renamed into place, manifest last, so an interrupted
    download never looks committed.
    """
    name = step_name(step)
    dest = Path(dest)
    where = f"{store.uri}/{name}"
    try:
        raw = store.get_bytes(f"{name}/{MANIFEST}")
    except Exception as exc:  # noqa: BLE001 - missing object or endpoint error: both mean "not resumable"
        raise CheckpointError(f"{where} is not a committed checkpoint (no readable {MANIFEST}: {exc})") from None
    manifest = Manifest.from_json(raw, where)
    local = read_manifest(dest) if (dest / MANIFEST).is_file() else None
    if local is not None and local.same_content(manifest) and not verify_local(dest, manifest):
        return dest
    staging = dest.with_name(f".incoming-{name}-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        def fetch(item: tuple[str, FileEntry]) -> str | None:
            rel, entry = item
            target = staging / rel
            retry(lambda: store.get_file(f"{name}/{rel}", target), what=f"download of {where}/{rel}", attempts=5)
            if target.stat().st_size != entry.size or sha256_file(target) != entry.sha256:
                return f"{rel}: SHA-256/size mismatch against the manifest"
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = [p for p in pool.map(fetch, manifest.files.items()) if p]
        if problems:
            raise CheckpointError(f"checkpoint {where} is corrupted: {'; '.join(problems[:5])}")
        write_atomic(staging / MANIFEST, raw)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
