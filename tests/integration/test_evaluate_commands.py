"""`vae-train eval | sample | reconstruct | interpolate | score` on a tiny really-trained checkpoint.

The checkpoint comes from the real trainer on real Fashion-MNIST shards, synced to
the real S3 server; the commands read it as a local checkpoint, as an export and
from ``s3://``. ``eval`` also runs under torchrun with 2 ranks.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from tests.launching import clean_env, run, torchrun
from vae_train.cli import main

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
VAL_SAMPLES = 300  # the val split of the fashion_shards fixture


@dataclass
class TinyRun:
    checkpoint: Path
    export: Path
    remote_checkpoint: str
    remote_export: str
    shards: Path
    s3_env: dict[str, str]


@pytest.fixture(scope="module")
def tiny_run(fashion_shards: Path, s3_server, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """40 steps of configs/tiny.yaml, checkpointed locally and to S3, then exported (local and S3)."""
    root = tmp_path_factory.mktemp("tiny-run")
    bucket = s3_server.new_bucket()
    trained = run(
        [sys.executable, "-m", "vae_train", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"data.train={fashion_shards}", f"data.val={fashion_shards}", f"run_dir={root / 'run'}",
         f"train.max_steps={STEPS}", f"checkpoint.every_steps={STEPS}", f"checkpoint.remote=s3://{bucket}/run"],
        env=clean_env(**s3_server.env()), timeout_s=240,
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    checkpoint = root / "run" / "checkpoints" / f"step-{STEPS:08d}"
    assert main(["export", str(checkpoint), "--out", str(root / "export")]) == 0
    client = s3_server.client()
    for name in ("config.json", "model.safetensors"):
        client.upload_file(str(root / "export" / name), bucket, f"export/{name}")
    return TinyRun(checkpoint, root / "export", f"s3://{bucket}/run/step-{STEPS:08d}", f"s3://{bucket}/export",
                   fashion_shards, s3_server.env())


def _eval(run: TinyRun, checkpoint: str, out: Path, *extra: str) -> dict:
    status = main(["eval", "--checkpoint", checkpoint, "--data", str(run.shards), "--out", str(out),
                   "--iw-samples", "5", *extra, "data.num_workers=0"])
    assert status == 0
    return json.loads(out.read_text())


def test_eval_local_export_and_s3_agree(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    local = _eval(tiny_run, str(tiny_run.checkpoint), tmp_path / "local.json")
    assert "negative ELBO" in capsys.readouterr().out  # the printed table
    assert local["images"] == VAL_SAMPLES and local["nonfinite_images"] == 0
    d = 28 * 28
    for key in ("nelbo", "recon", "kl", "iw_nll"):
        assert local[f"{key}_bpd"] == pytest.approx(local[f"{key}_nats"] / (d * math.log(2)))
    assert local["iw_nll_nats"] < local["nelbo_nats"]
    assert 0 <= local["active_units"] <= local["latent_units"] == 4 * 14 * 14
    assert local["psnr_db"] > 0 and 0 < local["ssim"] <= 1

    exported = _eval(tiny_run, str(tiny_run.export), tmp_path / "export.json")
    for env_name, value in tiny_run.s3_env.items():
        monkeypatch.setenv(env_name, value)
    remote_ckpt = _eval(tiny_run, tiny_run.remote_checkpoint, tmp_path / "s3-ckpt.json")
    remote_export = _eval(tiny_run, tiny_run.remote_export, tmp_path / "s3-export.json")
    for other in (exported, remote_ckpt, remote_export):  # same weights, same seed: same numbers
        for key in ("nelbo_nats", "iw_nll_nats", "active_units", "psnr_db", "ssim"):
            assert other[key] == pytest.approx(local[key], rel=1e-6), key


def test_eval_exactly_once_with_two_ranks(tiny_run: TinyRun, tmp_path: Path) -> None:
    single = _eval(tiny_run, str(tiny_run.export), tmp_path / "one.json", "--batch-size", "64")
    out = tmp_path / "two.json"
    done = run(torchrun("-m", "vae_train", "eval", "--checkpoint", str(tiny_run.export), "--data", str(tiny_run.shards),
                        "--batch-size", "64", "--out", str(out), "data.num_workers=0"), timeout_s=240)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    assert two["images"] == VAL_SAMPLES  # 300 samples over 2 ranks x 3 batches of 64: padding masked out
    # Deterministic parts (posterior means, reconstructions) agree exactly with one process.
    assert two["active_units"] == single["active_units"]
    assert two["psnr_db"] == pytest.approx(single["psnr_db"], rel=1e-9)
    assert two["ssim"] == pytest.approx(single["ssim"], rel=1e-9)
    assert two["kl_nats"] == pytest.approx(single["kl_nats"], rel=1e-6)  # analytic (float32 per image): no noise
    # One posterior draw per image, other noise per rank: the reconstruction term differs by sampling noise
    # only (its mean over 300 images has a standard deviation of about a nat here).
    assert two["nelbo_nats"] == pytest.approx(single["nelbo_nats"], abs=5.0)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_eval_reconstruction_metrics_agree_over_one_and_two_ranks(tiny_run: TinyRun, inception_weights: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--metrics psnr,ssim,rfid with the (random-weight) FID Inception file: each image once over the ranks and
    the float64 feature statistics all-reduced, so 2 ranks give the 1-rank rFID. A split of 7 real images
    keeps the Inception work small (299x299 on 2 CPU cores); 7 over 2 ranks x batches of 2 leaves padding."""
    small = tmp_path / "small-shards"
    assert main(["prepare", "fashion-mnist", "--out", str(small), "--limit", "7", "--val-fraction", "0",
                 "--workers", "1", "--no-progress"]) == 0
    data = f"{small}#test"
    flags = ["--metrics", "psnr,ssim,rfid", "--inception-weights", str(inception_weights), "--batch-size", "2",
             "data.num_workers=0"]
    single_out = tmp_path / "one.json"
    assert main(["eval", "--checkpoint", str(tiny_run.export), "--data", data, "--out", str(single_out), *flags]) == 0
    printed = capsys.readouterr().out
    assert "rFID (7 images)" in printed and "not comparable with published figures" in printed
    single = json.loads(single_out.read_text())
    assert single["rfid_published_weights"] is False
    out = tmp_path / "two.json"
    done = run(torchrun("-m", "vae_train", "eval", "--checkpoint", str(tiny_run.export), "--data", data,
                        "--out", str(out), *flags), timeout_s=240)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    assert single["images"] == single["rfid_images"] == two["rfid_images"] == two["images"] == 7
    assert single["rfid"] > 0
    assert two["rfid"] == pytest.approx(single["rfid"], rel=1e-6)
    assert two["psnr_db"] == pytest.approx(single["psnr_db"], rel=1e-9)
    assert two["ssim"] == pytest.approx(single["ssim"], rel=1e-9)
    # missing weights: a clear error before any image is read
    assert main(["eval", "--checkpoint", str(tiny_run.export), "--data", str(tiny_run.shards), "--metrics", "rfid",
                 "--inception-weights", str(tmp_path / "absent.pth")]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_run.export), "--data", str(tiny_run.shards), "--metrics",
                 "psnr,fid"]) == 2
    assert "unknown reconstruction metric" in capsys.readouterr().err


