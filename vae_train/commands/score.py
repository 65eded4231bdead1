"""``vae-train score``: one anomaly score per image, on one or several ranks, plus AUROC/AUPRC.

Examples::

    # one-class model of class 6: fit the normal data, score the test split by the default score
    vae-train score --checkpoint runs/c6/checkpoints/step-00001000 --data shards/#test \\
        --fit-data shards/#train --normal-classes 6 --out scores.csv
    # the same on 2 processes: every test image scored exactly once, one CSV from rank 0
    torchrun --nproc_per_node 2 -m vae_train score --checkpoint ... --data shards/#test --out scores.csv
    # a likelihood score, no normal data needed
    vae-train score --checkpoint exported/ --data shards/#test --score iw --iw-samples 100 --out scores.csv

The scores are those of :mod:`vae_train.anomaly`. ``latent`` and ``combined`` compare
an image with normal images: ``--fit-data`` names them (the model's training source,
kept to ``--normal-classes`` when given). The default score is ``combined`` (the best on
``benchmarks/anomaly.py``) when ``--fit-data`` is given, else the likelihood score the
command always had: the IWAE NLL with ``--iw-samples K``, else the negative ELBO.

Under torchrun each rank scores its share of the validation stream (and of the fit
data, whose sums are all-reduced); rank 0 gathers the rows in data order and writes
the CSV (``key,label,score_bpd,nelbo_nats[,iw_nll_nats]``, then ``score`` = the chosen
score and one column per score), the histogram of the chosen score per class and,
with ``--normal-classes``, prints AUROC and AUPRC of every score.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vae_train.anomaly import NormalFit
    from vae_train.config import Config
    from vae_train.model import VAE


def register(subparsers: argparse._SubParsersAction, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``score`` with the shared ``--checkpoint/--data/...`` options that ``command`` makes."""
    from vae_train.anomaly import SCORES

    score = command(subparsers, "score", "one anomaly score per image (+ AUROC/AUPRC with labels)", data=True)
    score.add_argument("--out", required=True,
                       help="CSV: key,label,score_bpd,nelbo_nats[,iw_nll_nats],score, then one column per score")
    score.add_argument("--score", default=None, choices=list(SCORES),
                       help="the anomaly score (default: combined with --fit-data, else iw with --iw-samples, else nelbo)")
    score.add_argument("--fit-data", default=None,
                       help="normal images for the latent and combined scores (e.g. the training split DIR#train); "
                            "kept to --normal-classes when given")
    score.add_argument("--iw-samples", type=int, default=None, metavar="K", help="compute the IWAE NLL with K samples")
    score.add_argument("--iw-batch-size", type=int, default=None,
                       help="latents decoded at once by the IWAE bound (default: sized from the model's decoder)")
    score.add_argument("--normal-classes", default=None, help="comma-separated labels of the normal classes, e.g. 0 or 0,2")
    score.add_argument("--hist", default=None, help="histogram PNG of scores per class (default: next to --out)")
    score.add_argument("--metrics-out", default=None, help="also write AUROC/AUPRC and counts as JSON here")
    score.add_argument("--max-images", type=int, default=0, help="score only the first N images (0 = all)")
    score.set_defaults(func=run_score)


def resolve_score(name: str | None, fit_data: str | None, iw_samples: int | None) -> str:
    """The score to rank by (see the module docstring); a fit score without ``--fit-data`` is an error."""
    from vae_train.anomaly import DEFAULT_SCORE, NEEDS_FIT, ScoreError, check_score_name

    if name is None:
        return DEFAULT_SCORE if fit_data else ("iw" if iw_samples else "nelbo")
    check_score_name(name)
    if name in NEEDS_FIT and not fit_data:
        raise ScoreError(f"--score {name} compares images with normal ones: give them with --fit-data "
                         "(e.g. the model's training split DIR#train, with --normal-classes for a one-class model)")
    if name == "iw" and not iw_samples:
        raise ScoreError("--score iw needs --iw-samples K (K >= 1)")
    return name


