"""`vae-train score` with a one-class-style model: a real training run with data.classes, then scoring
on one process and on two (torchrun), AUROC against scikit-learn, and the bad inputs of the issue."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tests.launching import clean_env, run, torchrun
from vae_train.cli import main

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
NORMAL = (0, 1)


@pytest.fixture(scope="module")
def two_class_model(fashion_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml trained on classes 0 and 1 only (data.classes), validated on them too; exported."""
    root = tmp_path_factory.mktemp("two-class")
    trained = run(
        [sys.executable, "-m", "vae_train", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"data.train={fashion_shards}", f"data.val={fashion_shards}", f"run_dir={root / 'run'}",
         f"train.max_steps={STEPS}", f"checkpoint.every_steps={STEPS}", "data.classes=[0,1]", "train.val_batches=0"],
        env=clean_env(), timeout_s=300,
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    assert val and val[-1]["images"] == pytest.approx(_count(fashion_shards, "val", NORMAL))  # only classes 0, 1
    assert main(["export", str(root / "run" / "checkpoints" / f"step-{STEPS:08d}"), "--out", str(root / "export")]) == 0
    return root / "export"


def _count(shards: Path, split: str, classes: tuple[int, ...]) -> int:
    from vae_train.data.decode import read_label
    from vae_train.data.tario import iter_shard

    index = json.loads((shards / "index.json").read_text())
    return sum(read_label(members) in classes for shard in index["splits"][split]["shards"]
               for _, members in iter_shard(str(shards / shard["name"])))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _score(model: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "--checkpoint", str(model), "--data", f"{shards}#test", "--fit-data", f"{shards}#train",
            "--normal-classes", ",".join(map(str, NORMAL)), "--out", str(out), "--batch-size", "200",
            "data.num_workers=0", *extra]


def test_score_one_and_two_ranks(two_class_model: Path, fashion_shards: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    one, metrics = tmp_path / "one.csv", tmp_path / "one.json"
    assert main(_score(two_class_model, fashion_shards, one, "--metrics-out", str(metrics), "--iw-samples", "2")) == 0
    printed = capsys.readouterr().out
    rows = _rows(one)
    assert len(rows) == 3000 and len({r["key"] for r in rows}) == 3000
    assert list(rows[0])[:5] == ["key", "label", "score_bpd", "nelbo_nats", "iw_nll_nats"]
    assert {"score", "recon", "complexity", "latent", "knn", "combined"} <= set(rows[0])
    summary = json.loads(metrics.read_text())
    assert summary["score"] == "combined"  # the default once normal data is given
    y = [int(r["label"]) not in NORMAL for r in rows]
    score = [float(r["score"]) for r in rows]
    assert score == [float(r["combined"]) for r in rows]
    assert summary["auroc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert summary["auprc"] == pytest.approx(average_precision_score(y, score), abs=1e-12)
    for name in ("nelbo", "iw", "recon", "complexity", "latent", "knn"):
        column = [float(r[{"nelbo": "nelbo_nats", "iw": "iw_nll_nats"}.get(name, name)]) for r in rows]
        assert summary["auroc_by_score"][name] == pytest.approx(roc_auc_score(y, column), abs=1e-12), name
    assert "AUROC" in printed and "AUPRC" in printed
    assert (tmp_path / "one_hist.png").stat().st_size > 1000

    two = tmp_path / "two.csv"
    done = run(torchrun("-m", "vae_train", *_score(two_class_model, fashion_shards, two)), timeout_s=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows2 = _rows(two)
    assert [r["key"] for r in rows2] == [r["key"] for r in rows]  # every test image once, in data order
    assert [r["label"] for r in rows2] == [r["label"] for r in rows]
    # deterministic scores (posterior means, the fit's sums) agree with one process
    for name in ("recon", "latent", "knn", "combined", "complexity"):
        if name == "complexity":  # rank by the sampled ELBO here (no --iw-samples): other noise per rank
            continue
        np.testing.assert_allclose([float(r[name]) for r in rows2], [float(r[name]) for r in rows], rtol=1e-6)


def test_bad_normal_classes_and_unlabelled_data(two_class_model: Path, fashion_shards: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    base = ["score", "--checkpoint", str(two_class_model), "--data", f"{fashion_shards}#val", "--out", str(out),
            "--score", "recon", "data.num_workers=0"]
    assert main([*base, "--normal-classes", "0,12"]) == 2
    assert "class(es) [12] do not occur in the scored data" in capsys.readouterr().err
    assert main([*base, "--normal-classes", ",".join(map(str, range(10)))]) == 2
    assert "every scored image belongs to --normal-classes" in capsys.readouterr().err
    assert main([*base[:-3], "--score", "latent", "--normal-classes", "0"]) == 2
    assert "--fit-data" in capsys.readouterr().err

    images = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    unlabelled = tmp_path / "unlabelled"
    assert main(["prepare", "arrays", str(tmp_path / "images.npy"), "--out", str(unlabelled), "--workers", "1",
                 "--val-fraction", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(two_class_model), "--data", f"{unlabelled}#train", "--out", str(out),
                 "--normal-classes", "0", "--metrics-out", str(tmp_path / "m.json"), "data.num_workers=0"]) == 0
    assert "the data has no labels" in capsys.readouterr().out
    assert len(_rows(out)) == 30 and "auroc" not in json.loads((tmp_path / "m.json").read_text())
    # normal data without labels cannot be kept to --normal-classes
    assert main(["score", "--checkpoint", str(two_class_model), "--data", f"{fashion_shards}#val", "--out", str(out),
                 "--fit-data", f"{unlabelled}#train", "--normal-classes", "0", "data.num_workers=0"]) == 2
    assert "needs labelled samples" in capsys.readouterr().err


def test_max_time_s_ends_the_run_with_a_final_checkpoint(fashion_shards: Path, tmp_path: Path) -> None:
    """train.max_time_s stops a run long before max_steps, and it ends as a finished run does."""
    started = time.perf_counter()
    trained = run(
        [sys.executable, "-m", "vae_train", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"data.train={fashion_shards}", f"run_dir={tmp_path / 'run'}", "train.max_steps=100000",
         "train.max_time_s=3", "checkpoint.every_steps=100000", "data.classes=[3]"],
        env=clean_env(), timeout_s=240,
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "train.max_time_s=3 reached" in trained.stderr + trained.stdout
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 100000
    assert time.perf_counter() - started < 200