def test_sample_writes_a_grid_and_single_images(tiny_run: TinyRun, tmp_path: Path) -> None:
    grid, single = tmp_path / "grid.png", tmp_path / "single"
    assert main(["sample", "--checkpoint", str(tiny_run.export), "--n", "16", "--temperature", "0.8",
                 "--out", str(grid), "--out-dir", str(single)]) == 0
    assert _png_size(grid) == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 tiles of 28 px with 2 px padding
    files = sorted(single.glob("sample-*.png"))
    assert len(files) == 16 and _png_size(files[0]) == (28, 28)


def test_image_commands_read_s3_checkpoints(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for env_name, value in tiny_run.s3_env.items():
        monkeypatch.setenv(env_name, value)
    local, remote = tmp_path / "local.png", tmp_path / "remote.png"
    assert main(["sample", "--checkpoint", str(tiny_run.checkpoint), "--n", "9", "--out", str(local)]) == 0
    assert main(["sample", "--checkpoint", tiny_run.remote_checkpoint, "--n", "9", "--out", str(remote)]) == 0
    assert local.read_bytes() == remote.read_bytes()  # same weights, same seed
    recon = tmp_path / "recon.png"
    assert main(["reconstruct", "--checkpoint", tiny_run.remote_export, "--data", str(tiny_run.shards),
                 "--n", "4", "--out", str(recon), "data.num_workers=0"]) == 0
    assert _png_size(recon) == (8 * 30 + 2, 30 + 2)


def test_reconstruct_and_interpolate_grids(tiny_run: TinyRun, tmp_path: Path) -> None:
    recon = tmp_path / "recon.png"
    assert main(["reconstruct", "--checkpoint", str(tiny_run.checkpoint), "--data", str(tiny_run.shards),
                 "--n", "8", "--out", str(recon), "data.num_workers=0"]) == 0
    assert _png_size(recon) == (16 * 30 + 2, 30 + 2)  # one row: 8 inputs, each beside its reconstruction
    interp = tmp_path / "interp.png"
    assert main(["interpolate", "--checkpoint", str(tiny_run.checkpoint), "--data", str(tiny_run.shards),
                 "--pairs", "3", "--steps", "5", "--out", str(interp), "data.num_workers=0"]) == 0
    assert _png_size(interp) == (7 * 30 + 2, 3 * 30 + 2)  # rows: input, 5 decoded points, input


def test_score_writes_csv_auroc_and_histogram(tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, metrics = tmp_path / "scores.csv", tmp_path / "score-metrics.json"
    assert main(["score", "--checkpoint", str(tiny_run.export), "--data", str(tiny_run.shards),
                 "--normal-classes", "0,1", "--iw-samples", "3", "--out", str(out),
                 "--metrics-out", str(metrics), "data.num_workers=0"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == VAL_SAMPLES
    # the columns the command always wrote come first; then the chosen score and one column per score (issue 14)
    assert list(rows[0])[:5] == ["key", "label", "score_bpd", "nelbo_nats", "iw_nll_nats"]
    assert len({row["key"] for row in rows}) == VAL_SAMPLES
    scores = [float(row["score_bpd"]) for row in rows]
    assert all(math.isfinite(s) for s in scores)
    assert scores[0] == pytest.approx(float(rows[0]["iw_nll_nats"]) / (784 * math.log(2)))
    summary = json.loads(metrics.read_text())
    anomalous = [int(row["label"]) not in (0, 1) for row in rows]
    assert summary["auroc"] == pytest.approx(roc_auc_score(anomalous, scores))  # scikit-learn, not our auroc
    assert summary["auprc"] == pytest.approx(average_precision_score(anomalous, scores))
    assert 0 <= summary["auprc"] <= 1 and summary["images"] == VAL_SAMPLES
    assert "AUROC" in capsys.readouterr().out
    assert _png_size(tmp_path / "scores_hist.png")[0] > 100
    few = tmp_path / "few.csv"
    assert main(["score", "--checkpoint", str(tiny_run.export), "--data", str(tiny_run.shards), "--max-images", "50",
                 "--out", str(few), "data.num_workers=0"]) == 0
    with few.open() as f:
        assert len(list(csv.DictReader(f))) == 50


def test_bad_input_gets_clear_errors(tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, data = str(tiny_run.export), str(tiny_run.shards)

    def fails(argv: list[str], pattern: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert pattern in err, err

    fails(["eval", "--checkpoint", ckpt, "--data", data, "--iw-samples", "0"], "--iw-samples must be >= 1")
    fails(["score", "--checkpoint", ckpt, "--data", data, "--iw-samples", "0", "--out", str(tmp_path / "s.csv")],
          "--iw-samples must be >= 1")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails(["eval", "--checkpoint", ckpt, "--data", data, "--out", str(blocker / "m.json")], "cannot create the directory")
    fails(["sample", "--checkpoint", ckpt, "--out", str(tmp_path)], "not a writable file path")
    fails(["sample", "--checkpoint", ckpt], "--out GRID.png")
    fails(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--data", data], "neither an exported model")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["eval", "--checkpoint", ckpt, "--data", str(empty), "data.num_workers=0"], "error:")
    fails(["score", "--checkpoint", ckpt, "--data", data, "--normal-classes", "a,b", "--out", str(tmp_path / "s.csv")],
          "comma-separated integer labels")


def test_weights_ema_without_an_ema_is_a_clear_error(tiny_run: TinyRun, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """tiny.yaml keeps no EMA: ``--weights ema`` stops every model-reading command with a message that
    says so and names ``--weights raw``; on an export (which holds one set) it names the set it holds."""
    data = ["--data", str(tiny_run.shards)]
    argvs = {
        "eval": ["eval", *data],
        "sample": ["sample", "--out", str(tmp_path / "s.png")],
        "reconstruct": ["reconstruct", *data, "--out", str(tmp_path / "r.png")],
        "interpolate": ["interpolate", *data, "--out", str(tmp_path / "i.png")],
        "score": ["score", *data, "--out", str(tmp_path / "s.csv")],
    }
    for name, argv in argvs.items():
        for source, messages in ((tiny_run.checkpoint, ("holds no EMA weights", "use --weights raw")),
                                 (tiny_run.export, ("export of the raw weights", "--weights ema needs the checkpoint"))):
            assert main([*argv, "--checkpoint", str(source), "--weights", "ema", "data.num_workers=0"]) == 2, name
            err = capsys.readouterr().err
            assert all(m in err for m in messages) and "Traceback" not in err, (name, err)
    assert main(["export", str(tiny_run.checkpoint), "--out", str(tmp_path / "e"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "holds no EMA weights" in err and "--weights raw" in err, err
    assert not (tmp_path / "e" / "model.safetensors").exists()


def test_checkpoint_that_does_not_match_the_data(tiny_run: TinyRun, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A 3-channel 32x32 model on 28x28 grayscale shards fails with a message, not a traceback."""
    from safetensors.torch import save_file

    from vae_train.config import ModelConfig
    from vae_train.export import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE
    from vae_train.model import ConvVAE

    cfg = ModelConfig(in_channels=3, image_size=32, base_channels=8, channel_mult=[1, 2], norm_groups=4,
                      likelihood="logistic")
    model = ConvVAE(cfg)
    out = tmp_path / "rgb32"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"format": EXPORT_FORMAT, "model": cfg.model_dump(mode="json"),
                                               "dtype": "fp32", "step": 0, "library_version": "test"}))
    assert main(["eval", "--checkpoint", str(out), "--data", str(tiny_run.shards), "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert "every sample of the evaluation stream was skipped" in err and "model.image_size=32" in err, err
