"""A physical follower that checkpointed itself comes back to the leader's part boundaries.

When a follower's memtable reaches its fallback threshold before the leader's part over those
events arrives (``storage/fallback.py``), it checkpoints itself; the leader's part then
overlaps its own and cannot be appended. Its own parts end where the leader's do not, and a
leader merge is only taken for parts that span exactly its range (``adopt.adopt_merge``): in
the sustained 10M-event run followers ended with 306 parts against the leader's 35.

So such a part is *held* (``HeldParts``: verified like any part from the leader -- size,
sha256, rows, lsn range, and the term and chain of the record at its last lsn against this
node's WAL -- and kept in ``parts-held/``) rather than dropped. As soon as this node's own
parts span exactly the range of one or more consecutive held parts (the follower checkpoints
through the end of each skipped part, so that happens with the next part at the latest), the
held parts go in their place, in one manifest swap (``Store.replace_parts``): the follower's
layout is the leader's again, and the leader's later merges are taken as they come. Before
the swap the held parts' rows are checked against the parts they replace: the same lsns and
the same event ids. Nothing is encoded here.

Bounded: at most ``HELD_PARTS_MAX`` parts are held (the oldest is let go; the store then
keeps its own parts there, merged by its own compaction, ``Store._may_compact``), and held
parts go when the link ends.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pyarrow.parquet as pq

from walship.fsutil import fsync_dir
from walship.limits import Limits
from walship.position import Lsn
from walship.storage.parquet import PartInfo, PartReader
from walship.storage.part_verify import PartRejected, verify_part_file

if TYPE_CHECKING:
    from walship.store import Store

log = logging.getLogger(__name__)

HELD_DIR: Final = "parts-held"
HELD_PARTS_MAX: Final = 16


@dataclass(frozen=True)
class HeldPart:
    """A leader's checkpoint part kept until this node's own parts line up with it."""

    info: PartInfo
    path: Path


class HeldParts:
    """The leader's checkpoint parts this follower could not append, kept to realign with.

    Used from the follower's worker thread (one at a time, like part installs).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = store.data_dir / HELD_DIR
        shutil.rmtree(self.directory, ignore_errors=True)  # what a past link held
        self.directory.mkdir(parents=True, exist_ok=True)
        self.parts: list[HeldPart] = []
        self.realigned = 0  # this node's own parts replaced by held ones
        self.leader_through = 0  # the last lsn the leader's checkpoint parts so far cover
        # this node's WAL is kept past that (store/checkpoints.py), but not before what it had
        # checkpointed when the link began
        self.checkpointed_at_start = store.manifest.last_lsn
        self.dropped = 0  # held parts let go unused
        self._publish()

    def __repr__(self) -> str:
        return f"<HeldParts {len(self.parts)} held, {self.realigned} realigned>"

    def hold(
        self, staged: Path, info: PartInfo, last_term: int, chain: bytes, digest: bytes
    ) -> bool:
        """Keep the leader's checkpoint part ``staged`` once verified; False (nothing kept)
        when this node's WAL no longer holds the record at its last lsn to check it by.
        PartRejected when a check fails."""
        verify_part_file(staged, info, digest=digest)
        log_ = self.store.log
        last = info.last_lsn
        if last > log_.written_lsn.value:
            raise PartRejected(f"part {info.file} ends past this node's log at lsn {last}")
        if log_.first_lsn().value > last:
            return False
        record = next(iter(log_.read_from(Lsn(last))), None)
        if record is None:
            return False
        if record.term != last_term or record.chain != chain:
            raise PartRejected(
                f"part {info.file}: the leader's record at lsn {last} (term {last_term}) is "
                "not this node's: another history"
            )
        path = self.directory / info.file
        os.replace(staged, path)
        self.parts = [p for p in self.parts if p.info.file != info.file]
        self.parts.append(HeldPart(info, path))
        self.parts.sort(key=lambda p: p.info.first_lsn)
        while len(self.parts) > HELD_PARTS_MAX:
            self._drop(self.parts[0])
        self._publish()
        return True

    def realign(self) -> int:
        """Put held parts in place of this node's own parts wherever those span exactly the
        range of consecutive held parts; returns how many held parts went in."""
        done = 0
        while True:
            found = self._next_run()
            if found is None:
                break
            run, own = found
            try:
                if not self._swap(run, own):
                    break  # its compaction merged some of them meanwhile: next time
            except PartRejected as exc:
                log.warning("replication: not realigning with the leader's parts: %s", exc)
                for held in run:
                    self._drop(held)
                continue
            done += len(run)
        self._drop_unusable()
        self._publish()
        return done

    def _next_run(self) -> tuple[list[HeldPart], list[PartInfo]] | None:
        """The first run of consecutive held parts whose range this node's parts span
        exactly (none of them the held parts themselves), with those parts."""
        parts = self.store.manifest.parts
        starts = {p.first_lsn: i for i, p in enumerate(parts)}
        ends = {p.last_lsn: i for i, p in enumerate(parts)}
        names = {p.file for p in parts}
        held = self.parts
        for i, first in enumerate(held):
            start = starts.get(first.info.first_lsn)
            if start is None:
                continue
            for j in range(i, len(held)):
                if held[j].info.file in names or (
                    j > i and held[j].info.first_lsn != held[j - 1].info.last_lsn + 1
                ):
                    break
                end = ends.get(held[j].info.last_lsn)
                if end is not None and end >= start:
                    return held[i : j + 1], parts[start : end + 1]
        return None

    def _swap(self, run: list[HeldPart], own: list[PartInfo]) -> bool:
        """Put ``run`` in place of ``own``, verified; False when ``own`` changed meanwhile."""
        store = self.store
        core = store.core
        with core.compaction_lock:
            if not {p.file for p in own} <= {p.file for p in core.manifest.parts}:
                return False
            events = sum(p.events for p in own)
            if events != sum(h.info.events for h in run):
                raise PartRejected(
                    f"held parts {run[0].info.file}..{run[-1].info.file}: "
                    f"{sum(h.info.events for h in run)} events, but this node holds {events} "
                    "there"
                )
            with core.lock:
                readers = {r.info.file: r for r in core.parts}
            own_readers = [readers[p.file] for p in own]
            lsns = np.sort(np.concatenate([_lsns(r.path, r.info) for r in own_readers]))
            ids = np.sort(np.concatenate([r.id_hashes() for r in own_readers]))
            new: list[tuple[PartInfo, PartReader]] = []
            at = 0
            for held in run:
                info = held.info
                upto = int(np.searchsorted(lsns, info.last_lsn, side="right"))
                verify_part_file(
                    held.path, info, digest=bytes.fromhex(info.sha256), lsns=lsns[at:upto]
                )
                at = upto
                new.append((info, PartReader(held.path, info)))
            theirs = np.sort(np.concatenate([r.id_hashes() for _, r in new]))
            if not np.array_equal(ids, theirs):
                raise PartRejected(
                    f"held parts {run[0].info.file}..{run[-1].info.file}: not the events this "
                    "node holds there"
                )
            placed: list[tuple[PartInfo, PartReader]] = []
            for (info, reader), held in zip(new, run, strict=True):
                path = store.parts_dir / info.file
                os.replace(held.path, path)
                moved = PartReader(path, info, core.id_index)
                moved.set_id_hashes(reader.id_hashes())
                placed.append((info, moved))
            fsync_dir(store.parts_dir)
            store.parts.replace_parts({p.file for p in own}, placed)
            core.parts_adopted += len(run)
        store.parts.collect_garbage()
        for held in run:
            self.parts.remove(held)
        self.realigned += len(own)
        log.info(
            "replication: %d part(s) of this node's own at lsn %d..%d replaced by the leader's "
            "%d (its layout is the leader's again)",
            len(own),
            own[0].first_lsn,
            own[-1].last_lsn,
            len(run),
        )
        return True

    def merged(self, info: PartInfo) -> None:
        """The leader's merge ``info`` went in: held parts in its range are not needed (put
        in place of it they would undo it)."""
        for held in list(self.parts):
            if info.first_lsn <= held.info.first_lsn and held.info.last_lsn <= info.last_lsn:
                self._drop(held)

    def _drop_unusable(self) -> None:
        """Let go of held parts that can no longer line up. Parts come from the leader in
        lsn order, so a run of consecutive held parts can only grow at its end, and this
        node's parts only lose boundaries (merges) behind its last checkpoint: a run that
        does not begin where one of its parts begins never will (a merge of its own took
        that boundary), and a held part with the very range of one of its parts is not
        needed (that boundary is the leader's already)."""
        parts = self.store.manifest.parts
        starts = {p.first_lsn for p in parts}
        names = {p.file for p in parts}
        begins, prev_last = False, None
        for held in list(self.parts):
            if prev_last is None or held.info.first_lsn != prev_last + 1:
                begins = held.info.first_lsn in starts  # a new run of held parts
            prev_last = held.info.last_lsn
            if not begins or held.info.file in names:
                self._drop(held)

    def _drop(self, held: HeldPart) -> None:
        if held in self.parts:
            self.parts.remove(held)
        held.path.unlink(missing_ok=True)
        self.dropped += 1
        self._publish()

    def came(self, info: PartInfo) -> None:
        """The leader's checkpoint part ``info`` arrived (installed, held or not)."""
        self.leader_through = max(self.leader_through, info.last_lsn)
        self._publish()

    def _publish(self) -> None:
        """Tell the store's compaction how far its own parts may be merged: not into the
        range of a held part (it would take the boundaries the held part needs), nor past
        the leader's parts received (the next may still line up with them)."""
        through = self.leader_through
        if self.parts:
            through = min(through, self.parts[0].info.first_lsn - 1)
        self.store.core.own_merges_through = through
        self.store.core.leader_parts_through = max(self.leader_through, self.checkpointed_at_start)

    def close(self) -> None:
        """Let every held part go (the link ended)."""
        self.parts.clear()
        self._publish()
        shutil.rmtree(self.directory, ignore_errors=True)