def run_score(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from vae_train.commands.evaluate import _check_count, _load, _output_path, _settings, process_group
    from vae_train.distributed import detect_launch_env

    if args.iw_samples is not None:
        _check_count("--iw-samples", args.iw_samples)
    if args.iw_batch_size is not None:
        _check_count("--iw-batch-size", args.iw_batch_size)
    _check_count("--max-images", args.max_images, minimum=0)
    name = resolve_score(args.score, args.fit_data, args.iw_samples)
    normal = parse_classes(args.normal_classes)
    env = detect_launch_env()
    out = hist = metrics_out = None
    if env.is_main:
        out = _output_path(args.out, "the scores")
        hist = _output_path(args.hist or str(Path(args.out).with_suffix("")) + "_hist.png", "the histogram")
        metrics_out = _output_path(args.metrics_out, "the score metrics") if args.metrics_out else None
    cfg = _settings(args)
    with process_group(args, cfg, env) as device:
        model = _load(args, cfg, device)
        fit = fit_normal(args, cfg, model, normal, env.rank, env.world_size) if args.fit_data else None
        rows = score_rows(args, cfg, model, fit, env.rank, env.world_size)
        rows = gather_rows(rows)
    if not env.is_main:
        return 0
    keys, labels, scores = rows
    if not keys:
        from vae_train.evaluate import EvalError

        raise EvalError(f"the data source {args.data!r} yielded no images")
    if args.max_images:
        keys, labels = keys[: args.max_images], labels[: args.max_images]
        scores = {k: v[: args.max_images] for k, v in scores.items()}
    summary = anomaly_summary(scores, labels, normal, name)
    write_csv(out, keys, labels, scores, name, model.num_dims)
    nonfinite = sum(1 for s in scores[name].tolist() if not math.isfinite(s))
    print(f"wrote {out} ({len(keys)} scores, ranked by {name}: {_describe(name, args.iw_samples)})")
    if nonfinite:
        print(f"warning: {nonfinite} non-finite score(s) (kept in the CSV; ranked as most anomalous)")
    summary.update({"images": len(keys), "score": name, "nonfinite_scores": nonfinite, "world_size": env.world_size})
    if "auroc" in summary:
        print(format_aurocs(summary, name, normal))
    if "note" in summary:
        print(summary["note"])
    plot_score_histogram(scores[name].tolist(), labels, hist, name)
    print(f"wrote {hist}")
    if metrics_out is not None:
        metrics_out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def _describe(name: str, iw_samples: int | None) -> str:
    from vae_train.anomaly import SCORES

    return SCORES[name].replace("K samples", f"K={iw_samples}") if iw_samples else SCORES[name]


# -- process group ----------------------------------------------------------------------------


# -- the passes ---------------------------------------------------------------------------------


def _real_images(stream: Any, max_images: int = 0) -> Iterator[dict[str, Any]]:
    """The unmasked part of each batch (image, key, label); stops once ``max_images`` (> 0) were given.

    The last batch is cut to what is still wanted: scoring a whole batch of 256 for
    ``--max-images 8`` made that command cost 32x the images it reported.
    """
    given = 0
    for batch in stream:
        if max_images and given >= max_images:
            break
        mask = batch["mask"].clone()
        if max_images:
            mask[mask.cumsum(0) > max_images - given] = False
        if not bool(mask.any()):
            continue
        given += int(mask.sum())
        yield {"image": batch["image"][mask], "label": batch["label"][mask],
               "key": [k for k, m in zip(batch["key"], mask.tolist()) if m]}


def fit_normal(args: argparse.Namespace, cfg: "Config", model: "VAE", normal: set[int] | None,
               rank: int, world_size: int) -> "NormalFit":
    """Fit :class:`vae_train.anomaly.NormalFit` on ``--fit-data`` (its ``normal`` classes), over all ranks."""
    import torch

    from vae_train import anomaly
    from vae_train.commands.evaluate import _stream
    from vae_train.data import DataError
    from vae_train.distributed import all_gather_json, all_reduce_sum

    fit_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"classes": sorted(normal or [])})})
    fit_args = argparse.Namespace(**{**vars(args), "data": args.fit_data})
    try:
        stream = _stream(fit_args, fit_cfg, model, rank, world_size)
    except DataError as exc:
        raise DataError(f"--fit-data {args.fit_data!r}: {exc}") from None
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed + 1000 + rank)
    # no importance samples here: the fit needs only the posterior means and the deterministic terms
    terms = [anomaly.image_terms(model, b["image"].to(device), generator=generator) for b in _real_images(stream)]
    dims = math.prod(model.latent_shape)
    mu = torch.cat([t["mu"] for t in terms]) if terms else torch.zeros(0, dims, dtype=torch.float64)
    count = all_reduce_sum(torch.tensor([float(len(mu))], dtype=torch.float64))
    total = all_reduce_sum(mu.sum(0))
    outer = all_reduce_sum(anomaly.latent_moments(mu))
    gaussian = anomaly.LatentGaussian.from_sums(float(count), total, outer)
    # every rank gets every normal image's posterior mean (for knn): each fills its rows, the sum is the bank
    counts = all_gather_json(len(mu))
    offset = sum(counts[:rank]) if len(counts) > 1 else 0
    bank = torch.zeros(sum(counts), dims, dtype=torch.float64)
    bank[offset:offset + len(mu)] = mu
    bank = all_reduce_sum(bank).float()
    names = ("nelbo", "recon", "complexity", "recon_png", "latent", "knn")
    moments = torch.zeros(len(names), 3, dtype=torch.float64)  # count, sum, sum of squares per score
    for t in terms:
        scores = {**anomaly.base_scores(t), "latent": gaussian.distance(t["mu"]),
                  "knn": anomaly.knn_distance(bank, t["mu"], exclude_self=True)}
        for i, n in enumerate(names):
            moments[i] += torch.tensor([scores[n].numel(), scores[n].sum(), scores[n].square().sum()])
    moments = all_reduce_sum(moments)
    stats = anomaly.stats_from_moments({n: tuple(moments[i].tolist()) for i, n in enumerate(names)})
    return anomaly.NormalFit(gaussian, bank, stats)


