"""A physical follower takes the leader's Parquet parts into its store, once verified.

The store's collaborator for ``replication/physical.py``: a checkpoint part is appended to the
manifest in place of the local checkpoint the follower would have written over the same
range, and the memtable drops the events it covers; a merged part replaces the very parts the
leader merged, or this node's own parts spanning exactly its range. Every check is against
this node's own state (its WAL is the source of truth): the part's range must continue this
manifest, the record at its last lsn must have the leader's term and chain, and its rows must
be exactly the events held here in that range (``storage/part_verify.py``). ``PartRejected``
otherwise, and nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from walship.events import now_us
from walship.fsutil import fsync_dir
from walship.position import Lsn
from walship.storage.consumers import ConsumerPosition
from walship.storage.parquet import PartInfo, PartReader, id_hashes_of_bytes
from walship.storage.part_verify import PartRejected, verify_part_file

if TYPE_CHECKING:
    from walship.store import Store


class PartOverlaps(PartRejected):
    """The leader's checkpoint part came after this node checkpointed (some of) its range
    itself: not a bad part (``storage/realign.py`` may still put it in place of its own)."""

    code = "part_overlaps"


def adopt_checkpoint(
    store: Store,
    staged: Path,
    info: PartInfo,
    last_term: int,
    chain: bytes,
    consumers: list[ConsumerPosition],
    digest: bytes,
) -> None:
    """Install the leader's checkpoint part ``staged`` (verified here) after this manifest.

    A gap before it (a part missed across a reconnect) is first filled by a checkpoint of
    this node's own, through the lsn before the part.
    """
    last = info.last_lsn
    with store.core.checkpoint_lock:
        if info.first_lsn > store.core.manifest.last_lsn + 1:
            store.checkpoints.checkpoint_once(through=info.first_lsn - 1)
        m = store.core.manifest
        if info.first_lsn <= m.last_lsn:
            raise PartOverlaps(
                f"part {info.file} starts at lsn {info.first_lsn}, but this node checkpointed "
                f"through {m.last_lsn} itself"
            )
        if info.first_lsn != m.last_lsn + 1:
            raise PartRejected(
                f"part {info.file} starts at lsn {info.first_lsn}, but this node's checkpoint "
                f"ends at {m.last_lsn}"
            )
        if last > store.log.written_lsn.value:
            raise PartRejected(f"part {info.file} ends past this node's log at lsn {last}")
        record = next(iter(store.log.read_from(Lsn(last))), None)
        if record is None or record.term != last_term or record.chain != chain:
            raise PartRejected(
                f"part {info.file}: the leader's record at lsn {last} (term {last_term}) is "
                "not this node's: another history"
            )
        with store.core.lock:
            covered, _ = store.core.active.split_at(last)
        verify_part_file(staged, info, digest=digest, lsns=covered.lsn_array())
        for entry in consumers:
            if entry.lsn > last:
                raise PartRejected(f"part {info.file}: a consumer tracked past its range")
        own = {(c.tenant_id, c.consumer): c for c in store.core.consumers.entries()}
        for key, entry in own.items():
            theirs = next((c for c in consumers if (c.tenant_id, c.consumer) == key), None)
            if entry.lsn <= last and theirs != entry:
                raise PartRejected(f"part {info.file}: consumer {key[1]!r} differs here")
        path = store.parts_dir / info.file
        os.replace(staged, path)
        fsync_dir(store.parts_dir)
        reader = PartReader(path, info, store.core.id_index)
        hashes = id_hashes_of_bytes(covered.id_bytes())
        hashes.sort()
        reader.set_id_hashes(hashes)
        with store.core.manifest_lock:
            manifest = m.advanced(info, last, last_term, chain, now_us(), consumers)
            from walship.storage.manifest import save_manifest

            save_manifest(store.checkpoint_dir, manifest)
            with store.core.lock:
                # a new memtable for what follows the part; the old one is left as it is,
                # for the readers whose view holds it (with the parts before this one)
                _, fresh = store.core.active.split_at(last)
                fresh.created_us = now_us()
                store.core.active = fresh
                store.core.manifest = manifest
                store.core.parts.append(reader)
                store.core.parts_adopted += 1
                store.core.checkpoint_done.notify_all()
    store.write_amp.checkpointed(info)
    store.core.update_memtable_gauges()
    store.checkpoints.remove_checkpointed_wal()


def adopt_merge(
    store: Store, staged: Path, info: PartInfo, replaces: list[PartInfo], digest: bytes
) -> None:
    """Swap the leader's merged part in for the parts it merged.

    Those are the ones this node holds (same files, same sha256s, consecutive in its
    manifest) when it installed the leader's parts all along. When its parts there are its
    own instead (a fallback checkpoint, a refused part rebuilt from its WAL), the merged
    part still goes in for them when they cover exactly its range, hold the same number of
    events and its rows are at exactly their lsns: the follower's layout comes back to the
    leader's rather than drifting from it for good.
    """
    with store.core.compaction_lock:
        m = store.core.manifest
        held = _parts_spanning(m.parts, info)
        if held is None:
            raise PartRejected(
                f"merged part {info.file}: this node's parts do not line up with its range "
                f"{info.first_lsn}..{info.last_lsn}"
            )
        if info.events != sum(p.events for p in held):
            raise PartRejected(
                f"merged part {info.file}: {info.events} events, but this node holds "
                f"{sum(p.events for p in held)} there"
            )
        if held == replaces:
            verify_part_file(staged, info, digest=digest)
        elif any(p.file == info.file for p in held):
            raise PartRejected(f"merged part {info.file}: this node holds that range in one part")
        else:
            lsns = np.concatenate(
                [_part_lsns(store.parts_dir / p.file, p) for p in held] or [np.empty(0, np.int64)]
            )
            verify_part_file(staged, info, digest=digest, lsns=np.sort(lsns))
        path = store.parts_dir / info.file
        os.replace(staged, path)
        fsync_dir(store.parts_dir)
        store.parts.replace_parts(
            {p.file for p in held}, [(info, PartReader(path, info, store.core.id_index))]
        )
        store.core.parts_adopted += 1
    store.parts.collect_garbage()


def _parts_spanning(parts: list[PartInfo], info: PartInfo) -> list[PartInfo] | None:
    """The consecutive parts that begin at ``info``'s first lsn and end at its last; None
    when no run of them covers exactly that range."""
    firsts = [p.first_lsn for p in parts]
    if info.first_lsn not in firsts:
        return None
    start = firsts.index(info.first_lsn)
    for end in range(start, len(parts)):
        if parts[end].last_lsn == info.last_lsn:
            return parts[start : end + 1]
        if parts[end].last_lsn > info.last_lsn:
            return None
    return None


def _part_lsns(path: Path, info: PartInfo) -> np.ndarray:
    """The lsn column of this node's part ``info``."""
    try:
        column = pq.read_table(path, columns=["lsn"]).column("lsn")
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise PartRejected(f"this node's part {info.file} is not readable: {exc}") from exc
    return np.asarray(column.to_numpy(), dtype=np.int64)
