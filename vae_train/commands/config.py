"""``vae-train config show CONFIG [key=value ...]``: print the resolved config."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect configurations")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config (YAML + overrides, validated)")
    show.add_argument("config", nargs="?", default=None, help="YAML config file (defaults when omitted)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    keys = actions.add_parser("keys", help="list every config key with its default and description")
    keys.set_defaults(config=None, overrides=[])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.config import describe_fields, load_config

    if args.action == "keys":
        for key, default, description in describe_fields():
            print(f"{key:36s} {default:28s} {description}")
        return 0
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file given, only overrides
        config_path, overrides = None, [config_path, *overrides]
    print(load_config(config_path, overrides).to_yaml(), end="")
    return 0
