"""Shared test set-up: fixtures live in tests/fixtures/ and are registered here."""

import os

# DeepSpeed picks its accelerator at import time; every test runs on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins: list[str] = [
    "tests.fixtures.s3",
    "tests.fixtures.data",
    "tests.fixtures.trained_vae",
    "tests.fixtures.slurm",
    "tests.fixtures.vgg",
]
