"""What a checkpoint is on disk and in a bucket: its names, its manifest, and how it is verified.

A checkpoint is the directory (or S3 prefix) ``step-NNNNNNNN/``. It exists -- for
resume, export and retention -- only when its ``manifest.json`` is there and
valid: the manifest is written last and lists every file with its size and
SHA-256, so a save killed half-way never passes for a good one.

File names inside a checkpoint (other modules and ``vae-train export`` use these
names, never literals):

* DeepSpeed's files of the part named ``model`` at the top (``mp_rank_00_model_states.pt``,
  ``zero_pp_rank_R_mp_rank_00_optim_states.pt``, ...), where DeepSpeed's own tools
  (``zero_to_fp32``, ``ds_to_universal``) and checkpoints of format 1 have them;
  any other DeepSpeed part in a sub-directory named after it;
* per rank R: ``trainer_state.rankRRRRR.json`` (the JSON state of every registered
  part, the RNG states of Python/NumPy, and on rank 0 the resolved config) and
  ``rng.rankRRRRR.safetensors`` (the torch RNG states); tensors of a registered
  part in ``state.NAME.rankRRRRR.safetensors``. JSON and safetensors: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vae_train.errors import VaeTrainError
from vae_train.storage import ObjectStore

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The layout written now: named parts listed in the manifest (``parts``).
FORMAT = "vae-train-checkpoint/2"
#: The layout before named parts (one DeepSpeed engine + one opaque trainer-state dict):
#: still verified and exported, not resumed (:func:`check_resumable`).
FORMAT_V1 = "vae-train-checkpoint/1"
READABLE_FORMATS = (FORMAT, FORMAT_V1)
STEP_RE = re.compile(r"^step-(\d{8,})$")
#: The DeepSpeed part whose files sit at the top of the checkpoint.
MODEL_PART = "model"
MODEL_STATES = "mp_rank_00_model_states.pt"
_OWNER_RES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"\.rank(\d+)\."))


class CheckpointError(VaeTrainError):
    """A checkpoint that cannot be used: missing, uncommitted, corrupted or incompatible."""


def step_name(step: int) -> str:
    """The directory (and S3 prefix) name of a checkpoint: ``step-00001234``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint name (``step-00001234`` -> 1234), None for any other name."""
    match = STEP_RE.match(name)
    return int(match.group(1)) if match else None


def split_checkpoint_uri(uri: str) -> tuple[str, int]:
    """``s3://bucket/run/step-00001000`` -> (``s3://bucket/run``, 1000); anything else is an error."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    step = parse_step(name)
    if step is None or not parent:
        raise CheckpointError(f"{uri!r} must end in a checkpoint name like step-00001000")
    return parent, step


def trainer_state_files(rank: int) -> tuple[str, str]:
    """This rank's JSON state file and torch RNG file."""
    return f"trainer_state.rank{rank:05d}.json", f"rng.rank{rank:05d}.safetensors"


def part_tensor_file(name: str, rank: int) -> str:
    """Where rank ``rank`` keeps the tensors of registered part ``name``."""
    return f"state.{name}.rank{rank:05d}.safetensors"


def owner_rank(name: str) -> int:
    """Which rank wrote a checkpoint file (by DeepSpeed's and our naming); the rest is rank 0's."""
    for pattern in _OWNER_RES:
        match = pattern.search(Path(name).name)
        if match:
            return int(match.group(1))
    return 0


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    rank: int


@dataclass(frozen=True)
class PartEntry:
    """One registered part as saved: ``kind`` is ``deepspeed`` or ``state``."""

    kind: str
    zero_stage: int = 0  # DeepSpeed parts: the engine's ZeRO stage at save time


