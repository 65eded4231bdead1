"""Fencing: each incarnation of a run claims a generation where it writes; an older one stops.

On a cluster two incarnations of one run can write the same checkpoint prefix at
once: a requeued job whose old ranks still run (a lost node, a killed launcher,
a network partition), or a user resubmitting a job while the old one runs. So
every incarnation, before it resumes, claims the next *generation* with a
conditional write (``If-None-Match``; on a directory an atomic create-if-absent)
of ``generations/gNNNNNNNN.json`` in the remote prefix and in the local
checkpoint directory. Two incarnations cannot hold the same number; the higher
one is the newer owner. The writer names its uploads after its generation
(``step-N/gNNNNNNNN-ID/...``), so nothing it uploads can replace another writer's
objects, and before every save and every remote commit it looks for a newer
claim: once one exists it uploads and commits nothing more and the run stops
on all ranks with :class:`FencedError`, naming the newer incarnation.

The check and the commit are two requests, not one transaction: a commit that
races a newer claim within that gap can still land. It is then a complete,
verifiable checkpoint of the older lineage, and the newer writer never deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from vae_train.checkpoint.manifest import CheckpointError
from vae_train.storage import ObjectStore

log = logging.getLogger(__name__)

GENERATIONS = "generations"
_CLAIM_RE = re.compile(r"^g(\d{8,})\.json$")
_MAX_CLAIM_ATTEMPTS = 100


class FencedError(CheckpointError):
    """A newer incarnation of this run has claimed its checkpoint location: this one must stop."""


def writer_name(generation: int) -> str:
    """The claim name of a generation: ``g00000003`` (its file is ``generations/g00000003.json``)."""
    return f"g{generation:08d}"


@dataclass(frozen=True)
class Incarnation:
    """Who claimed a generation: enough for an operator to find the process."""

    generation: int
    incarnation: str  # random id, the same in every store this incarnation claimed
    host: str
    pid: int
    started: str
    slurm_job: str = ""

    @property
    def writer(self) -> str:
        """The name its uploads and manifests carry: the generation plus the incarnation id, so it is
        unique across every prefix and run dir (generation numbers alone repeat between locations)."""
        return f"{writer_name(self.generation)}-{self.incarnation[:12]}"

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"generation {self.generation} (host {self.host}, pid {self.pid}{job}, started {self.started})"

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, generation: int) -> Incarnation:
        try:
            raw = json.loads(data)
            return cls(generation, str(raw["incarnation"]), str(raw["host"]), int(raw["pid"]), str(raw["started"]),
                       str(raw.get("slurm_job", "")))
        except (ValueError, KeyError, TypeError):  # unreadable: still a claim, by someone unknown
            return cls(generation, "?", "?", 0, "?")


def _claimed_generations(store: ObjectStore) -> list[int]:
    out = []
    for info in store.list(""):
        match = _CLAIM_RE.match(info.key)
        if match:
            out.append(int(match.group(1)))
    return sorted(out)


def claim(store: ObjectStore, incarnation: str) -> Incarnation:
    """Claim the next free generation in ``store`` (a ``generations/`` directory) for ``incarnation``."""
    claimed = _claimed_generations(store)
    generation = (claimed[-1] if claimed else 0) + 1
    for _ in range(_MAX_CLAIM_ATTEMPTS):
        me = Incarnation(generation, incarnation, socket.gethostname(), os.getpid(),
                         datetime.now(timezone.utc).isoformat(timespec="seconds"), os.environ.get("SLURM_JOB_ID", ""))
        if store.put_bytes(me.to_json(), f"{writer_name(generation)}.json", if_none_match=True):
            return me
        generation += 1  # another incarnation took this number a moment ago
    raise CheckpointError(f"could not claim a generation in {store.uri} after {_MAX_CLAIM_ATTEMPTS} attempts: "
                          "is something creating claims in a loop?")


class Fence:
    """This incarnation's claims, and the question asked before every save and commit: am I still the newest?"""

    def __init__(self, locations: list[tuple[str, ObjectStore]]) -> None:
        """Claim a generation in every (name, store) location, in its ``generations/``; one incarnation id for all."""
        incarnation = uuid.uuid4().hex
        self._claims = [(where, store.child(GENERATIONS), claim(store.child(GENERATIONS), incarnation))
                        for where, store in locations]

    @property
    def mine(self) -> Incarnation:
        """The claim that names this incarnation's uploads (the first store's: the remote when there is one)."""
        return self._claims[0][2]

    def newer(self, *, skip_unreachable: bool = False) -> tuple[str, Incarnation] | None:
        """(where, the newest claim) when any location holds a claim newer than ours, else None.

        ``skip_unreachable``: a location that cannot be listed now (an S3 outage) is
        skipped instead of raising; the uploader's check before each commit, which
        retries until the store answers, still guards the remote.
        """
        for where, store, mine in self._claims:
            try:
                claimed = _claimed_generations(store)
                if claimed and claimed[-1] > mine.generation:
                    newest = claimed[-1]
                    return where, Incarnation.from_json(store.get_bytes(f"{writer_name(newest)}.json"), newest)
            except Exception as exc:  # noqa: BLE001 - boto/network errors have no common base
                if not skip_unreachable:
                    raise
                log.warning("could not look for newer incarnations in %s (%s); checked again before its next "
                            "commit", where, exc)
        return None

    def error(self, where: str, newer: Incarnation) -> FencedError:
        return FencedError(
            f"another incarnation of this run took over {where}: {newer.describe()} claimed it after this one "
            f"({self.mine.describe()}). This incarnation stops without writing or uploading further checkpoints, so "
            "the newer one's are never touched. If the newer job is the mistake, stop it and start this run again "
            "(resume=auto continues from the newest committed checkpoint)"
        )
