"""``data.classes``: keep only samples of some labels (one-class anomaly models, class subsets).

The filter runs inside the streams, before a sample is decoded, on its ``cls``
member alone, so a skipped sample costs its raw bytes and nothing else. Skipped
samples are counted as *filtered* (a choice of the user), apart from the *skipped*
ones (damaged data), and never warned about one by one.

Two ways a filter can never be satisfied, both reported as :class:`DataError`:

* **No labels.** A sample without a ``cls`` member under ``data.classes`` stops the
  stream at once (its data was prepared without labels).
* **A label that does not occur.** :func:`check_labels_occur` reads the labels of the
  source at start-up, stopping as soon as every wanted label was seen (a few dozen
  samples for a balanced data set). Having read the whole source (up to
  :data:`PROBE_LIMIT` samples) without a label proves it absent. Past that limit the
  streams' own guard applies: :data:`MAX_CONSECUTIVE_FILTERED` filtered samples in a
  row in one worker end the run instead of letting it spin.
"""

from __future__ import annotations

from collections.abc import Iterable

from vae_train.data.decode import SampleRejected, read_label
from vae_train.data.errors import DataError
from vae_train.data.sources import Source
from vae_train.data.tario import ShardReadError, iter_shard

PROBE_LIMIT = 200_000
"""Samples read at start-up at most to find every wanted label (raw bytes, nothing decoded)."""
MAX_CONSECUTIVE_FILTERED = 100_000
"""Filtered samples in a row (one worker) after which the wanted labels are declared absent."""


def _no_labels(classes: Iterable[int], key: str, where: str) -> DataError:
    return DataError(
        f"data.classes={sorted(classes)} needs labelled samples, but sample {key!r} of {where} has no cls member "
        "(the data was prepared without labels); prepare it with labels (e.g. --labels-from-folders) "
        "or remove data.classes")


def keeps(classes: frozenset[int], key: str, members: dict[str, bytes], where: str) -> bool:
    """Whether the filter keeps this raw sample. An unreadable label is kept so the decoder
    rejects and counts it as damage; a missing label raises :class:`DataError`."""
    try:
        label = read_label(members)
    except SampleRejected:
        return True
    if label < 0:
        raise _no_labels(classes, key, where)
    return label in classes


def too_many_filtered(classes: frozenset[int], in_a_row: int, where: str) -> DataError:
    """The error of a stream that read ``in_a_row`` samples without one of ``classes``."""
    return DataError(
        f"{in_a_row} samples in a row of {where} had none of the labels data.classes={sorted(classes)}; "
        "these labels (almost) never occur in this data: check data.classes against the data's labels")


def check_labels_occur(sources: Iterable[Source], classes: frozenset[int], what: str) -> None:
    """Start-up check that every label of ``classes`` occurs in ``sources`` (see the module docstring).

    ``what`` names the setting in messages (``data.train``). Shards that cannot be
    read are passed over here: the stream skips and counts them, with a warning.
    """
    if not classes:
        return
    sources = list(sources)
    missing, seen, read = set(classes), set(), 0
    for source in sources:
        for shard in source.shards:
            raw = iter_shard(shard.url)
            try:
                for key, members in raw:
                    read += 1
                    try:
                        label = read_label(members)
                    except SampleRejected:
                        continue
                    if label < 0:
                        raise _no_labels(classes, key, shard.url)
                    seen.add(label)
                    missing.discard(label)
                    if not missing or read >= PROBE_LIMIT:
                        return
            except ShardReadError:
                continue
            finally:
                raw.close()
    specs = " + ".join(source.spec for source in sources)
    raise DataError(
        f"data.classes={sorted(classes)}: label(s) {sorted(missing)} never occur in {what}={specs!r} "
        f"({read} samples read; labels present: {sorted(seen)})")