def score_rows(args: argparse.Namespace, cfg: "Config", model: "VAE", fit: "NormalFit | None",
               rank: int, world_size: int) -> tuple[list[str], "torch.Tensor", dict[str, "torch.Tensor"]]:
    """This rank's keys, labels and every score of its share of ``--data``, in data order."""
    import torch

    from vae_train import anomaly
    from vae_train.commands.evaluate import _stream

    stream = _stream(args, cfg, model, rank, world_size)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    keys: list[str] = []
    labels: list[torch.Tensor] = []
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in _real_images(stream, args.max_images):
        terms = anomaly.image_terms(model, batch["image"].to(device), iw_samples=args.iw_samples or 0,
                                    iw_batch_size=args.iw_batch_size, generator=generator)
        scores = fit.scores(terms) if fit is not None else anomaly.base_scores(terms)
        keys += batch["key"]
        labels.append(batch["label"])
        for name, value in scores.items():
            columns.setdefault(name, []).append(value)
    if not columns:  # this rank's share was empty: the columns still have to match the others'
        empty = torch.zeros(0, dtype=torch.float64)
        names = ["nelbo", "recon", "complexity", "recon_png"] + (["iw"] if args.iw_samples else [])
        columns = {n: [empty] for n in names + (["latent", "knn", "combined"] if fit is not None else [])}
        labels = [torch.zeros(0, dtype=torch.int64)]
    return keys, torch.cat(labels), {name: torch.cat(values) for name, values in columns.items()}


def gather_rows(rows: tuple[list[str], "torch.Tensor", dict[str, "torch.Tensor"]]
                ) -> tuple[list[str], list[int], dict[str, "torch.Tensor"]]:
    """Every rank's rows, concatenated in rank order (= data order: ranks hold consecutive ranges).

    JSON on the wire (:func:`vae_train.distributed.all_gather_json`): floats round-trip
    exactly, and non-finite scores travel as NaN/Infinity.
    """
    import torch

    from vae_train.distributed import all_gather_json

    keys, labels, scores = rows
    parts = all_gather_json({"keys": keys, "labels": labels.tolist(),
                             "scores": {name: values.tolist() for name, values in scores.items()}})
    names = sorted(scores)
    out_keys = [key for part in parts for key in part["keys"]]
    out_labels = [label for part in parts for label in part["labels"]]
    table = {name: torch.tensor([v for part in parts for v in part["scores"][name]], dtype=torch.float64)
             for name in names}
    return out_keys, out_labels, table


# -- outputs ------------------------------------------------------------------------------------


