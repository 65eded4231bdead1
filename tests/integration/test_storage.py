"""vae_train.storage against a real SeaweedFS S3 server and a local directory."""

from __future__ import annotations

import os

import pytest

from vae_train.config import S3Config
from vae_train.storage import LocalStore, S3Store, StorageError, open_store, parse_uri, retry

pytestmark = pytest.mark.timeout(120)


def test_parse_uri():
    assert parse_uri("s3://bkt/a/b/") == parse_uri("s3://bkt/a/b")
    p = parse_uri("s3://bkt/a/b")
    assert (p.scheme, p.bucket, p.key, str(p)) == ("s3", "bkt", "a/b", "s3://bkt/a/b")
    assert parse_uri("s3://bkt").key == ""
    assert parse_uri("/tmp/x").scheme == "file"
    assert parse_uri("file:///tmp/x").key == "/tmp/x"
    for bad in ("", "s3://", "gs://bucket/x"):
        with pytest.raises(StorageError):
            parse_uri(bad)


def _exercise(store):
    """The same contract for both stores."""
    assert store.list() == []
    assert store.head("a/x") is None and not store.exists("a/x")
    assert store.put_bytes(b"one", "a/x", if_none_match=True)
    assert not store.put_bytes(b"two", "a/x", if_none_match=True), "conditional write must refuse an existing key"
    assert store.get_bytes("a/x") == b"one"
    assert store.put_bytes(b"three", "a/x")  # unconditional overwrite
    assert store.get_bytes("a/x") == b"three"
    store.put_bytes(b"zz", "b/y")
    assert [o.key for o in store.list()] == ["a/x", "b/y"]
    assert [o.key for o in store.list("a/")] == ["a/x"]
    assert store.head("a/x").size == 5
    store.delete(["a/x", "does/not/exist"])
    assert [o.key for o in store.list()] == ["b/y"]


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.check_access()
    _exercise(store)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    store.put_file(src, "d/f.bin")
    store.get_file("d/f.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_store_roundtrip_multipart_and_metadata(s3_env, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/pre/fix", S3Config())
    assert isinstance(store, S3Store)
    store.check_access()
    _exercise(store)
    # 40 MiB crosses the multipart threshold: parts are uploaded in parallel.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024))
    store.put_file(big, "ck/big.bin", metadata={"sha256": "abc"})
    info = store.head("ck/big.bin")
    assert info.size == big.stat().st_size and info.metadata == {"sha256": "abc"}
    store.get_file("ck/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    # Keys are relative to the prefix; nothing leaks outside it.
    raw = s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert all(o["Key"].startswith("pre/fix/") for o in raw)


def test_s3_wrong_credentials_clear_error(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    store = open_store(f"s3://{s3_bucket}/x", S3Config())
    with pytest.raises(StorageError) as err:
        store.check_access()
    msg = str(err.value)
    assert "denied" in msg and s3_bucket in msg
    assert "definitely-wrong-secret" not in msg and s3_env.access_key not in msg


def test_s3_missing_bucket_and_unreachable_endpoint(s3_env):
    with pytest.raises(StorageError, match="does not exist"):
        open_store("s3://no-such-bucket-xyz/p", S3Config()).check_access()
    unreachable = S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1)
    with pytest.raises(StorageError, match="cannot reach"):
        open_store("s3://bkt/p", unreachable).check_access()


def test_retry_backoff_then_success_and_user_errors_not_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert retry(flaky, what="op", attempts=5, base_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(ConnectionError):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("x")), what="op", attempts=2, base_s=0.01)

    def user_error():
        calls.append(1)
        raise StorageError("bad bucket")

    calls.clear()
    with pytest.raises(StorageError):
        retry(user_error, what="op", attempts=5, base_s=0.01)
    assert len(calls) == 1


def test_the_test_server_has_a_volume_for_every_bucket_the_suite_makes(s3_server):
    """Each bucket takes a SeaweedFS volume of its own; by default ``weed mini`` allows only
    (free disk / 1 GiB) of them, and once they are gone every write to a new bucket is an HTTP 500.
    The fixture fixes the capacity, so the suite's ~80 buckets fit on any machine's disk."""
    import json
    import urllib.request

    from tests.fixtures.s3 import MAX_VOLUMES

    with urllib.request.urlopen(f"{s3_server.master_url}/dir/status", timeout=10) as response:
        topology = json.load(response)["Topology"]
    assert topology["Max"] == MAX_VOLUMES
    assert topology["Free"] >= MAX_VOLUMES // 2
