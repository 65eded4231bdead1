"""Using a trained VAE: ``vae-train eval | sample | reconstruct | interpolate | score``.

Each command takes ``--checkpoint C``: a training checkpoint directory, an
exported model directory (``vae-train export``) or the ``s3://`` URI of either.
``--data SRC`` is any validation source the data pipeline reads (a directory made
by ``vae-train prepare`` -- its ``val`` split, or ``DIR#test`` for another --, an
``s3://`` prefix, ...). ``--config``/``key=value`` overrides set the ``data``
and ``s3`` sections (workers, endpoint); everything else comes from the checkpoint.

Examples::

    vae-train eval --checkpoint runs/fm/checkpoints/step-00002000 --data shards/#test --iw-samples 1000 --out metrics.json
    torchrun --nproc_per_node 2 -m vae_train eval --checkpoint s3://bucket/run/step-00002000 --data s3://bucket/shards
    vae-train sample --checkpoint exported/ --n 64 --temperature 0.8 --out samples.png
    vae-train reconstruct --checkpoint exported/ --data shards/ --out recon.png
    vae-train interpolate --checkpoint exported/ --data shards/ --pairs 6 --steps 8 --out interp.png
    vae-train score --checkpoint exported/ --data shards/#test --normal-classes 0 --out scores.csv

``eval`` runs under torchrun / accelerate too: each rank evaluates its share of
the stream and the sums are all-reduced, so every sample counts exactly once.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vae_train.config import Config
    from vae_train.model import ConvVAE


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = _command(subparsers, "eval", "ELBO, IW-NLL (bits/dim), active units, PSNR/SSIM on a data split", data=True)
    ev.add_argument("--iw-samples", type=int, default=None, metavar="K", help="importance samples for the IWAE NLL (K >= 1)")
    ev.add_argument("--iw-batch-size", type=int, default=1024, help="latents decoded at once by the IWAE bound")
    ev.add_argument("--max-batches", type=int, default=0, help="stop after N batches per rank (0 = whole split)")
    ev.add_argument("--out", default=None, help="also write the metrics as JSON here")
    ev.set_defaults(func=run_eval)

    sample = _command(subparsers, "sample", "draw images from the prior", data=False)
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--temperature", type=float, default=1.0, help="scale of the prior noise (< 1: smoother samples)")
    sample.add_argument("--out", default=None, help="grid PNG")
    sample.add_argument("--out-dir", default=None, help="directory for one PNG per sample")
    sample.set_defaults(func=run_sample)

    recon = _command(subparsers, "reconstruct", "inputs beside their reconstructions", data=True)
    recon.add_argument("--n", type=int, default=32, help="number of inputs")
    recon.add_argument("--out", required=True, help="grid PNG")
    recon.set_defaults(func=run_reconstruct)

    interp = _command(subparsers, "interpolate", "latent interpolations between pairs of inputs", data=True)
    interp.add_argument("--pairs", type=int, default=8, help="pairs of inputs (one row each)")
    interp.add_argument("--steps", type=int, default=8, help="decoded points per row, both ends included")
    interp.add_argument("--out", required=True, help="grid PNG")
    interp.set_defaults(func=run_interpolate)

    score = _command(subparsers, "score", "one anomaly score per image (+ AUROC/AUPRC with labels)", data=True)
    score.add_argument("--out", required=True, help="CSV: key,label,score_bpd,nelbo_nats[,iw_nll_nats]")
    score.add_argument("--iw-samples", type=int, default=None, metavar="K", help="score by the IWAE NLL with K samples")
    score.add_argument("--iw-batch-size", type=int, default=1024, help="latents decoded at once by the IWAE bound")
    score.add_argument("--normal-classes", default=None, help="comma-separated labels of the normal classes, e.g. 0 or 0,2")
    score.add_argument("--hist", default=None, help="histogram PNG of scores per class (default: next to --out)")
    score.add_argument("--metrics-out", default=None, help="also write AUROC/AUPRC and counts as JSON here")
    score.add_argument("--max-images", type=int, default=0, help="score only the first N images (0 = all)")
    score.set_defaults(func=run_score)


def _command(subparsers: argparse._SubParsersAction, name: str, help_text: str, *, data: bool) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, exported model dir, or s3:// URI of either")
    if data:
        parser.add_argument("--data", required=True, help="data source (directory from `vae-train prepare`, DIR#split, s3://...)")
        parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default data.val_batch_size)")
        parser.add_argument(
            "--binarize",
            choices=("auto", "none", "fixed"),
            default="auto",
            help="binarize pixels (auto: a fixed draw for a Bernoulli model, else none)",
        )
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--config", default=None, help="YAML config for the data/s3 sections (optional)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_workers=0 s3.endpoint_url=http://...")
    return parser


# -- shared pieces --------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Config:
    from vae_train.config import load_config

    return load_config(args.config, args.overrides)


def _output_path(path: str, what: str) -> Path:
    """``path`` with its directory created; an unwritable location is a clear error before any work."""
    import os
    from pathlib import Path

    from vae_train.evaluate import EvalError

    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"cannot create the directory for {what} {path!r}: {exc.strerror or exc}") from None
    if out.is_dir() or not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise EvalError(f"cannot write {what} to {path!r}: not a writable file path; choose another location")
    return out


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(args: argparse.Namespace, cfg: Config, device: torch.device) -> ConvVAE:
    import vae_train

    return vae_train.load_model(args.checkpoint, s3_cfg=cfg.s3, map_location=str(device))


def _stream(args: argparse.Namespace, cfg: Config, model: ConvVAE, rank: int = 0, world_size: int = 1) -> Any:
    """The validation stream of ``--data`` decoded for this model (its size, channels and range)."""
    from vae_train.data import build_val_stream
    from vae_train.evaluate import EvalError

    from vae_train.config import resolve_binarize

    # auto -> dynamic for a Bernoulli model, which a validation stream draws as the fixed binarization
    binarize = resolve_binarize(args.binarize, model.config.likelihood)
    data_cfg = cfg.data.model_copy(update={"val": args.data, "binarize": binarize})
    batch_size = args.batch_size or cfg.data.val_batch_size
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    return build_val_stream(
        data_cfg,
        image_size=model.config.image_size,
        channels=model.config.in_channels,
        value_range=model.likelihood.value_range,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        s3_cfg=cfg.s3,
    )


def _take(stream: Any, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` real (unmasked) images of a stream and their keys."""
    import torch

    from vae_train.evaluate import EvalError

    images, keys = [], []
    have = 0
    for batch in stream:
        mask = batch["mask"]
        images.append(batch["image"][mask])
        keys += [k for k, m in zip(batch["key"], mask.tolist()) if m]
        have += int(mask.sum())
        if have >= n:
            break
    if have == 0:
        raise EvalError("the data source yielded no images")
    return torch.cat(images)[:n], keys[:n]


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    from vae_train.evaluate import EvalError

    if value < minimum:
        raise EvalError(f"{name} must be >= {minimum}, got {value}")


