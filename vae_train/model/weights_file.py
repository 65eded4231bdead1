"""Identify a local pretrained-weights file by its content, without trusting its name alone.

LPIPS (VGG16) and rFID (Inception) figures are comparable with published ones only on
the published weights; the metrics say so when a file is another one (e.g. the random
backbones the tests and CPU demos use).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_prefix(path: Path, size: int = 8) -> str:
    """The first ``size`` hex digits of the file's SHA-256 (how torch hub names its weights files)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:size]
