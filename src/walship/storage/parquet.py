"""Immutable Parquet parts: the checkpointed history, readable by DuckDB, Polars and Spark.

A part holds the events of one lsn range, named ``{first:016x}-{last:016x}.parquet``. Rows are
sorted by (tenant_id, entity_id, lsn) in row groups of ``parquet_row_group_rows``, and the
manifest keeps each row group's first and last entity key, so a query by entity reads one or
two row groups per part without trusting writer statistics.

Payloads: a JSON payload is text in ``payload`` (so ``payload::JSON`` and ``json_extract`` work
in DuckDB, ``str.json_decode`` in Polars); a binary one is null there, its bytes are in
``payload_bytes`` (BINARY: DuckDB's BLOB, Polars' Binary) and ``payload_binary`` is true.
Parts written before these columns existed lack them; ``conform`` gives their tables the
current schema (no binary payloads), and DuckDB reads a mix with ``union_by_name``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from walship.errors import CorruptionError
from walship.event_frames import EventFrames, FrameSpan, frames_of_table
from walship.events import StoredEvent
from walship.fsutil import fsync_dir
from walship.storage.lsn_spill import SPILLS_KEPT, LsnSpill, Recent
from walship.storage.query import QueryFilter, entity_key

if TYPE_CHECKING:
    from walship.storage.id_index import IdIndexFiles

log = logging.getLogger(__name__)

if pa.default_memory_pool().backend_name == "jemalloc":
    # pyarrow was imported before walship chose the system allocator (see walship/__init__):
    # at least make jemalloc hand freed memory back at once
    pa.jemalloc_set_decay_ms(0)

SCHEMA = pa.schema(
    [
        pa.field("lsn", pa.int64(), nullable=False),
        pa.field("term", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("entity_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        # null when the payload is binary: a JSON column keeps only JSON, not base64 guesswork
        pa.field("payload", pa.string(), nullable=True),
        pa.field("metadata", pa.string(), nullable=True),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("tenant_position", pa.int64(), nullable=False),
        pa.field("payload_binary", pa.bool_(), nullable=False),
        pa.field("payload_bytes", pa.binary(), nullable=True),  # only for binary payloads
    ]
)
"""The documented schema: standard types only; payload and metadata are JSON text."""

POSITION_COLUMN = "tenant_position"
_BINARY_COLUMNS = {"payload_binary", "payload_bytes"}


def _missing_column(name: str, rows: int) -> pa.Array:
    """A column a part written before it existed reads as: no position, no binary payload."""
    if name == POSITION_COLUMN:
        return pa.array(np.zeros(rows, np.int64), pa.int64())
    if name == "payload_binary":
        return pa.array(np.zeros(rows, np.bool_), pa.bool_())
    return pa.nulls(rows, pa.binary())


def conform(table: pa.Table) -> pa.Table:
    """``table`` (all or some columns of a part's rows) with the columns added to ``SCHEMA``
    since its part was written: ``tenant_position`` 0 (no position), ``payload_binary``
    false, ``payload_bytes`` null; a table of every column gets ``SCHEMA`` exactly (order,
    ``payload`` nullable), as a merge writes it."""
    if "lsn" not in table.column_names:
        return table
    for name in (POSITION_COLUMN, *sorted(_BINARY_COLUMNS)):
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), _missing_column(name, table.num_rows))
    if table.num_columns == len(SCHEMA) and not table.schema.equals(SCHEMA):
        table = table.select(SCHEMA.names).cast(SCHEMA)
    return table


def _conform_all(table: pa.Table) -> pa.Table:
    """Every column of a part's rows in exactly ``SCHEMA`` (a spill's batches share one)."""
    table = conform(table)
    return table if table.schema.equals(SCHEMA) else table.select(SCHEMA.names).cast(SCHEMA)


def part_name(first_lsn: int, last_lsn: int) -> str:
    return f"{first_lsn:016x}-{last_lsn:016x}.parquet"


class PartInfo(msgspec.Struct, frozen=True):
    """One part as the manifest records it."""

    file: str
    first_lsn: int
    last_lsn: int
    events: int
    bytes: int
    sha256: str
    min_ts_us: int
    max_ts_us: int
    row_groups: list[tuple[str, str]]  # (first entity key, last entity key) per row group


_ID_HASH_MASK = 0x7FFF_FFFF_FFFF_FFFF


def id_hash(event_id: bytes) -> int:
    """The 64-bit key of an event id in the dedupe index (low half of the UUID)."""
    return int.from_bytes(event_id[8:], "little") & _ID_HASH_MASK


def id_hashes(ids: list[bytes]) -> np.ndarray:
    """``id_hash`` of each 16-byte id, as int64 (vectorized)."""
    raw = np.frombuffer(b"".join(ids), np.uint8).reshape(len(ids), 16)
    return _low_halves(raw[:, 8:])


def id_hashes_of_bytes(ids: bytes) -> np.ndarray:
    """``id_hashes`` of 16-byte ids joined into one buffer."""
    return _low_halves(np.frombuffer(ids, np.uint8).reshape(len(ids) // 16, 16)[:, 8:])


def _low_halves(tails: np.ndarray) -> np.ndarray:
    """``(n, 8)`` uint8 UUID tails -> their id hashes."""
    low = np.ascontiguousarray(tails).view("<u8").ravel()
    return (low & np.uint64(_ID_HASH_MASK)).astype(np.int64)


_HEX_VALUE = np.full(256, 0xFF, np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_TAIL_DIGIT_AT = np.array([19, 20, 21, 22, *range(24, 36)])  # UUID bytes 8..15 in its text


def id_hashes_of_text(ids: pa.Array) -> np.ndarray | None:
    """``id_hash`` of each canonical UUID text (``uuid_strings``' column), vectorized; None
    when some id is not 36 characters of hex and dashes (the caller parses those itself)."""
    n = len(ids)
    if n == 0:
        return np.empty(0, np.int64)
    if ids.type != pa.string() or ids.null_count:
        return None
    offsets = np.frombuffer(ids.buffers()[1], np.int32, n + 1, ids.offset * 4)
    if int(offsets[-1]) - int(offsets[0]) != 36 * n or not (np.diff(offsets) == 36).all():
        return None
    data = np.frombuffer(ids.buffers()[2], np.uint8, 36 * n, int(offsets[0]))
    digits = _HEX_VALUE[data.reshape(n, 36)[:, _TAIL_DIGIT_AT]]
    if (digits == 0xFF).any():
        return None
    return _low_halves((digits[:, 0::2] << 4) | digits[:, 1::2])


DICTIONARY_COLUMNS = ["tenant_id", "entity_id", "event_type"]

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_UUID_DIGIT_AT = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])  # the rest are "-"


def uuid_strings(ids: list[bytes]) -> pa.StringArray:
    """The canonical texts of 16-byte UUIDs as one Arrow column (vectorized ``format_uuid``)."""
    return uuid_strings_of(np.frombuffer(b"".join(ids), np.uint8).reshape(len(ids), 16))


def uuid_strings_of(raw: np.ndarray) -> pa.StringArray:
    """``uuid_strings`` of ``(n, 16)`` uint8 UUID bytes."""
    n = len(raw)
    digits = np.empty((n, 32), np.uint8)
    digits[:, 0::2] = _HEX_DIGITS[raw >> 4]
    digits[:, 1::2] = _HEX_DIGITS[raw & 0x0F]
    text = np.full((n, 36), ord("-"), np.uint8)
    text[:, _UUID_DIGIT_AT] = digits
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


# A part's rows are sorted by entity, so any run of consecutive lsns is spread over every
# row group: a subscription catching up in lsn order read the whole part for each page of
# 500 (measured: ~13,000 events/s over 100,000 events). An lsn scan serves pages from slabs
# of this many rows in lsn order: a part of at most SCAN_SPILL_SLABS_MIN - 1 slabs is read
# for each slab (decoded that many times), a bigger one is decoded once into an lsn-ordered
# spill (``lsn_spill``: decoded 30 times, a merged part of 500,000 events had cost ~73 µs of
# CPU an event; spilled, ~3 µs to build and ~0.7 to read a slab back).
SCAN_SLAB_ROWS = 16_384
SCAN_SPILL_SLABS_MIN = 3
# a query of some tenants (a tenant-scoped subscription) reads a big part by slabs when they
# fill this share of its row groups; rarer tenants are picked from their row groups
SCAN_DENSE_GROUPS_MIN = 0.125
# slabs kept per process, the least recently used dropped first: two consumers a slab apart,
# or one at the edge of two parts, both hit. A slab holds its events or frames (~21 MB for
# 16,384 ~1 KB events); a slab dropped here lives on only while a read still builds or
# slices it (pages are copied out of it), and SCAN_SLAB_BUILDS bound how many those are.
SCAN_SLABS_KEPT = 4
SCAN_SLAB_BUILDS = threading.BoundedSemaphore(2)
_KEPT_SLABS: Recent[_Slab] = Recent(SCAN_SLABS_KEPT)
_SPILLS: Recent[LsnSpill] = Recent(SPILLS_KEPT)
_EVERYTHING = QueryFilter()


def part_table(rows: pa.Table) -> pa.Table:
    """A memtable's rows (``memtable.MEM_SCHEMA``, lsn order) as a part's table: ``SCHEMA``,
    sorted by (tenant_id, entity_id, lsn), every column made with Arrow kernels."""
    # cluster by entity so a query by entity touches one or two row groups per part
    order = pc.sort_indices(
        rows.select(["tenant_id", "entity_id", "lsn"]),
        sort_keys=[("tenant_id", "ascending"), ("entity_id", "ascending"), ("lsn", "ascending")],
    )
    return part_columns(rows.take(order))


def part_columns(rows: pa.Table) -> pa.Table:
    """Memtable rows (``memtable.MEM_SCHEMA``) as rows of ``SCHEMA``, in the same order."""
    rows = rows.combine_chunks()
    n = rows.num_rows
    binary = rows.column("payload_binary")
    payload = rows.column("payload")
    no_bytes = pa.nulls(n, pa.binary())
    any_binary = n > 0 and pc.any(binary).as_py()  # copy the payloads only when some are
    ids = rows.column("id").combine_chunks() if n else pa.array([], pa.binary(16))
    return pa.table(
        {
            "lsn": rows.column("lsn"),
            "term": rows.column("term"),
            "id": uuid_text(ids),
            "tenant_id": rows.column("tenant_id"),
            "entity_id": rows.column("entity_id"),
            "event_type": rows.column("event_type"),
            "timestamp": rows.column("timestamp_us").cast(pa.timestamp("us", tz="UTC")),
            # null when binary: a JSON column keeps only JSON (cast checks it is UTF-8)
            "payload": (pc.if_else(binary, no_bytes, payload) if any_binary else payload).cast(
                pa.string()
            ),
            "metadata": rows.column("metadata").cast(pa.string()),
            "version": rows.column("version"),
            "tenant_position": rows.column("tenant_position"),
            "payload_binary": binary,
            "payload_bytes": pc.if_else(binary, payload, no_bytes) if any_binary else no_bytes,
        },
        schema=SCHEMA,
    )


def uuid_text(ids: pa.Array) -> pa.StringArray:
    """``uuid_strings`` of a ``binary(16)`` column, read from its buffer."""
    n = len(ids)
    if n == 0:
        return uuid_strings_of(np.empty((0, 16), np.uint8))
    raw = np.frombuffer(ids.buffers()[1], np.uint8, 16 * n, 16 * ids.offset)
    return uuid_strings_of(raw.reshape(n, 16))


def events_table(events: list[StoredEvent]) -> pa.Table:
    """``events`` as rows of ``SCHEMA``, in their order."""
    from walship.storage.memtable import Memtable

    mem = Memtable()
    mem.add_all(events)
    return part_columns(mem.table())


_table = events_table


@contextlib.contextmanager
def removed_on_error(tmp: Path) -> Iterator[Path]:
    """``tmp``, deleted when the block raises: a part half-written on a full disk would hold
    the space the retry needs until the next start removed it."""
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_part(
    directory: Path, events: list[StoredEvent], first: int, last: int, row_group_rows: int
) -> PartInfo:
    """Write ``events`` (lsn order, within ``first..last``) as one part, durably."""
    from walship.storage.memtable import Memtable

    mem = Memtable()
    mem.add_all(events)
    return write_part_rows(directory, mem.table(), first, last, row_group_rows)


def write_part_rows(
    directory: Path, rows: pa.Table, first: int, last: int, row_group_rows: int
) -> PartInfo:
    """Write a memtable's rows (``memtable.MEM_SCHEMA``, lsn order, within ``first..last``)
    as one part, durably."""
    table = part_table(rows)
    del rows
    name = part_name(first, last)
    path = directory / name
    tmp = directory / (name + ".tmp")
    with removed_on_error(tmp):
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_rows,
            compression="zstd",
            # only columns that repeat gain from a dictionary; for ids and payloads it is work
            # thrown away when the dictionary overflows
            use_dictionary=DICTIONARY_COLUMNS,
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    fsync_dir(directory)
    tenants = table.column("tenant_id")
    entities = table.column("entity_id")
    groups = []
    for start in range(0, table.num_rows, row_group_rows):
        end = min(start + row_group_rows, table.num_rows) - 1
        groups.append(
            (
                entity_key(tenants[start].as_py(), entities[start].as_py()),
                entity_key(tenants[end].as_py(), entities[end].as_py()),
            )
        )
    ts = table.column("timestamp").cast(pa.int64())
    return PartInfo(
        file=name,
        first_lsn=first,
        last_lsn=last,
        events=table.num_rows,
        bytes=path.stat().st_size,
        sha256=digest,
        min_ts_us=pc.min(ts).as_py(),
        max_ts_us=pc.max(ts).as_py(),
        row_groups=groups,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Slab:
    """Rows of a part in lsn order, kept as the forms they were asked for: events (a
    query), subscription frames (a stream catching up), the rows (a filtered read)."""

    def __init__(self, load: Callable[[], pa.Table]) -> None:
        self._load = load
        self._table: pa.Table | None = None  # kept only when a filtered read asks for it
        self._events: list[StoredEvent] | None = None
        self._frames: EventFrames | None = None
        self._lock = threading.Lock()

    def events(self) -> list[StoredEvent]:
        with self._lock:
            if self._events is None:
                with SCAN_SLAB_BUILDS:
                    table = self._load()
                    self._events = _to_events(table, table.num_rows)
            return self._events

    def table(self) -> pa.Table:
        """The rows themselves (a filtered read picks its events out of them)."""
        with self._lock:
            if self._table is None:
                with SCAN_SLAB_BUILDS:
                    self._table = self._load()
            return self._table

    def frames(self) -> EventFrames:
        with self._lock:
            if self._frames is None:
                with SCAN_SLAB_BUILDS:
                    self._frames = self._build_frames()
            return self._frames

    def _build_frames(self) -> EventFrames:
        table = self._load()
        built = frames_of_table(table)
        if built is None:  # a row the vectorized builder does not vouch for
            built = EventFrames.of_events(_to_events(table, table.num_rows))
        return built


class PartReader:
    """Reads one part with pruning by lsn range, time range and entity row groups.

    Safe from any number of threads at once. pyarrow's ``ParquetFile`` is not: its reader
    keeps per-read state (the pre-buffer cache), and one reader shared by the HTTP threads
    answered ``ReadRangeCache did not find matching cache entry`` and then crashed the process
    (SIGSEGV) under eight concurrent query clients. So each read opens a ``ParquetFile`` of its
    own over one shared file descriptor, with the footer parsed once here: positional reads
    (``pread``) of one ``OSFile`` are thread-safe, and the descriptor keeps a part that a merge
    replaced readable for the queries that still hold it.
    """

    def __init__(self, path: Path, info: PartInfo, id_index: IdIndexFiles | None = None) -> None:
        self.path = path
        self.info = info
        # where the id hashes live, memory-mapped (storage.id_index); None: in the heap
        self._id_index = id_index
        try:
            self._source = pa.OSFile(str(path))
            self._metadata = pq.ParquetFile(self._source).metadata
        except (OSError, pa.ArrowException) as exc:
            raise CorruptionError(f"cannot open checkpoint part {path}: {exc}") from exc
        self._id_hashes: np.ndarray | None = None
        self._scan_lock = threading.Lock()
        self._lsns: np.ndarray | None = None  # every lsn of the part, sorted (8 bytes a row)
        self._spill_lock = threading.Lock()  # one build of this part's spill at a time

    def _open(self) -> pq.ParquetFile:
        """A reader for one call (it shares the descriptor, which it leaves open)."""
        return pq.ParquetFile(self._source, metadata=self._metadata)

    def could_match(self, flt: QueryFilter, visible_lsn: int) -> bool:
        info = self.info
        return not (
            info.last_lsn < flt.from_lsn
            or info.first_lsn > visible_lsn
            or (flt.to_lsn is not None and info.first_lsn > flt.to_lsn)
            or (flt.since_us is not None and info.max_ts_us < flt.since_us)
            or (flt.until_us is not None and info.min_ts_us >= flt.until_us)
        )

    def select(self, flt: QueryFilter, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` matching events of this part, in lsn order."""
        if dataclasses.replace(flt, from_lsn=1, to_lsn=None) == _EVERYTHING:
            return self._scan(flt.from_lsn, flt.to_lsn, limit)
        if self._dense_tenants(flt):
            return self._select_by_slabs(flt, limit)
        if flt.entity_id is not None:
            key = entity_key(flt.tenant_id or "default", flt.entity_id)
            groups = [i for i, (lo, hi) in enumerate(self.info.row_groups) if lo <= key <= hi]
            if not groups:
                return []
            with self._open() as file:
                table = conform(file.read_row_groups(groups, use_threads=False))
            return _to_events(_filter(table, flt), limit)
        columns = ["lsn", "tenant_id", "event_type", "timestamp"]
        if flt.by_position and self.has_positions:
            columns.append(POSITION_COLUMN)
        with self._open() as file:
            keys = conform(file.read(columns=columns))
        mask = _mask(keys, flt)
        if mask is not None:
            keys = keys.filter(mask)
        if keys.num_rows == 0:
            return []
        wanted = np.sort(keys.column("lsn").to_numpy())[:limit]
        table = self._rows_by_lsn(wanted)
        return _to_events(table, limit)

    def _dense_tenants(self, flt: QueryFilter) -> bool:
        """Whether ``flt`` picks tenants (no entity) that fill at least
        ``SCAN_DENSE_GROUPS_MIN`` of this part's row groups, in a part big enough to spill.
        Picking a page of such a tenant's rows out of the row groups that hold them decodes
        nearly all of the part for each page (a tenant-scoped catch-up over a merged part of
        115,000 events: ~100 µs an event); read in lsn order from slabs, it is decoded once."""
        tenants = {flt.tenant_id} if flt.tenant_id is not None else flt.tenant_ids
        groups = self.info.row_groups
        if flt.entity_id is not None or not tenants or not groups:
            return False
        if self.info.events <= (SCAN_SPILL_SLABS_MIN - 1) * SCAN_SLAB_ROWS:
            return False
        # a tenant's keys all lie in [tenant + NUL, tenant + \x01)
        spans = [(entity_key(t, ""), f"{t}\x01") for t in tenants]
        hit = sum(1 for lo, hi in groups if any(a <= hi and lo < b for a, b in spans))
        return hit >= SCAN_DENSE_GROUPS_MIN * len(groups)

    def _select_by_slabs(self, flt: QueryFilter, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events matching ``flt``, read slab by slab in lsn order."""
        lsns = self._sorted_lsns()
        i = int(np.searchsorted(lsns, flt.from_lsn))
        end = len(lsns)
        if flt.to_lsn is not None:
            end = int(np.searchsorted(lsns, flt.to_lsn, side="right"))
        out: list[StoredEvent] = []
        while i < end and len(out) < limit:
            slab = i // SCAN_SLAB_ROWS
            table = _filter(self._slab(slab, lsns).table(), flt)
            out.extend(_to_events(table, limit - len(out)))
            i = (slab + 1) * SCAN_SLAB_ROWS
        return out

    def _scan(self, from_lsn: int, to_lsn: int | None, limit: int) -> list[StoredEvent]:
        """Every event from ``from_lsn`` through ``to_lsn`` (at most ``limit``), by slabs."""
        out: list[StoredEvent] = []
        for slab, start, stop in self._slab_runs(from_lsn, to_lsn, limit):
            out.extend(slab.events()[start:stop])
        return out

    def scan_frames(self, from_lsn: int, to_lsn: int | None, limit: int) -> list[FrameSpan]:
        """The subscription frames of every event from ``from_lsn`` through ``to_lsn`` (at
        most ``limit``), as spans of each slab's frames (built once per slab, vectorized).
        The spans are copies: a page held by a slow consumer holds its own bytes, not a slab."""
        return [
            slab.frames().span(start, stop).copy()
            for slab, start, stop in self._slab_runs(from_lsn, to_lsn, limit)
        ]

    def _slab_runs(
        self, from_lsn: int, to_lsn: int | None, limit: int
    ) -> list[tuple[_Slab, int, int]]:
        """``(slab, first row, end row)`` runs, within each slab, of the lsns asked for."""
        lsns = self._sorted_lsns()
        i = int(np.searchsorted(lsns, from_lsn))
        end = len(lsns) if to_lsn is None else int(np.searchsorted(lsns, to_lsn, side="right"))
        end = min(end, i + limit)
        runs = []
        while i < end:
            slab = i // SCAN_SLAB_ROWS
            first = slab * SCAN_SLAB_ROWS
            runs.append(
                (self._slab(slab, lsns), i - first, min(end, first + SCAN_SLAB_ROWS) - first)
            )
            i = first + SCAN_SLAB_ROWS
        return runs

    def _sorted_lsns(self) -> np.ndarray:
        with self._scan_lock:
            if self._lsns is None:
                with self._open() as file:
                    column = file.read(columns=["lsn"], use_threads=False).column("lsn")
                self._lsns = np.sort(column.to_numpy())
            return self._lsns

    def _slab(self, slab: int, lsns: np.ndarray) -> _Slab:
        """The rows ``slab * SCAN_SLAB_ROWS`` on in lsn order (kept a while for the next
        pages), decoded when first asked for."""
        return _KEPT_SLABS.get_or_make(
            (self, slab), lambda: _Slab(functools.partial(self._read_slab, slab, lsns))
        )

    def _read_slab(self, slab: int, lsns: np.ndarray) -> pa.Table:
        if len(lsns) > (SCAN_SPILL_SLABS_MIN - 1) * SCAN_SLAB_ROWS:
            try:
                return self._spill(lsns).slab(slab)
            except OSError as exc:
                # a spill is a cache: without room for it, read the slab the slow way
                log.warning("cannot spill %s for an lsn-ordered read: %s", self.path.name, exc)
        lo = int(lsns[slab * SCAN_SLAB_ROWS])
        hi = int(lsns[min((slab + 1) * SCAN_SLAB_ROWS, len(lsns)) - 1])
        return self._read_lsns(lo, hi)

    def _spill(self, lsns: np.ndarray) -> LsnSpill:
        """This part's lsn-ordered spill, built by the first read that needs it."""
        key = (self, SCAN_SLAB_ROWS)  # a test may change the slab size: not the same spill
        with self._spill_lock:
            found = _SPILLS.get(key)
            if found is None:
                with self._open() as file:
                    found = LsnSpill.build(
                        self.path.parent,
                        SCHEMA,
                        file.metadata.num_row_groups,
                        lambda g: _conform_all(file.read_row_group(g, use_threads=False)),
                        lsns[::SCAN_SLAB_ROWS],
                    )
                _SPILLS.put(key, found)
            return found

    def _read_lsns(self, lo: int, hi: int) -> pa.Table:
        """Every row with an lsn in ``lo..hi``, in lsn order, one row group at a time."""
        kept = []
        with self._open() as file:
            for group in range(file.metadata.num_row_groups):
                table = file.read_row_group(group, use_threads=False)
                col = table.column("lsn")
                kept.append(
                    table.filter(pc.and_(pc.greater_equal(col, lo), pc.less_equal(col, hi)))
                )
        return conform(pa.concat_tables(kept)).sort_by("lsn")

    def _rows_by_lsn(self, lsns: np.ndarray) -> pa.Table:
        """Read only the row groups that hold ``lsns`` and keep those rows."""
        meta = self._metadata
        group_rows = meta.row_group(0).num_rows if meta.num_row_groups else 1
        with self._open() as file:
            lsn_col = file.read(columns=["lsn"]).column("lsn").to_numpy()
            rows = np.nonzero(np.isin(lsn_col, lsns))[0]
            groups = sorted({int(r) // group_rows for r in rows})
            table = conform(file.read_row_groups(groups))
        return table.filter(pc.is_in(table.column("lsn"), pa.array(lsns)))

    def read_columns(self, columns: list[str]) -> pa.Table:
        """These columns of every row, in file order."""
        with self._open() as file:
            return file.read(columns=columns, use_threads=False)

    @property
    def has_positions(self) -> bool:
        """Whether the part has a ``tenant_position`` column (written since they exist)."""
        return POSITION_COLUMN in self._metadata.schema.names

    def tenant_positions(self) -> pa.Table | None:
        """``tenant_id``, ``tenant_position`` and ``lsn`` of every row with a position;
        None for a part written before positions existed."""
        if not self.has_positions:
            return None
        t = self.read_columns(["tenant_id", POSITION_COLUMN, "lsn"])
        return t.filter(pc.greater(t.column(POSITION_COLUMN), 0))

    def read_row_groups(self, groups: list[int]) -> pa.Table:
        """Every column of these row groups, in file order."""
        with self._open() as file:
            return conform(file.read_row_groups(groups, use_threads=False))

    def row_group_starts(self) -> np.ndarray:
        """The first row of each row group (file order), then the row count."""
        meta = self._metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)

    def entity_versions(self) -> pa.Table:
        """(tenant_id, entity_id, version max) per entity in this part."""
        with self._open() as file:
            t = file.read(columns=["tenant_id", "entity_id", "version"])
        return t.group_by(["tenant_id", "entity_id"]).aggregate([("version", "max")])

    def id_hashes(self) -> np.ndarray:
        """Sorted 64-bit id keys of this part (loaded once, 8 bytes per event)."""
        if self._id_hashes is None and self._id_index is not None:
            self._id_hashes = self._id_index.load(self.info)
        if self._id_hashes is None:
            with self._open() as file:
                column = file.read(columns=["id"]).column("id").combine_chunks()
            arr = id_hashes_of_text(column)
            if arr is None:  # not as walship writes ids: parse each one
                ids = column.to_pylist()
                arr = np.fromiter((id_hash(uuid.UUID(s).bytes) for s in ids), np.int64, len(ids))
            arr.sort()
            self.set_id_hashes(arr)
            assert self._id_hashes is not None
        return self._id_hashes

    def set_id_hashes(self, arr: np.ndarray) -> None:
        """The part's sorted id hashes, known already (its writer had the ids): kept mapped from
        the id index file when the reader has one, else in memory."""
        self._id_hashes = arr if self._id_index is None else self._id_index.write(self.info, arr)

    def find_id(self, event_id: bytes) -> StoredEvent | None:
        """The stored event with this id, or None; the hash index avoids most reads."""
        hashes = self.id_hashes()
        h = id_hash(event_id)
        i = int(np.searchsorted(hashes, h))
        if i >= len(hashes) or hashes[i] != h:
            return None
        text = str(uuid.UUID(bytes=event_id))
        with self._open() as file:
            # the id column, then the one row group holding the row: not every payload
            ids = file.read(columns=["id"], use_threads=False).column("id")
            row = pc.index(ids, text).as_py()
            if row < 0:
                return None
            group = int(np.searchsorted(self.row_group_starts(), row, side="right")) - 1
            table = conform(file.read_row_group(group, use_threads=False))
        hit = table.filter(pc.equal(table.column("id"), text))
        found = _to_events(hit, 1)
        return found[0] if found else None


def _mask(table: pa.Table, flt: QueryFilter) -> pa.ChunkedArray | None:
    conds = []
    col = table.column
    if flt.from_lsn > 1:
        conds.append(pc.greater_equal(col("lsn"), flt.from_lsn))
    if flt.to_lsn is not None:
        conds.append(pc.less_equal(col("lsn"), flt.to_lsn))
    if flt.tenant_id is not None:
        conds.append(pc.equal(col("tenant_id"), flt.tenant_id))
    if flt.tenant_ids is not None:
        wanted = pa.array(sorted(flt.tenant_ids), pa.string())
        conds.append(pc.is_in(col("tenant_id"), value_set=wanted))
    if flt.entity_id is not None and "entity_id" in table.column_names:
        conds.append(pc.equal(col("entity_id"), flt.entity_id))
    if flt.event_type is not None:
        conds.append(pc.equal(col("event_type"), flt.event_type))
    if flt.event_type_prefix is not None:
        conds.append(pc.starts_with(col("event_type"), flt.event_type_prefix))
    if flt.since_us is not None:
        conds.append(pc.greater_equal(col("timestamp").cast(pa.int64()), flt.since_us))
    if flt.until_us is not None:
        conds.append(pc.less(col("timestamp").cast(pa.int64()), flt.until_us))
    if flt.from_position is not None:
        conds.append(pc.greater_equal(col(POSITION_COLUMN), flt.from_position))
    if flt.to_position is not None:
        conds.append(pc.less_equal(col(POSITION_COLUMN), flt.to_position))
    if not conds:
        return None
    mask = conds[0]
    for c in conds[1:]:
        mask = pc.and_(mask, c)
    return mask


def _filter(table: pa.Table, flt: QueryFilter) -> pa.Table:
    if flt.entity_id is not None and flt.tenant_id is None:
        flt = dataclasses.replace(flt, tenant_id="default")
    mask = _mask(table, flt)
    return table if mask is None else table.filter(mask)


def _to_events(table: pa.Table, limit: int) -> list[StoredEvent]:
    """Rows to StoredEvents in lsn order (at most ``limit``)."""
    import uuid

    if table.num_rows == 0:
        return []
    table = conform(table).sort_by("lsn").slice(0, limit)
    names = [n for n in SCHEMA.names if n != "timestamp" and n not in _BINARY_COLUMNS]
    cols = {name: table.column(name).to_pylist() for name in names}
    ts = table.column("timestamp").cast(pa.int64()).to_pylist()
    binary = table.column("payload_binary").to_pylist()  # conform: false in older parts
    blobs = table.column("payload_bytes").to_pylist()
    out = []
    for i in range(table.num_rows):
        meta = cols["metadata"][i]
        blob = blobs[i]
        payload = blob if binary[i] and blob is not None else cols["payload"][i].encode()
        out.append(
            StoredEvent(
                cols["lsn"][i],
                cols["term"][i],
                uuid.UUID(cols["id"][i]).bytes,
                cols["tenant_id"][i],
                cols["entity_id"][i],
                cols["event_type"][i],
                ts[i],
                cols["version"][i],
                payload,
                None if meta is None else meta.encode(),
                cols[POSITION_COLUMN][i],
                payload_binary=bool(binary[i]),
            )
        )
    return out


to_events = _to_events
"""Rows of the part schema to StoredEvents in lsn order (public name for other readers)."""
