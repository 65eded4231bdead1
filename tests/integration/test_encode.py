"""``vae-train encode`` and ``latent-stats`` on real Fashion-MNIST shards: 2 ranks under torchrun, a
SIGKILL mid-run and a resume, the real S3 server, and the latent shards read back by the data stream.

The oracle for every latent is the model's own ``encode`` on the input PNG decoded here
with Pillow, in fp32, one image at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

import vae_train
from tests.launching import clean_env, finish, kill_group, run, start, torchrun
from vae_train.cli import main
from vae_train.config import DataConfig
from vae_train.data import build_train_stream, build_val_stream
from vae_train.data.index import ShardIndex
from vae_train.data.tario import iter_shard
from vae_train.latents import keyed_noise
from vae_train.ops.reference import soft_clamp_logvar

pytestmark = [pytest.mark.timeout(300)]

TRAIN_SAMPLES = 2700  # the train split of the fashion_shards fixture: 6 shards (5 x 500 + 200)


def _input_samples(shards: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    index = ShardIndex.from_json((shards / "index.json").read_text(), "index.json")
    samples = {}
    for record in index.shards(split):
        for key, members in iter_shard(str(shards / record.name)):
            samples[key] = members
    return samples


def _output_samples(out: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of every shard in ``out``'s index.json (local dir), in order."""
    index = ShardIndex.from_json(Path(out, "index.json").read_text(), "index.json")
    return [s for split in index.splits for r in index.shards(split) for s in iter_shard(str(Path(out, r.name)))]


