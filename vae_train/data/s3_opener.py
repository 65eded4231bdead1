"""``s3://`` for WebDataset: a boto3 streaming reader registered in ``webdataset.gopen.gopen_schemes``.

webdataset 1.0.2 has no ``s3://`` scheme, and the usual ``pipe:aws s3 cp ... -``
breaks intermittently (Broken pipe) and hides errors in a subprocess. This opener
streams the object body through the client of :func:`vae_train.storage.make_s3_client`
(standard AWS credential chain, endpoint from ``s3.endpoint_url`` or
``AWS_ENDPOINT_URL``, per-request timeouts, botocore "standard" retries). A
connection that breaks mid-object is reopened at the current byte offset with a
``Range`` request, with full-jitter backoff, so a transient network error costs a
retry, not a shard.

The client is created lazily per process (boto3 clients must not cross a fork),
so DataLoader workers each get their own.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vae_train.config import S3Config

_settings: dict[str, Any] = {"cfg": None}
_clients: dict[tuple[int, str], Any] = {}


def configure(s3_cfg: "S3Config | None") -> None:
    """Set the S3 client settings used by every later ``s3://`` open in this process."""
    _settings["cfg"] = s3_cfg
    register()


def register() -> None:
    """Install the ``s3`` scheme into webdataset's dispatch table (idempotent)."""
    import importlib

    # ``webdataset.gopen`` the attribute is the function; the module sits in sys.modules.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = open_s3


def _client() -> Any:
    """This process's client for the configured settings."""
    from vae_train.storage import make_s3_client

    cfg = _settings["cfg"]
    key = (os.getpid(), cfg.model_dump_json() if cfg is not None else "")
    if key not in _clients:
        _clients[key] = make_s3_client(cfg)
    return _clients[key]


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url!r} is not of the form s3://bucket/key")
    return bucket, key


class S3ReadStream(io.RawIOBase):
    """A read-only stream over one S3 object that resumes at its offset after a broken connection."""

    def __init__(self, client: Any, bucket: str, key: str, max_attempts: int) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._max_attempts = max_attempts
        self._pos = 0
        self._size: int | None = None
        self._body = None
        self._open()

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        response = self._client.get_object(**kwargs)
        if self._size is None:
            self._size = int(response["ContentLength"])
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        from botocore.exceptions import BotoCoreError, ClientError

        from vae_train.storage import retry

        if self._size is not None and self._pos >= self._size:
            return 0

        def attempt() -> bytes:
            if self._body is None:
                self._open()
            try:
                return self._body.read(len(buffer))
            except (BotoCoreError, OSError):
                self._body = None  # reopen at self._pos on the next attempt
                raise

        data = retry(attempt, what=f"reading s3://{self._bucket}/{self._key}", attempts=self._max_attempts,
                     retry_on=(BotoCoreError, ClientError, OSError))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        if n == 0 and self._size is not None and self._pos < self._size:
            raise OSError(f"s3://{self._bucket}/{self._key}: connection ended at byte {self._pos} of {self._size}")
        return n

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BufferedReader:
    """The gopen handler: a buffered stream of ``s3://bucket/key`` (read only)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: the s3 scheme is read-only here (prepare uploads through vae_train.storage)")
    bucket, key = split_s3_url(url)
    cfg = _settings["cfg"]
    attempts = cfg.max_attempts if cfg is not None else 5
    return io.BufferedReader(S3ReadStream(_client(), bucket, key, attempts), buffer_size=max(bufsize, 1 << 20))
