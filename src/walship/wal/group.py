"""What the WAL writer's queue holds, and how a group of it is cut into writes.

The queue holds single encoded records (a leader's appends: ``bytes``) and ``WholeUnits``:
a run of records that ends an atomic append, as one buffer (a follower's verified frame,
``wal/frame.py``, or a leader's append). The writer packs atomic appends into the active
segment and rolls to a new one when the next does not fit, so an append never spans two
segments; a ``WholeUnits`` of several appends is packed whole when it fits and otherwise cut
between two of its appends (``fit_first``), so a follower fills its segments as its leader
does.

These helpers read only the element's own headers or its kept offsets: for a ``WholeUnits``
nothing here walks its records one by one except the sparse index, which looks at one record
per ~256 KiB.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from walship.wal.record import HEADER


class WholeUnits:
    """Records ``first_lsn..`` ending an atomic append, written as one buffer.

    ``parts`` are the records' bytes in order, in one buffer (a follower's frame, a leader's
    append: ``encode_records``) or one per record;
    ``starts[i]`` is where the ``i``-th record begins (the last entry is the byte count);
    ``unit_ends`` counts the records up to the end of each atomic append among them (the last
    is all of them); ``last`` is the last record's ``(lsn, term, chain)``.
    """

    __slots__ = ("first_lsn", "last", "parts", "starts", "unit_ends")

    def __init__(
        self,
        parts: list[bytes],
        starts: list[int],
        unit_ends: list[int],
        first_lsn: int,
        last: tuple[int, int, bytes],
    ) -> None:
        self.parts = parts
        self.starts = starts
        self.unit_ends = unit_ends
        self.first_lsn = first_lsn
        self.last = last

    def __len__(self) -> int:
        return self.starts[-1]

    def __repr__(self) -> str:
        return f"<WholeUnits lsns={self.first_lsn}..{self.last[0]} bytes={len(self)}>"

    def split(self, room: int) -> tuple[WholeUnits, WholeUnits] | None:
        """``(head, rest)``: the most whole appends from the first that fit in ``room`` bytes,
        and the others; None when all of them fit, or not even the first does."""
        starts = self.starts
        k = 0
        for end in self.unit_ends[:-1]:
            if starts[end] > room:
                break
            k = end
        if not k:
            return None
        cut = starts[k]
        if len(self.parts) == 1:
            data = self.parts[0]
            head_parts, rest_parts = [data[:cut]], [data[cut:]]
        else:  # one buffer per record
            head_parts, rest_parts = self.parts[:k], self.parts[k:]
        _, _, lsn, term, _, chain = HEADER.unpack_from(
            head_parts[-1], starts[k - 1] if len(self.parts) == 1 else 0
        )
        head = WholeUnits(
            head_parts,
            starts[: k + 1],
            [e for e in self.unit_ends if e <= k],
            self.first_lsn,
            (lsn, term, chain),
        )
        rest = WholeUnits(
            rest_parts,
            [s - cut for s in starts[k:]],
            [e - k for e in self.unit_ends if e > k],
            self.first_lsn + k,
            self.last,
        )
        return head, rest


def fit_first(batch: list[Pending], k: int, room: int) -> bool:
    """Split ``batch[k]`` in place when it is a ``WholeUnits`` larger than ``room`` of which
    some first appends fit: a segment then takes those and the rest goes to the next one, so a
    follower's segments stay within their limit as its leader's do. True when it split."""
    raw = batch[k]
    if not isinstance(raw, WholeUnits) or len(raw) <= room:
        return False
    halves = raw.split(room)
    if halves is None:
        return False
    batch[k : k + 1] = halves
    return True


Pending = bytes | WholeUnits


def plan_units(batch: Sequence[Pending]) -> list[tuple[int, int, int]]:
    """``(start, end, bytes)`` of each atomic append in ``batch`` (a ``WholeUnits`` is one)."""
    units: list[tuple[int, int, int]] = []
    start = size = 0
    for k, raw in enumerate(batch):
        size += len(raw)
        if isinstance(raw, WholeUnits) or HEADER.unpack_from(raw, 0)[4] == 0:
            units.append((start, k + 1, size))
            start, size = k + 1, 0
    if start < len(batch):  # cannot happen: appends queue whole units
        units.append((start, len(batch), size))
    return units


def first_lsn(raw: Pending) -> int:
    """The lsn of the element's first record."""
    if isinstance(raw, WholeUnits):
        return raw.first_lsn
    return int(HEADER.unpack_from(raw, 0)[2])


def last_position(raw: Pending) -> tuple[int, int, bytes]:
    """``(lsn, term, chain)`` of the element's last record."""
    if isinstance(raw, WholeUnits):
        return raw.last
    _, _, lsn, term, _, chain = HEADER.unpack_from(raw, 0)
    return lsn, term, chain


def joined(elems: Sequence[Pending]) -> bytes:
    """The elements' bytes, one after the other (a lone buffer as it is, not copied)."""
    if len(elems) == 1:
        raw = elems[0]
        if not isinstance(raw, WholeUnits):
            return raw
        if len(raw.parts) == 1:
            return raw.parts[0]
    buffers: list[bytes] = []
    for raw in elems:
        if isinstance(raw, WholeUnits):
            buffers.extend(raw.parts)
        else:
            buffers.append(raw)
    return b"".join(buffers)


def index_sparse(
    sparse_index: list[tuple[int, int]], elems: Sequence[Pending], offset: int, every: int
) -> int:
    """Add ``(lsn, offset)`` entries for ``elems`` written at ``offset``, one at most every
    ``every`` bytes after the last entry; returns the offset after them."""
    last_indexed = sparse_index[-1][1] if sparse_index else -every
    pos = offset
    for raw in elems:
        if isinstance(raw, WholeUnits):
            starts = raw.starts
            i = 0
            while True:
                # the first record at least ``every`` bytes after the last entry
                i = bisect_left(starts, last_indexed + every - pos, i, len(starts) - 1)
                if i >= len(starts) - 1:
                    break
                sparse_index.append((raw.first_lsn + i, pos + starts[i]))
                last_indexed = pos + starts[i]
            pos += len(raw)
            continue
        if pos - last_indexed >= every:
            sparse_index.append((int(HEADER.unpack_from(raw, 0)[2]), pos))
            last_indexed = pos
        pos += len(raw)
    return pos
