"""Parts' id indexes live in files beside the parts, memory-mapped, not in the node's heap
(storage/id_index.py): the store's memory no longer grows by 8 bytes for every event ever
stored, and idempotent appends still find every stored id -- after checkpoints, merges and a
restart, and whatever state the index files are found in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_event
from walship.errors import IdConflict
from walship.limits import Limits
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


def _open(path: Path) -> Store:
    limits = Limits(compaction_fanin_min=2, parquet_row_group_rows=16)
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=limits,
                                  checkpoints=False))  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = _open(tmp_path / "data")
    try:
        yield s
    finally:
        s.close()


def _fill(store: Store, parts: int, events: int) -> list[uuid.UUID]:
    ids = []
    for p in range(parts):
        batch = []
        for i in range(events):
            ids.append(uuid.uuid4())
            batch.append(make_event(f"e{i % 5}", id=ids[-1], payload={"p": p, "i": i}))
        store.append_batch(batch)
        store.checkpoint()
    return ids


def _stored_once(store: Store, ids: list[uuid.UUID]) -> None:
    """Every id is found: sent again with its content, a duplicate; with other content, refused."""
    for n, event_id in enumerate(ids):
        p, i = divmod(n, len(ids) // 2)
        receipt = store.append(make_event(f"e{i % 5}", id=event_id, payload={"p": p, "i": i}))
        assert receipt.duplicate, n
    with pytest.raises(IdConflict):
        store.append(make_event("other", id=ids[3]))


def test_checkpoint_and_merge_indexes_are_mapped_files_not_heap(store: Store) -> None:
    ids = _fill(store, 2, 40)
    for reader in store.core.parts:
        hashes = reader.id_hashes()
        assert isinstance(hashes, np.memmap), type(hashes)  # in the page cache, not the heap
        assert store.core.id_index.path(reader.info.file).exists()
    merged = store.compact()
    assert merged is not None and merged.events == 80
    (reader,) = store.core.parts
    assert isinstance(reader.id_hashes(), np.memmap)
    assert len(reader.id_hashes()) == 80
    # the merged-away parts' index files went with them
    assert sorted(p.name for p in store.core.id_index.directory.iterdir()) == [merged.file + ".ids"]
    _stored_once(store, ids)


def test_index_files_are_read_after_a_restart_and_rebuilt_when_they_do_not_match(
    tmp_path: Path,
) -> None:
    store = _open(tmp_path / "data")
    ids = _fill(store, 2, 30)
    parts = [p.info for p in store.core.parts]
    store.close()
    index = tmp_path / "data" / "checkpoints" / "ids"
    first, second = (index / (p.file + ".ids") for p in parts)
    # one file damaged (a flipped byte in the hashes), one of another part, a stray one
    raw = bytearray(first.read_bytes())
    raw[-3] ^= 0xFF
    first.write_bytes(bytes(raw))
    second.write_bytes(second.read_bytes()[:64] + np.zeros(30, "<i8").tobytes())
    (index / "0000000000000900-0000000000000999.parquet.ids").write_bytes(b"junk")
    (index / "x.parquet.ids.tmp").write_bytes(b"junk")

    store = _open(tmp_path / "data")
    try:
        assert sorted(p.name for p in index.iterdir()) == sorted([first.name, second.name])
        _stored_once(store, ids)  # the bad files were not believed
        for reader in store.core.parts:
            assert isinstance(reader.id_hashes(), np.memmap)
        assert first.read_bytes() != bytes(raw)  # written again from the part's id column
    finally:
        store.close()


def test_a_store_whose_index_cannot_be_written_keeps_it_in_memory(tmp_path: Path) -> None:
    """The index is derived data: a directory it cannot write (here a file in its way, as a
    full disk would fail it) costs memory, never a checkpoint or an idempotent answer."""
    store = _open(tmp_path / "data")
    try:
        assert not store.core.id_index.directory.exists()  # made by the first index written
        store.core.id_index.directory.write_bytes(b"in the way")
        ids = _fill(store, 2, 20)
        assert store.checkpoints_taken == 2
        for reader in store.core.parts:
            hashes = reader.id_hashes()
            assert not isinstance(hashes, np.memmap) and len(hashes) == 20
        _stored_once(store, ids)
    finally:
        store.close()
