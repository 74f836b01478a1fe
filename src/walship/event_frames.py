"""Subscription frames built a slab at a time: the SSE bytes of many events in one pass.

A subscription sends each event as ``id: <lsn>:<term>`` + ``data: <the event's JSON>`` (see
``sse.py``), the JSON being what ``to_out`` gives. Built one event at a time, that is a
``StoredEvent`` decoded from the Parquet row, an ``EventOut``, a timestamp formatted and a
msgspec encode: ~10-17 µs of Python per event, which held catch-up near 25,000 events/s.
Parquet already holds payload and metadata as JSON text, so ``frames_of_table`` joins the
pieces of every row's frame with Arrow kernels instead (strings that need JSON quoting are
encoded once per distinct value), and a page of frames is then a slice of one buffer.

The bytes are the per-event path's exactly (``frame_of`` is that path; a test compares the
two over a mix of events): anything this module cannot vouch for (an id not in canonical
form, a time before 1970 or past 9999) makes it answer None and the caller encodes per event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walship.events import StoredEvent, _second_text, base64_json, to_out
from walship.sse import encode_event

_encoder = msgspec.json.Encoder()
_UUID_TEXT = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# format_timestamp uses time.strftime's %Y, which pads differently past four digits
_TS_MIN_US = 0  # 1970: the split into seconds and microseconds here truncates toward zero
_TS_MAX_US = 253_402_300_800 * 1_000_000  # 10000-01-01T00:00:00Z
_TEXT = pa.large_string()


def frame_of(ev: StoredEvent) -> bytes:
    """One event's frame, the per-event way (the live tail and memtables use it)."""
    return encode_event(ev.lsn, ev.term, _encoder.encode(to_out(ev)))


@dataclasses.dataclass(frozen=True, slots=True)
class FrameSpan:
    """Consecutive frames, joined: ``count`` events, the last at ``last_lsn``."""

    data: memoryview
    count: int
    last_lsn: int
    ends: np.ndarray  # where each frame ends in ``data`` (int64, ascending)

    def copy(self) -> FrameSpan:
        """The same frames in bytes of their own (not a view of a bigger buffer)."""
        return FrameSpan(memoryview(bytes(self.data)), self.count, self.last_lsn, self.ends.copy())

    def pieces(self, size: int) -> Iterator[bytes]:
        """``data`` in pieces of about ``size`` bytes, each cut where a frame ends (so a
        chunk of the HTTP body holds whole frames, as when frames were sent one by one)."""
        start, total = 0, len(self.data)
        while start < total:
            i = int(np.searchsorted(self.ends, start + size))
            stop = total if i >= len(self.ends) else int(self.ends[i])
            yield bytes(self.data[start:stop])
            start = stop


@dataclasses.dataclass(frozen=True, slots=True)
class EventFrames:
    """The frames of events in lsn order: frame ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    lsns: np.ndarray  # int64, ascending
    offsets: np.ndarray  # int64, len(lsns) + 1
    data: memoryview

    def __len__(self) -> int:
        return len(self.lsns)

    def span(self, start: int, stop: int) -> FrameSpan:
        """The joined frames of events ``start`` up to ``stop`` (no copy)."""
        base = int(self.offsets[start])
        return FrameSpan(
            self.data[base : int(self.offsets[stop])],
            stop - start,
            int(self.lsns[stop - 1]),
            self.offsets[start + 1 : stop + 1] - base,
        )

    @classmethod
    def of_events(cls, events: list[StoredEvent]) -> EventFrames:
        """Frames of already decoded events (memtables), one encode each."""
        frames = [frame_of(ev) for ev in events]
        offsets = np.zeros(len(frames) + 1, np.int64)
        np.cumsum([len(f) for f in frames], out=offsets[1:])
        lsns = np.fromiter((ev.lsn for ev in events), np.int64, len(events))
        return cls(lsns, offsets, memoryview(b"".join(frames)))


def _json_strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each string as msgspec writes it in JSON (quoted, escaped), encoded once per value."""
    encoded = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = encoded.dictionary_encode()
    values = [_encoder.encode(s) for s in encoded.dictionary.to_pylist()]
    return pa.array(values, pa.large_binary()).cast(_TEXT).take(encoded.indices)


