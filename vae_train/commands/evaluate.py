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
    vae-train reconstruct --checkpoint exported/ --data photos/ --image-size 512,768 --tile train --out big.png data.resize=true
    vae-train interpolate --checkpoint exported/ --data shards/ --pairs 6 --steps 8 --out interp.png
    vae-train score --checkpoint exported/ --data shards/#test --normal-classes 0 --out scores.csv

``--image-size H[,W]`` (eval, reconstruct) decodes the data at another size than the
model's (any sides divisible by its downsampling factor); ``--tile H[,W]|train`` with
``--tile-overlap`` encodes and decodes such larger images in blended tiles
(:meth:`vae_train.model.ConvVAE.enable_tiling`), so memory stays that of one tile.

``eval`` runs under torchrun / accelerate too: each rank evaluates its share of
the stream and the sums are all-reduced, so every sample counts exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vae_train.config import Config
    from vae_train.distributed import LaunchEnv
    from vae_train.model import VAE


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = _command(subparsers, "eval", "ELBO, IW-NLL (bits/dim), active units, PSNR/SSIM/LPIPS/rFID on a data split",
                  data=True)
    ev.add_argument("--metrics", default=None, metavar="LIST",
                    help="reconstruction metrics, any of psnr,ssim,lpips,rfid (default eval.metrics: psnr,ssim)")
    ev.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="FID Inception state dict pt_inception-2015-12-05-6726825d.pth for rfid (default "
                         "eval.inception_weights, else $TORCH_HOME/hub/checkpoints/); never downloaded")
    ev.add_argument("--lpips-backbone", default=None, metavar="PATH",
                    help="VGG16 weights for lpips (default eval.lpips_backbone_path); never downloaded")
    ev.add_argument("--iw-samples", type=int, default=None, metavar="K", help="importance samples for the IWAE NLL (K >= 1)")
    ev.add_argument("--iw-batch-size", type=int, default=None,
                    help="latents decoded at once by the IWAE bound (default: sized from the model's decoder)")
    ev.add_argument("--max-batches", type=int, default=0, help="stop after N batches per rank (0 = whole split)")
    ev.add_argument("--out", default=None, help="also write the metrics as JSON here")
    _size_options(ev)
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
    _size_options(recon)
    recon.set_defaults(func=run_reconstruct)

    interp = _command(subparsers, "interpolate", "latent interpolations between pairs of inputs", data=True)
    interp.add_argument("--pairs", type=int, default=8, help="pairs of inputs (one row each)")
    interp.add_argument("--steps", type=int, default=8, help="decoded points per row, both ends included")
    interp.add_argument("--out", required=True, help="grid PNG")
    interp.set_defaults(func=run_interpolate)

    from vae_train.commands import score  # the command's logic lives there (vae_train/commands/score.py)

    score.register(subparsers, _command)


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
    parser.add_argument("--weights", choices=("ema", "raw"), default="auto",
                        help="a checkpoint's EMA or raw trained weights (default: EMA when the run kept one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--config", default=None, help="YAML config for the data/s3 sections (optional)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_workers=0 s3.endpoint_url=http://...")
    return parser


def _size_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", default=None, metavar="H[,W]",
                        help="decode the data at this size instead of the model's image_size (sides divisible by "
                        "the model's downsampling factor; data.resize=true to resize photos to it)")
    parser.add_argument("--tile", default=None, metavar="H[,W]",
                        help="encode and decode in tiles of this many pixels with blended overlaps (bounded memory "
                        "for images larger than the training size); 'train' = the model's training size")
    parser.add_argument("--tile-overlap", default=None, metavar="H[,W]",
                        help="pixels shared by neighbouring tiles (default: a quarter of the tile)")


def _pixels(text: str | None, what: str) -> tuple[int, int] | None:
    """``H`` or ``H,W`` -> (H, W); None stays None."""
    from vae_train.evaluate import EvalError

    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise EvalError(f"{what} must be H or H,W in pixels (positive integers), got {text!r}")
    return (parts[0], parts[-1])


def _apply_size_options(args: argparse.Namespace, model: VAE) -> tuple[int, int] | None:
    """Turn tiling on as ``--tile``/``--tile-overlap`` ask; the ``--image-size`` to decode the data at, or None."""
    from vae_train.evaluate import EvalError
    from vae_train.model import ArchitectureError

    image_hw = _pixels(args.image_size, "--image-size")
    if image_hw is not None:
        factor = model.config.downsampling_factor
        if image_hw != model.config.hw and (image_hw[0] % factor or image_hw[1] % factor):
            raise EvalError(f"--image-size {image_hw[0]},{image_hw[1]}: sides must be multiples of the model's "
                            f"downsampling factor {factor} (or equal its image_size {list(model.config.hw)})")
    if args.tile is not None:
        tile = None if args.tile == "train" else _pixels(args.tile, "--tile")
        try:
            model.enable_tiling(tile, _pixels(args.tile_overlap, "--tile-overlap"))
        except ArchitectureError as exc:
            raise EvalError(f"--tile/--tile-overlap: {exc}") from None
    elif args.tile_overlap is not None:
        raise EvalError("--tile-overlap needs --tile")
    return image_hw


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


