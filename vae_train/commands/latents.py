"""``vae-train latent-stats`` and ``vae-train encode``: a trained VAE's latents, for a diffusion model.

Examples::

    vae-train latent-stats --checkpoint exported/ --data shards/#train --max-images 10000 --out stats.json
    torchrun --nproc_per_node 8 -m vae_train latent-stats --checkpoint s3://b/run/step-00100000 \\
        --data s3://b/shards#train --latents sample
    vae-train encode --checkpoint exported/ --data shards/ --out latents/            # the train split
    torchrun --nproc_per_node 8 -m vae_train encode --checkpoint exported/ \\
        --data "shards/#train + shards/#val" --out s3://b/latents --latents sample --dtype bf16

Both take ``--checkpoint``/``--data``/``--batch-size``/``--binarize``/``--seed``/``--device``
and the ``data``/``s3`` overrides as ``vae-train eval`` does, and run under the same
launchers (every image once over all ranks). ``latent-stats`` reads ``--data`` as eval
does (a directory means its ``val`` split); ``encode`` encodes ``--data``'s ``train``
split unless a ``#split`` is named. See :mod:`vae_train.latents` and
:mod:`vae_train.encode` for what is measured and written.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from vae_train.commands.evaluate import _command

    stats = _command(subparsers, "latent-stats",
                     "per-channel mean/std of the latents, scaling_factor and shift_factor, as JSON", data=True)
    stats.add_argument("--max-images", type=int, default=0, help="measure at most N images over all ranks (0 = all)")
    stats.add_argument("--latents", choices=("mean", "sample"), default="mean",
                       help="statistics of the posterior means or of one posterior sample per image")
    stats.add_argument("--out", default=None, help="also write the statistics as JSON here")
    stats.set_defaults(func=run_latent_stats)

    enc = _command(subparsers, "encode", "encode a data set to WebDataset shards of latents (+ index.json)", data=True)
    enc.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    enc.add_argument("--latents", choices=("mean_logvar", "sample"), default="mean_logvar",
                     help="store the posterior mean and log-variance ([2C,h,w]) or one sample ([C,h,w])")
    enc.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the stored latents")
    enc.add_argument("--overwrite", action="store_true", help="replace latents encoded with another model or options")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    enc.set_defaults(func=run_encode)


def run_latent_stats(args: argparse.Namespace) -> int:
    import json

    from vae_train.commands.evaluate import _load, _output_path, _settings, _stream, process_group
    from vae_train.distributed import detect_launch_env
    from vae_train.latents import latent_statistics_pass

    cfg = _settings(args)
    env = detect_launch_env()
    out = _output_path(args.out, "the latent statistics") if (args.out and env.is_main) else None
    with process_group(args, cfg, env) as device:
        model = _load(args, cfg, device)
        stream = _stream(args, cfg, model, env.rank, env.world_size)
        stats = latent_statistics_pass(model, stream, latents=args.latents, max_images=args.max_images,
                                       seed=args.seed)
    if not env.is_main:
        return 0
    report = {"checkpoint": args.checkpoint, "data": args.data, "world_size": env.world_size, "seed": args.seed,
              **stats}
    print(f"{report['images']} images, latents = posterior {args.latents}"
          f"{' (one draw per image)' if args.latents == 'sample' else ''}")
    print(f"scaling_factor {stats['scaling_factor']:.6g}   shift_factor {stats['shift_factor']:.6g}   "
          f"(std {stats['std']:.6g})")
    print(f"{'channel':>8s} {'mean':>12s} {'std':>12s}")
    for c, (m, s) in enumerate(zip(stats["latents_mean"], stats["latents_std"])):
        print(f"{c:8d} {m:12.6g} {s:12.6g}")
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from vae_train.commands.evaluate import _load, _settings, process_group
    from vae_train.config import resolve_binarize
    from vae_train.distributed import detect_launch_env
    from vae_train.encode import EncodeOptions, encode

    cfg = _settings(args)
    options = EncodeOptions(latents=args.latents, dtype=args.dtype, seed=args.seed)
    options.check()
    env = detect_launch_env()
    with process_group(args, cfg, env) as device:
        model = _load(args, cfg, device)
        data_cfg = cfg.data.model_copy(update={"binarize": resolve_binarize(args.binarize, model.config.likelihood)})
        summary = encode(model, checkpoint=args.checkpoint, data=args.data, out=args.out, options=options,
                         data_cfg=data_cfg, batch_size=args.batch_size or cfg.data.val_batch_size,
                         overwrite=args.overwrite, s3_cfg=cfg.s3, progress=env.is_main and not args.no_progress)
    if env.is_main:
        print(f"encoded {summary['samples']} samples into {summary['shards']} shard(s) in {args.out} "
              f"({summary['written']} written now, {summary['kept']} kept from an earlier run); "
              f"latents {summary['latents']} {summary['dtype']} {summary['latent_shape']}, "
              f"scaling_factor {summary['scaling_factor']:.6g}, shift_factor {summary['shift_factor']:.6g}")
        if summary["skipped"]:
            print(f"warning: skipped {sum(summary['skipped'].values())} undecodable input(s): {summary['skipped']}")
    return 0