def _timestamps(ts_us: pa.ChunkedArray) -> pa.Array:
    """``format_timestamp`` of each time (without its ``Z``); times are >= 0. The text of each
    second is made once (events come in runs of one second): Arrow's ``strftime`` took
    1.2 µs a row, half of building a frame."""
    ts = ts_us.combine_chunks() if isinstance(ts_us, pa.ChunkedArray) else ts_us
    secs = pc.divide(ts, 1_000_000)
    micros = pc.subtract(ts, pc.multiply(secs, 1_000_000))
    seconds = secs.dictionary_encode()
    texts = [_second_text(s) + "." for s in seconds.dictionary.to_pylist()]
    return pc.binary_join_element_wise(
        pa.array(texts, _TEXT).take(seconds.indices),
        pc.utf8_lpad(pc.cast(micros, _TEXT), width=6, padding="0"),
        pa.scalar("", _TEXT),
    )


def _one_line(text: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """JSON text with each CR and LF made a space, as ``sse.one_line`` does per event (a
    stored payload or metadata is the client's text, which may spread over lines)."""
    if _has_line_break(text):
        for brk in ("\n", "\r"):
            text = pc.replace_substring(text, brk, " ")
    return text


def _has_line_break(text: pa.ChunkedArray | pa.Array) -> bool:
    """Whether some string of ``text`` (large_string) holds a CR or LF, by a byte search of
    its data (Arrow's ``match_substring`` took ~5 µs a ~1 KB payload, most of a frame)."""
    chunks = text.chunks if isinstance(text, pa.ChunkedArray) else [text]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        if data_buf is None:
            continue
        offsets = np.frombuffer(offsets_buf, np.int64, len(chunk) + 1, chunk.offset * 8)
        data = data_buf[int(offsets[0]) : int(offsets[-1])].to_pybytes()
        if b"\n" in data or b"\r" in data:
            return True
    return False


def _decimal(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(column, _TEXT)


def frames_of_table(table: pa.Table) -> EventFrames | None:
    """The frames of every row of ``table`` (part schema, in lsn order, ``conform``ed);
    None when some row is not in the form this builder vouches for."""
    n = table.num_rows
    col = table.column
    ids = col("id")
    if n and not pc.all(pc.match_substring_regex(ids, _UUID_TEXT)).as_py():
        return None
    ts_us = pc.cast(col("timestamp"), pa.int64())
    if n:
        bounds = pc.min_max(ts_us).as_py()
        if bounds["min"] < _TS_MIN_US or bounds["max"] >= _TS_MAX_US:
            return None
    stamps = _timestamps(ts_us)
    binary = col("payload_binary")
    payload = _one_line(pc.cast(col("payload"), _TEXT))
    has_binary = n and pc.any(binary).as_py()
    if has_binary:
        blobs = col("payload_bytes").to_pylist()
        flags = binary.to_pylist()
        b64 = [
            base64_json(b) if f and b is not None else None
            for f, b in zip(flags, blobs, strict=True)
        ]
        payload = pc.coalesce(payload, pa.array(b64, pa.large_binary()).cast(_TEXT))
        end = pc.if_else(binary, ',"payload_encoding":"base64"}\n\n', "}\n\n").cast(_TEXT)
    else:
        end = pa.scalar("}\n\n", _TEXT)
    lsn = _decimal(col("lsn"))
    term = _decimal(col("term"))
    pieces = [
        "id: ",
        lsn,
        ":",
        term,
        '\ndata: {"id":"',
        pc.cast(ids, _TEXT),
        '","tenant_id":',
        _json_strings(col("tenant_id")),
        ',"entity_id":',
        _json_strings(col("entity_id")),
        ',"event_type":',
        _json_strings(col("event_type")),
        ',"payload":',
        payload,
        ',"metadata":',
        pc.fill_null(_one_line(pc.cast(col("metadata"), _TEXT)), "null"),
        ',"timestamp":"',
        stamps,
        'Z","version":',
        _decimal(col("version")),
        ',"lsn":',
        lsn,
        ',"term":',
        term,
        ',"position":',
        _decimal(col("tenant_position")),
        end,
    ]
    args = [pa.scalar(p, _TEXT) if isinstance(p, str) else p for p in pieces]
    joined = pc.binary_join_element_wise(*args, pa.scalar("", _TEXT))
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    if n == 0:
        return EventFrames(np.empty(0, np.int64), np.zeros(1, np.int64), memoryview(b""))
    if joined.null_count:
        return None  # a null where the schema has none: let the per-event path say why
    _, offsets_buf, data_buf = joined.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, joined.offset * 8)
    base = int(offsets[0])
    data = memoryview(data_buf)[base : int(offsets[-1])]
    lsns = col("lsn").to_numpy()
    return EventFrames(np.asarray(lsns, np.int64), offsets - base, data)
