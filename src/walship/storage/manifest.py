"""The checkpoint manifest: which Parquet parts exist and which lsn they cover up to.

Replaced atomically (tmp -> fsync -> rename -> fsync dir) after each checkpoint. A snapshot
is exactly one manifest: parts covering lsn <= ``last_lsn``, plus that record's term and chain.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from walship.errors import CorruptionError
from walship.fsutil import atomic_write
from walship.storage.consumers import ConsumerPosition
from walship.storage.parquet import PartInfo
from walship.wal.record import GENESIS_CHAIN

FILE_NAME = "manifest.json"
FORMAT = 1
INSTALL_MARKER = "INSTALLING_SNAPSHOT"
"""In the data dir while a snapshot replaces ``checkpoints/`` (and ``wal/``) by renames."""


class CheckpointManifest(msgspec.Struct, frozen=True):
    format: int = FORMAT
    last_lsn: int = 0
    last_term: int = 0
    chain: str = GENESIS_CHAIN.hex()
    parts: list[PartInfo] = msgspec.field(default_factory=list)
    created_us: int = 0
    # consumers' tracked positions as of ``last_lsn``: their records leave with the WAL the
    # checkpoint covers, so the table travels here (restarts, snapshots, compactions keep it)
    consumers: list[ConsumerPosition] = msgspec.field(default_factory=list)

    @property
    def chain_bytes(self) -> bytes:
        return bytes.fromhex(self.chain)

    @property
    def events(self) -> int:
        return sum(p.events for p in self.parts)

    def advanced(
        self,
        part: PartInfo | None,
        last_lsn: int,
        last_term: int,
        chain: bytes,
        created_us: int,
        consumers: list[ConsumerPosition] | None = None,
    ) -> CheckpointManifest:
        """The manifest after a checkpoint up to ``last_lsn`` (``part`` None: no events in it;
        ``consumers`` None: the table did not change)."""
        return CheckpointManifest(
            format=FORMAT,
            last_lsn=last_lsn,
            last_term=last_term,
            chain=chain.hex(),
            parts=[*self.parts, part] if part is not None else list(self.parts),
            created_us=created_us,
            consumers=list(self.consumers) if consumers is None else consumers,
        )


def read_manifest(directory: Path) -> CheckpointManifest | None:
    """The manifest as one atomic read of its file, parts not looked at; None when absent.

    What a reader in another process uses: the file is only ever replaced by a rename, so
    one read sees one whole manifest, though its parts may be deleted a moment later by a
    compaction (``storage.pins`` keeps them). CorruptionError when it does not decode.
    """
    path = directory / FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = msgspec.json.decode(data, type=CheckpointManifest)
    except msgspec.DecodeError as exc:
        raise CorruptionError(f"unreadable checkpoint manifest {path}: {exc}") from exc
    if manifest.format != FORMAT:
        raise CorruptionError(f"{path}: unknown manifest format {manifest.format}")
    return manifest


def load_manifest(directory: Path) -> CheckpointManifest:
    """The current manifest, every part checked present; an empty one when no checkpoint has
    been taken. For the store that owns ``directory``."""
    path = directory / FILE_NAME
    manifest = read_manifest(directory)
    if manifest is None:
        return CheckpointManifest()
    previous_last = 0
    for part in manifest.parts:
        if part.first_lsn <= previous_last or part.last_lsn < part.first_lsn:
            raise CorruptionError(f"{path}: part {part.file} overlaps lsn {previous_last}")
        if not (directory / "parts" / part.file).exists():
            raise CorruptionError(f"{path}: part {part.file} is missing")
        previous_last = part.last_lsn
    if previous_last > manifest.last_lsn:
        raise CorruptionError(f"{path}: parts go past the manifest's last lsn")
    for entry in manifest.consumers:
        if entry.lsn > manifest.last_lsn:
            raise CorruptionError(
                f"{path}: consumer {entry.consumer!r} was tracked at lsn {entry.lsn}, past "
                "the manifest's last lsn"
            )
    return manifest


def save_manifest(directory: Path, manifest: CheckpointManifest) -> None:
    atomic_write(directory / FILE_NAME, msgspec.json.encode(manifest))
