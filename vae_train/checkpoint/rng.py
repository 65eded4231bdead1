"""The global random number generators of one rank: capture for a checkpoint, restore on resume.

Exact resume needs every global stream the training step draws from (Python's
``random``, NumPy's legacy global state, torch CPU and CUDA) back where it was.
The states are split into a JSON part and tensors (saved as safetensors), so
nothing is pickled.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any


def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """RNG states as (JSON part, tensors) -- Python, NumPy, torch CPU and CUDA."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (CUDA states for the devices present)."""
    import numpy as np
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def reseed(seed: int, step: int, rank: int) -> None:
    """Deterministic fresh RNG streams for a resume at another world size (old per-rank states do not map)."""
    import numpy as np
    import torch

    derived = int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little")
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)
