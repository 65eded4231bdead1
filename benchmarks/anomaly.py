"""One-class anomaly detection on Fashion-MNIST through the CLI: AUROC of every score, per class.

Run::

    OMP_NUM_THREADS=1 python benchmarks/anomaly.py [--classes 0,6] [--json OUT] [--work-dir DIR]
        [--config configs/anomaly.yaml] [--budget-s 300] [--iw-samples 2] [overrides ...]

The protocol (Ruff et al. 2018, Golan & El-Yaniv 2018, Park et al. 2020): for each class c,
train on the training images of class c only, score all 10,000 test images, and report
the AUROC of "another class" (anomaly) against "class c" (normal); the summary is the
mean over the classes. Everything goes through the user-facing commands:

1. ``vae-train prepare fashion-mnist`` once (train/val/test splits, labels in the shards);
2. per class, ``vae-train train --config CONFIG data.classes=[c]`` (the training stream
   keeps class c and counts the rest as filtered); the config's ``train.max_time_s``
   ends the loop in time for the whole command to fit in ``--budget-s`` seconds on the
   shared 2-core CPU (a loaded machine trains fewer steps), and the measured time of every
   run is printed beside its result (a run over budget is flagged);
3. ``vae-train score --data DIR#test --fit-data DIR#train --normal-classes c`` with
   ``--iw-samples K``, which reports the AUROC of every score in its metrics JSON.

Scoring one class overlaps the training of the next (``--no-overlap`` to run them one
after the other): the training runs still get at most their wall-time budget, and the
table shows how many steps each one reached. With ``--work-dir`` kept from an earlier run,
trained classes are not trained again (their recorded time is reused) and classes scored
with every current score are not scored again.

Prints a table (one row per class, one column per score, the mean, and the ratio of the
default score's mean to the 0.94 target) and, with ``--json OUT``, writes
``{"<class>": {"<score>": auroc, ...}, ..., "default_score": "<name>"}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cli_runs import command, failed, fashion_mnist_work_dir, vae_train  # noqa: E402
from vae_train.anomaly import DEFAULT_SCORE, SCORES  # noqa: E402
from vae_train.data.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES  # noqa: E402

TARGET_MEAN = 0.94
TARGET_MIN = 0.85
ANCHORS = {"VAE recon (Park et al. 2020)": 0.869, "Deep SVDD": 0.914, "GEOM": 0.935, "ARNet": 0.939}


def train_class(c: int, args: argparse.Namespace, work: Path, shards: Path, log: Path) -> tuple[Path, float]:
    """Train on class ``c`` only; returns (final checkpoint, wall seconds of the train command).

    The loop stops at ``train.max_time_s`` (the config leaves room for start-up and the
    final save within ``--budget-s``), so a loaded machine trains fewer steps, not longer.
    A class trained by an earlier run of this benchmark (same ``--work-dir``) is reused.
    """
    run_dir = work / f"class{c}"
    timing = run_dir / "train_seconds.txt"
    if timing.is_file():
        train_s = float(timing.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoint of an interrupted earlier run is taken for this one
        train_s = vae_train("train", "--config", args.config, f"data.train={shards}", "data.val=",
                             f"data.classes=[{c}]", f"run_dir={run_dir}", "resume=none",
                             "logging.progress_bar=false", *args.overrides, log=log)
        timing.write_text(f"{train_s:.1f}\n")
    # the run ends at train.max_time_s (or max_steps): its final checkpoint is the newest one
    return max((run_dir / "checkpoints").glob("step-*")), train_s


class Scoring:
    """``vae-train score`` of one class model, started in the background (it may overlap the next training)."""

    def __init__(self, c: int, checkpoint: Path, args: argparse.Namespace, work: Path, shards: Path) -> None:
        self.c, self.metrics, self.log = c, work / f"class{c}-score.json", work / f"class{c}-score.log"
        self.args = ("score", "--checkpoint", str(checkpoint), "--data", f"{shards}#test", "--fit-data",
                     f"{shards}#train", "--normal-classes", str(c), "--iw-samples", str(args.iw_samples),
                     "--binarize", "none", "--out", str(work / f"class{c}-scores.csv"),
                     "--metrics-out", str(self.metrics), "data.num_workers=0")
        self.process = None
        if not self._done():
            cmd, env = command(self.args)
            with self.log.open("w") as f:
                self.process = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

    def _done(self) -> bool:
        """Scored already (an earlier run, same --work-dir) with every score of this version."""
        if not self.metrics.is_file():
            return False
        return set(SCORES) <= set(json.loads(self.metrics.read_text()).get("auroc_by_score", {}))

    def result(self) -> dict[str, float]:
        """AUROC per score (waits for the command)."""
        if self.process is not None and self.process.wait() != 0:
            raise failed(self.args, self.process.returncode, self.log)
        return json.loads(self.metrics.read_text())["auroc_by_score"]


def table(results: dict[int, dict[str, float]], seconds: dict[int, float], steps: dict[int, int],
          budget_s: float) -> str:
    names = [n for n in SCORES if all(n in r for r in results.values())]
    head = f"{'class':14s} " + " ".join(f"{n:>10s}" for n in names) + f" {'train s':>8s} {'steps':>6s}"
    lines = [head, "-" * len(head)]
    for c, aurocs in sorted(results.items()):
        flag = " over budget" if seconds[c] > budget_s else ""
        lines.append(f"{c} {CLASS_NAMES[c]:12s} " + " ".join(f"{aurocs[n]:10.3f}" for n in names)
                     + f" {seconds[c]:8.0f} {steps[c]:6d}{flag}")
    means = {n: sum(r[n] for r in results.values()) / len(results) for n in names}
    lines.append("-" * len(head))
    lines.append(f"{'mean':14s} " + " ".join(f"{means[n]:10.3f}" for n in names))
    default_mean = means[DEFAULT_SCORE]
    worst = min(results, key=lambda c: results[c][DEFAULT_SCORE])
    lines.append(f"default score {DEFAULT_SCORE}: mean AUROC {default_mean:.3f} = {default_mean / TARGET_MEAN:.3f} x "
                 f"the {TARGET_MEAN} target; worst class {worst} ({CLASS_NAMES[worst]}) "
                 f"{results[worst][DEFAULT_SCORE]:.3f} (target >= {TARGET_MIN})")
    lines.append("anchors (mean AUROC, all 10 classes): " + ", ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="normal classes to run, e.g. 0,6")
    parser.add_argument("--config", default=str(REPO / "configs" / "anomaly.yaml"), help="training config")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds allowed per class")
    parser.add_argument("--iw-samples", type=int, default=2, help="K of the IWAE bound (the iw and complexity scores)")
    parser.add_argument("--json", default=None, help="write the AUROC table as JSON here")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="score each class before training the next (default: scoring overlaps the next training)")
    parser.add_argument("--work-dir", default=None, help="keep shards, runs and logs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = parser.parse_args()
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--classes {args.classes!r}: expected comma-separated class numbers 0-9") from None
    if not classes or any(not 0 <= c <= 9 for c in classes):
        raise SystemExit(f"--classes {args.classes!r}: expected comma-separated class numbers 0-9")
    if not Path(args.config).is_file():
        raise SystemExit(f"config {args.config} not found; pass --config")
    work, log, shards = fashion_mnist_work_dir(args.work_dir, "vae-anomaly-")

    results: dict[int, dict[str, float]] = {}
    seconds: dict[int, float] = {}
    steps: dict[int, int] = {}
    pending: list[Scoring] = []

    def collect(scoring: Scoring) -> None:
        c = scoring.c
        results[c] = {n: v for n, v in scoring.result().items() if n in SCORES}
        shown = ", ".join(f"{n} {v:.3f}" for n, v in results[c].items())
        print(f"class {c} ({CLASS_NAMES[c]}): {shown}; trained {seconds[c]:.0f} s, {steps[c]} steps", flush=True)
        if args.json:
            _write_json(args.json, results)

    for c in classes:
        checkpoint, seconds[c] = train_class(c, args, work, shards, log)
        steps[c] = int(checkpoint.name.split("-")[1])
        if pending:  # the previous class was scored while this one trained
            collect(pending.pop())
        scoring = Scoring(c, checkpoint, args, work, shards)
        if args.overlap:
            pending.append(scoring)
        else:
            collect(scoring)
    for scoring in pending:
        collect(scoring)
    print()
    print(f"config {args.config} {' '.join(args.overrides)}; scores with K={args.iw_samples} importance samples")
    print(table(results, seconds, steps, args.budget_s))


def _write_json(path: str, results: dict[int, dict[str, float]]) -> None:
    payload: dict[str, object] = {str(c): aurocs for c, aurocs in sorted(results.items())}
    payload["default_score"] = DEFAULT_SCORE
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