def parse_classes(text: str | None) -> set[int] | None:
    from vae_train.evaluate import EvalError

    if text is None:
        return None
    try:
        classes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise EvalError(f"--normal-classes {text!r} must be comma-separated integer labels, e.g. 0 or 0,2") from None
    if not classes:
        raise EvalError("--normal-classes is empty; give at least one label")
    return classes


def anomaly_summary(scores: dict[str, "torch.Tensor"], labels: list[int], normal: set[int] | None,
                    name: str) -> dict[str, Any]:
    """AUROC/AUPRC of ``scores[name]`` (anomaly = label not in ``normal``), and the AUROC of every score.

    A normal class that no image has, or no anomalous image at all, is an error (the
    metric would be meaningless); unlabelled data gives a note instead of metrics. NaN
    scores rank as most anomalous (+inf): a model that cannot score an image should
    flag it, and dropping it would flatter the metric.
    """
    from vae_train.evaluate import EvalError, auprc, auroc

    if normal is None:
        return {"note": "no --normal-classes given: AUROC/AUPRC not computed"}
    labelled = [i for i, lab in enumerate(labels) if lab >= 0]
    if not labelled:
        return {"note": "the data has no labels (no cls members): AUROC/AUPRC not computed"}
    present = {labels[i] for i in labelled}
    if not normal <= present:
        raise EvalError(f"--normal-classes {sorted(normal)}: class(es) {sorted(normal - present)} do not occur in "
                        f"the scored data (its labels: {sorted(present)}); check the labels and --data")
    is_anomaly = [labels[i] not in normal for i in labelled]
    anomalies = sum(is_anomaly)
    if anomalies == 0:
        raise EvalError(f"every scored image belongs to --normal-classes {sorted(normal)}: there is no anomaly to "
                        "rank, so AUROC/AUPRC are undefined; score data that also holds other classes")
    per_score = {}
    for score_name, values in scores.items():
        ranked = [math.inf if math.isnan(v) else v for v in values[labelled].tolist()]
        per_score[score_name] = auroc(ranked, is_anomaly)
    ranked = [math.inf if math.isnan(v) else v for v in scores[name][labelled].tolist()]
    return {"auroc": per_score[name], "auprc": auprc(ranked, is_anomaly), "anomalies": anomalies,
            "labelled": len(labelled), "auroc_by_score": per_score}


def format_aurocs(summary: dict[str, Any], name: str, normal: set[int] | None) -> str:
    lines = [f"AUROC: {summary['auroc']:.4f}  AUPRC: {summary['auprc']:.4f}  (score {name}, normal classes "
             f"{sorted(normal or [])}, {summary['anomalies']} anomalies of {summary['labelled']} labelled images)",
             "AUROC of every score: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["auroc_by_score"].items())]
    return "\n".join(lines)


def write_csv(path: "Path", keys: list[str], labels: list[int], scores: dict[str, "torch.Tensor"], name: str,
              num_dims: int) -> None:
    """One row per image: the columns the command always wrote, then the chosen score and every score."""
    import csv

    from vae_train.model import bits_per_dim

    likelihood = scores["iw"] if "iw" in scores else scores["nelbo"]
    extra = [n for n in ("recon", "complexity", "latent", "knn", "combined") if n in scores]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "score_bpd", "nelbo_nats"] + (["iw_nll_nats"] if "iw" in scores else [])
                        + ["score"] + extra)
        for i, key in enumerate(keys):
            row = [key, labels[i], repr(float(bits_per_dim(float(likelihood[i]), num_dims))), repr(float(scores["nelbo"][i]))]
            row += [repr(float(scores["iw"][i]))] if "iw" in scores else []
            row += [repr(float(scores[name][i]))] + [repr(float(scores[n][i])) for n in extra]
            writer.writerow(row)


def plot_score_histogram(score: list[float], labels: list[int], path: "Path", name: str = "score") -> None:
    """One histogram of (finite) scores per class label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    finite = [(s, lab) for s, lab in zip(score, labels) if math.isfinite(s)]
    if finite:
        lo, hi = min(s for s, _ in finite), max(s for s, _ in finite)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        for label in sorted({lab for _, lab in finite}):
            values = [s for s, lab in finite if lab == label]
            label_name = "unlabelled" if label < 0 else f"class {label}"
            ax.hist(values, bins=bins, histtype="step", label=f"{label_name} ({len(values)})")
        ax.legend(fontsize="small")
    ax.set_xlabel(f"anomaly score: {name}")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