# -- eval -------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    import json

    import torch.distributed as dist

    from vae_train.distributed import detect_launch_env, init_process_group
    from vae_train.engine import choose_device
    from vae_train.evaluate import evaluate_stream

    if args.iw_samples is not None:
        _check_count("--iw-samples", args.iw_samples)
    _check_count("--iw-batch-size", args.iw_batch_size)
    cfg = _settings(args)
    env = detect_launch_env()
    out = _output_path(args.out, "the metrics") if (args.out and env.is_main) else None
    started_group = False
    if env.world_size > 1:
        device, backend = choose_device(env, cfg.distributed.backend)
        started_group = init_process_group(env, backend, device, cfg.distributed.timeout_s)
    else:
        device = _device(args.device)
    try:
        model = _load(args, cfg, device)
        stream = _stream(args, cfg, model, env.rank, env.world_size)
        metrics = evaluate_stream(
            model,
            stream,
            args.iw_samples or 0,
            max_batches=args.max_batches,
            iw_batch_size=args.iw_batch_size,
            seed=args.seed,
        )
    finally:
        if started_group:
            dist.destroy_process_group()
    if not env.is_main:
        return 0
    report = {"checkpoint": args.checkpoint, "data": args.data, "world_size": env.world_size, **metrics}
    print(format_metrics(metrics))
    if metrics["nonfinite_images"]:
        print(f"warning: {metrics['nonfinite_images']} image(s) had a non-finite score and are not in the means")
    if metrics["skipped_samples"]:
        print(f"warning: the data stream skipped {metrics['skipped_samples']} damaged or mis-sized sample(s)")
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


