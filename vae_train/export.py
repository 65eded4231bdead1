"""Export a training checkpoint to plain safetensors + JSON, and load it back without DeepSpeed.

An exported model is a directory with two files:

* ``model.safetensors``: the consolidated weights (fp32 or bf16), gathered from the
  ZeRO partitions of every rank;
* ``config.json``: ``{"format": "vae-train-model/1", "model": {ModelConfig fields},
  "dtype", "step", "library_version"}``.

Usage::

    vae-train export runs/x/checkpoints/step-00002000 --out exported/   # or s3://bucket/run/step-...
    import vae_train
    model = vae_train.load_model("exported/")                          # the model (model.arch) in eval mode

:func:`load_model` needs only torch, safetensors and :mod:`vae_train.model`:
DeepSpeed is imported only when it is handed a training checkpoint instead of an
export (then the ZeRO shards must be consolidated first). Nothing here unpickles
untrusted data: exports are safetensors + JSON, and checkpoint files are verified
against their manifest and read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_train.checkpoint.manifest import (
    MANIFEST,
    MODEL_STATES,
    read_manifest,
    split_checkpoint_uri,
    step_name,
    trainer_state_files,
    verified_manifest,
)
from vae_train.errors import VaeTrainError

if TYPE_CHECKING:
    import torch

    from vae_train.config import S3Config
    from vae_train.model import VAE

EXPORT_FORMAT = "vae-train-model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = ("fp32", "bf16")


class ExportError(VaeTrainError):
    """A model export or load that cannot proceed (wrong path, format, or dtype)."""


def consolidated_state_dict(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 weights of a local checkpoint (all ZeRO partitions merged) and its resolved config.

    The checkpoint is verified against its manifest first (sizes and SHA-256). Needs DeepSpeed.
    """
    import torch

    from vae_train.checkpoint.safe_load import restricted_torch_load

    ckpt_dir = Path(ckpt_dir)
    manifest = verified_manifest(ckpt_dir)
    state = json.loads((ckpt_dir / trainer_state_files(0)[0]).read_text())
    with restricted_torch_load(), contextlib.redirect_stdout(io.StringIO()):
        if manifest.zero_stage > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        else:
            weights = torch.load(ckpt_dir / MODEL_STATES, map_location="cpu")["module"]
    weights = {k: v.detach().float().contiguous().clone() for k, v in weights.items()}
    return weights, state.get("config", {})


def export_checkpoint(src: str, out_dir: str | Path, dtype: str = "fp32", s3_cfg: S3Config | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for checkpoint ``src`` (local dir or ``s3://.../step-N``)."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    with _local_checkpoint(src, s3_cfg) as ckpt_dir:
        weights, config = consolidated_state_dict(ckpt_dir)
        step = read_manifest(ckpt_dir).step  # verified just above
    if "model" not in config:
        raise ExportError(f"{src} holds no model config ({trainer_state_files(0)[0]} lacks 'config')")
    target = torch.float32 if dtype == "fp32" else torch.bfloat16
    weights = {k: v.to(target).contiguous() for k, v in weights.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    from vae_train import __version__

    meta = {"format": EXPORT_FORMAT, "model": config["model"], "dtype": dtype, "step": step,
            "library_version": __version__}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


@contextlib.contextmanager
def _local_checkpoint(src: str, s3_cfg: S3Config | None):
    """``src`` as a local checkpoint directory (an ``s3://`` one is downloaded and verified first)."""
    if not src.startswith("s3://"):
        yield Path(src)
        return
    from vae_train.checkpoint.transfer import download_checkpoint
    from vae_train.storage import open_store

    parent, step = split_checkpoint_uri(src)
    with tempfile.TemporaryDirectory(prefix="vae-train-export-") as tmp:
        yield download_checkpoint(open_store(parent, s3_cfg), step, Path(tmp) / step_name(step))


def load_model(src: str | Path, *, s3_cfg: S3Config | None = None, map_location: str = "cpu") -> VAE:
    """Build the model of an export (or a checkpoint) in eval mode (``model.arch`` picks the class).

    ``src``: an exported directory (``config.json`` + ``model.safetensors``), a
    training checkpoint directory (consolidated on the fly; needs DeepSpeed), or
    the ``s3://`` URI of either.
    """
    from safetensors.torch import load_file

    from vae_train.config import ModelConfig
    from vae_train.model import build_model

    src = str(src)
    if src.startswith("s3://"):
        return _load_remote(src, s3_cfg, map_location)
    path = Path(src)
    if (path / CONFIG_FILE).is_file():
        meta = _read_export_config(path)
        weights = load_file(str(path / WEIGHTS_FILE), device=map_location)
        model_cfg = meta["model"]
    elif (path / MANIFEST).is_file():
        weights, config = consolidated_state_dict(path)
        model_cfg = config.get("model", {})
    else:
        raise ExportError(f"{src} is neither an exported model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a checkpoint "
                          f"({MANIFEST}); export one with `vae-train export CHECKPOINT --out DIR`")
    model = build_model(ModelConfig.model_validate(model_cfg))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{src} does not match its model config: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return model.to(map_location).eval()


def _read_export_config(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise ExportError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if meta.get("format") != EXPORT_FORMAT or "model" not in meta:
        raise ExportError(f"{path / CONFIG_FILE} is not a vae-train export (format {meta.get('format')!r})")
    if not (path / WEIGHTS_FILE).is_file():
        raise ExportError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return meta


def _load_remote(src: str, s3_cfg: S3Config | None, map_location: str) -> VAE:
    from vae_train.storage import open_store

    store = open_store(src, s3_cfg)
    if store.exists(CONFIG_FILE):
        with tempfile.TemporaryDirectory(prefix="vae-train-model-") as tmp:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                store.get_file(name, Path(tmp) / name)
            return load_model(tmp, map_location=map_location)
    with _local_checkpoint(src, s3_cfg) as ckpt_dir:
        return load_model(ckpt_dir, map_location=map_location)


def initialize_from(model: VAE, src: str, s3_cfg: S3Config | None = None) -> None:
    """Copy the weights of export (or checkpoint) ``src`` into ``model`` (``model.init_from``).

    The export's architecture must give exactly ``model``'s parameters (names and shapes);
    otherwise the error lists the ``model.*`` settings that differ, so the config can be fixed.
    """
    source = load_model(src, s3_cfg=s3_cfg)
    theirs, ours = source.state_dict(), model.state_dict()
    mismatched = sorted(k for k in set(theirs) | set(ours)
                        if k not in theirs or k not in ours or theirs[k].shape != ours[k].shape)
    if mismatched:
        saved, current = source.config.model_dump(mode="json"), model.config.model_dump(mode="json")
        fields = [f"model.{k}: export {saved[k]!r}, config {current[k]!r}" for k in sorted(saved)
                  if k != "init_from" and saved[k] != current[k]]
        raise ExportError(f"model.init_from={src} does not fit the configured model ({len(mismatched)} parameters "
                          f"differ, e.g. {', '.join(mismatched[:3])}); settings that differ:\n  " + "\n  ".join(fields))
    model.load_state_dict(theirs)
