"""Raw samples: reading tar shards, rejecting bad samples, shuffling.

This module owns the step from shard files to validated *raw* samples
(key, shard, encoded image bytes, label) and the bad-sample policy:
a sample with no image, an image whose header/CRC check fails, no or a
non-integer `cls`, or a label outside [0, data.num_classes) is skipped,
warned about once and counted; a worker that meets more than
data.max_bad_samples distinct bad samples of its own share raises. Every
decision about the stream depends on the bytes only, never on timing, so the
streams in data.stream stay deterministic (which reader first warns about an
image of another's share that fails at decode may depend on timing). Pixels are decoded later, in data.stream.
"""

from __future__ import annotations

import os
import random
import re
import tarfile
import warnings
from collections.abc import Container, Iterable, Iterator
from typing import Callable, NamedTuple

from webdataset import tariterators

from data.bad_ledger import FOLDER, append_entry, entries_of, read_entries
from data.shards import recorded_samples
from data.tars import tar_members
from data.transforms import check_image_header
from data.writer import IMAGE_FIELDS, LABEL_FIELD

# webdataset's metadata members (skipped, as its tar iterator does).
_META = re.compile(r"__[^/]*__($|/)")


class RawSample(NamedTuple):
    """One validated, still-encoded sample; cheap to buffer and to skip."""

    key: str
    shard: str
    image: bytes
    label: int
    reported: bool = True  # its shard is this reader's own: a failure to decode counts toward its cap


class BadSampleCounter:
    """Counts distinct bad samples of one reader (one worker) and enforces the cap.

    Distinct, because an endless stream meets the same bad sample once per
    epoch; counting repeats would make a long run fail on a tiny, fixed
    amount of bad data. Only samples recorded with report=True count toward
    the cap (and warn): a training slot reports the shards it owns, its share
    of the first epoch's deal. The shares are disjoint across slots, so each
    worker's cap holds against its own share, as with a fixed deal, although
    the shards move between slots every epoch. Owned, not first epoch only: a
    sample that fails only at decode may be met first in a later epoch.

    With the run's record (`ledger`, data.bad_ledger) every counted sample is
    also written down, and an image that fails at decode in a shard this slot
    does not own is written down (and warned about) by the first slot that
    decodes it, outside the cap: its owner may never decode it (the
    class-balanced batcher drops what does not gather m images; a resume's skip
    never decodes). The run's logged total is the record's distinct entries.
    """

    def __init__(
        self,
        max_bad_samples: int,
        where: str,
        publish: Callable[[int], None] | None = None,
        ledger: str | None = None,
        earlier: dict[tuple[str, str, str], int] | None = None,
    ) -> None:
        self.max_bad_samples = max_bad_samples
        self.where = where  # e.g. "rank 0 worker 1", for messages
        self.seen: dict[tuple[str, str], int] = {}  # (shard, key) -> how many samples it stands for
        self.publish = publish  # receives the new count (e.g. a slot of shared memory)
        self.ledger = ledger  # a file each bad sample found here is appended to (data.bad_ledger)
        self.earlier = earlier or {}  # what earlier jobs of the run recorded, from every slot's ledger
        self.elsewhere: set[tuple[str, str]] = set()  # decode failures of shards owned by other slots, recorded

    def adopt_earlier(self, shards: Iterable[str]) -> None:
        """Count the earlier jobs' bad samples of `shards` (this slot's owned share) as found, without warning
        again: a resume's skip never decodes, so an image that failed only at decode would otherwise be counted
        again only if this slot is dealt its shard once more (see data.bad_ledger)."""
        adopted = {ident: n for ident, n in entries_of(self.earlier, shards).items() if ident not in self.seen}
        self.seen.update(adopted)
        if adopted and self.publish is not None:
            self.publish(self.count)
        if self.count > self.max_bad_samples:  # at the start, not at the next bad sample hours later
            raise RuntimeError(
                f"{self.where} starts with {self.count} bad samples in its shards that earlier jobs of this run "
                f"recorded (the run's {FOLDER}/ folder), more than data.max_bad_samples={self.max_bad_samples} "
                "(fewer ranks or workers than before give each reader a larger share); rebuild the shards, or "
                "raise data.max_bad_samples if skipping them is acceptable"
            )

    @property
    def count(self) -> int:
        """Distinct bad samples of this reader's own share recorded so far (with report=True)."""
        return sum(self.seen.values())

    def record_decode_failure(self, shard: str, key: str, reason: str, owned: bool) -> None:
        """An image that passed the header check but does not decode (see the class docstring). Whether it is
        already in the run's record is read once per reader and sample; two readers meeting it at the same
        moment may both warn (the logged total still counts it once)."""
        ident = (shard, key)
        if self.ledger is None or ident in self.seen or ident in self.elsewhere:
            self.record(shard, key, reason, report=owned)
            return
        recorded = ident in entries_of(read_entries(os.path.dirname(self.ledger)), [shard])
        if owned:  # counts toward this reader's cap (deterministic); warned about and written once
            self.record(shard, key, reason, quiet=recorded)
            return
        self.elsewhere.add(ident)
        if not recorded:
            append_entry(self.ledger, shard, key, 1, reason)
            self._warn(shard, key, reason)

    def record(
        self, shard: str, key: str, reason: str, samples: int = 1, report: bool = True, quiet: bool = False
    ) -> None:
        """Note a bad sample (or `samples` of them lost at one place, the rest of a damaged shard); warn the
        first time; raise past the cap. report=False: met again in a later epoch, ignored. quiet: already in
        the run's record (neither warned about nor written again)."""
        ident = (shard, key)
        if not report or ident in self.seen:
            return
        self.seen[ident] = samples
        if self.ledger is not None and not quiet:
            append_entry(self.ledger, shard, key, samples, reason)
        if self.publish is not None:
            self.publish(self.count)
        if not quiet:
            self._warn(shard, key, reason)
        if self.count > self.max_bad_samples:
            raise RuntimeError(
                f"{self.where} met {self.count} bad samples, more than "
                f"data.max_bad_samples={self.max_bad_samples}; the last one was {key!r} in "
                f"{shard} ({reason}). Rebuild the shards, or raise data.max_bad_samples "
                f"if skipping them is acceptable"
            )

    def _warn(self, shard: str, key: str, reason: str) -> None:
        warnings.warn(f"skipping bad sample {key!r} in {shard} ({self.where}): {reason}", RuntimeWarning, stacklevel=3)