_ROWS = (
    ("images", "images", "{:.0f}"),
    ("negative ELBO", "nelbo", None),
    ("  reconstruction", "recon", None),
    ("  KL", "kl", None),
    ("IW NLL (K={iw_samples})", "iw_nll", None),
    ("active units", "active_units", "{:.0f} / {latent_units}"),
    ("active channels", "active_channels", "{:.0f} / {latent_channels}"),
    ("PSNR (dB)", "psnr_db", "{:.2f}"),
    ("SSIM", "ssim", "{:.4f}"),
)


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned text table (nats/image and bits/dim side by side)."""
    lines = [f"{'metric':24s} {'nats/image':>12s} {'bits/dim':>10s}"]
    for label, key, fmt in _ROWS:
        if fmt is None:
            if f"{key}_nats" not in metrics:
                continue
            lines.append(
                f"{label.format(**metrics):24s} {metrics[f'{key}_nats']:12.3f} {metrics[f'{key}_bpd']:10.4f}"
            )
        else:
            lines.append(f"{label:24s} {fmt.format(metrics[key], **metrics):>12s}")
    return "\n".join(lines)


# -- sample, reconstruct, interpolate ----------------------------------------------------------


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from vae_train.evaluate import EvalError
    from vae_train.logging import image_grid, save_png

    if not args.out and not args.out_dir:
        raise EvalError("give --out GRID.png and/or --out-dir DIR for the samples")
    _check_count("--n", args.n)
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {args.temperature}")
    out = _output_path(args.out, "the sample grid") if args.out else None
    out_dir = _output_path(f"{args.out_dir}/sample-00000.png", "the samples").parent if args.out_dir else None
    cfg = _settings(args)
    device = _device(args.device)
    model = _load(args, cfg, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature, generator=generator)
    value_range = model.likelihood.value_range
    if out is not None:
        save_png(image_grid(images, value_range, ncol=_columns(args.n)), out)
        print(f"wrote {out}")
    if out_dir is not None:
        for i, image in enumerate(images):
            save_png(image_grid(image[None], value_range, pad=0), out_dir / f"sample-{i:05d}.png")
        print(f"wrote {len(images)} PNGs to {out_dir}")
    return 0


def _columns(n: int) -> int:
    """Columns of a near-square grid of ``n`` images."""
    import math

    return max(1, math.ceil(math.sqrt(n)))


def run_reconstruct(args: argparse.Namespace) -> int:
    from vae_train.logging import pairs_grid, save_png

    _check_count("--n", args.n)
    out = _output_path(args.out, "the reconstruction grid")
    cfg = _settings(args)
    device = _device(args.device)
    model = _load(args, cfg, device)
    x, _ = _take(_stream(args, cfg, model), args.n)
    x = x.to(device)
    recon = model.reconstruct(x)
    target = model.target(x)
    save_png(pairs_grid(target, recon, model.likelihood.value_range, pairs_per_row=min(8, len(x))), out)
    print(f"wrote {out} ({len(x)} inputs beside their reconstructions)")
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    from vae_train.logging import image_grid, save_png

    _check_count("--pairs", args.pairs)
    _check_count("--steps", args.steps, minimum=2)
    out = _output_path(args.out, "the interpolation grid")
    cfg = _settings(args)
    device = _device(args.device)
    model = _load(args, cfg, device)
    x, _ = _take(_stream(args, cfg, model), 2 * args.pairs)
    pairs = len(x) // 2
    if pairs == 0:
        from vae_train.evaluate import EvalError

        raise EvalError("interpolation needs at least two images in the data source")
    x = x[: 2 * pairs].to(device)
    rows = interpolation_rows(model, x[0::2], x[1::2], args.steps)
    save_png(image_grid(rows.flatten(0, 1), model.likelihood.value_range, ncol=args.steps + 2), out)
    print(f"wrote {out} ({pairs} rows: input, {args.steps} decoded points, input)")
    return 0


def interpolation_rows(model: ConvVAE, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``[P, steps + 2, C, H, W]``: each row is input a, decodes of the linear path between the
    posterior means of a and b (both ends included), input b."""
    import torch

    with torch.no_grad():
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        t = torch.linspace(0.0, 1.0, steps, device=mu_a.device).view(1, steps, 1, 1, 1)
        path = (1 - t) * mu_a[:, None] + t * mu_b[:, None]
        decoded = model.likelihood.mean(model.decode(path.flatten(0, 1)))
        decoded = decoded.view(len(a), steps, *decoded.shape[1:])
    return torch.cat([model.target(a)[:, None].float(), decoded, model.target(b)[:, None].float()], dim=1)


# -- score ------------------------------------------------------------------------------------


