"""Each part's id index -- its events' sorted 64-bit id hashes -- in a file beside the part,
memory-mapped instead of held in the node's heap.

The store answers "is this event id stored already?" (idempotent appends) from every part's
sorted id hashes, 8 bytes an event. Held in memory they grew with the history without bound
(80 MB a node at 10,000,000 events: a third of the leader's RSS growth by window in the
sustained benchmark), against "memory stays bounded however many events are stored" (DESIGN
section 3). Written once here when a part is made and mapped
read-only, they cost the process only the pages a lookup touches (a binary search: ~20 per
part), which the kernel can drop again like any clean file page; a node whose clients never
send ids touches none.

The file is derived data, never trusted blindly: a 64-byte header holds a magic, the number of
hashes, the CRC-32C of the hashes and the sha256 of the part it indexes, and any file that
does not match its part (missing, torn, from another part of the same name after a cut) is
ignored and written again from the part's id column. A failure to write one (a full disk) only
costs memory: the index then stays in the heap, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from pathlib import Path

import crc32c
import numpy as np

from walship.fsutil import fsync_dir
from walship.storage.parquet import PartInfo

log = logging.getLogger(__name__)

MAGIC = b"WSIDX001"
HEADER = struct.Struct("<8sQI4x32s")  # magic, count, crc32c of the hashes, sha256 of the part
HEADER_BYTES = 64  # the hashes start 8-byte aligned, after the header and padding
SUFFIX = ".ids"


class IdIndexFiles:
    """The id index files of one store's parts, in their own directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, part_file: str) -> Path:
        return self.directory / (part_file + SUFFIX)

    def load(self, info: PartInfo) -> np.ndarray | None:
        """The part's id hashes, mapped from its file; None when there is no valid file."""
        path = self.path(info.file)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the id index %s: %s", path, exc)
            return None
        if len(head) != HEADER_BYTES:
            return None
        magic, count, crc, sha = HEADER.unpack_from(head)
        if (
            magic != MAGIC
            or count != info.events
            or sha != _sha_bytes(info)
            or len(data) != 8 * count
            or crc32c.crc32c(data) != crc
        ):
            return None
        del data
        if count == 0:
            return np.empty(0, np.int64)
        return np.memmap(path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(count,))

    def write(self, info: PartInfo, hashes: np.ndarray) -> np.ndarray:
        """Write the part's sorted id hashes (tmp, fsync, rename) and return them mapped from
        the file; ``hashes`` themselves when the file cannot be written."""
        body = np.ascontiguousarray(hashes, dtype="<i8").tobytes()
        head = HEADER.pack(MAGIC, len(hashes), crc32c.crc32c(body), _sha_bytes(info))
        path = self.path(info.file)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, head.ljust(HEADER_BYTES, b"\0"))
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            # derived data: the index stays in memory, and the next open writes it again
            log.warning("cannot write the id index %s (kept in memory): %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return hashes
        mapped = self.load(info)
        return hashes if mapped is None else mapped

    def remove(self, part_files: list[str]) -> None:
        """Delete the files of parts that are gone (a missing one is fine)."""
        for name in part_files:
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    def sweep(self, referenced: set[str]) -> None:
        """Delete every file not of a part in ``referenced`` (recovery), and stray tmps."""
        if not self.directory.is_dir():
            return
        removed = False
        for path in self.directory.iterdir():
            name = path.name
            if name.endswith(".tmp") or name.removesuffix(SUFFIX) not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed = True
        if removed:
            fsync_dir(self.directory)


def _sha_bytes(info: PartInfo) -> bytes:
    try:
        return bytes.fromhex(info.sha256)[:32].ljust(32, b"\0")
    except ValueError:
        return b"\0" * 32
