"""The things a checkpoint holds, registered by name: DeepSpeed engines and plain stateful objects.

Two kinds of part (see :meth:`vae_train.checkpoint.CheckpointManager.register`):

* :class:`DeepSpeedState` wraps a DeepSpeed engine: weights, optimizer and LR
  scheduler state in DeepSpeed's own files (partitioned under ZeRO). A resume at
  another world size or ZeRO stage goes through DeepSpeed's universal checkpoint
  conversion (:func:`convert_to_universal`), weights and optimizer state exact.
* Anything with ``state_dict()`` / ``load_state_dict(state)`` (the data stream,
  the trainer's counters, EMA weights, ...): its state is saved by every rank,
  JSON values in the rank's ``trainer_state`` file and tensors bit for bit in a
  safetensors file (:func:`encode_state`). Its saved state belongs to one rank
  of one world size; what happens at another world size is the part's
  :class:`Resize` policy, chosen at registration.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from vae_train.checkpoint.manifest import CheckpointError
from vae_train.checkpoint.safe_load import restricted_torch_load
from vae_train.storage import temp_sibling

_TENSOR = "__tensor__"


@runtime_checkable
class Stateful(Protocol):
    """What a non-DeepSpeed part provides (torch modules, optimizers and our data streams do)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Resize(enum.Enum):
    """What a :class:`Stateful` part does on a resume at another world size (its per-rank states do not map).

    ``REFUSE`` (the default): stop with an error naming the part -- right for state
    partitioned by rank that nobody taught to re-shard. ``REPLICATED``: every rank
    saved the same state; each loads rank 0's. ``RESTART``: keep the state the
    object was built with (e.g. a data stream's seed-derived start), logged.
    """

    REFUSE = "refuse"
    REPLICATED = "replicated"
    RESTART = "restart"


@dataclass(frozen=True)
class StateFunctions:
    """A :class:`Stateful` made of two functions, for state that lives in a caller's variables."""

    get: Callable[[], dict[str, Any]]
    set: Callable[[dict[str, Any]], None]

    def state_dict(self) -> dict[str, Any]:
        return self.get()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set(state)


class DeepSpeedState:
    """A DeepSpeed engine as a checkpoint part (every rank calls save/load: they are collectives)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def save(self, part_dir: Path) -> None:
        """DeepSpeed's files of this engine into ``part_dir`` (DeepSpeed's ``save_dir/tag``)."""
        self.engine.save_checkpoint(str(part_dir.parent), tag=part_dir.name, save_latest=False)

    def load(self, part_dir: Path, *, universal: bool = False) -> None:
        """Load ``part_dir``: DeepSpeed's own files, or (``universal``) a universal checkpoint made from them."""
        config = self.engine._config
        if universal:
            config.load_universal_checkpoint = True
        try:
            with restricted_torch_load():
                loaded, _ = self.engine.load_checkpoint(str(part_dir.parent), tag=part_dir.name,
                                                        load_module_strict=True, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        finally:
            if universal:
                config.load_universal_checkpoint = False
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {part_dir}")


def convert_to_universal(src: Path, dest: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in-process (serial, weights-only loads), atomically into ``dest``."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = temp_sibling(dest)
    # DeepSpeed's converter collects model files from the whole tree under its input folder; the
    # model part's folder is the checkpoint's root, where other engines' parts (a discriminator)
    # live in subfolders. It is given a folder of links to this part's own files only.
    staging = temp_sibling(dest.parent / f"{dest.name}-input")
    staging.mkdir(parents=True)
    for file in src.iterdir():
        if file.is_file():
            (staging / file.name).symlink_to(file.resolve())
    args = argparse.Namespace(input_folder=str(staging), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with restricted_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another node on a shared filesystem finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def encode_state(state: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """Split a state into its JSON skeleton and its tensors (keyed by their path in the state).

    Tensors are moved to the CPU and made contiguous; their dtype and bits are kept.
    Anything neither JSON nor a tensor is an error naming the part and the path.
    """
    import torch

    tensors: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise CheckpointError(f"state of part {name!r} at {path or '/'}: dict keys must be strings")
            return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"state of part {name!r} at {path or '/'} is a {type(value).__name__}: a part's "
                              "state_dict() may hold only JSON values (dict, list, str, number, bool, None) and tensors")

    return walk(state, ""), tensors


def decode_state(skeleton: Any, tensors: dict[str, Any]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: decode_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [decode_state(v, tensors) for v in skeleton]
    return skeleton
