"""``vae-train train --config CONFIG [key=value ...]``: train a VAE (same as ``train.py``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a VAE (any launcher: python, torchrun, accelerate, deepspeed)")
    parser.add_argument("--config", default=None, help="YAML config file (e.g. configs/fashion_mnist.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 distributed.zero_stage=2")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.config import load_config
    from vae_train.trainer import train

    train(load_config(args.config, args.overrides))
    return 0
