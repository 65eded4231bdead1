"""Subcommands of ``vae-train``; each module exposes ``register(subparsers)`` and ``run(args)``."""
