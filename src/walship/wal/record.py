"""The WAL record codec: the bytes that are written, fsynced, shipped and compared.

A record is a 32-byte header and a body::

    offset  size  field
    0       4     body_len   u32 little endian
    4       4     crc        CRC-32C of bytes 0..4 and 8..end (header without itself, and body)
    8       8     lsn        u64
    16      4     term       u32
    20      4     batch_left records after this one that belong to the same atomic append
    24      8     chain      running hash: blake2b-64(prev_chain || lsn || term || crc32c(body))
    32      n     body       the encoded event (opaque here)

The CRC covers the header and the whole body (the reference's covered neither payload nor
term). ``batch_left`` makes a batch atomic across crashes: recovery drops a trailing batch
whose last record never reached the disk. The chain makes two logs with the same chain at lsn
N identical up to N, which is what followers and divergence repair compare.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from hashlib import blake2b

import crc32c as _crc32c

from walship.errors import CorruptionError

HEADER = struct.Struct("<IIQII8s")
HEADER_BYTES = HEADER.size  # 32
CHAIN_BYTES = 8
GENESIS_CHAIN = bytes(CHAIN_BYTES)
_LEN = struct.Struct("<I")
_LSN_TERM_CRC = struct.Struct("<QQI")

crc32c = _crc32c.crc32c


def next_chain(prev_chain: bytes, lsn: int, term: int, body: bytes) -> bytes:
    """The chain hash of a record, from the previous record's chain."""
    h = blake2b(prev_chain, digest_size=CHAIN_BYTES)
    h.update(_LSN_TERM_CRC.pack(lsn, term, crc32c(body)))
    return h.digest()


_REST = struct.Struct("<QII8s")
TERM_MAX = 0xFFFF_FFFF


def encode_record(
    lsn: int, term: int, prev_chain: bytes, body: bytes, batch_left: int = 0
) -> tuple[bytes, bytes]:
    """Encode one record; returns ``(record_bytes, chain)``.

    ``batch_left`` is how many records of the same atomic append follow this one.
    """
    h = blake2b(prev_chain, digest_size=CHAIN_BYTES)
    h.update(_LSN_TERM_CRC.pack(lsn, term, crc32c(body)))
    chain = h.digest()
    rest = _REST.pack(lsn, term, batch_left, chain)
    length = _LEN.pack(len(body))
    crc = crc32c(body, crc32c(rest, crc32c(length)))
    return b"".join((length, _LEN.pack(crc), rest, body)), chain


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded, CRC-verified record. ``raw`` is the exact bytes as stored."""

    lsn: int
    term: int
    chain: bytes
    body: bytes
    raw: bytes
    batch_left: int = 0

    def verify_chain(self, prev_chain: bytes) -> bool:
        """True when this record's chain follows from ``prev_chain``."""
        return next_chain(prev_chain, self.lsn, self.term, self.body) == self.chain


class RecordIncomplete(Exception):
    """Fewer bytes than the record needs: a torn write at the tail, or a short read."""


class RecordInvalid(Exception):
    """The bytes are there but do not form a valid record (bad CRC or impossible length)."""


def decode_record(buf: bytes | memoryview, offset: int, body_bytes_max: int) -> Record:
    """Decode and CRC-check the record at ``offset``.

    Raises RecordIncomplete when the buffer ends inside the record and RecordInvalid when the
    length is impossible or the CRC does not match. Never returns an unchecked record.
    """
    end_header = offset + HEADER_BYTES
    if end_header > len(buf):
        raise RecordIncomplete(f"header needs {HEADER_BYTES} bytes at offset {offset}")
    body_len, crc, lsn, term, batch_left, chain = HEADER.unpack_from(buf, offset)
    if body_len > body_bytes_max:
        raise RecordInvalid(f"record length {body_len} exceeds {body_bytes_max} at offset {offset}")
    end = end_header + body_len
    if end > len(buf):
        raise RecordIncomplete(f"record at offset {offset} needs {end - len(buf)} more bytes")
    raw = bytes(buf[offset:end])
    actual = crc32c(raw[8:], crc32c(raw[0:4]))
    if actual != crc:
        raise RecordInvalid(
            f"CRC mismatch at offset {offset} (lsn field {lsn}): "
            f"stored {crc:08x}, computed {actual:08x}"
        )
    return Record(
        lsn=lsn, term=term, chain=chain, body=raw[HEADER_BYTES:], raw=raw, batch_left=batch_left
    )


def iter_records(buf: bytes | memoryview, body_bytes_max: int, offset: int = 0) -> list[Record]:
    """Decode every whole record in ``buf`` (a shipped batch); CorruptionError on any defect."""
    out: list[Record] = []
    while offset < len(buf):
        try:
            rec = decode_record(buf, offset, body_bytes_max)
        except (RecordIncomplete, RecordInvalid) as exc:
            raise CorruptionError(str(exc), offset=offset) from exc
        out.append(rec)
        offset += len(rec.raw)
    return out
