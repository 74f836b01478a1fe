"""Lost-and-found: the records divergence repair cut from this node's log, kept for the operator.

One file per repair under ``DATA_DIR/lost-found/``, named
``{UTC time}-{term of the first cut record}-{its lsn}.jsonl`` (fixed-width hex, so names sort
in time order), with one JSON object per cut record::

    {"lsn": 101, "term": 1, "acknowledged": "local_or_unanswered", "source": "wal",
     "event": {"id": ..., "tenant_id": ..., "entity_id": ..., "event_type": ...,
               "timestamp": ..., "version": ..., "payload": ..., "metadata": ...}}

``acknowledged`` is what this node told the client who wrote it (``AckHistory.level``):
``replicated``, ``degraded``, ``local_or_unanswered`` or ``not_led_here``. ``source`` is
``wal`` or ``checkpoint`` (a record read back from a Parquet part). A file is written whole
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


class LostRecord(msgspec.Struct):
    """One record cut from the log."""

    lsn: int
    term: int
    acknowledged: str
    source: str
    event: msgspec.Raw


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LostRecord)


def lost_record(ev: StoredEvent, acknowledged: str, source: str) -> LostRecord:
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
    return LostRecord(ev.lsn, ev.term, acknowledged, source, msgspec.Raw(_encoder.encode(fields)))


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
    if file is not None:
        out["file"] = file.name
    return out
