"""Keep freed host memory in the process (glibc malloc), so each step's tensors reuse warm pages.

Why: PyTorch's CPU tensors come straight from ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at start, raised as such blocks are freed) with freshly mapped
pages and unmaps it on ``free``, and it hands the heap's free top above 128 KiB back to
the kernel; either way the next step's activations land on pages the kernel must fault
in and zero again. On the default job (2 CPU ranks, bf16 28x28 activations of 0.1-2 MB)
that was ~16% of the ranks' CPU time spent in the kernel. With both thresholds set once
at start (blocks up to glibc's 32 MiB ceiling come from the heap, and freed memory stays
for the next step), ``benchmarks/train_throughput.py`` measured the kernel time halved;
images/s moved by about the benchmark's run-to-run noise (README, "Trainer overhead").
The price: a process keeps its peak heap, which a training loop reuses every step anyway.

Only glibc (Linux) is tuned; another C library, or a user who tuned glibc's malloc through
``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables, is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameters (glibc's malloc.h)."""

MMAP_THRESHOLD = 32 * 2**20
"""Blocks up to this size come from the heap: glibc's largest allowed value on 64-bit."""

TRIM_THRESHOLD = 2**30
"""Free heap top kept before glibc returns memory to the kernel."""

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
"""Environment variables through which a user already chose these settings."""


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; returns whether they were set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.debug("glibc refused the malloc thresholds; freed memory goes back to the kernel as usual")
    return done
