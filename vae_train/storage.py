"""Object storage for checkpoints and data: a local directory or an S3 bucket, one interface.

Why an abstraction at all: checkpoint sync (upload, conditional manifest commit,
listing, retention) is the same logic whether the remote is ``s3://bucket/prefix``
or a directory on a shared filesystem, and the directory form makes that logic
cheap to test. The S3 side is plain boto3:

* Credentials come **only** from the standard AWS chain (environment variables,
  ``~/.aws`` files, instance/container roles). Nothing here accepts, stores or
  logs a key; error messages name the endpoint and bucket, never a credential.
* The endpoint is ``s3.endpoint_url`` from the config, else ``AWS_ENDPOINT_URL``
  (read by boto3 itself), else AWS. Path-style addressing, because S3-compatible
  stores (SeaweedFS, MinIO, Ceph) rarely serve virtual-host buckets.
* Every request has connect/read timeouts and botocore's "standard" retry mode
  (exponential backoff with jitter) for transient errors; :func:`retry` adds an
  outer loop with the same shape for callers that must outlast a longer outage.
* Large files go through boto3's transfer manager (multipart, parallel parts).
* ``put_bytes(..., if_none_match=True)`` is a conditional write (``If-None-Match:
  *``; on a directory an atomic create-if-absent): checkpoint manifests are
  committed and run generations claimed with it, so two writers can never both
  believe they committed the same checkpoint or hold the same generation.

Public interface (used by :mod:`vae_train.checkpoint` and the data pipeline)::

    parse_uri("s3://bucket/some/prefix")   -> ParsedUri("s3", "bucket", "some/prefix")
    make_s3_client(s3_cfg)                 -> boto3 S3 client (keep this stable: data uses it)
    store = open_store(uri, s3_cfg)        -> LocalStore | S3Store rooted at uri
    store.put_file(path, key, metadata=..) / put_bytes(data, key, if_none_match=..) -> bool
    store.get_file(key, path) / get_bytes(key) / head(key) / exists(key)
    store.list(prefix) -> list[ObjectInfo] / delete(keys)
    store.child("generations")             -> the store rooted one level down (same client)
    store.check_access(write=True)         # fail fast before training starts
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vae_train.errors import VaeTrainError

if TYPE_CHECKING:
    from vae_train.config import S3Config

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Our own random stream for retry jitter: drawing from the global ``random`` in a background
#: thread would perturb the training process's RNG state (and with it exact resume).
_JITTER = random.Random()

#: Files at or above this size are uploaded/downloaded in parallel parts.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
TRANSFER_CONCURRENCY = 8


class StorageError(VaeTrainError):
    """A storage location that cannot be used: unreachable, unauthorized, missing, malformed."""


@dataclass(frozen=True)
class ParsedUri:
    """``scheme`` is ``"s3"`` or ``"file"``; for S3 ``bucket`` + ``key`` (no leading slash)."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}".rstrip("/")
        return self.key


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, size and user metadata."""

    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


def parse_uri(uri: str) -> ParsedUri:
    """Split ``s3://bucket/prefix`` (or a local path / ``file://`` URI) into its parts."""
    if not uri:
        raise StorageError("empty storage URI: give s3://bucket/prefix or a local directory")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} has no bucket name: write it as s3://bucket/prefix")
        return ParsedUri("s3", bucket, key.strip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use s3://bucket/prefix or a local path")
    return ParsedUri("file", "", uri.removeprefix("file://"))


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_s: float = 0.5,
    cap_s: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Call ``fn`` until it succeeds, sleeping ``uniform(0, min(cap, base * 2**i))`` between tries.

    Full-jitter exponential backoff (the AWS architecture blog's recommendation):
    many ranks retrying against one recovering endpoint do not retry in lockstep.
    ``attempts <= 0`` means retry until ``should_stop()`` says so. User errors
    (:class:`StorageError`) are not retried: waiting does not fix a wrong bucket.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StorageError:
            raise
        except retry_on as exc:
            if (attempts > 0 and attempt >= attempts) or (should_stop is not None and should_stop()):
                raise
            delay = backoff_delay(attempt, base_s, cap_s)
            log.warning("%s failed (attempt %d): %s; retrying in %.1fs", what, attempt, _describe(exc), delay)
            time.sleep(delay)


def backoff_delay(attempt: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**(attempt-1)))`` seconds."""
    return _JITTER.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


def _describe(exc: BaseException) -> str:
    """A short, credential-free description of a boto/network error."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', '?')} (HTTP {status}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def make_s3_client(s3_cfg: S3Config | None = None, *, max_attempts: int | None = None):
    """A boto3 S3 client from the standard AWS credential chain.

    Endpoint: ``s3_cfg.endpoint_url`` if set, else boto3's own lookup
    (``AWS_ENDPOINT_URL``, config files), else AWS. Region: ``s3_cfg.region``, else
    the chain's default, else ``us-east-1``. Path-style addressing, per-request
    timeouts and "standard" retries (exponential backoff with jitter).
    """
    import boto3
    from botocore.config import Config as BotoConfig

    from vae_train.config import S3Config

    cfg = s3_cfg or S3Config()
    session = boto3.session.Session()
    region = cfg.region or session.region_name or "us-east-1"
    boto_cfg = BotoConfig(
        region_name=region,
        s3={"addressing_style": "path"},
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"max_attempts": max_attempts or cfg.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, TRANSFER_CONCURRENCY * 2),
    )
    return session.client("s3", endpoint_url=cfg.endpoint_url or None, config=boto_cfg)


