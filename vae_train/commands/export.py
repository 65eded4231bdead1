"""``vae-train export CHECKPOINT --out DIR [--dtype fp32|bf16] [--weights ema|raw]``: consolidated safetensors + model config JSON.

CHECKPOINT is a committed checkpoint directory (``.../checkpoints/step-NNNNNNNN``) or
``s3://bucket/prefix/step-NNNNNNNN``. S3 credentials come from the standard AWS
chain; the endpoint from ``--endpoint-url`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint as safetensors + model config (load with vae_train.load_model)")
    parser.add_argument("checkpoint", help="checkpoint directory or s3://bucket/prefix/step-NNNNNNNN")
    parser.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype of the export")
    parser.add_argument("--weights", choices=("ema", "raw"), default="auto",
                        help="the EMA or the raw trained weights (default: EMA when the run kept one)")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.config import S3Config
    from vae_train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.dtype, S3Config(endpoint_url=args.endpoint_url), args.weights)
    print(f"exported {args.checkpoint} -> {out} ({args.dtype}); load with vae_train.load_model({str(out)!r})")
    return 0
