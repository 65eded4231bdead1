"""Which checkpoint a run resumes from (``resume=auto | none | PATH | s3://.../step-N``), as a typed decision.

Rank 0 decides (:func:`decide`) and broadcasts the :class:`ResumeDecision`;
every node's local rank 0 then makes sure the files are present and verified
locally (:func:`ensure_local`), downloading them from the remote if needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vae_train.checkpoint.manifest import (
    MANIFEST,
    CheckpointError,
    check_resumable,
    list_local_committed,
    list_remote,
    read_manifest,
    split_checkpoint_uri,
    step_name,
    verified_manifest,
    verify_local,
)
from vae_train.checkpoint.transfer import download_checkpoint
from vae_train.storage import ObjectStore, open_store

if TYPE_CHECKING:
    from vae_train.config import S3Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeDecision:
    """Resume from checkpoint ``step`` at local ``path``; ``source`` is the remote it comes from ("" = local)."""

    step: int
    path: str
    source: str = ""


def decide(mode: str, root: Path, store: ObjectStore | None, s3_cfg: S3Config | None) -> ResumeDecision | None:
    """The checkpoint ``resume=mode`` names (None: start fresh); rank 0 only. Raises on a bad choice.

    ``auto``: the newest committed checkpoint of the remote that downloads and
    verifies, else the newest verified one in ``root``; a failing one is logged
    and the previous one taken. An explicit path or URI must verify.
    """
    mode = mode.strip()
    if mode.lower() in ("none", ""):
        return None
    if mode == "auto":
        return _decide_auto(root, store, s3_cfg)
    if mode.startswith("s3://"):
        parent, step = split_checkpoint_uri(mode)
        decision = ResumeDecision(step, str(root / step_name(step)), parent)
        ensure_local(decision, store, s3_cfg)
        _check_resumable(decision)
        return decision
    path = Path(mode)
    if not path.is_dir() or read_manifest(path) is None:
        raise CheckpointError(f"resume={mode!r} is not a committed checkpoint directory (no {MANIFEST}); "
                              "use auto, none, a step-NNNNNNNN directory or s3://.../step-NNNNNNNN")
    manifest = verified_manifest(path)
    check_resumable(manifest, str(path))
    return ResumeDecision(manifest.step, str(path))


def _decide_auto(root: Path, store: ObjectStore | None, s3_cfg: S3Config | None) -> ResumeDecision | None:
    if store is not None:
        _, committed = list_remote(store)
        for step in sorted(committed, reverse=True):
            decision = ResumeDecision(step, str(root / step_name(step)), store.uri)
            try:
                ensure_local(decision, store, s3_cfg)
            except CheckpointError as exc:
                log.warning("refusing remote checkpoint %s: %s; falling back to the previous committed one",
                            step_name(step), exc)
                continue
            log.info("resume=auto: newest committed remote checkpoint is %s/%s", store.uri, step_name(step))
            _check_resumable(decision)
            return decision
    for step, path, manifest in reversed(list_local_committed(root)):
        problems = verify_local(path, manifest)
        if not problems:
            log.info("resume=auto: newest committed local checkpoint is %s", path)
            check_resumable(manifest, str(path))
            return ResumeDecision(step, str(path))
        log.warning("refusing local checkpoint %s (%s); falling back to the previous committed one",
                    path, "; ".join(problems[:3]))
    log.info("resume=auto: no committed checkpoint found; starting fresh")
    return None


def _check_resumable(decision: ResumeDecision) -> None:
    manifest = read_manifest(decision.path)
    assert manifest is not None  # ensure_local just verified it
    check_resumable(manifest, f"{decision.source}/{step_name(decision.step)}" if decision.source else decision.path)


def ensure_local(decision: ResumeDecision, store: ObjectStore | None, s3_cfg: S3Config | None) -> None:
    """Download (if needed) and verify the checkpoint of ``decision`` into its local path."""
    path = Path(decision.path)
    if not decision.source:
        manifest = read_manifest(path)
        if manifest is None or verify_local(path, manifest, hashes=False):
            raise CheckpointError(f"checkpoint {path} is not present on this node (use a shared filesystem "
                                  "or checkpoint.remote for multi-node resume)")
        return
    source = store if store is not None and decision.source == store.uri else open_store(decision.source, s3_cfg)
    download_checkpoint(source, decision.step, path)