def _endpoint_of(client: Any) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", "?"))


class ObjectStore:
    """Objects addressed by ``/``-separated keys relative to a root (``uri``)."""

    uri: str

    def put_file(self, path: str | Path, key: str, metadata: dict[str, str] | None = None) -> None:
        raise NotImplementedError

    def put_bytes(self, data: bytes, key: str, *, if_none_match: bool = False) -> bool:
        """Write ``data``; with ``if_none_match`` only if ``key`` is absent. Returns False if it was present."""
        raise NotImplementedError

    def get_file(self, key: str, path: str | Path) -> None:
        """Download ``key`` to ``path`` atomically (a temp file renamed into place)."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        """Size and metadata of ``key``, or None when it does not exist."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; missing keys are not an error."""
        raise NotImplementedError

    def check_access(self, write: bool = True) -> None:
        """Raise :class:`StorageError` now if the store cannot be read (and written)."""
        raise NotImplementedError

    def child(self, sub: str) -> ObjectStore:
        """The store rooted at ``sub`` inside this one (same connection)."""
        raise NotImplementedError



def temp_sibling(path: Path) -> Path:
    """A hidden, unique temporary name beside ``path``: renaming it onto ``path`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` and fsync it, so a later rename never exposes a file whose bytes are not on disk."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync, so a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    _write_synced(tmp, data)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class LocalStore(ObjectStore):
    """A directory used as an object store (shared filesystems, tests)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, path: str | Path, key: str, metadata: dict[str, str] | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dest)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, data: bytes, key: str, *, if_none_match: bool = False) -> bool:
        dest = self._path(key)
        if not if_none_match:
            write_atomic(dest, data)
            return True
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dest)
        _write_synced(tmp, data)
        try:
            os.link(tmp, dest)  # atomic create-if-absent
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return ObjectInfo(key, path.stat().st_size) if path.is_file() else None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.endswith(".tmp"):
                out.append(ObjectInfo(key, path.stat().st_size))
        return sorted(out, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def child(self, sub: str) -> LocalStore:
        return LocalStore(self.root / sub)

    def check_access(self, write: bool = True) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if write:
                probe = self.root / f".access-check-{uuid.uuid4().hex}"
                probe.write_bytes(b"ok")
                probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc.strerror}; check the path and permissions") from None


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` through one boto3 client (thread-safe; shared by transfers)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.transfer_config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=TRANSFER_CONCURRENCY,
            use_threads=True,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, path: str | Path, key: str, metadata: dict[str, str] | None = None) -> None:
        extra = {"Metadata": metadata} if metadata else None
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer_config)

    def put_bytes(self, data: bytes, key: str, *, if_none_match: bool = False) -> bool:
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kwargs)
            return True
        except ClientError as exc:
            if if_none_match and _status(exc) in (409, 412):
                return False
            raise

    def get_file(self, key: str, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp, Config=self.transfer_config)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), dict(resp.get("Metadata") or {}))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"])))
        return sorted(out, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        for start in range(0, len(batch), 1000):  # the DeleteObjects limit
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch[start:start + 1000], "Quiet": True})

    def child(self, sub: str) -> S3Store:
        return S3Store(self.bucket, self._key(sub.strip("/")), self.client)

    def check_access(self, write: bool = True) -> None:
        """Fail fast, before training, with the cause and the fix (no credential in the message)."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        endpoint = _endpoint_of(self.client)
        where = f"{self.uri} (endpoint {endpoint})"
        try:
            self.client.head_bucket(Bucket=self.bucket)
            if write:
                probe = self._key(f".vae-train-access-check-{uuid.uuid4().hex}")
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                self.client.delete_object(Bucket=self.bucket, Key=probe)
        except NoCredentialsError:
            raise StorageError(
                f"no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an instance role (credentials come only from the standard AWS chain)"
            ) from None
        except EndpointConnectionError:
            raise StorageError(
                f"cannot reach S3 endpoint {endpoint} for {self.uri}: check s3.endpoint_url / "
                "AWS_ENDPOINT_URL and that the server is running"
            ) from None
        except ClientError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise StorageError(
                    f"access to {where} denied ({_describe(exc)}): the credentials from the AWS chain are "
                    "wrong or lack s3:ListBucket/GetObject/PutObject/DeleteObject on this bucket"
                ) from None
            if status == 404:
                raise StorageError(f"bucket {self.bucket!r} does not exist at {endpoint}: create it first") from None
            raise StorageError(f"S3 check of {where} failed: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 check of {where} failed: {type(exc).__name__}: {exc}") from None


def _status(exc: Any) -> int | None:
    """HTTP status of a botocore ClientError (None when unknown)."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None:
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(code) if code.isdigit() else None
    return status


def open_store(uri: str, s3_cfg: S3Config | None = None, *, client: Any = None) -> ObjectStore:
    """A store rooted at ``uri`` (``s3://bucket/prefix`` or a local directory)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return S3Store(parsed.bucket, parsed.key, client if client is not None else make_s3_client(s3_cfg))
    return LocalStore(parsed.key)
