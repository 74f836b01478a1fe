"""History pins: a reader's own hard links to one manifest's parts, so nothing it reads vanishes.

An outside reader (DuckDB, Polars, pyarrow, ``walship sql``, in any process) must see the
parts of one manifest -- exactly the events with lsn <= S, each once -- for as long as it
reads them, while the store goes on checkpointing and compacting. A glob over ``parts/``
races with both: a merged part sits beside the parts it replaced until they are deleted (rows
counted twice), and a part deleted between the listing and the open fails "No such file".

A pin is a directory ``DATA_DIR/readers/<pid>-<random>/`` holding a hard link to each part of
one manifest, plus a copy of that manifest. When a compaction deletes a part's name in
``parts/``, the pinned link keeps the file's data until the pin is released -- what an open
file descriptor does inside one process, across processes and across the many opens a
DuckDB view makes. Nothing is shared with the store but the file system: a reader can never
stall a checkpoint or a compaction, and it reads safely from a node that knows nothing of pins
(a snapshot install moves ``checkpoints/`` away whole; the links in ``readers/`` stay).

Taking a pin is optimistic. Read the manifest (one read of a file only ever replaced by a
rename: one whole manifest), link each of its parts; when one is already gone, a compaction
replaced it since the read, so drop the links and read the newer manifest. Each link's size
is checked against the manifest, so a file re-created under the same name (a node reset and
refilled by a snapshot) is never mixed with parts of another manifest.

The holder keeps an exclusive ``flock`` on the pin directory, which the kernel drops when the
process ends however it ends. A pin whose lock can be taken is stale; whoever finds it (the
next reader, or the store after each compaction and every ``pin_sweep_interval_ms``) deletes
it, which frees the disk space of parts compacted away meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import msgspec

from walship.errors import NotFound, StorageError, Unavailable
from walship.storage.manifest import INSTALL_MARKER, CheckpointManifest, read_manifest

READERS_DIR = "readers"
MANIFEST_COPY = "manifest.json"
_RETRY_S = 0.005  # a compaction deletes the parts it merged right after its manifest swap


class HistoryPin:
    """One manifest's parts, hard-linked into a directory this process holds locked.

    ``files`` stay readable until ``release`` (or until this object is garbage collected, or
    the process ends) whatever the store does meanwhile.
    """

    def __init__(self, path: Path, fd: int, manifest: CheckpointManifest, files: list[Path]):
        self.path = path
        self.manifest = manifest
        self.files = files
        self._finalizer = weakref.finalize(self, _release, path, fd, os.getpid())

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def release(self) -> None:
        """Delete the links and drop the lock. Idempotent."""
        self._finalizer()

    def __enter__(self) -> HistoryPin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "RELEASED" if self.released else "HELD"
        return (
            f"<HistoryPin {state} lsn<={self.manifest.last_lsn} "
            f"{len(self.files)} parts {self.path}>"
        )


def _release(path: Path, fd: int, owner_pid: int) -> None:
    # links first, lock last: a sweeper that sees the directory unlocked may delete it too.
    # A forked child (its copy of the pin collected, or at its exit) only closes its copy of
    # the fd: the pin, and the parent's reads through it, are the parent's
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def pin_history(data_dir: Path, timeout_ms: int) -> HistoryPin:
    """Pin the parts of the current checkpoint manifest of ``data_dir``.

    NotFound when ``data_dir`` is not a walship data dir; StorageError when the pin cannot be
    made there (no write access to ``readers/``, no hard links on that file system);
    Unavailable when no whole manifest could be pinned within ``timeout_ms``.
    """
    if not (data_dir / "wal").is_dir() and not (data_dir / "checkpoints").is_dir():
        raise NotFound(f"{data_dir} is not a walship data dir (it has no wal/ or checkpoints/)")
    readers = data_dir / READERS_DIR
    try:
        readers.mkdir(exist_ok=True)
    except OSError as exc:
        raise _storage_error(f"cannot create {readers}", exc) from exc
    sweep_stale_pins(data_dir)
    deadline = time.monotonic() + timeout_ms / 1000
    path, fd = _new_pin_dir(readers, deadline)
    try:
        while True:
            manifest = _current_manifest(data_dir)
            if manifest is not None:
                files = _link_parts(data_dir, path, manifest)
                if files is not None:
                    _write_copy(path, manifest)
                    return HistoryPin(path, fd, manifest, files)
                _unlink_all(path)
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"could not pin a whole checkpoint of {data_dir} in {timeout_ms} ms: its "
                    "parts kept changing or a snapshot install did not end"
                )
            time.sleep(_RETRY_S)
    except BaseException:
        _release(path, fd, os.getpid())
        raise


def sweep_stale_pins(data_dir: Path) -> int:
    """Delete the pins of processes that have ended; returns how many."""
    readers = data_dir / READERS_DIR
    try:
        entries = list(os.scandir(readers))
    except FileNotFoundError:
        return 0
    swept = 0
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone already, or not a pin directory
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # held: a live reader
            shutil.rmtree(entry.path, ignore_errors=True)
            swept += 1
        finally:
            os.close(fd)
    return swept


def _new_pin_dir(readers: Path, deadline: float) -> tuple[Path, int]:
    """A fresh pin directory, locked by this process."""
    while True:
        try:
            path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=readers))
        except OSError as exc:
            raise _storage_error(f"cannot create a pin in {readers}", exc) from exc
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it for one rmtree at most
        with contextlib.suppress(FileNotFoundError):
            here = os.stat(path)
            held = os.fstat(fd)
            if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
                return path, fd
        # a sweeper took the directory for a dead pin between its creation and our lock
        os.close(fd)
        if time.monotonic() >= deadline:
            raise Unavailable(f"could not create a pin in {readers}")


def _current_manifest(data_dir: Path) -> CheckpointManifest | None:
    """The manifest to pin; None while a snapshot install has ``checkpoints/`` moved away."""
    checkpoints = data_dir / "checkpoints"
    manifest = read_manifest(checkpoints)
    if manifest is not None:
        return manifest
    if (data_dir / INSTALL_MARKER).exists():
        return None
    # no checkpoint yet -- unless an install ended between the two looks
    return read_manifest(checkpoints) or CheckpointManifest()


def _link_parts(data_dir: Path, pin: Path, manifest: CheckpointManifest) -> list[Path] | None:
    """Link every part of ``manifest`` into ``pin``; None when one is gone or not the same
    file any more (a newer manifest replaced it)."""
    parts_dir = data_dir / "checkpoints" / "parts"
    files = []
    for part in manifest.parts:
        source = parts_dir / part.file
        link = pin / part.file
        try:
            os.link(source, link)
        except FileNotFoundError:
            if not data_dir.is_dir():
                raise NotFound(f"{data_dir} was removed") from None
            return None
        except OSError as exc:
            raise _storage_error(f"cannot hard-link {source} into {pin}", exc) from exc
        if link.stat().st_size != part.bytes:
            return None
        files.append(link)
    return files


def _unlink_all(pin: Path) -> None:
    for entry in os.scandir(pin):
        os.unlink(entry.path)


def _write_copy(pin: Path, manifest: CheckpointManifest) -> None:
    # for whoever looks in readers/: which checkpoint this pin holds (not read back)
    (pin / MANIFEST_COPY).write_bytes(msgspec.json.encode(manifest))


def _storage_error(what: str, exc: OSError) -> StorageError:
    hint = ""
    if exc.errno == errno.EPERM:
        # most Linux systems set fs.protected_hardlinks: only a file's owner (or whoever may
        # write it) may link it, so a reader runs as the node's user
        hint = (
            " (pins hard-link the node's part files: run as the user that owns them, the "
            "node's, on a file system with hard links)"
        )
    elif exc.errno in (errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
        hint = " (pins need hard links within the data dir's file system)"
    elif exc.errno in (errno.EACCES, errno.EROFS):
        hint = " (a reader needs write access to DATA_DIR/readers/)"
    return StorageError(f"{what}: {exc.strerror or exc}{hint}")
