"""Shipped records a frame at a time: verify, cut at an atomic append, hand to the WAL whole.

A follower receives its leader's records in frames of up to a few MiB. ``verify_run`` turns
each record into a ``Record`` (two copies of its bytes and an object), and the WAL writer then
walks them one by one again. Here a frame is verified in one pass over a memoryview — CRC,
the next lsn, the term, the chain, exactly ``verify_run``'s checks and messages — and kept as
what it is: the frame's bytes plus the offset of each record (``VerifiedFrame``). The whole
atomic appends among them go to the WAL as one buffer (``WholeUnits``), written as they are;
the rest (an append that continues in the next frame) is held, verified, until it completes.

The chain's input is each record's own stored chain hash and its predecessor's, so a frame's
records could be checked in any order; they are checked in log order so that the first defect
reported is the first in the log, as ``verify_run`` reports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b
from itertools import repeat
from typing import NamedTuple

from walship.errors import CorruptionError
from walship.wal.record import (
    _CHAIN_INPUT,
    CHAIN_BYTES,
    HEADER,
    HEADER_BYTES,
    _raise_undecodable,
    crc32c,
)

# blake2b-64 with its parameters set once: a copy per record costs less than the keyword call
_CHAIN_HASHER = blake2b(digest_size=CHAIN_BYTES)


class VerifiedFrame(NamedTuple):
    """Consecutive records, each checked against the one before from ``prev_*``.

    ``starts[i]`` is where record ``prev_lsn + 1 + i`` begins in ``data``; the last entry is
    ``len(data)``. ``unit_ends`` counts the records up to each one that ends an atomic append
    (``batch_left == 0``), in order; ``rises`` lists ``(term, first lsn)`` where the term goes up;
    ``bodies`` are views of the records' bodies (of ``data``, or of the frames it was joined
    from: the same bytes).
    """

    prev_lsn: int
    prev_term: int
    prev_chain: bytes
    data: bytes
    starts: list[int]
    unit_ends: list[int]
    rises: list[tuple[int, int]]
    bodies: list[memoryview]

    @property
    def record_count(self) -> int:
        return len(self.starts) - 1

    @property
    def whole(self) -> int:
        """How many records, from the first, end whole atomic appends."""
        return self.unit_ends[-1] if self.unit_ends else 0

    @property
    def last_lsn(self) -> int:
        return self.prev_lsn + self.record_count

    def tail(self) -> tuple[int, int, bytes]:
        """``(lsn, term, chain)`` of the last record (``prev_*`` when there is none)."""
        return self.position_after(self.record_count)

    def position_after(self, k: int) -> tuple[int, int, bytes]:
        """``(lsn, term, chain)`` of the ``k``-th record (``prev_*`` for 0)."""
        if k == 0:
            return self.prev_lsn, self.prev_term, self.prev_chain
        _, _, lsn, term, _, chain = HEADER.unpack_from(self.data, self.starts[k - 1])
        return lsn, term, chain

    def extend(self, more: VerifiedFrame) -> VerifiedFrame:
        """These records followed by ``more`` (verified to continue this frame's tail)."""
        if not self.record_count:
            return more
        if not more.record_count:
            return self
        base = len(self.data)
        starts = self.starts[:-1]
        starts.extend([s + base for s in more.starts])
        count = self.record_count
        return VerifiedFrame(
            self.prev_lsn,
            self.prev_term,
            self.prev_chain,
            self.data + more.data,
            starts,
            self.unit_ends + [end + count for end in more.unit_ends],
            self.rises + more.rises,
            self.bodies + more.bodies,
        )

    def split(self) -> tuple[VerifiedFrame, VerifiedFrame]:
        """``(whole appends, the open rest)``: the records that end atomic appends, and the
        start of one that continues past this frame (either may be empty)."""
        k = self.whole
        if k == self.record_count:
            return self, self._empty_after(k)
        cut = self.starts[k]
        lsn, term, chain = self.position_after(k)
        first_open = lsn + 1
        head = VerifiedFrame(
            self.prev_lsn,
            self.prev_term,
            self.prev_chain,
            self.data[:cut],
            self.starts[: k + 1],
            self.unit_ends,
            [r for r in self.rises if r[1] < first_open],
            self.bodies[:k],
        )
        rest = VerifiedFrame(
            lsn,
            term,
            chain,
            self.data[cut:],
            [s - cut for s in self.starts[k:]],
            [],
            [r for r in self.rises if r[1] >= first_open],
            self.bodies[k:],
        )
        return head, rest

    def _empty_after(self, k: int) -> VerifiedFrame:
        lsn, term, chain = self.position_after(k)
        return VerifiedFrame(lsn, term, chain, b"", [0], [], [], [])

    def entries(self) -> Iterable[tuple[int, int, memoryview]]:
        """``(lsn, term, body)`` of each record, without a Python step per record when the
        frame holds one term (nearly always)."""
        first = self.prev_lsn + 1
        lsns = range(first, first + len(self.bodies))
        if not self.rises:
            return zip(lsns, repeat(self.prev_term), self.bodies, strict=False)
        terms: list[int] = []
        term, at = self.prev_term, first
        for r_term, r_lsn in self.rises:
            terms.extend(repeat(term, r_lsn - at))
            term, at = r_term, r_lsn
        terms.extend(repeat(term, first + len(self.bodies) - at))
        return zip(lsns, terms, self.bodies, strict=True)


def empty_frame(prev_lsn: int, prev_term: int, prev_chain: bytes) -> VerifiedFrame:
    """No records, after ``(prev_lsn, prev_term, prev_chain)``."""
    return VerifiedFrame(prev_lsn, prev_term, prev_chain, b"", [0], [], [], [])


def verify_frame(
    buf: bytes,
    prev_lsn: int,
    prev_term: int,
    prev_chain: bytes,
    term_max: int,
    body_bytes_max: int,
) -> VerifiedFrame:
    """Check every record in ``buf`` (a shipped frame's records) against the one before:
    CRC over header and body, the next lsn, a term in ``prev_term..term_max`` never going
    down, and the chain hash from ``prev_chain``. CorruptionError naming the first defect
    (``verify_run``'s message); never a partial answer. ``buf`` is kept, not copied.
    """
    starts: list[int] = []
    unit_ends: list[int] = []
    rises: list[tuple[int, int]] = []
    bodies: list[memoryview] = []
    add_start, add_body = starts.append, bodies.append
    unpack, chain_input, hasher = HEADER.unpack_from, _CHAIN_INPUT.pack, _CHAIN_HASHER.copy
    # the CRC of each record's 4-byte length field, by length: a frame's records are mostly
    # of a few sizes, and this saves a slice and a call per record
    length_crcs: dict[int, int] = {}
    lsn, term, chain = prev_lsn, prev_term, prev_chain
    offset, size = 0, len(buf)
    view = memoryview(buf)
    while offset < size:
        if size - offset < HEADER_BYTES:
            _raise_undecodable(view, offset, body_bytes_max)
        body_len, crc, r_lsn, r_term, left, r_chain = unpack(view, offset)
        body_at = offset + HEADER_BYTES
        end = body_at + body_len
        if body_len > body_bytes_max or end > size:
            _raise_undecodable(view, offset, body_bytes_max)
        length_crc = length_crcs.get(body_len)
        if length_crc is None:
            length_crc = length_crcs[body_len] = crc32c(view[offset : offset + 4])
        # the record's CRC covers bytes 0..4 and 8..end; the chain wants the body's own CRC
        # (crc32c continues only from a prefix: two passes over the body)
        if crc32c(view[offset + 8 : end], length_crc) != crc:
            _raise_undecodable(view, offset, body_bytes_max)
        if r_lsn != lsn + 1:
            raise CorruptionError(f"record lsn {r_lsn} where {lsn + 1} was due", offset=offset)
        if r_term != term:
            if not term <= r_term <= term_max:
                raise CorruptionError(
                    f"record {r_lsn} has term {r_term}, outside {term}..{term_max}",
                    offset=offset,
                )
            rises.append((r_term, r_lsn))
        body = view[body_at:end]
        digest = hasher()
        digest.update(chain_input(chain, r_lsn, r_term, crc32c(body)))
        if digest.digest() != r_chain:
            raise CorruptionError(f"chain hash mismatch at record {r_lsn}", offset=offset)
        add_start(offset)
        add_body(body)
        if not left:
            unit_ends.append(len(starts))
        lsn, term, chain = r_lsn, r_term, r_chain
        offset = end
    starts.append(size)
    return VerifiedFrame(prev_lsn, prev_term, prev_chain, buf, starts, unit_ends, rises, bodies)