def parse_label(sample: dict, num_classes: int) -> int:
    """Return the sample's label; ValueError (with the reason) when unusable."""
    raw = sample.get(LABEL_FIELD)
    if raw is None:
        raise ValueError(f"missing {LABEL_FIELD}")
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{LABEL_FIELD} {raw[:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, data.num_classes={num_classes})")
    return label


def check_sample(sample: dict, shard: str, num_classes: int, report: bool = True) -> RawSample:
    """Validate one tar sample without decoding pixels; ValueError if bad."""
    label = parse_label(sample, num_classes)
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"no image field (expected one of {IMAGE_FIELDS})")
    image = sample[field]
    try:
        check_image_header(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"undecodable {field}: {type(exc).__name__}: {exc}") from None
    return RawSample(str(sample.get("__key__")), shard, image, label, report)


def read_shard(path: str, counter: BadSampleCounter, report: bool = True) -> Iterator[dict]:
    """Yield the raw webdataset samples of one tar file (dicts of bytes).

    Members are read by data.tars and grouped into samples by webdataset's
    own group_by_keys (key = the name up to the first dot of its basename;
    webdataset's `__*__` metadata members are skipped). A file that cannot be
    opened, or is no tar archive from its first block, raises naming it: every
    sample of it would be lost every epoch. An archive damaged further in (a
    truncated shard, a bad header) keeps what came before, and the rest is
    counted as bad: as many samples as the manifest records for the shard
    minus those read (one where the manifest records no count, with a warning
    that says so). A duplicate member is counted as a bad sample.
    """
    errors = 0
    members_read = data_members = 0

    def handler(exc: Exception) -> bool:
        nonlocal errors
        errors += 1
        # Keyed by the error's position in the shard: deterministic, and the
        # same error in the next epoch is not counted again.
        counter.record(path, f"<tar error {errors}>", f"{type(exc).__name__}: {exc}", report=report)
        return True

    def members() -> Iterator[dict]:
        nonlocal members_read, data_members
        try:
            stream = open(path, "rb")
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot open shard {path} ({exc.strerror}): restore the file, or re-run the converter"
            ) from exc
        with stream:
            try:
                for name, data in tar_members(stream, path):
                    members_read += 1
                    if not _META.match(name):
                        data_members += 1
                        yield {"fname": name, "data": data, "__url__": path}
            except (tarfile.TarError, OSError, ValueError) as exc:
                if members_read == 0:
                    raise ValueError(
                        f"shard {path} is not a readable tar archive ({type(exc).__name__}: {exc}): "
                        "restore the file, or re-run the converter"
                    ) from exc
                # group_by_keys still holds the sample whose members came last: it is yielded after this
                # (complete, or counted bad by check_sample), so it is not among the lost
                lost = _lost_after(path, samples_read + (data_members > 0))
                rest = "the rest of the shard is skipped" + (
                    f": {lost} sample(s) of the {recorded_samples(path)} its manifest records"
                    if lost is not None
                    else " (its manifest records no sample count: how many were lost is unknown, 1 is counted)"
                )
                counter.record(
                    path,
                    "<rest after tar error>",
                    f"{type(exc).__name__}: {exc}; {rest}",
                    1 if lost is None else lost,
                    report,
                )
                return
        if members_read == 0:  # e.g. truncated to 0 bytes: every sample its manifest records is lost
            lost = _lost_after(path, 0)
            held = f" (its manifest records {lost} sample(s))" if lost is not None else ""
            lost = 1 if lost is None else lost  # no count recorded: 1, as for a damaged shard's unknown rest
            counter.record(path, "<empty shard>", f"the shard holds no member{held}; rebuild it", lost, report)

    samples_read = 0
    for sample in tariterators.group_by_keys(members(), handler=handler):
        samples_read += 1
        yield sample


def _lost_after(path: str, samples_read: int) -> int | None:
    """Samples of `path` not read (its manifest's count minus `samples_read`); None without a count."""
    recorded = recorded_samples(path)
    return None if recorded is None else max(recorded - samples_read, 0)


def valid_samples(
    shards: Iterable[str], num_classes: int, counter: BadSampleCounter, owned: Container[str] | None = None
) -> Iterator[RawSample]:
    """Yield the good samples of `shards` in file order, recording bad ones. Those of the `owned` shards (all
    when None) count toward the reported total (see BadSampleCounter); the samples carry that for their
    decoding."""
    for shard in shards:
        report = owned is None or shard in owned
        for sample in read_shard(shard, counter, report):
            try:
                yield check_sample(sample, shard, num_classes, report)
            except ValueError as exc:
                counter.record(shard, str(sample.get("__key__")), str(exc), report=report)


def shuffle_buffer(samples: Iterable[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Shuffle a stream with a buffer of `size` samples, then drain it.

    Draining at the end means the output is an exact permutation of the
    input: called once per epoch, every sample appears once per epoch.
    """
    buf: list[RawSample] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf
