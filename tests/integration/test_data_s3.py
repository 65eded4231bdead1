"""Shards on a real S3-compatible server (SeaweedFS on 127.0.0.1): prepare --out s3://, stream, bad credentials."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.launching import free_port
from vae_train.cli import main
from vae_train.config import DataConfig, S3Config
from vae_train.data import DataError, build_train_stream, build_val_stream

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PREPARE = ["prepare", "fashion-mnist", "--limit", "600", "--samples-per-shard", "100", "--workers", "2",
           "--no-progress"]


def _train(spec: str, s3_cfg: S3Config, workers: int = 2):
    data = DataConfig(train=spec, num_workers=workers, shuffle_buffer=50, timeout_s=60, binarize="dynamic")
    return build_train_stream(data, image_size=28, channels=1, value_range=(0.0, 1.0), micro_batch_size=16,
                              rank=0, world_size=1, seed=3, s3_cfg=s3_cfg)


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory) -> tuple[str, Path]:
    """The same Fashion-MNIST subset prepared to S3 and to a local directory."""
    env = s3_server.env()
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    bucket = s3_server.new_bucket()
    local = tmp_path_factory.mktemp("s3-reference")
    try:
        assert main([*PREPARE, "--out", f"s3://{bucket}/fm"]) == 0
        assert main([*PREPARE, "--out", str(local)]) == 0
    finally:
        mp.undo()
    return f"s3://{bucket}/fm", local


def test_prepare_uploads_shards_and_index(s3_env, s3_shards) -> None:
    uri, local = s3_shards
    bucket = uri.split("/")[2]
    objects = {o["Key"]: o["Size"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]}
    expected = {f"fm/{p.name}": p.stat().st_size for p in local.iterdir() if p.suffix in (".tar", ".json")}
    assert objects == expected
    body = s3_env.client().get_object(Bucket=bucket, Key="fm/index.json")["Body"].read()
    assert body == (local / "index.json").read_bytes()


def test_stream_from_s3_equals_stream_from_disk(s3_env, s3_shards) -> None:
    uri, local = s3_shards
    from_s3 = _train(uri, S3Config())
    from_disk = _train(str(local), S3Config())
    for _ in range(12):
        a, b = next(from_s3), next(from_disk)
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    from_s3.close()
    brace = _train(f"{uri}/train-{{000000..000005}}.tar", S3Config(), workers=0)
    assert len(next(brace)["key"]) == 16


def test_validation_from_s3_exactly_once(s3_env, s3_shards) -> None:
    uri, _ = s3_shards
    seen: Counter[str] = Counter()
    for rank in (0, 1):
        data = DataConfig(val=f"{uri}#test", num_workers=2, binarize="fixed")
        for batch in build_val_stream(data, image_size=28, channels=1, value_range=(0.0, 1.0), batch_size=64,
                                      rank=rank, world_size=2, s3_cfg=S3Config()):
            seen.update(k for k, m in zip(batch["key"], batch["mask"]) if m)
    assert len(seen) == 600 and set(seen.values()) == {1}


def test_wrong_credentials_fail_at_start_up(s3_env, s3_shards, monkeypatch) -> None:
    uri, _ = s3_shards
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(DataError, match="denied") as info:
        _train(uri, S3Config(max_attempts=1))
    assert "definitely-wrong" not in str(info.value)


def test_unreachable_endpoint_fails_fast(s3_env, s3_shards) -> None:
    uri, _ = s3_shards
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot reach"):
        _train(uri, S3Config(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout_s=1))
    assert time.monotonic() - start < 30


def test_object_deleted_mid_run_is_skipped(s3_env, s3_shards) -> None:
    uri, _ = s3_shards
    bucket = uri.split("/")[2]
    client = s3_env.client()
    copy = f"s3://{bucket}/copy"
    for name in ("train-000000.tar", "train-000001.tar"):
        client.copy_object(Bucket=bucket, Key=f"copy/{name}", CopySource={"Bucket": bucket, "Key": f"fm/{name}"})
    stream = _train(f"{copy}/train-{{000000..000001}}.tar", S3Config(), workers=0)
    client.delete_object(Bucket=bucket, Key="copy/train-000001.tar")
    keys = [k for _ in range(30) for k in next(stream)["key"]]
    assert len(keys) == 480
    assert stream.stats()["skipped"]["shard_error"] >= 1


def test_sliced_prepare_to_s3_and_resume(s3_env, s3_shards, data_log) -> None:
    _, local = s3_shards
    bucket = s3_env.new_bucket()
    out = f"s3://{bucket}/sliced"
    for i in (1, 0):
        assert main([*PREPARE, "--out", out, "--num-slices", "2", "--slice", str(i)]) == 0
    assert main(["prepare", "index", out]) == 0
    client = s3_env.client()
    index = client.get_object(Bucket=bucket, Key="sliced/index.json")["Body"].read()
    assert index == (local / "index.json").read_bytes()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if "_slices" in k]
    assert main([*PREPARE, "--out", out]) == 0  # everything is there: nothing re-uploaded
    assert "resuming: 13 of 13 shard(s) already written" in data_log.text
    assert client.get_object(Bucket=bucket, Key="sliced/index.json")["Body"].read() == index


def test_s3_stream_resumes_after_the_connection_breaks(s3_env) -> None:
    import os

    from vae_train.data import s3_opener

    bucket = s3_env.new_bucket()
    payload = os.urandom(24 * 1024 * 1024)  # larger than any socket buffer: the body is really streamed
    s3_env.client().put_object(Bucket=bucket, Key="big.bin", Body=payload)
    s3_opener.configure(S3Config(max_attempts=10))
    stream = s3_opener.open_s3(f"s3://{bucket}/big.bin")
    head = stream.read(1024 * 1024)
    s3_env.stop()  # the open connection dies with the server
    s3_env.start()
    rest = stream.read()
    stream.close()
    assert head + rest == payload
