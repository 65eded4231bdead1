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
    list_remote,
    read_manifest,
    scan_local,
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
    and the previous one taken (with the steps lost). When there are committed
    checkpoints but none verifies, ``auto`` raises instead of starting fresh.
    An explicit path or URI must verify.
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
    refused: list[tuple[int, str]] = []  # (step, "where: why") of committed checkpoints that cannot be used
    decision = None
    if store is not None:
        _, committed = list_remote(store)
        for step in sorted(committed, reverse=True):
            candidate = ResumeDecision(step, str(root / step_name(step)), store.uri)
            try:
                ensure_local(candidate, store, s3_cfg)
            except CheckpointError as exc:
                log.warning("refusing remote checkpoint %s: %s", step_name(step), exc)
                refused.append((step, f"{store.uri}/{step_name(step)}: {exc}"))
                continue
            log.info("resume=auto: newest committed remote checkpoint is %s/%s", store.uri, step_name(step))
            decision = candidate
            break
    if decision is None:
        good, bad = scan_local(root)
        refused += [(step, f"{path}: {why}") for step, path, why in bad]
        for step, path, manifest in reversed(good):
            problems = verify_local(path, manifest)
            if not problems:
                log.info("resume=auto: newest committed local checkpoint is %s", path)
                decision = ResumeDecision(step, str(path))
                break
            log.warning("refusing local checkpoint %s: %s", path, "; ".join(problems[:3]))
            refused.append((step, f"{path}: fails its manifest: {'; '.join(problems[:3])}"))
    if decision is None:
        if refused:
            raise CheckpointError(
                "resume=auto found committed checkpoints but none that verifies, so it does not start from step 0 "
                "on its own:\n  " + "\n  ".join(why for _, why in sorted(refused, reverse=True)[:10])
                + "\nTo start fresh on purpose, set resume=none (the old checkpoints stay; a run dir or prefix of "
                "its own is cleaner); to resume one of them, repair it and pass it as resume=PATH "
                "(a step-NNNNNNNN directory) or resume=s3://.../step-NNNNNNNN")
        log.info("resume=auto: no committed checkpoint found; starting fresh")
        return None
    newer = sorted(step for step, _ in refused if step > decision.step)
    if newer:
        log.warning("resume=auto: falling back to %s: the newer %s cannot be used (see above), so the %d step(s) "
                    "after step %d are lost and trained again", step_name(decision.step),
                    ", ".join(step_name(s) for s in newer), newer[-1] - decision.step, decision.step)
    _check_resumable(decision)
    return decision


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
