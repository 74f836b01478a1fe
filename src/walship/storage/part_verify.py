"""Checks of a Parquet part that arrived from another node, before anything uses it.

Shared by the two ways parts travel: a snapshot (``replication/staging.py``) and a physical
follower's part from the leader (``replication/physical.py``, ``storage/adopt.py``). A part
is only ever taken when its bytes are the ones its ``PartInfo`` names (size, sha256) and its
rows are the ones the info says (row count, lsns within its range; for a physical follower
exactly the lsns its own WAL holds there). Anything else raises ``PartRejected``: the
receiver never installs it, and rebuilds from its own WAL what it would have covered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from walship.errors import CorruptionError
from walship.storage.parquet import PartInfo

HASH_READ_BYTES = 1 << 20


class PartRejected(CorruptionError):
    """A part from another node fails a check; it is not installed."""

    code = "part_rejected"


def file_sha256(path: Path) -> bytes:
    """The sha256 of the file's whole content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(HASH_READ_BYTES):
            h.update(data)
    return h.digest()


def verify_part_file(
    path: Path,
    info: PartInfo,
    *,
    digest: bytes | None = None,
    lsns: np.ndarray | None = None,
) -> None:
    """PartRejected unless the file at ``path`` is the part ``info`` describes.

    ``digest``: its sha256, when the receiver hashed it as it arrived (else read here).
    ``lsns``: the lsns of the events this node holds in the part's range, in order; the
    part's own lsn column must be exactly these.
    """
    name = info.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PartRejected(f"part {name}: cannot read it: {exc}") from exc
    if size != info.bytes:
        raise PartRejected(f"part {name}: {size} bytes, but its info says {info.bytes}")
    actual = digest if digest is not None else file_sha256(path)
    if actual.hex() != info.sha256:
        raise PartRejected(f"part {name} fails its sha256 check")
    if info.first_lsn > info.last_lsn:
        raise PartRejected(f"part {name}: empty lsn range {info.first_lsn}..{info.last_lsn}")
    try:
        meta = pq.ParquetFile(path).metadata
        rows = meta.num_rows
        column = pq.read_table(path, columns=["lsn"]).column("lsn")
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise PartRejected(f"part {name} is not a readable Parquet file: {exc}") from exc
    if rows != info.events:
        raise PartRejected(f"part {name}: {rows} rows, but its info says {info.events}")
    if rows:
        low, high = pc.min(column).as_py(), pc.max(column).as_py()
        if low < info.first_lsn or high > info.last_lsn:
            raise PartRejected(
                f"part {name}: rows at lsn {low}..{high}, outside its range "
                f"{info.first_lsn}..{info.last_lsn}"
            )
    if lsns is not None:
        held = np.sort(column.to_numpy())
        if len(held) != len(lsns) or not np.array_equal(held, lsns):
            raise PartRejected(
                f"part {name}: its {rows} rows are not the {len(lsns)} events this node's WAL "
                f"holds at lsn {info.first_lsn}..{info.last_lsn}"
            )
