"""The ``vae-train`` command line: one subcommand per module in :mod:`vae_train.commands`.

Command modules are light to import (heavy imports happen inside ``run``), so
``vae-train --help`` and ``vae-train config show`` answer at once. A
:class:`~vae_train.errors.VaeTrainError` is printed as one message with exit
status 2: user mistakes never end in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vae_train import __version__
from vae_train.allocator import keep_freed_memory
from vae_train.errors import VaeTrainError

COMMAND_MODULES: tuple[str, ...] = (
    "vae_train.commands.train",
    "vae_train.commands.config",
    "vae_train.commands.prepare",
    "vae_train.commands.schedules",
    "vae_train.commands.evaluate",
    "vae_train.commands.export",
    "vae_train.commands.import_weights",
    "vae_train.commands.latents",
    "vae_train.commands.build_ops",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vae-train", description="Train and use convolutional VAEs at scale.")
    parser.add_argument("--version", action="version", version=f"vae-train {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # every command's tensors reuse warm pages (vae_train.allocator)
    try:
        return int(args.func(args) or 0)
    except VaeTrainError as exc:
        print(f"vae-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