@contextlib.contextmanager
def process_group(args: argparse.Namespace, cfg: Config, env: LaunchEnv) -> Iterator[torch.device]:
    """This rank's device, inside a process group when the launcher started several ranks.

    One process uses ``--device``; under torchrun / accelerate / srun each rank takes the
    device and backend training would (``engine.choose_device``), and the group is
    destroyed on the way out if this call started it.
    """
    if env.world_size == 1:
        yield _device(args.device)
        return
    import torch.distributed as dist

    from vae_train.distributed import init_process_group
    from vae_train.engine import choose_device

    device, backend = choose_device(env, cfg.distributed.backend)
    started_group = init_process_group(env, backend, device, cfg.distributed.timeout_s)
    try:
        yield device
    finally:
        if started_group:
            dist.destroy_process_group()


def _load(args: argparse.Namespace, cfg: Config, device: torch.device) -> VAE:
    import vae_train

    return vae_train.load_model(args.checkpoint, s3_cfg=cfg.s3, map_location=str(device), weights=args.weights)


def _stream(args: argparse.Namespace, cfg: Config, model: VAE, rank: int = 0, world_size: int = 1,
            image_hw: tuple[int, int] | None = None) -> Any:
    """The validation stream of ``--data`` decoded for this model (its size or ``image_hw``, channels, range)."""
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
        image_size=image_hw or model.config.image_size,
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

    from vae_train.distributed import detect_launch_env
    from vae_train.evaluate import evaluate_stream
    from vae_train.recon_metrics import ReconstructionMetrics, build_extractors, parse_metrics

    if args.iw_samples is not None:
        _check_count("--iw-samples", args.iw_samples)
    if args.iw_batch_size is not None:
        _check_count("--iw-batch-size", args.iw_batch_size)
    cfg = _settings(args)
    names = parse_metrics(args.metrics if args.metrics is not None else cfg.eval.metrics)
    env = detect_launch_env()
    out = _output_path(args.out, "the metrics") if (args.out and env.is_main) else None
    with process_group(args, cfg, env) as device:
        # the metric networks first: missing weights fail before the model or the data is read
        extractors = build_extractors(
            names, device=device,
            inception_weights=args.inception_weights if args.inception_weights is not None else cfg.eval.inception_weights,
            lpips_backbone_path=args.lpips_backbone if args.lpips_backbone is not None else cfg.eval.lpips_backbone_path,
        )
        model = _load(args, cfg, device)
        image_hw = _apply_size_options(args, model)
        stream = _stream(args, cfg, model, env.rank, env.world_size, image_hw)
        metrics = evaluate_stream(
            model,
            stream,
            args.iw_samples or 0,
            max_batches=args.max_batches,
            iw_batch_size=args.iw_batch_size,
            seed=args.seed,
            image_hw=image_hw,
            recon_metrics=ReconstructionMetrics(names, extractors),
        )
    if not env.is_main:
        return 0
    report = {"checkpoint": args.checkpoint, "data": args.data, "world_size": env.world_size, **metrics}
    print(format_metrics(metrics))
    if extractors.inception is not None:
        report["rfid_published_weights"] = extractors.inception.published_weights
        if not extractors.inception.published_weights:
            print("warning: the Inception weights are not the published pt_inception-2015-12-05-6726825d.pth: "
                  "this rFID is not comparable with published figures")
    if extractors.lpips is not None:
        report["lpips_imagenet_backbone"] = extractors.lpips.imagenet_backbone
        if not extractors.lpips.imagenet_backbone:
            print("warning: LPIPS runs on a VGG16 that is not torchvision's ImageNet file: this LPIPS is not "
                  "comparable with published figures")
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
    ("LPIPS", "lpips", "{:.4f}"),
    ("rFID ({rfid_images} images)", "rfid", "{:.3f}"),
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
        elif key in metrics:
            lines.append(f"{label.format(**metrics):24s} {fmt.format(metrics[key], **metrics):>12s}")
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
    image_hw = _apply_size_options(args, model)
    x, _ = _take(_stream(args, cfg, model, image_hw=image_hw), args.n)
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


def interpolation_rows(model: VAE, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``[P, steps + 2, C, H, W]``: each row is input a, decodes of the linear path between the
    posterior means of a and b (both ends included), input b."""
    import torch

    with torch.no_grad():
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        t = torch.linspace(0.0, 1.0, steps, device=mu_a.device).view(1, steps, 1, 1, 1)
        path = (1 - t) * mu_a[:, None] + t * mu_b[:, None]
        decoded = model.generate(path.flatten(0, 1))
        decoded = decoded.view(len(a), steps, *decoded.shape[1:])
    return torch.cat([model.target(a)[:, None].float(), decoded, model.target(b)[:, None].float()], dim=1)
