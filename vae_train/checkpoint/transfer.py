"""Moving checkpoints to and from the remote store: the background uploader and the verified download.

Upload: one thread per rank mirrors the files that rank wrote to
``{remote}/step-NNNNNNNN/`` in save order (multipart through boto3's transfer
manager, retried with full-jitter backoff while training continues). Rank 0
then waits until every other rank's files are remote with the right size and
SHA-256, and only then commits the manifest with a conditional write
(``If-None-Match``), so a remote checkpoint exists only once it is whole.
After a commit, rank 0 applies the retention policy remotely.

Download: :func:`download_checkpoint` fetches a committed remote checkpoint in
parallel into a staging directory, checks every file against the manifest and
renames it into place, manifest last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vae_train.checkpoint.manifest import (
    MANIFEST,
    CheckpointError,
    FileEntry,
    Manifest,
    list_remote,
    read_manifest,
    retention_victims,
    sha256_file,
    step_name,
    verify_local,
)
from vae_train.storage import ObjectStore, backoff_delay, retry, write_atomic

log = logging.getLogger(__name__)

#: Niceness of the upload threads (training keeps priority on a busy node).
UPLOAD_NICE = 10
#: Longest pause between upload retries: an outage is noticed within this long after it ends.
RETRY_CAP_S = 15.0


@dataclass
class UploadJob:
    """One checkpoint's upload on one rank."""

    step: int
    local_dir: Path
    files: dict[str, FileEntry]  # the files this rank uploads
    manifest: Manifest | None  # rank 0: commit it once every listed file is remote
    saved_at: float


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int
    keep_every: int


class Uploader:
    """One thread per rank that mirrors checkpoint files to the remote store, in save order."""

    def __init__(self, store: ObjectStore, rank: int, retention: RetentionPolicy, peer_timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.retention = retention
        self.peer_timeout_s = peer_timeout_s
        self._jobs: deque[UploadJob] = deque()
        self._active: UploadJob | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-upload-rank{rank}", daemon=True)
        self._thread.start()

    def pending(self) -> list[int]:
        """Steps queued or uploading on this rank."""
        with self._cond:
            return [j.step for j in self._jobs] + ([self._active.step] if self._active else [])

    def submit(self, job: UploadJob) -> None:
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
                log.error("rank %d: upload of checkpoint %s to %s failed: %s; it stays local only; the previous "
                          "committed checkpoint remains the one resumed", self.rank, step_name(job.step),
                          self.store.uri, exc)
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _process(self, job: UploadJob) -> None:
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
        manifest = job.manifest
        committed = retry(lambda: self.store.put_bytes(manifest.to_json(), f"{name}/{MANIFEST}", if_none_match=True),
                          what=f"commit of {name}", attempts=0, cap_s=RETRY_CAP_S, should_stop=self._stop.is_set)
        if not committed:
            existing = Manifest.from_json(self.store.get_bytes(f"{name}/{MANIFEST}"), f"{self.store.uri}/{name}")
            if not existing.same_content(manifest):
                log.warning("%s/%s was already committed with different content (another run writes to this "
                            "prefix?); it was not overwritten", self.store.uri, name)
        with contextlib.suppress(Exception):
            self.store.put_bytes(name.encode(), "latest")  # a hint for humans; resolution never reads it
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

    def _wait_for_peers(self, job: UploadJob) -> None:
        """Rank 0 commits only when every other rank's files are remote and verified."""
        assert job.manifest is not None
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
            victims = set(retention_victims(sorted(committed), self.retention.keep_last, self.retention.keep_every))
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