def _lsns(path: Path, info: PartInfo) -> np.ndarray:
    """The lsn column of this node's part ``info``."""
    try:
        column = pq.read_table(path, columns=["lsn"]).column("lsn")
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise PartRejected(f"this node's part {info.file} is not readable: {exc}") from exc
    return np.asarray(column.to_numpy(), dtype=np.int64)


def follower_may_merge(
    parts: Sequence[PartReader],
    run: tuple[int, int],
    own: set[str],
    through: int,
    limits: Limits,
) -> bool:
    """Whether a physical follower merges ``run`` (picked by ``compaction.pick_run``) itself
    instead of waiting for the leader's merge.

    Yes when the run holds a part of its own that no held part replaced: its layout left the
    leader's there, so the leader's merges of that range may never line up, and waiting for
    them let the sustained run's followers pile up 306 parts -- but not while the leader's
    parts over it may still put it right: no part of its own in the run may end past
    ``through`` (what the leader's parts received so far cover, short of any held part's
    range; ``HeldParts.merges_through``). Yes too when it holds more
    parts not yet settled than the leader's policy ever leaves (``4 * compaction_fanin_min``,
    its cap): its layout left the leader's elsewhere. Else the leader's merge of the same run
    comes as a part, and encoding it here would be the work physical followers save.
    """
    inputs = parts[run[0] : run[1]]
    mine = [p for p in inputs if p.info.file in own]
    if mine and all(p.info.last_lsn <= through for p in mine):
        return True
    unsettled = sum(1 for p in parts if 2 * p.info.events <= limits.compaction_events_max)
    return unsettled >= 4 * limits.compaction_fanin_min
