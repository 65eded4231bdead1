"""``vae-train export SRC --out DIR [--format vae-train|diffusers|ldm] [--dtype fp32|bf16] [--latent-stats FILE]``.

``--format vae-train`` (default): consolidated safetensors + model config JSON of a committed
checkpoint (``.../checkpoints/step-NNNNNNNN`` or ``s3://bucket/prefix/step-NNNNNNNN``).
``--format diffusers``: a folder ``diffusers.AutoencoderKL.from_pretrained`` loads; ``--format ldm``:
one LDM-named ``.safetensors`` file (``--out`` is that file). Both need ``model.arch: ldm`` with the
``gaussian_fixed`` likelihood, take a checkpoint or an export as SRC, and fill ``scaling_factor``,
``shift_factor``, ``latents_mean``, ``latents_std`` from ``--latent-stats FILE`` or the export's
``latent_stats.json``, saying plainly when there are none. S3 credentials come from the standard AWS
chain; the endpoint from ``--endpoint-url`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse

FORMATS = ("vae-train", "diffusers", "ldm")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint as safetensors + model config (load with "
                                   "vae_train.load_model), or an ldm model as a diffusers folder / LDM single file")
    parser.add_argument("checkpoint", help="checkpoint directory or s3://bucket/prefix/step-NNNNNNNN "
                        "(diffusers/ldm formats: also an export directory)")
    parser.add_argument("--out", required=True, help="output directory (--format ldm: the .safetensors file)")
    parser.add_argument("--format", choices=FORMATS, default="vae-train", help="output format (default vae-train)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype (vae-train format)")
    parser.add_argument("--latent-stats", default="", help="latent statistics JSON (vae-train latent-stats) for the "
                        "diffusers/ldm config's scaling_factor, shift_factor, latents_mean, latents_std")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.config import S3Config
    from vae_train.export import export_checkpoint

    from vae_train.interop import InteropError, export_autoencoder

    s3_cfg = S3Config(endpoint_url=args.endpoint_url)
    if args.format == "vae-train":
        if args.latent_stats:
            raise InteropError("--latent-stats is for --format diffusers/ldm; the vae-train format keeps none")
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, s3_cfg)
        print(f"exported {args.checkpoint} -> {out} ({args.dtype}); load with vae_train.load_model({str(out)!r})")
        return 0
    if args.dtype != "fp32":
        raise InteropError(f"--dtype {args.dtype} is for --format vae-train; diffusers/ldm exports are fp32")
    out, origin = export_autoencoder(args.checkpoint, args.out, args.format, latent_stats=args.latent_stats or None,
                                     s3_cfg=s3_cfg)
    print(f"exported {args.checkpoint} -> {out} ({args.format}); {origin}")
    return 0