def _direct(model: torch.nn.Module, members: list[dict[str, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior of each input PNG (decoded here with Pillow), fp32, in batches of 256."""
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(m["png"])), dtype=np.float32) / 255 for m in members])
    x = torch.from_numpy(pixels)[:, None]
    with torch.no_grad():
        mu, logvar = zip(*(model.encode(chunk) for chunk in x.split(256)))
    return torch.cat(mu), soft_clamp_logvar(torch.cat(logvar))


def _check_against_inputs(out: str, shards: Path, model: torch.nn.Module, *, sample_seed: int | None = None,
                          atol: float = 2e-5, rtol: float = 0.0) -> dict:
    """Each input key exactly once with its non-image members, every latent equal to a direct encode."""
    inputs = _input_samples(shards)
    outputs = _output_samples(out)
    counts = Counter(key for key, _ in outputs)
    assert len(outputs) == TRAIN_SAMPLES and set(counts) == set(inputs) and max(counts.values()) == 1
    for key, members in outputs:
        assert members["cls"] == inputs[key]["cls"] and "png" not in members
    keys = [key for key, _ in outputs]
    latents = torch.stack([load(members["safetensors"])["latents"].float() for _, members in outputs])
    mu, logvar = _direct(model, [inputs[key] for key in keys])
    if sample_seed is None:
        expected = torch.cat([mu, logvar], dim=1)
    else:
        expected = mu + torch.exp(0.5 * logvar) * keyed_noise(keys, mu.shape[1:], sample_seed)
    torch.testing.assert_close(latents, expected, atol=atol, rtol=rtol)
    return json.loads(Path(out, "index.json").read_text())["meta"]


def test_two_ranks_encode_every_key_once_and_the_stream_reads_them_back(
        exported_vae: Path, fashion_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    done = run(torchrun("-m", "vae_train", "encode", "--checkpoint", str(exported_vae), "--data",
                        f"{fashion_shards}#train", "--out", str(out), "--binarize", "none", "--batch-size", "128",
                        "--no-progress", "data.num_workers=1"), timeout_s=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = vae_train.load_model(exported_vae)
    meta = _check_against_inputs(str(out), fashion_shards, model)
    assert meta["latent_shape"] == [8, 14, 14] and meta["latents"] == "mean_logvar" and meta["dtype"] == "fp32"

    # the scaling factor recorded is 1/std of every posterior mean (float64 over all of them)
    means = torch.stack([load(m["safetensors"])["latents"][:4] for _, m in _output_samples(str(out))]).double()
    assert meta["scaling_factor"] == pytest.approx(1 / means.std(unbiased=False).item(), rel=1e-6)
    assert meta["shift_factor"] == pytest.approx(means.mean().item(), rel=1e-6, abs=1e-9)

    # the data pipeline reads the shards back: validation = every key once, training = endless batches
    data = DataConfig(train=str(out), val=f"{out}#train", num_workers=1, shuffle_buffer=16, binarize="none")
    kw = {"image_size": 14, "channels": 8, "value_range": (0.0, 0.0), "s3_cfg": None, "sample_kind": "latents"}
    stored = {k: load(m["safetensors"])["latents"] for k, m in _output_samples(str(out))}
    seen = Counter()
    for batch in build_val_stream(data, batch_size=500, rank=0, world_size=1, **kw):
        assert "image" not in batch and batch["latents"].dtype == torch.float32
        for key, latent, real in zip(batch["key"], batch["latents"], batch["mask"].tolist()):
            if real:
                seen[key] += 1
                assert torch.equal(latent, stored[key])
    assert seen == Counter(dict.fromkeys(stored, 1))
    train = build_train_stream(data, micro_batch_size=32, rank=0, world_size=1, seed=0, **kw)
    for _, batch in zip(range(3), train):
        assert batch["latents"].shape == (32, 8, 14, 14) and set(batch["key"]) <= set(stored)


def test_killed_encode_resumes_without_duplicates(exported_vae: Path, fashion_shards: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latents"
    args = ["encode", "--checkpoint", str(exported_vae), "--data", str(fashion_shards), "--out", str(out),
            "--binarize", "none", "--no-progress"]
    proc = start([sys.executable, "-m", "vae_train", *args, "--batch-size", "1", "data.num_workers=0"],
                 env=clean_env())
    deadline = time.monotonic() + 120
    # kill once a shard is finished and the next one is being written (batches of 1: a shard takes seconds)
    while (not list(out.glob("train-*.tar")) or not list(out.glob(".train-*.partial"))) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_group(proc)
    tail = finish(proc).stdout[-2000:]
    finished = sorted(p.name for p in out.glob("train-*.tar"))
    assert finished and not (out / "index.json").exists(), f"the run was not interrupted mid-way:\n{tail}"
    assert len(finished) < 6 and list(out.glob(".train-*.partial")), "no shard was being written at the kill"

    assert main([*args, "--batch-size", "256", "data.num_workers=0"]) == 0  # another batch size: same output
    assert f"{len(finished)} kept from an earlier run" in capsys.readouterr().out
    assert not list(out.glob(".*partial"))
    _check_against_inputs(str(out), fashion_shards, vae_train.load_model(exported_vae))
    index = json.loads((out / "index.json").read_text())
    for shard in index["splits"]["train"]["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]

    # other options over the same output are refused, not mixed in
    assert main([*args, "--latents", "sample"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_encode_to_s3_and_read_back(exported_vae: Path, fashion_shards: Path, s3_env, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_env.new_bucket()
    uri = f"s3://{bucket}/latents"
    args = ["encode", "--checkpoint", str(exported_vae), "--data", str(fashion_shards), "--out", uri,
            "--latents", "sample", "--dtype", "bf16", "--seed", "7", "--binarize", "none", "--no-progress",
            "data.num_workers=1"]
    assert main(args) == 0
    assert "6 written now" in capsys.readouterr().out
    local = tmp_path / "copy"
    client = s3_env.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="latents/")["Contents"]:
        assert ".partial" not in obj["Key"]
        target = local / obj["Key"].removeprefix("latents/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(target))
    meta = _check_against_inputs(str(local), fashion_shards, vae_train.load_model(exported_vae), sample_seed=7,
                                 atol=1e-4, rtol=2**-8)  # bf16: 8 significant bits
    assert meta["latents"] == "sample" and meta["dtype"] == "bf16" and meta["latent_shape"] == [4, 14, 14]

    data = DataConfig(val=f"{uri}#train", num_workers=1, binarize="none")
    stream = build_val_stream(data, image_size=14, channels=4, value_range=(0.0, 0.0), batch_size=1000, rank=0,
                              world_size=1, s3_cfg=None, sample_kind="latents")
    assert sum(int(batch["mask"].sum()) for batch in stream) == TRAIN_SAMPLES

    assert main(args) == 0  # resume on S3: nothing left to do
    assert "6 kept from an earlier run" in capsys.readouterr().out


def test_latent_stats_on_one_and_two_ranks_agree(exported_vae: Path, fashion_shards: Path, tmp_path: Path) -> None:
    # The val split (300 images) splits at 150 over 2 ranks; batches of 50 start there too, so both runs
    # encode the same fp32 batches (a convolution's rounding may depend on the batch) and what may differ
    # is the float64 reduction order. 251 images: rank 0 measures 150 of them, rank 1 the other 101.
    args = ["latent-stats", "--checkpoint", str(exported_vae), "--data", f"{fashion_shards}#val", "--latents",
            "sample", "--seed", "3", "--max-images", "251", "--batch-size", "50"]
    assert main([*args, "--out", str(tmp_path / "one.json"), "data.num_workers=0"]) == 0
    done = run(torchrun("-m", "vae_train", *args, "--out", str(tmp_path / "two.json"), "data.num_workers=1"),
               timeout_s=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["images"] == two["images"] == 251 and one["latents"] == two["latents"] == "sample"
    for key in ("scaling_factor", "shift_factor", "std"):
        assert two[key] == pytest.approx(one[key], rel=1e-12)
    np.testing.assert_allclose(two["latents_std"], one["latents_std"], rtol=1e-12)
    np.testing.assert_allclose(two["latents_mean"], one["latents_mean"], rtol=1e-12, atol=1e-15)


def test_a_damaged_input_shard_stops_encode_cleanly(exported_vae: Path, fashion_shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(fashion_shards, shards)
    damaged = shards / "train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2] + b"\x00garbage" * 100)
    out = tmp_path / "latents"
    assert main(["encode", "--checkpoint", str(exported_vae), "--data", str(shards), "--out", str(out),
                 "--binarize", "none", "--no-progress", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "train-000002.tar" in err and "finished shards are kept" in err
    assert not (out / "index.json").exists() and not (out / "train-000002.tar").exists()
    assert not list(out.glob(".*partial")), "an aborted shard left its temporary file"
    assert (out / "train-000000.tar").exists()  # shards finished before the damaged one are kept
