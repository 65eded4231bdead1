"""Checkpoints: save named parts, commit, upload in the background, find the newest, resume.

A checkpoint is ``{run_dir}/checkpoints/step-NNNNNNNN/`` (mirrored to
``checkpoint.remote`` when set). What it holds is whatever was registered with
the :class:`CheckpointManager` by name -- the trainer registers the model's
DeepSpeed engine (``model``), the data stream (``data``) and its counters
(``trainer``) -- plus every rank's RNG states and, written last by rank 0,
``manifest.json``: every file with size and SHA-256, every part, world size,
ZeRO stage and step. A checkpoint without a valid manifest does not exist, so a
save killed half-way (SIGKILL, node loss) is never resumed.

Resume (``resume=auto``) takes the newest committed checkpoint in the remote,
else in the local run dir, downloads it in parallel if needed, verifies every
file against the manifest (a failing one is refused and ``auto`` falls back to
the previous one) and loads it. Same world size: exact (DeepSpeed state, each
rank's part states, RNG states). Another world size: DeepSpeed parts go through
DeepSpeed's universal checkpoint conversion (weights and optimizer state exact);
the trainer's counters are replicated and load as saved; the data stream
restarts from the position its seed gives at the new world size (the first
batches of that stream, not a continuation), which is logged; the RNGs are
re-seeded from (seed, step, rank).

Modules, one concern each: :mod:`.manifest` (names, manifest, verification),
:mod:`.safe_load` (weights-only loading of DeepSpeed's pickles), :mod:`.rng`,
:mod:`.parts` (what can be registered), :mod:`.transfer` (upload thread,
download), :mod:`.resume` (which checkpoint), :mod:`.manager`.
"""

from vae_train.checkpoint.manager import UNIVERSAL_DIR, CheckpointManager, ResumedState
from vae_train.checkpoint.manifest import (
    FORMAT,
    FORMAT_V1,
    MANIFEST,
    MODEL_PART,
    MODEL_STATES,
    CheckpointError,
    FileEntry,
    Manifest,
    PartEntry,
    check_resumable,
    list_local_committed,
    list_remote,
    owner_rank,
    parse_step,
    part_tensor_file,
    read_manifest,
    retention_victims,
    sha256_file,
    split_checkpoint_uri,
    step_name,
    trainer_state_files,
    verified_manifest,
    verify_local,
)
from vae_train.checkpoint.parts import DeepSpeedState, Resize, Stateful, StateFunctions, convert_to_universal
from vae_train.checkpoint.resume import ResumeDecision
from vae_train.checkpoint.safe_load import restricted_torch_load
from vae_train.checkpoint.transfer import download_checkpoint

__all__ = [
    "FORMAT", "FORMAT_V1", "MANIFEST", "MODEL_PART", "MODEL_STATES", "UNIVERSAL_DIR",
    "CheckpointError", "CheckpointManager", "DeepSpeedState", "FileEntry", "Manifest", "PartEntry", "Resize",
    "ResumeDecision", "ResumedState", "StateFunctions", "Stateful",
    "check_resumable", "convert_to_universal", "download_checkpoint", "list_local_committed", "list_remote",
    "owner_rank", "parse_step", "part_tensor_file", "read_manifest", "restricted_torch_load", "retention_victims",
    "sha256_file", "split_checkpoint_uri", "step_name", "trainer_state_files", "verified_manifest", "verify_local",
]