@dataclass
class Manifest:
    """What makes a checkpoint exist: written last, lists every file with its hash and every part."""

    step: int
    world_size: int
    zero_stage: int
    files: dict[str, FileEntry]
    created: str = ""
    library_version: str = ""
    format: str = FORMAT
    parts: dict[str, PartEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = asdict(self)
        body["files"] = {name: asdict(entry) for name, entry in sorted(self.files.items())}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> Manifest:
        """Parse and validate; any deviation raises :class:`CheckpointError` naming ``where``."""
        try:
            raw = json.loads(data)
            fmt = raw.get("format")
            if fmt not in READABLE_FORMATS:
                raise ValueError(f"format {fmt!r} is not {FORMAT!r}")
            files = {}
            for name, entry in raw["files"].items():
                if name.startswith("/") or ".." in Path(name).parts or name == MANIFEST:
                    raise ValueError(f"bad file name {name!r}")
                files[name] = FileEntry(int(entry["size"]), str(entry["sha256"]), int(entry["rank"]))
            if not files:
                raise ValueError("lists no files")
            parts = {str(name): PartEntry(str(p["kind"]), int(p.get("zero_stage", 0)))
                     for name, p in raw.get("parts", {}).items()}
            return cls(int(raw["step"]), int(raw["world_size"]), int(raw["zero_stage"]), files,
                       str(raw.get("created", "")), str(raw.get("library_version", "")), fmt, parts)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"invalid manifest {where}: {exc}") from None

    def same_content(self, other: Manifest) -> bool:
        return (self.step, self.world_size, self.files) == (other.step, other.world_size, other.files)


def check_resumable(manifest: Manifest, where: str) -> None:
    """Refuse a checkpoint whose layout this version can verify and export but not resume."""
    if manifest.format != FORMAT:
        raise CheckpointError(
            f"checkpoint {where} has format {manifest.format!r}, written by a vae-train before named checkpoint "
            f"parts; this version resumes only {FORMAT!r}. Its weights still export (`vae-train export {where} "
            "--out DIR`); to train on, start fresh with resume=none or resume it with the vae-train that wrote it"
        )


def read_manifest(ckpt_dir: str | Path) -> Manifest | None:
    """The manifest of a local checkpoint, or None when it has none (= not committed)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_json(path.read_bytes(), str(path))


def verify_local(ckpt_dir: str | Path, manifest: Manifest, *, hashes: bool = True) -> list[str]:
    """Problems of a local checkpoint against its manifest (empty list = intact)."""
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{name}: size {path.stat().st_size} != {entry.size}")
        elif hashes and sha256_file(path) != entry.sha256:
            problems.append(f"{name}: SHA-256 mismatch")
    return problems


def verified_manifest(ckpt_dir: str | Path) -> Manifest:
    """The manifest of a committed local checkpoint whose every file matches it; else a clear error."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir) if ckpt_dir.is_dir() else None
    if manifest is None:
        raise CheckpointError(f"{ckpt_dir} is not a committed checkpoint directory (no {MANIFEST})")
    problems = verify_local(ckpt_dir, manifest)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} fails its manifest: {'; '.join(problems[:5])}")
    return manifest


def list_local_committed(ckpt_root: str | Path) -> list[tuple[int, Path, Manifest]]:
    """Committed local checkpoints (valid manifest), oldest first."""
    out = []
    root = Path(ckpt_root)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        step = parse_step(child.name)
        if step is None or not child.is_dir():
            continue
        try:
            manifest = read_manifest(child)
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", child, exc)
            continue
        if manifest is not None:
            out.append((step, child, manifest))
    return sorted(out, key=lambda item: item[0])


def list_remote(store: ObjectStore) -> tuple[dict[int, list[str]], set[int]]:
    """All remote checkpoint keys grouped by step, and the steps that have a manifest."""
    by_step: dict[int, list[str]] = {}
    committed = set()
    for info in store.list("step-"):
        top, _, rest = info.key.partition("/")
        step = parse_step(top)
        if step is None or not rest:
            continue
        by_step.setdefault(step, []).append(info.key)
        if rest == MANIFEST:
            committed.add(step)
    return by_step, committed


def retention_victims(committed: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Committed steps to delete: all but the newest ``keep_last`` and multiples of ``keep_every``.

    The newest committed checkpoint is never a victim (``keep_last >= 1``).
    """
    ordered = sorted(committed)
    keep = set(ordered[-max(1, keep_last):])
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]
