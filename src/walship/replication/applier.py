"""A follower's sans-I/O applier: the leader's ``WalBatch``es in, whole atomic appends out.

Each batch's records are verified a frame at a time (``wal/frame.py``: CRC, lsn, term and
chain, with ``verify_run``'s messages), and cut after the last record that ends an atomic
append. A leader's frame can end inside an append (one larger than a frame, or a catch-up
frame cut at its byte budget): its records so far are held here, verified but neither written
nor readable, until the frame with its last record arrives — so a follower never shows or acks
half an append. What comes out is a ``VerifiedFrame`` of whole appends, for
``Store.apply_frame`` to write as one buffer.
"""

from __future__ import annotations

from walship.errors import CorruptionError, ProtocolError
from walship.limits import DEFAULT_LIMITS, Limits
from walship.replication.protocol import WalBatch
from walship.wal.frame import VerifiedFrame, empty_frame, verify_frame
from walship.wal.record import GENESIS_CHAIN, HEADER_BYTES


class BatchApplier:
    """Verifies and cuts one session's batches; holds the start of an append still arriving."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.record_bytes_max = limits.record_bytes_max
        self.held_records_max = limits.batch_events_max
        # what a leader with the same limits accepts as one append (Store.submit checks it)
        self.held_bytes_max = limits.append_bytes_max + limits.batch_events_max * HEADER_BYTES
        self.held: VerifiedFrame = empty_frame(0, 0, GENESIS_CHAIN)

    def __repr__(self) -> str:
        return f"<BatchApplier held={self.held.record_count} records>"

    def reset(self) -> None:
        """Forget the held records (a new session starts from the store's own tail)."""
        self.held = empty_frame(0, 0, GENESIS_CHAIN)

    @property
    def holding(self) -> bool:
        return self.held.record_count > 0

    def held_tail(self) -> tuple[int, int, bytes] | None:
        """``(lsn, term, chain)`` after the held records; None when nothing is held."""
        return self.held.tail() if self.held.record_count else None

    def take(self, batch: WalBatch) -> VerifiedFrame | None:
        """The whole appends that ``batch`` completes (None when it only adds to the held
        one). ProtocolError when a record fails a check or the held append outgrows what a
        leader accepts; nothing is kept from a batch that fails."""
        span = f"WalBatch {batch.first_lsn}..{batch.last_lsn}"
        try:
            frame = verify_frame(
                batch.records,
                batch.prev_lsn,
                batch.prev_term,
                batch.prev_chain,
                batch.term,
                self.record_bytes_max,
            )
        except CorruptionError as exc:
            raise ProtocolError(f"{span}: {exc.message}", **exc.details) from exc
        if frame.last_lsn != batch.last_lsn:
            raise ProtocolError(f"{span}: the records end at lsn {frame.last_lsn}")
        if self.held.record_count:
            frame = self.held.extend(frame)
        whole, rest = frame.split()
        if rest.record_count and (
            rest.record_count > self.held_records_max or len(rest.data) > self.held_bytes_max
        ):
            raise ProtocolError(
                f"an atomic append from lsn {rest.prev_lsn + 1} is still open after "
                f"{rest.record_count} records ({len(rest.data)} bytes): larger than any append a "
                "leader accepts"
            )
        self.held = rest
        return whole if whole.record_count else None
