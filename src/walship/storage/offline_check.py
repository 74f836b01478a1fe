"""Verifying a data dir offline: its WAL (``wal/offline.py``) and the checkpoint's coverage.

A checkpoint's manifest says which lsns its Parquet parts cover; the WAL must start no later
than the lsn after them and must not end before them, or records are missing. Like the WAL
reader below it, this never writes and takes no lock: it notes when a node holds the dir.
"""

from __future__ import annotations

from walship.dirlock import holder_pid
from walship.errors import CorruptionError
from walship.storage.manifest import load_manifest
from walship.wal.offline import VerifyReport, WalLocation, verify_segments


def verify_wal(location: WalLocation) -> VerifyReport:
    """Verify every segment (CRC, lsn and chain continuity, term history) and, given the data
    dir, the checkpoint's coverage; never writes to the directory."""
    report = verify_segments(location)
    if location.data_dir is not None:
        _verify_checkpoint(report)
        holder = holder_pid(location.data_dir)
        if holder is not None:
            report.notes.append(
                f"{location.data_dir} is in use by pid {holder or '?'}: it may be writing the "
                "last records as they are read (a torn tail is then expected)"
            )
    return report


def _verify_checkpoint(report: VerifyReport) -> None:
    assert report.location.data_dir is not None
    checkpoint_dir = report.location.data_dir / "checkpoints"
    try:
        manifest = load_manifest(checkpoint_dir)
    except CorruptionError as exc:
        report.problems.append(exc.message)
        return
    if not report.segments or report.corruption:
        return
    first = report.segments[0].first_lsn.value
    last = report.last_lsn.value
    checkpointed = manifest.last_lsn
    if checkpointed:
        report.notes.append(
            f"checkpoint covers lsn 1..{checkpointed} in {len(manifest.parts)} Parquet part(s)"
        )
    if first > checkpointed + 1:
        report.problems.append(
            f"the WAL starts at lsn {first} but the checkpoint ends at {checkpointed}: "
            f"records {checkpointed + 1}..{first - 1} are missing"
        )
    elif last < checkpointed:
        report.problems.append(
            f"the WAL ends at lsn {last} but the checkpoint already covers {checkpointed}"
        )
