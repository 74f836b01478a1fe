"""The write-ahead log: record codec, segment files, term history and the group-committing log."""

from walship.wal.log import AppendResult, FsyncPolicy, Wal, WalStatus
from walship.wal.record import Record, decode_record, encode_record
from walship.wal.terms import TermHistory

__all__ = [
    "AppendResult",
    "FsyncPolicy",
    "Record",
    "TermHistory",
    "Wal",
    "WalStatus",
    "decode_record",
    "encode_record",
]
