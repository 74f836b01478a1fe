"""The follower's side of a snapshot transfer: files staged on disk, verified, resumable.

A snapshot arrives as ``SnapshotStart`` (the file list with sizes and sha256s), chunks in file
order and ``SnapshotEnd``. ``SnapshotStaging`` keeps it under
``data_dir/replication/snapshot-staging/<snapshot_id>/``::

    progress.json      which snapshot this is (its SnapshotStart) and how many files are done
    partial/<name>     the file being received, appended chunk by chunk
    files/<name>       files received whole, fsynced and sha256-verified (what gets installed)

After an interruption, a SnapshotStart with the same id and the same file list resumes: files
in ``files/`` are hashed again, the partial file continues at its current size, and the answer
is the ``SnapshotResume`` pointing there. A partial file is checked by its sha256 once whole;
a mismatch deletes it, so the next attempt fetches it again from offset 0.

Names from the wire are never joined to a path unchecked (DESIGN 8.10): each one must match
the protocol's bare-name pattern *and* resolve to a child of its staging directory. Everything
here is blocking file I/O; the follower calls it in a worker thread.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Final

import msgspec

from walship.errors import ProtocolError
from walship.fsutil import atomic_write, fsync_dir
from walship.replication.protocol import (
    SnapshotChunk,
    SnapshotFile,
    SnapshotResume,
    SnapshotStart,
)
from walship.storage.manifest import FILE_NAME as MANIFEST_NAME
from walship.storage.manifest import FORMAT as MANIFEST_FORMAT
from walship.storage.manifest import CheckpointManifest
from walship.storage.part_verify import PartRejected, file_sha256, verify_part_file
from walship.wal.terms import FILE_NAME as TERMS_NAME

STAGING_DIR: Final = Path("replication") / "snapshot-staging"
PROGRESS_NAME: Final = "progress.json"
HASH_READ_BYTES: Final = 1 << 20

# The same rule as protocol.FileName, checked again here because this is where names become
# paths (a SnapshotStart built in-process skips msgspec's decode-time validation).
_BARE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_U64 = Annotated[int, msgspec.Meta(ge=0)]


class _Progress(msgspec.Struct, frozen=True):
    """``progress.json``: the SnapshotStart being received and the files already whole."""

    snapshot_id: str
    last_lsn: int
    last_term: int
    chain: str
    files: list[tuple[str, int, str]]  # (name, size, sha256 hex)
    files_done: int = 0

    @classmethod
    def of(cls, start: SnapshotStart, files_done: int = 0) -> _Progress:
        return cls(
            snapshot_id=start.snapshot_id,
            last_lsn=start.last_lsn,
            last_term=start.last_term,
            chain=start.chain.hex(),
            files=[(f.name, f.size, f.sha256.hex()) for f in start.files],
            files_done=files_done,
        )

    def same_snapshot(self, other: _Progress) -> bool:
        return msgspec.structs.replace(self, files_done=0) == msgspec.structs.replace(
            other, files_done=0
        )


def checked_child(directory: Path, name: str) -> Path:
    """``directory / name`` for a bare file name from the wire; ProtocolError for anything else.

    The name must match the protocol's pattern (no separators, no leading dot) and the joined
    path must resolve to a direct child of ``directory`` (no symlink games either).
    """
    if not _BARE_NAME.fullmatch(name):
        raise ProtocolError(f"snapshot file name {name!r} is not a bare file name")
    path = directory / name
    if path.resolve().parent != directory.resolve():
        raise ProtocolError(f"snapshot file name {name!r} leaves its staging directory")
    return path


class SnapshotStaging:
    """One snapshot being received. Not thread-safe: one receive loop drives it, in order."""

    def __init__(self, directory: Path, start: SnapshotStart) -> None:
        self.directory = directory
        self.start = start
        self.files_dir = directory / "files"
        self.partial_dir = directory / "partial"
        self.index = 0  # the file being received: files[:index] are whole and verified
        self.held = 0  # bytes of files[index] held in partial/
        self.bytes_done = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = None

    def __repr__(self) -> str:
        return (
            f"<SnapshotStaging {self.start.snapshot_id} file {self.index}/"
            f"{len(self.start.files)} {self.bytes_done}/{self.bytes_total} bytes>"
        )

    @property
    def snapshot_id(self) -> str:
        return self.start.snapshot_id

    @property
    def bytes_total(self) -> int:
        return self.start.total_bytes

    # ------------------------------------------------------------------ opening and resuming

    @classmethod
    def open(cls, data_dir: Path, start: SnapshotStart) -> SnapshotStaging:
        """Stage ``start``, resuming what an earlier transfer of the same snapshot left.

        Staging directories of other snapshots are removed (only one transfer is kept).
        ProtocolError when the snapshot id or a file name is not a bare name.
        """
        root = data_dir / STAGING_DIR
        root.mkdir(parents=True, exist_ok=True)
        directory = checked_child(root, start.snapshot_id)
        names = [f.name for f in start.files]
        if MANIFEST_NAME not in names or TERMS_NAME not in names:
            raise ProtocolError(
                f"snapshot {start.snapshot_id} lacks {MANIFEST_NAME} or {TERMS_NAME}"
            )
        for other in root.iterdir():
            if other.name != directory.name:
                _remove(other)
        staging = cls(directory, start)
        for f in start.files:  # every name is checked before any file is touched
            checked_child(staging.files_dir, f.name)
        staging._resume_or_reset()
        return staging

    def _resume_or_reset(self) -> None:
        wanted = _Progress.of(self.start)
        progress_path = self.directory / PROGRESS_NAME
        found: _Progress | None = None
        if progress_path.is_file():
            try:
                found = msgspec.json.decode(progress_path.read_bytes(), type=_Progress)
            except msgspec.DecodeError:
                found = None
        if found is None or not found.same_snapshot(wanted):
            _remove(self.directory)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        if found is None or not found.same_snapshot(wanted):
            atomic_write(progress_path, msgspec.json.encode(wanted))
            fsync_dir(self.directory.parent)
        self._find_resume_point()

    def _find_resume_point(self) -> None:
        """Skip files already whole and verified; continue the partial one at its size."""
        files = self.start.files
        self.index, self.held, self.bytes_done = len(files), 0, 0
        for i, f in enumerate(files):
            whole = self.files_dir / f.name
            if (
                whole.is_file()
                and whole.stat().st_size == f.size
                and file_sha256(whole) == f.sha256
            ):
                self.bytes_done += f.size
                continue
            self.index = i
            break
        # Anything past the resume point is stale: files come in order, so it cannot be ours.
        for i, f in enumerate(files):
            if i >= self.index:
                (self.files_dir / f.name).unlink(missing_ok=True)
            if i != self.index:
                (self.partial_dir / f.name).unlink(missing_ok=True)
        if self.index < len(files):
            self._open_partial(files[self.index])

    def _open_partial(self, meta: SnapshotFile) -> None:
        path = self.partial_dir / meta.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size > meta.size:
            os.ftruncate(fd, 0)
            size = 0
        self._hash = hashlib.sha256()
        read = 0
        while read < size:  # bytes held so far count towards the whole file's sha256
            data = os.pread(fd, min(HASH_READ_BYTES, size - read), read)
            if not data:
                break
            self._hash.update(data)
            read += len(data)
        os.lseek(fd, read, os.SEEK_SET)
        self._fd, self.held = fd, read
        self.bytes_done += read

    @property
    def resume(self) -> SnapshotResume:
        """The answer to this SnapshotStart: where the leader should continue."""
        return SnapshotResume(self.start.snapshot_id, self.index, self.held)

    # ------------------------------------------------------------------ receiving

    def write(self, chunk: SnapshotChunk) -> None:
        """Append ``chunk`` to its file; ProtocolError unless it continues exactly where the
        bytes held end (in file order, at the held offset, within the file's size)."""
        files = self.start.files
        if chunk.file_index >= len(files) or chunk.file_index < self.index:
            raise ProtocolError(
                f"SnapshotChunk for file {chunk.file_index}, but file {self.index} of "
                f"{len(files)} is the one being received"
            )
        while self.index < chunk.file_index:
            # a later file begins: the current one must be whole (empty files send no bytes)
            self._finish_file()
        meta = files[self.index]
        if chunk.offset != self.held:
            raise ProtocolError(
                f"SnapshotChunk for {meta.name} at offset {chunk.offset}, but {self.held} bytes "
                "are held: chunks must arrive in order"
            )
        if self.held + len(chunk.data) > meta.size:
            raise ProtocolError(
                f"SnapshotChunk runs past the end of {meta.name} ({meta.size} bytes)"
            )
        assert self._fd is not None
        view = memoryview(chunk.data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(chunk.data)
        self.held += len(chunk.data)
        self.bytes_done += len(chunk.data)
        if self.held == meta.size:
            self._finish_file()

    def _finish_file(self) -> None:
        """Verify the current file whole, fsync it and move it to ``files/``."""
        meta = self.start.files[self.index]
        partial = self.partial_dir / meta.name
        if self.held != meta.size:
            raise ProtocolError(f"snapshot file {meta.name} ended at {self.held} of {meta.size}")
        assert self._fd is not None
        try:
            if self._hash.digest() != meta.sha256:
                partial.unlink(missing_ok=True)  # the next attempt fetches it again from 0
                raise ProtocolError(f"snapshot file {meta.name} fails its sha256 check")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        os.replace(partial, self.files_dir / meta.name)
        fsync_dir(self.files_dir)
        self.index += 1
        atomic_write(
            self.directory / PROGRESS_NAME,
            msgspec.json.encode(_Progress.of(self.start, self.index)),
        )
        if self.index < len(self.start.files):
            self._open_partial(self.start.files[self.index])

    def finish(self) -> tuple[CheckpointManifest, list[tuple[int, int]]]:
        """Once SnapshotEnd arrived: every file whole and verified, the manifest and term
        history decoded and checked against SnapshotStart. ProtocolError otherwise."""
        files = self.start.files
        while self.index < len(files):
            self._finish_file()  # each file's sha256 was checked as it became whole
        manifest = self._manifest()
        terms = self._terms()
        return manifest, terms

    def _manifest(self) -> CheckpointManifest:
        start = self.start
        data = (self.files_dir / MANIFEST_NAME).read_bytes()
        try:
            manifest = msgspec.json.decode(data, type=CheckpointManifest)
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                f"snapshot {start.snapshot_id}: unreadable manifest: {exc}"
            ) from exc
        if manifest.format != MANIFEST_FORMAT:
            raise ProtocolError(f"snapshot manifest has unknown format {manifest.format}")
        if (manifest.last_lsn, manifest.last_term, manifest.chain) != (
            start.last_lsn,
            start.last_term,
            start.chain.hex(),
        ):
            raise ProtocolError(
                f"snapshot manifest ends at {manifest.last_term}/{manifest.last_lsn}, but "
                f"SnapshotStart announced {start.last_term}/{start.last_lsn} (or another chain)"
            )
        shipped = {f.name: f for f in start.files}
        for part in manifest.parts:
            meta = shipped.get(part.file)
            if meta is None or part.file in (MANIFEST_NAME, TERMS_NAME):
                raise ProtocolError(f"snapshot manifest names part {part.file!r}, not shipped")
            checked_child(self.files_dir, part.file)
            if meta.size != part.bytes or meta.sha256.hex() != part.sha256:
                raise ProtocolError(f"snapshot part {part.file} differs from its manifest entry")
            try:  # the same checks as a physical follower's part (its sha256 was checked)
                verify_part_file(self.files_dir / part.file, part, digest=meta.sha256)
            except PartRejected as exc:
                raise ProtocolError(f"snapshot {start.snapshot_id}: {exc.message}") from exc
        return manifest

    def _terms(self) -> list[tuple[int, int]]:
        data = (self.files_dir / TERMS_NAME).read_bytes()
        try:
            terms = msgspec.json.decode(data, type=list[tuple[_U64, _U64]])
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"snapshot term history is unreadable: {exc}") from exc
        for (t1, lsn1), (t2, lsn2) in itertools.pairwise(terms):
            if not (t1 < t2 and lsn1 <= lsn2):
                raise ProtocolError(f"snapshot term history is not increasing at term {t2}")
        return terms

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Release the open partial file; what is staged stays for a resume."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and delete the staging directory (after install, or when abandoned)."""
        self.close()
        _remove(self.directory)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
