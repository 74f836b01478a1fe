"""Lost-and-found: the records divergence repair cut from this node's log, kept for the operator.

One file per repair under ``DATA_DIR/lost-found/``, named
``{UTC time}-{term of the first cut record}-{its lsn}.jsonl`` (fixed-width hex, so names sort
in time order), with one JSON object per cut record::

    {"lsn": 101, "term": 1, "acknowledged": "local_or_unanswered", "source": "wal",
     "event": {"id": ..., "tenant_id": ..., "entity_id": ..., "event_type": ...,
               "timestamp": ..., "version": ..., "payload": ..., "metadata": ...},
     "batch_left": 0}

``acknowledged`` is what this node told the client who wrote it (``AckHistory.level``):
``replicated``, ``degraded``, ``local_or_unanswered`` or ``not_led_here``. ``source`` is
``wal`` or ``checkpoint`` (a record read back from a Parquet part). ``batch_left`` (``wal``
records; absent in files written before it and for ``checkpoint`` ones) is the WAL header's:
how many records after this one belong to the same atomic append, so that replay can put a
consumer's tracking back with the events of its batch. A file is written whole
(tmp → fsync → rename → fsync dir) before the log is cut, so nothing is dropped untraced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from walship.errors import InvalidInput
from walship.events import StoredEvent, decode_body, stored_from_body, to_out
from walship.fsutil import fsync_dir
from walship.wal.record import Record

DIR_NAME = "lost-found"
SUFFIX = ".jsonl"


class LostRecord(msgspec.Struct, omit_defaults=True):
    """One record cut from the log."""

    lsn: int
    term: int
    acknowledged: str
    source: str
    event: msgspec.Raw
    batch_left: int | None = None  # records after it in its atomic append (None: not known)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LostRecord)


def lost_record(
    ev: StoredEvent, acknowledged: str, source: str, batch_left: int | None = None
) -> LostRecord:
    out = to_out(ev)
    fields = {
        "id": out.id,
        "tenant_id": out.tenant_id,
        "entity_id": out.entity_id,
        "event_type": out.event_type,
        "timestamp": out.timestamp,
        "version": out.version,
        "payload": out.payload,
        "metadata": out.metadata,
    }
    if out.payload_encoding is not None:  # binary: base64 text, said so, as the API answers
        fields["payload_encoding"] = out.payload_encoding
    event = msgspec.Raw(_encoder.encode(fields))
    return LostRecord(ev.lsn, ev.term, acknowledged, source, event, batch_left)


def event_of(rec: Record) -> StoredEvent:
    return stored_from_body(rec.lsn, rec.term, decode_body(rec.body))


def lost_found_dir(data_dir: Path) -> Path:
    return data_dir / DIR_NAME


def write_lost_found(data_dir: Path, records: Iterable[LostRecord]) -> tuple[Path, int] | None:
    """Write ``records`` (in lsn order) to a new lost-and-found file, durably; returns its
    path and how many records it holds, or None when there were none."""
    directory = lost_found_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".writing-{os.getpid()}-{time.monotonic_ns()}{SUFFIX}.tmp"
    first: LostRecord | None = None
    count = 0
    with open(tmp, "wb") as f:
        for rec in records:
            if first is None:
                first = rec
            f.write(_encoder.encode(rec))
            f.write(b"\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    if first is None:
        tmp.unlink()
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{stamp}-{first.term:08x}-{first.lsn:016x}{SUFFIX}"
    n = 1
    while path.exists():  # two repairs within a second
        path = directory / f"{stamp}-{first.term:08x}-{first.lsn:016x}.{n}{SUFFIX}"
        n += 1
    os.replace(tmp, path)
    fsync_dir(directory)
    return path, count


def find_files(where: Path) -> list[Path]:
    """The lost-and-found files under a data dir or a lost-found dir, oldest first."""
    directory = where if where.name == DIR_NAME else lost_found_dir(where)
    if not directory.is_dir():
        if where.is_dir():
            return []
        raise InvalidInput(f"{where} is not a directory")
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def read_file(path: Path) -> Iterator[LostRecord]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield _decoder.decode(line)
                except msgspec.DecodeError as exc:
                    raise InvalidInput(f"{path} line {n}: {exc}") from exc


def to_builtins(rec: LostRecord, file: Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lsn": rec.lsn,
        "term": rec.term,
        "acknowledged": rec.acknowledged,
        "source": rec.source,
        "event": msgspec.json.decode(rec.event),
    }
    if rec.batch_left is not None:
        out["batch_left"] = rec.batch_left
    if file is not None:
        out["file"] = file.name
    return out


class FileSummary(msgspec.Struct, frozen=True):
    """What one lost-and-found file holds, without its records; ``error`` when it could not
    be read (the other fields are then empty)."""

    name: str
    bytes: int
    records: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None
    terms: list[int] = msgspec.field(default_factory=list)
    acknowledged: dict[str, int] = msgspec.field(default_factory=dict)
    error: str | None = None


def summarize(path: Path) -> FileSummary:
    """Count ``path``'s records by term and acknowledgement; a damaged file gives a summary
    with ``error`` set, never an exception (one bad file must not hide the others)."""
    try:
        size = path.stat().st_size
        terms: set[int] = set()
        acknowledged: dict[str, int] = {}
        first = last = None
        count = 0
        for rec in read_file(path):
            first = rec.lsn if first is None else first
            last = rec.lsn
            count += 1
            terms.add(rec.term)
            acknowledged[rec.acknowledged] = acknowledged.get(rec.acknowledged, 0) + 1
    except (InvalidInput, OSError) as exc:
        message = exc.message if isinstance(exc, InvalidInput) else str(exc)
        return FileSummary(path.name, 0, error=message)
    return FileSummary(path.name, size, count, first, last, sorted(terms), acknowledged)


class SummaryCache:
    """Summaries of a data dir's lost-and-found files, each read once: a file is written
    whole and renamed into place, so its name, size and mtime identify its contents."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._known: dict[tuple[str, int, int], FileSummary] = {}

    def newest(self, count_max: int) -> tuple[list[FileSummary], int]:
        """The ``count_max`` newest files' summaries, oldest first, and how many files there
        are in all."""
        files = find_files(self.data_dir)
        kept: dict[tuple[str, int, int], FileSummary] = {}
        out = []
        for path in files[-count_max:]:
            try:
                st = path.stat()
            except OSError:
                continue  # removed by the operator meanwhile
            key = (path.name, st.st_size, st.st_mtime_ns)
            summary = self._known.get(key) or summarize(path)
            kept[key] = summary
            out.append(summary)
        self._known = kept  # forget the files that are gone
        return out, len(files)
