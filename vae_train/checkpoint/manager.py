"""The checkpoint manager: named parts in, committed checkpoints out, and back again on resume.

Every rank makes the same calls in the same order (saving and loading are
collectives)::

    ckpt = CheckpointManager(cfg, rank, world_size, local_rank)   # checks S3 access, claims a generation
    ckpt.register("model", DeepSpeedState(engine))                 # a DeepSpeed engine
    ckpt.register("data", stream, resize=Resize.RESTART)           # anything with state_dict()
    ckpt.register("trainer", counters, resize=Resize.REPLICATED)
    path = ckpt.resolve_resume()                                    # None = start fresh
    step = ckpt.load(path).step if path else 0                      # restores every part + RNGs
    while step < max_steps:
        ...; step += 1
        ckpt.maybe_save(step)
    ckpt.save(step, final=True)            # FencedError once a newer incarnation took over
    ckpt.wait_for_uploads()
    ckpt.close()

A new part (a discriminator engine, EMA weights) is one more ``register`` line:
it is saved by every rank, listed in the manifest, uploaded and verified with
the rest, restored bit for bit, converted or re-derived on a resume at another
world size, and a checkpoint without it is refused with a message naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_train import distributed
from vae_train.checkpoint.fence import Fence, FencedError
from vae_train.checkpoint.manifest import (
    MANIFEST,
    MODEL_PART,
    CheckpointError,
    FileEntry,
    Manifest,
    PartEntry,
    check_resumable,
    list_local_committed,
    owner_rank,
    parse_step,
    part_tensor_file,
    read_manifest,
    retention_victims,
    sha256_file,
    step_name,
    trainer_state_files,
)
from vae_train.checkpoint.parts import DeepSpeedState, Resize, Stateful, convert_to_universal, decode_state, encode_state
from vae_train.checkpoint.resume import ResumeDecision, decide, ensure_local
from vae_train.checkpoint.rng import capture_rng, reseed, restore_rng
from vae_train.checkpoint.transfer import RetentionPolicy, Uploader, UploadJob
from vae_train.errors import VaeTrainError
from vae_train.storage import LocalStore, ObjectStore, StorageError, open_store, temp_sibling, write_atomic

if TYPE_CHECKING:
    from vae_train.config import Config

log = logging.getLogger(__name__)

#: Where universal conversions of checkpoints are cached (under the local checkpoint root).
UNIVERSAL_DIR = ".universal"
#: Model-config keys that do not change the parameters (safe to differ on resume).
RUNTIME_ONLY_MODEL_KEYS = frozenset({"reparam", "init_from"})
_PART_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass
class ResumedState:
    """What :meth:`CheckpointManager.load` restored.

    ``elastic`` is true when the world size or a ZeRO stage changed (DeepSpeed
    parts went through the universal conversion; per-rank parts followed their
    :class:`Resize` policy). ``config`` is the resolved config the checkpoint was
    trained with.
    """

    step: int
    path: str
    elastic: bool
    saved_world_size: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Part:
    name: str
    obj: DeepSpeedState | Stateful
    resize: Resize

    @property
    def kind(self) -> str:
        return "deepspeed" if isinstance(self.obj, DeepSpeedState) else "state"


class CheckpointManager:
    """Save / commit / upload / resolve / load for one rank; every rank makes the same calls."""

    def __init__(
        self,
        cfg: Config,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        *,
        store: ObjectStore | None = None,
    ) -> None:
        """Set up and, when a remote is configured, check it now (clear error before training)."""
        self.cfg = cfg
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        self.local_rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        if self.store is None and cfg.checkpoint.remote:
            self.store = open_store(cfg.checkpoint.remote, cfg.s3)
        self._parts: dict[str, _Part] = {}
        self._uploader: Uploader | None = None
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        self._skipped_job: UploadJob | None = None
        self._ancestors: list[tuple[str, int]] = []
        if self.store is not None:
            self._check_access_everywhere()
        self._fence, self.writer = self._claim_generation()
        if self.store is not None:
            ck = cfg.checkpoint
            self._uploader = Uploader(self.store, self.rank, self.writer, RetentionPolicy(ck.keep_last, ck.keep_every),
                                      ck.upload_deadline_s, self._fence)

    def _check_access_everywhere(self) -> None:
        assert self.store is not None
        error = None
        try:  # one write probe per node is enough; every rank checks it can reach and read the bucket
            self.store.check_access(write=self.local_rank == 0)
        except StorageError as exc:
            error = str(exc)
        errors = [e for e in distributed.all_gather_json(error) if e]
        if errors:
            raise StorageError(f"checkpoint.remote is not usable: {errors[0]}")

    def _claim_generation(self) -> tuple[Fence | None, str]:
        """Rank 0 claims this incarnation's generation (remote and local); every rank learns its writer name."""
        fence, verdict = None, {}
        if self.rank == 0:
            locations = [(self.store.uri, self.store)] if self.store is not None else []
            locations.append((str(self.root), LocalStore(self.root)))
            try:
                fence = Fence(locations)
                verdict = {"writer": fence.mine.writer}
                log.info("checkpoints: this incarnation is %s", fence.mine.describe())
            except (VaeTrainError, OSError) as exc:
                verdict = {"error": f"cannot claim a checkpoint generation: {exc}"}
        verdict = distributed.broadcast_json(verdict)
        if "error" in verdict:
            raise CheckpointError(verdict["error"])
        return fence, verdict["writer"]

    def _check_fence(self) -> None:
        """Collective: raise :class:`FencedError` on every rank once a newer incarnation claimed our location."""
        message = None
        if self._fence is not None:
            newer = self._uploader.fenced if self._uploader is not None and self._uploader.fenced else None
            newer = newer or self._fence.newer(skip_unreachable=True)
            message = str(self._fence.error(*newer)) if newer else None
        message = distributed.broadcast_json(message)
        if message:
            raise FencedError(message)

    # -- registration ----------------------------------------------------------------
    def register(self, name: str, part: DeepSpeedState | Stateful, *, resize: Resize = Resize.REFUSE) -> None:
        """Save and restore ``part`` as ``name`` (same names, same order, on every rank).

        ``part`` is a :class:`DeepSpeedState` (a DeepSpeed engine; ``resize`` does
        not apply: it is converted) or any object with ``state_dict()`` /
        ``load_state_dict()`` whose state holds JSON values and tensors.
        """
        if not _PART_NAME.match(name):
            raise CheckpointError(f"checkpoint part name {name!r} must be lower-case letters, digits and _ "
                                  "(starting with a letter, at most 32 characters)")
        if name in self._parts:
            raise CheckpointError(f"checkpoint part {name!r} is registered twice")
        if not isinstance(part, (DeepSpeedState, Stateful)):
            raise CheckpointError(f"checkpoint part {name!r} ({type(part).__name__}) has no state_dict()/"
                                  "load_state_dict(); wrap a DeepSpeed engine in DeepSpeedState")
        self._parts[name] = _Part(name, part, resize)

    def _engines(self) -> list[_Part]:
        return [p for p in self._parts.values() if p.kind == "deepspeed"]

    def _states(self) -> list[_Part]:
        return [p for p in self._parts.values() if p.kind == "state"]

    def _part_dir(self, ckpt_dir: Path, name: str) -> Path:
        return ckpt_dir if name == MODEL_PART else ckpt_dir / name

    def _zero_stage(self) -> int:
        engines = self._engines()
        model = self._parts.get(MODEL_PART)
        if model is not None and model.kind == "deepspeed":
            return model.obj.zero_stage()  # type: ignore[union-attr]
        return engines[0].obj.zero_stage() if engines else int(self.cfg.distributed.zero_stage)  # type: ignore[union-attr]

    # -- saving ----------------------------------------------------------------------
    def maybe_save(self, step: int) -> bool:
        """Save if ``checkpoint.every_steps`` or ``every_minutes`` says so (same decision on all ranks)."""
        ck = self.cfg.checkpoint
        due = bool(ck.every_steps) and step % ck.every_steps == 0
        if ck.every_minutes and not due:
            due = distributed.any_rank(time.monotonic() - self._last_save_time >= ck.every_minutes * 60)
        if due:
            self.save(step)
        return due

    def save(self, step: int, *, final: bool = False) -> Path:
        """Save every registered part as checkpoint ``step`` on every rank, commit it locally, queue its upload.

        ``final=True`` (end of training, SIGTERM/SIGUSR1) never skips the upload: it
        waits for queue room up to ``checkpoint.upload_deadline_s``. Follow it with
        :meth:`wait_for_uploads`.
        """
        if not self._parts:
            raise CheckpointError("nothing to save: register the checkpoint's parts first (CheckpointManager.register)")
        name = step_name(step)
        ckpt_dir = self.root / name
        if self._last_save_step == step:
            if final and self._skipped_job is not None and self._uploader is not None:
                self._enqueue(self._skipped_job, final=True)
            return ckpt_dir
        start = time.monotonic()
        self._check_fence()  # before anything is written: a newer incarnation may own this run dir
        if self.local_rank == 0 and ckpt_dir.exists():
            if (ckpt_dir / MANIFEST).exists():
                log.warning("overwriting existing checkpoint %s", ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a killed save's leftovers: never mix old and new
        distributed.barrier()
        parts: dict[str, PartEntry] = {}
        for part in self._engines():
            engine = part.obj
            assert isinstance(engine, DeepSpeedState)
            engine.save(self._part_dir(ckpt_dir, part.name))
            parts[part.name] = PartEntry("deepspeed", engine.zero_stage())
        parts.update({part.name: PartEntry("state") for part in self._states()})
        self._write_rank_state(ckpt_dir, step)
        mine = self._hash_own_files(ckpt_dir)
        pending = self._uploader.pending() if self._uploader else []
        gathered = distributed.all_gather_json({"files": {k: asdict(v) for k, v in mine.items()}, "pending": pending})
        files = {k: FileEntry(**v) for g in gathered for k, v in g["files"].items()}
        manifest = Manifest(step, self.world_size, self._zero_stage(), files,
                            datetime.now(timezone.utc).isoformat(timespec="seconds"), _library_version(),
                            parts=parts, writer=self.writer, ancestors=list(self._ancestors))
        self._commit_local(ckpt_dir, manifest)
        self._last_save_step, self._last_save_time = step, time.monotonic()
        all_pending = [s for g in gathered for s in g["pending"]]
        if self._uploader is not None:
            job = UploadJob(step, ckpt_dir, mine, manifest if self.rank == 0 else None, time.monotonic())
            behind = max(len(g["pending"]) for g in gathered) >= self.cfg.checkpoint.max_pending_uploads
            if behind and not final:
                self._skipped_job = job
                if self.rank == 0:
                    log.warning("uploads are behind (%d checkpoints pending): %s stays local only; training "
                                "continues", max(len(g["pending"]) for g in gathered), name)
            else:
                self._skipped_job = None
                self._enqueue(job, final=final)
                all_pending.append(step)
        if self.local_rank == 0:
            self._apply_local_retention(protect_from=min(all_pending, default=None))
        if self.rank == 0:
            log.info("saved checkpoint %s in %.2fs%s", ckpt_dir, time.monotonic() - start,
                     " (upload queued)" if self._uploader and self._skipped_job is None else "")
        return ckpt_dir

    def _enqueue(self, job: UploadJob, *, final: bool) -> None:
        assert self._uploader is not None
        if final:
            deadline = time.monotonic() + self.cfg.checkpoint.upload_deadline_s
            if not self._uploader.wait_for_room(self.cfg.checkpoint.max_pending_uploads, deadline):
                log.warning("rank %d: upload queue still full at the deadline; queueing %s anyway",
                            self.rank, step_name(job.step))
        self._uploader.submit(job)
        self._skipped_job = None

    def _write_rank_state(self, ckpt_dir: Path, step: int) -> None:
        """This rank's JSON file (every state part's JSON, RNG, rank 0: config) and its safetensors files."""
        from safetensors.torch import save_file

        json_name, rng_name = trainer_state_files(self.rank)
        skeletons: dict[str, Any] = {}
        tensor_files: dict[str, dict[str, Any]] = {}
        for part in self._states():
            skeletons[part.name], tensors = encode_state(part.obj.state_dict(), part.name)  # type: ignore[union-attr]
            if tensors:
                tensor_files[part_tensor_file(part.name, self.rank)] = tensors
        rng_meta, rng_tensors = capture_rng()
        tensor_files[rng_name] = rng_tensors
        body: dict[str, Any] = {"step": step, "rank": self.rank, "world_size": self.world_size,
                                "library_version": _library_version(), "parts": skeletons, "rng": rng_meta}
        if self.rank == 0:
            body["config"] = self.cfg.model_dump(mode="json")  # holds no credentials (they never enter it)
        write_atomic(ckpt_dir / json_name, json.dumps(body, sort_keys=True).encode())
        for file_name, tensors in tensor_files.items():
            tmp = temp_sibling(ckpt_dir / file_name)
            save_file(tensors, str(tmp))
            os.replace(tmp, ckpt_dir / file_name)

    def _hash_own_files(self, ckpt_dir: Path) -> dict[str, FileEntry]:
        """Size and SHA-256 of the files this rank wrote (attributed by file name).

        Hidden files are other writers' temporaries (ours from ``temp_sibling``,
        safetensors' ``.tmpXXXX``): another rank may still be writing one while this
        rank hashes, and a temporary that is renamed away must never enter the manifest.
        """
        out = {}
        for path in sorted(ckpt_dir.rglob("*")):
            rel = path.relative_to(ckpt_dir).as_posix()
            if not path.is_file() or rel == MANIFEST or path.name.startswith(".") or path.name.endswith(".tmp"):
                continue
            if owner_rank(rel) == self.rank:
                out[rel] = FileEntry(path.stat().st_size, sha256_file(path), self.rank)
        return out

    def _commit_local(self, ckpt_dir: Path, manifest: Manifest) -> None:
        """Rank 0 writes the manifest; on node-local disks every node's local rank 0 writes its copy."""
        if self.rank == 0:
            write_atomic(ckpt_dir / MANIFEST, manifest.to_json())
        distributed.barrier()
        if self.local_rank == 0 and self.rank != 0 and not (ckpt_dir / MANIFEST).exists():
            write_atomic(ckpt_dir / MANIFEST, manifest.to_json())

    def _apply_local_retention(self, protect_from: int | None) -> None:
        """Keep the newest ``keep_last`` (+ ``keep_every``) committed; never touch pending uploads."""
        committed = list_local_committed(self.root)
        if not committed:
            return
        newest = committed[-1][0]
        victims = set(retention_victims([s for s, _, _ in committed], self.cfg.checkpoint.keep_last,
                                        self.cfg.checkpoint.keep_every))
        for child in self.root.iterdir():  # uncommitted leftovers older than a committed save
            step = parse_step(child.name)
            if step is not None and step < newest and not (child / MANIFEST).exists():
                victims.add(step)
        for step in sorted(victims):
            if protect_from is not None and step >= protect_from:
                continue
            path = self.root / step_name(step)
            # Uncommit first: a crash half-way through rmtree must not leave a "committed" partial dir.
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    def wait_for_uploads(self, deadline_s: float | None = None) -> bool:
        """Block until this rank's queued uploads are done (True) or the deadline passed (False)."""
        if self._uploader is None:
            return True
        timeout = self.cfg.checkpoint.upload_deadline_s if deadline_s is None else deadline_s
        done = self._uploader.wait_idle(timeout)
        if not done:
            log.warning("rank %d: uploads still pending after %.0fs (%s); the newest committed remote "
                        "checkpoint is the one a resume will use", self.rank, timeout,
                        ", ".join(step_name(s) for s in self._uploader.pending()))
        return done

    def close(self) -> None:
        """Stop the upload thread (call :meth:`wait_for_uploads` first to finish uploads)."""
        if self._uploader is not None:
            self._uploader.stop()

    # -- resolving -------------------------------------------------------------------
    def resolve_resume(self, cfg: Config | None = None) -> str | None:
        """The local path of the checkpoint to resume from (downloaded and verified), or None.

        ``resume``: ``auto`` (newest committed in the remote, else local, else None),
        ``none``, a local checkpoint directory, or ``s3://.../step-NNNNNNNN``. Rank 0
        decides; every node's local rank 0 makes sure the files are present locally.
        """
        cfg = cfg or self.cfg
        if cfg.resume.strip().lower() in ("none", ""):
            return None
        verdict: dict[str, Any] = {}
        if self.rank == 0:
            try:
                decision = decide(cfg.resume, self.root, self.store, self.cfg.s3)
                verdict = {"decision": asdict(decision) if decision else None}
            except VaeTrainError as exc:
                verdict = {"error": str(exc)}
        verdict = distributed.broadcast_json(verdict)
        if "error" in verdict:
            raise CheckpointError(verdict["error"])
        if verdict["decision"] is None:
            return None
        decision = ResumeDecision(**verdict["decision"])
        error = None
        if self.rank != 0 and self.local_rank == 0:
            try:
                ensure_local(decision, self.store, self.cfg.s3)
            except VaeTrainError as exc:
                error = str(exc)
        errors = [e for e in distributed.all_gather_json(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return decision.path

    # -- loading ---------------------------------------------------------------------
    def load(self, path: str | Path) -> ResumedState:
        """Restore every registered part and the RNG states from checkpoint ``path`` (every rank).

        Same world size: each rank's own state and RNG streams, DeepSpeed's files as
        saved (exact resume; a changed ZeRO stage converts the DeepSpeed parts).
        Another world size: DeepSpeed parts go through the universal conversion
        (weights and optimizer state exact), each other part follows its
        :class:`Resize` policy, and the RNGs are re-seeded from (seed, step, rank).
        Everything is checked before anything is loaded.

        Exactness needs the caller not to draw from the global RNGs between this call
        and the first step in a way the uninterrupted run did not (e.g. a DataLoader
        drawing its base seed from the global torch RNG when first iterated: give it
        its own ``generator``).
        """
        from safetensors.torch import load_file

        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise CheckpointError(f"{path} is not a committed checkpoint (no {MANIFEST})")
        check_resumable(manifest, str(path))
        rank0 = self._read_rank_state(path, 0)
        self._check_model_config(path, rank0.get("config", {}))
        self._check_parts(path, manifest)
        same_world = manifest.world_size == self.world_size
        mine = (rank0 if self.rank == 0 else self._read_rank_state(path, self.rank)) if same_world else None
        converted = [p.name for p in self._engines()
                     if not same_world or manifest.parts[p.name].zero_stage != p.obj.zero_stage()]  # type: ignore[union-attr]
        _refuse_universal_into_zero3(path, manifest, self.world_size,
                                     {p.name: p.obj.zero_stage() for p in self._engines() if p.name in converted})  # type: ignore[union-attr]
        for part in self._engines():
            engine = part.obj
            assert isinstance(engine, DeepSpeedState)
            saved_stage = manifest.parts[part.name].zero_stage
            if part.name in converted and saved_stage > 0:
                self._load_universal(path, part.name, manifest, engine)
            else:
                engine.load(self._part_dir(path, part.name))
        for part in self._states():
            source = mine if mine is not None else (rank0 if part.resize is Resize.REPLICATED else None)
            if source is None:
                log.warning("resume at world size %d (saved by %d ranks): part %r restarts from the state it was "
                            "built with", self.world_size, manifest.world_size, part.name)
                continue
            tensor_file = path / part_tensor_file(part.name, source["rank"])
            tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
            part.obj.load_state_dict(decode_state(source["parts"][part.name], tensors))  # type: ignore[union-attr]
        if mine is not None:
            restore_rng(mine["rng"], load_file(str(path / trainer_state_files(self.rank)[1])))
        else:
            reseed(self.cfg.seed, manifest.step, self.rank)
        self._last_save_step, self._last_save_time = manifest.step, time.monotonic()
        self._ancestors = manifest.ancestors + ([(manifest.writer, manifest.step)] if manifest.writer else [])
        if self._uploader is not None:
            self._uploader.ancestors = list(self._ancestors)
        elastic = not same_world or bool(converted)
        if self.rank == 0:
            if elastic:
                log.info("elastic resume from %s at step %d: world size %d -> %d, ZeRO stage %d -> %d (universal "
                         "checkpoint for %s)", path, manifest.step, manifest.world_size, self.world_size,
                         manifest.zero_stage, self._zero_stage(), ", ".join(converted) or "nothing")
            else:
                log.info("resumed from %s at step %d (exact: same world size %d)", path, manifest.step,
                         self.world_size)
        return ResumedState(manifest.step, str(path), elastic, manifest.world_size, rank0.get("config", {}))

    def _check_parts(self, path: Path, manifest: Manifest) -> None:
        """Refuse, before loading anything, a checkpoint that lacks a registered part or cannot map it."""
        missing = [name for name in self._parts if name not in manifest.parts]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} has no saved state for {', '.join(repr(m) for m in missing)} (it holds "
                f"{', '.join(sorted(manifest.parts)) or 'no named parts'}): it was written by a run without "
                f"{'it' if len(missing) == 1 else 'them'}. Resume from a checkpoint that has "
                f"{'it' if len(missing) == 1 else 'them'}, or start fresh with resume=none")
        for name, part in self._parts.items():
            if manifest.parts[name].kind != part.kind:
                raise CheckpointError(f"checkpoint {path} saved part {name!r} as {manifest.parts[name].kind}, "
                                      f"this run registers it as {part.kind}")
            if manifest.world_size != self.world_size and part.kind == "state" and part.resize is Resize.REFUSE:
                raise CheckpointError(
                    f"checkpoint {path} was saved by {manifest.world_size} ranks; part {name!r} holds per-rank "
                    f"state that cannot be mapped to {self.world_size} ranks: resume with {manifest.world_size} ranks")
        extra = sorted(set(manifest.parts) - set(self._parts))
        if extra and self.rank == 0:
            log.warning("checkpoint %s also holds %s, which this run does not use; it is not restored",
                        path, ", ".join(extra))

    def _read_rank_state(self, path: Path, rank: int) -> dict[str, Any]:
        json_name, _ = trainer_state_files(rank)
        try:
            return json.loads((path / json_name).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read {json_name}: {exc}") from None

    def _check_model_config(self, path: Path, saved_cfg: dict[str, Any]) -> None:
        # Keys a checkpoint predates (model.arch, the ldm keys) count as their defaults.
        defaults = type(self.cfg.model).model_construct().model_dump(mode="json")
        saved_model = {**defaults, **saved_cfg.get("model", {})}
        current = self.cfg.model.model_dump(mode="json")
        saved_trainable = saved_cfg.get("train", {}).get("trainable", "all")
        if saved_trainable != self.cfg.train.trainable:
            raise CheckpointError(
                f"checkpoint {path} trained with train.trainable={saved_trainable} (its optimizer state covers only "
                f"those parameters) but the config says {self.cfg.train.trainable}; resume with the same setting, or "
                "export the checkpoint and start a new run from it with model.init_from"
            )
        diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current.get(k)!r}"
                 for k in sorted(set(saved_model) | set(current))
                 if k not in RUNTIME_ONLY_MODEL_KEYS and saved_model.get(k) != current.get(k)]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was trained with an incompatible model config:\n  "
                                  + "\n  ".join(diffs)
                                  + "\nuse the checkpoint's model settings, or start fresh with resume=none")

    def _load_universal(self, path: Path, name: str, manifest: Manifest, engine: DeepSpeedState) -> None:
        """Convert part ``name`` to DeepSpeed's universal format (local rank 0 of each node) and load it."""
        load_dir = self.root / UNIVERSAL_DIR
        tag = f"{path.name}-{name}-ws{manifest.world_size}"
        error = None
        if self.local_rank == 0 and not (load_dir / tag).is_dir():
            try:
                convert_to_universal(self._part_dir(path, name), load_dir / tag)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"universal conversion of {path} ({name}) failed: {exc}"
        errors = [e for e in distributed.all_gather_json(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        engine.load(load_dir / tag, universal=True)
        distributed.barrier()
        if self.local_rank == 0:
            shutil.rmtree(load_dir / tag, ignore_errors=True)


def _refuse_universal_into_zero3(path: Path, manifest: Manifest, world_size: int, stages: dict[str, int]) -> None:
    """Refuse, before loading, a conversion DeepSpeed cannot load: a universal checkpoint into ZeRO-3.

    DeepSpeed's ZeRO-3 engine looks for its own per-rank model files in the
    universal folder and dies on a bare ``AssertionError``; say what works instead.
    """
    for name, stage in stages.items():
        saved = manifest.parts[name].zero_stage
        if stage == 3 and saved > 0:
            raise CheckpointError(
                f"checkpoint {path} ({name!r}) was saved by {manifest.world_size} ranks with ZeRO stage {saved}; "
                f"this run has {world_size} ranks with ZeRO stage 3, which would need a universal checkpoint "
                "loaded into ZeRO-3, and DeepSpeed cannot do that. Resume with "
                f"{manifest.world_size} ranks and distributed.zero_stage={saved} (exact), or with "
                "distributed.zero_stage=1 or 2 at any world size")


def _library_version() -> str:
    from vae_train import __version__

    return __version__
