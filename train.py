"""Entry point for every launcher: ``accelerate launch train.py --config configs/X.yaml [key=value ...]``.

Runs exactly ``vae-train train`` (:func:`vae_train.commands.train.run`: the final config,
then the trainer); also works under ``torchrun``, ``deepspeed`` and plain ``python``.
"""

import sys

from vae_train.cli import main

if __name__ == "__main__":
    # Launchers append their own flags (deepspeed adds --local_rank=N); the
    # environment (LOCAL_RANK) carries the same information, so drop them.
    argv = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    sys.exit(main(["train", *argv]))
