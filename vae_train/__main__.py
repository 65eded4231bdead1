"""``python -m vae_train`` is the same as the ``vae-train`` console script."""

import sys

from vae_train.cli import main

sys.exit(main())
