"""Compaction: merge consecutive Parquet parts into one, streaming, in bounded memory.

Each checkpoint adds a part, and a query by entity reads one row group per part, so parts are
merged in the background (``pick_run``: levelled, so that each event is rewritten about once,
into parts of up to ``compaction_events_max`` events). The merge keeps the parts' order
-- rows sorted by (tenant_id, entity_id, lsn) -- and never holds more than the sort keys of its
inputs plus one step of rows (``MERGE_GATHER_BYTES``, and the input row groups they come from)
in memory: it sorts only the keys, then copies rows out a step at a time, reading each input's
row groups in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from walship.fsutil import fsync_dir
from walship.storage.parquet import (
    DICTIONARY_COLUMNS,
    SCHEMA,
    PartInfo,
    PartReader,
    _sha256,
    conform,
    part_name,
    removed_on_error,
)

# Rows a merge gathers per step, in uncompressed bytes: one ``take`` over every input's rows
# per step, not one per input per 1,024-row group. Measured on 16 parts of 28,000 ~1.1 KB
# events (the sustained benchmark's checkpoints): 16,384 rows a step took the merge from
# 11-12 us of CPU per event to ~7; a step never gathers more than this, nor fewer than a row
# group (a part of 1 MiB payloads: one row group at a time, as before).
MERGE_GATHER_BYTES = 32 * 1024 * 1024
MERGE_GATHER_GROUPS_MAX = 16


class _RowSource:
    """Rows of one input part, read row group by row group as the merge asks for them."""

    def __init__(self, reader: PartReader) -> None:
        self.file = pq.ParquetFile(reader.path)
        meta = self.file.metadata
        self.group_starts = np.cumsum(
            [0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        )
        rows = int(self.group_starts[-1])
        raw = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        self.row_bytes = raw / rows if rows else 0.0
        self.cache: dict[int, pa.Table] = {}

    def window(self, first: int, last: int) -> tuple[pa.Table, int]:
        """The row groups holding rows ``first..last`` (ascending calls), conformed, and the
        row of the part at which they start."""
        first_group = int(np.searchsorted(self.group_starts, first, side="right") - 1)
        last_group = int(np.searchsorted(self.group_starts, last, side="right") - 1)
        for g in list(self.cache):
            if g < first_group:
                del self.cache[g]  # consumed: rows come in ascending order
        tables = []
        for g in range(first_group, last_group + 1):
            if g not in self.cache:
                # conformed once per row group, not once per step that reads it
                self.cache[g] = conform(self.file.read_row_group(g, use_threads=False))
            tables.append(self.cache[g])
        window = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return window, int(self.group_starts[first_group])


def gather_rows(sources: list[_RowSource], row_group_rows: int) -> int:
    """Rows a merge step gathers: whole row groups, within ``MERGE_GATHER_BYTES``."""
    row_bytes = max((s.row_bytes for s in sources), default=0.0) or 1.0
    groups = int(MERGE_GATHER_BYTES // (row_bytes * row_group_rows))
    return row_group_rows * max(1, min(groups, MERGE_GATHER_GROUPS_MAX))


def merge_parts(
    directory: Path, readers: list[PartReader], row_group_rows: int
) -> tuple[PartInfo, np.ndarray]:
    """Merge consecutive parts into one new part file, durably.

    Returns its manifest entry and the sorted id-hash index of the merged part. The inputs are
    left in place; the caller swaps the manifest and removes them.
    """
    info = write_merged(directory, readers, row_group_rows)
    return info, merged_id_hashes(readers)


def merged_id_hashes(readers: list[PartReader]) -> np.ndarray:
    """The sorted id-hash index of the part merged from ``readers``."""
    hashes = np.concatenate([r.id_hashes() for r in readers])
    hashes.sort()
    return hashes


def merge_files(directory: str, inputs: list[PartInfo], row_group_rows: int) -> PartInfo:
    """``write_merged`` from plain values, for a worker process (``storage.part_worker``)."""
    path = Path(directory)
    return write_merged(path, [PartReader(path / i.file, i) for i in inputs], row_group_rows)


def write_merged(directory: Path, readers: list[PartReader], row_group_rows: int) -> PartInfo:
    """Write the part merged from ``readers`` (tmp, fsync, rename, fsync dir): its entry."""
    first = readers[0].info.first_lsn
    last = readers[-1].info.last_lsn

    # sort keys as small integers: each row's entity key becomes its rank in the sorted set of
    # all keys, so the whole sort is over int arrays (a few bytes per row), not strings
    def key_column(reader: PartReader) -> tuple[pa.Array, np.ndarray]:
        t = pq.read_table(reader.path, columns=["tenant_id", "entity_id", "lsn"])
        keys = pc.binary_join_element_wise(t.column("tenant_id"), t.column("entity_id"), "\x00")
        return keys.combine_chunks(), t.column("lsn").to_numpy()

    uniques = [pc.unique(key_column(r)[0]) for r in readers]
    dictionary = pc.unique(pa.concat_arrays(uniques))
    dictionary = dictionary.take(pc.sort_indices(dictionary))
    del uniques
    ranks, lsns, srcs_parts, rows_parts = [], [], [], []
    for i, reader in enumerate(readers):
        keys, lsn = key_column(reader)
        ranks.append(pc.index_in(keys, value_set=dictionary).to_numpy(zero_copy_only=False))
        lsns.append(lsn)
        srcs_parts.append(np.full(len(lsn), i, dtype=np.int32))
        rows_parts.append(np.arange(len(lsn), dtype=np.int64))
        del keys
    rank_all = np.concatenate(ranks).astype(np.int64)
    order = np.lexsort((np.concatenate(lsns), rank_all))
    del ranks, lsns
    srcs = np.concatenate(srcs_parts)[order]
    rows = np.concatenate(rows_parts)[order]
    sorted_ranks = rank_all[order]
    del srcs_parts, rows_parts, rank_all, order
    total = len(srcs)
    sources = [_RowSource(r) for r in readers]
    name = part_name(first, last)
    path = directory / name
    tmp = directory / (name + ".tmp")
    groups: list[tuple[str, str]] = []
    min_ts: int | None = None
    max_ts: int | None = None
    step = gather_rows(sources, row_group_rows)
    with removed_on_error(tmp):
        with pq.ParquetWriter(
            tmp, SCHEMA, compression="zstd", use_dictionary=DICTIONARY_COLUMNS
        ) as writer:
            for start in range(0, total, step):
                end = min(start + step, total)
                chunk_src = srcs[start:end]
                chunk_rows = rows[start:end]
                # each input's rows in this step are ascending and contiguous in that input (its
                # rows and the merged order are both sorted by key then lsn): one window of its
                # row groups each, then one take over all the windows restores the merged order
                windows = []
                index = np.empty(end - start, dtype=np.int64)
                base = 0
                for i in np.unique(chunk_src):
                    mask = chunk_src == i
                    wanted = chunk_rows[mask]
                    window, offset = sources[int(i)].window(int(wanted[0]), int(wanted[-1]))
                    index[mask] = wanted - offset + base
                    base += window.num_rows
                    windows.append(window)
                gathered = pa.concat_tables(windows) if len(windows) > 1 else windows[0]
                table = gathered.take(pa.array(index))
                del windows, gathered
                writer.write_table(table, row_group_size=row_group_rows)
                for g in range(start, end, row_group_rows):
                    g_end = min(g + row_group_rows, end)
                    groups.append(
                        (
                            str(dictionary[int(sorted_ranks[g])].as_py()),
                            str(dictionary[int(sorted_ranks[g_end - 1])].as_py()),
                        )
                    )
                ts = table.column("timestamp").cast(pa.int64())
                lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
                min_ts = lo if min_ts is None else min(min_ts, lo)
                max_ts = hi if max_ts is None else max(max_ts, hi)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    fsync_dir(directory)
    return PartInfo(
        file=name,
        first_lsn=first,
        last_lsn=last,
        events=total,
        bytes=path.stat().st_size,
        sha256=digest,
        min_ts_us=min_ts or 0,
        max_ts_us=max_ts or 0,
        row_groups=groups,
    )


def pick_run(parts: list[PartInfo], fanin_min: int, events_max: int) -> tuple[int, int] | None:
    """The run of consecutive parts to merge next, as ``(start, end)`` indexes; None if none.

    Levelled by lsn range, so that a merge writes each event about once (issue 15: the
    size-tiered policy with fan-in 4 rewrote every event ~3 times over 5,000,000 events, and a
    sustained ingest paid for it). A part holding more than half of ``events_max`` is settled:
    never merged again. The other parts fall into runs of consecutive unsettled parts; in each:

    1. fill: once a run holds ``events_max`` events or more, its oldest parts up to
       ``events_max`` become one part -- settled, as each unsettled part has at most half of
       ``events_max``, so what did not fit is less than the half that did;
    2. tier: else the oldest ``fanin_min`` or more consecutive parts of one size class (the
       integer part of ``log(events, fanin_min)``) become one part of a higher class, which
       bounds the unsettled parts to about ``fanin_min - 1`` per class when checkpoints are
       small (a quiet node checkpointing on its timer);
    3. cap: else a run of ``4 * fanin_min`` parts or more (sizes too mixed for rule 2) merges
       its ``fanin_min`` consecutive parts with the fewest events.

    With the default limits and checkpoints of ~27,000 events (32 MiB memtables of ~1.1 KB
    events) rule 2 turns 16 checkpoints into one settled part of ~432,000 events: each event
    is written once by its checkpoint and once by a merge (``tests/test_compaction_policy.py``
    runs 5,000,000 events through this function).
    """

    def unsettled(part: PartInfo) -> bool:
        return 2 * part.events <= events_max

    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, part in enumerate(parts):
        if unsettled(part):
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(parts)))
    for start, end in runs:  # 1. fill
        if sum(p.events for p in parts[start:end]) >= events_max:
            stop, total = start, 0
            while stop < end and total + parts[stop].events <= events_max:
                total += parts[stop].events
                stop += 1
            if stop - start >= 2:
                return start, stop
    fanin = max(fanin_min, 2)
    for start, end in runs:  # 2. tier
        classes = [_size_class(p.events, fanin) for p in parts[start:end]]
        a = start
        while a < end:
            b, total = a, 0  # the parts of a's class that follow it, up to events_max
            while b < end and classes[b - start] == classes[a - start]:
                if total + parts[b].events > events_max:
                    break
                total += parts[b].events
                b += 1
            if b - a >= fanin:
                return a, b
            a = max(b, a + 1)
    best: tuple[int, int] | None = None
    fewest = 0
    for start, end in runs:  # 3. cap
        if end - start < 4 * fanin:
            continue
        for a in range(start, end - fanin + 1):
            total = sum(p.events for p in parts[a : a + fanin])
            if best is None or total < fewest:
                best, fewest = (a, a + fanin), total
    return best


def _size_class(events: int, fanin: int) -> int:
    """``floor(log(events, fanin))``, in integers (no float edge at exact powers)."""
    size_class, bound = 0, fanin
    while bound <= events:
        size_class += 1
        bound *= fanin
    return size_class