def run_score(args: argparse.Namespace) -> int:
    import csv
    import json
    import math
    from pathlib import Path

    import torch

    from vae_train.distributed import detect_launch_env
    from vae_train.evaluate import EvalError, score_images
    from vae_train.model import bits_per_dim

    if detect_launch_env().world_size > 1:
        raise EvalError("score writes one CSV: run it as a single process (python -m vae_train score ...)")
    if args.iw_samples is not None:
        _check_count("--iw-samples", args.iw_samples)
    normal = _parse_classes(args.normal_classes)
    out = _output_path(args.out, "the scores")
    hist = _output_path(args.hist or str(Path(args.out).with_suffix("")) + "_hist.png", "the histogram")
    metrics_out = _output_path(args.metrics_out, "the score metrics") if args.metrics_out else None
    cfg = _settings(args)
    device = _device(args.device)
    model = _load(args, cfg, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    keys: list[str] = []
    labels: list[int] = []
    nelbo: list[float] = []
    iw: list[float] = []
    _check_count("--max-images", args.max_images, minimum=0)
    for batch in _stream(args, cfg, model):
        if args.max_images and len(keys) >= args.max_images:
            break
        mask = batch["mask"]
        if not bool(mask.any()):
            continue
        scores = score_images(
            model, batch["image"][mask].to(device), args.iw_samples or 0, iw_batch_size=args.iw_batch_size, generator=generator
        )
        keys += [k for k, m in zip(batch["key"], mask.tolist()) if m]
        labels += batch["label"][mask].tolist()
        nelbo += scores["nelbo"].tolist()
        if args.iw_samples:
            iw += scores["iw_nll"].tolist()
    if not keys:
        raise EvalError(f"the data source {args.data!r} yielded no images")
    if args.max_images:
        keys, labels, nelbo, iw = keys[: args.max_images], labels[: args.max_images], nelbo[: args.max_images], iw[: args.max_images]
    primary = iw if args.iw_samples else nelbo
    score = [float(bits_per_dim(v, model.num_dims)) for v in primary]
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "score_bpd", "nelbo_nats"] + (["iw_nll_nats"] if iw else []))
        for i, key in enumerate(keys):
            writer.writerow([key, labels[i], repr(score[i]), repr(nelbo[i])] + ([repr(iw[i])] if iw else []))
    nonfinite = sum(1 for s in score if not math.isfinite(s))
    summary: dict[str, Any] = {
        "images": len(keys),
        "score": f"iw_nll_bpd (K={args.iw_samples})" if args.iw_samples else "nelbo_bpd",
        "nonfinite_scores": nonfinite,
    }
    print(f"wrote {out} ({len(keys)} scores, {summary['score']})")
    if nonfinite:
        print(f"warning: {nonfinite} non-finite score(s) (kept in the CSV; ranked as most anomalous)")
    summary.update(anomaly_metrics(score, labels, normal))
    for key in ("auroc", "auprc"):
        if key in summary:
            print(f"{key.upper()}: {summary[key]:.4f}  (normal classes {sorted(normal or [])}, {summary['anomalies']} anomalies)")
    if "note" in summary:
        print(summary["note"])
    plot_score_histogram(score, labels, hist)
    print(f"wrote {hist}")
    if metrics_out is not None:
        metrics_out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def _parse_classes(text: str | None) -> set[int] | None:
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


def anomaly_metrics(score: list[float], labels: list[int], normal: set[int] | None) -> dict[str, Any]:
    """AUROC/AUPRC of ``score`` (anomaly = label not in ``normal``) over the labelled images.

    NaN scores rank as most anomalous (+inf): a model that cannot score an image
    should flag it, and dropping it would flatter the metric.
    """
    import math

    if normal is None:
        return {"note": "no --normal-classes given: AUROC/AUPRC not computed"}
    from vae_train.evaluate import auprc, auroc

    rows = [(math.inf if math.isnan(s) else s, lab not in normal) for s, lab in zip(score, labels) if lab >= 0]
    anomalies = sum(1 for _, a in rows if a)
    if anomalies == 0 or anomalies == len(rows):
        return {"note": f"AUROC/AUPRC need labelled normal and anomalous images; got {len(rows)} labelled, {anomalies} anomalous"}
    values, is_anomaly = [r[0] for r in rows], [r[1] for r in rows]
    return {"auroc": auroc(values, is_anomaly), "auprc": auprc(values, is_anomaly), "anomalies": anomalies, "labelled": len(rows)}


def plot_score_histogram(score: list[float], labels: list[int], path: Path) -> None:
    """One histogram of (finite) scores per class label."""
    import math

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
            name = "unlabelled" if label < 0 else f"class {label}"
            ax.hist(values, bins=bins, histtype="step", label=f"{name} ({len(values)})")
        ax.legend(fontsize="small")
    ax.set_xlabel("anomaly score (bits/dim)")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
