"""``vae-train train --config CONFIG [key=value ...]``: train a VAE (``train.py`` runs this same command)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a VAE (any launcher: python, torchrun, accelerate, deepspeed)")
    parser.add_argument("--config", default=None, help="YAML config file (e.g. configs/fashion_mnist.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 distributed.zero_stage=2")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Make the run's final config, then train it.

    Final means: the YAML file, the overrides, and what an ``accelerate launch
    --config_file`` passed in ``ACCELERATE_*`` variables (ZeRO stage, precision,
    a DeepSpeed JSON: :func:`vae_train.engine.apply_launcher_settings`), and
    ``distributed.precision=auto`` decided for this machine, all before anything
    is built; nothing downstream changes it.
    """
    from vae_train.config import load_config
    from vae_train.engine import apply_launcher_settings, resolve_auto_precision
    from vae_train.trainer import train

    cfg, launcher_notes = apply_launcher_settings(load_config(args.config, args.overrides))
    cfg, precision_notes = resolve_auto_precision(cfg)
    train(cfg, notes=[*launcher_notes, *precision_notes])
    return 0
