"""Loading DeepSpeed's pickled checkpoint files without letting them run code.

DeepSpeed stores its files with ``torch.save`` (pickle) and loads them with
``weights_only=False``, i.e. full pickle, which executes code from the file. We
load them with ``weights_only=True`` plus an allow-list of four plain DeepSpeed
data classes, and only after the SHA-256 of each file matched the manifest. The
residual assumption: whoever can write the manifest and files in your bucket
controls the checkpoint's *values*, not this process.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from vae_train.checkpoint.manifest import CheckpointError


def _deepspeed_safe_globals() -> list[Any]:
    """The only non-tensor classes DeepSpeed puts into its checkpoint pickles (ZeRO 0-3, fp16/bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_RESTRICT_LOCK = threading.Lock()
_restrict_depth = 0


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Make every ``torch.load`` inside (DeepSpeed's included) use ``weights_only=True``.

    Forcing the weights-only unpickler with an allow-list of DeepSpeed's plain data
    classes keeps a crafted checkpoint from running code even if it got past the
    manifest's hashes. Re-entrant (the universal conversion runs inside a load).
    """
    import pickle

    import torch

    global _restrict_depth
    with _RESTRICT_LOCK:
        _restrict_depth += 1
        if _restrict_depth == 1:
            original = torch.load

            def weights_only_load(*args: Any, **kwargs: Any) -> Any:
                kwargs["weights_only"] = True
                try:
                    return original(*args, **kwargs)
                except pickle.UnpicklingError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CheckpointError(
                        f"refusing to load {args[0] if args else kwargs.get('f')!s}: it holds objects outside "
                        f"the weights-only allow-list ({first}); it was not written by vae-train's DeepSpeed save"
                    ) from None

            weights_only_load.original = original  # type: ignore[attr-defined]
            torch.load = weights_only_load
            torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    try:
        yield
    finally:
        with _RESTRICT_LOCK:
            _restrict_depth -= 1
            if _restrict_depth == 0:
                torch.load = torch.load.original  # type: ignore[attr-defined]
