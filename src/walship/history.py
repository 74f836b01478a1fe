"""Consistent reads of the Parquet history for DuckDB, Polars and pyarrow, from any process.

::

    from walship import history

    with history.open_snapshot("walship-data") as snap:     # pins one checkpoint
        con = duckdb.connect()
        snap.duckdb_view(con)                                # a view named "events"
        con.sql("SELECT event_type, count(*) FROM events GROUP BY 1").show()
        table = snap.dataset().to_table(filter=pc.field("entity_id") == "acct-1")  # pyarrow
        frame = polars.scan_parquet(snap.files).collect()                          # Polars

A snapshot is the parts of one checkpoint manifest: every event with lsn <= ``last_lsn``,
each exactly once, readable until the snapshot is closed however the node checkpoints and
compacts meanwhile (``storage.pins`` says how). Events after the last checkpoint are still in
the node's memtable and WAL; ``walship checkpoint`` (or ``POST /internal/checkpoint``) writes
them out first when a reader needs them. Never glob ``checkpoints/parts/*.parquet``: a merged
part sits beside the parts it replaced for a moment (rows counted twice), and a part can be
deleted between the listing and the read.

Reading needs write access to ``DATA_DIR/readers/`` (where the pins live), not the data dir's
lock: a node keeps running while its history is read. Where ``fs.protected_hardlinks`` is on
(most Linux systems) the reader runs as the node's user, who owns the part files it links.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from walship.limits import DEFAULT_LIMITS
from walship.storage.manifest import CheckpointManifest
from walship.storage.parquet import SCHEMA
from walship.storage.pins import HistoryPin, pin_history

if TYPE_CHECKING:
    import pyarrow.dataset as ds

__all__ = ["SCHEMA", "HistorySnapshot", "duckdb_view", "files", "open_snapshot"]

VIEW_NAME = "events"

_DUCKDB_TYPES = {
    pa.int64(): "BIGINT",
    pa.string(): "VARCHAR",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB",
}

# the snapshots behind each DuckDB connection's views, by view name: a view lives as long as
# its connection, so its pin does too (unless closed first), and replacing a view releases
# the pin of the one it replaced
_VIEWS: weakref.WeakKeyDictionary[Any, dict[str, HistorySnapshot]] = weakref.WeakKeyDictionary()


class HistorySnapshot:
    """The Parquet parts of one checkpoint, pinned until ``close``."""

    def __init__(self, data_dir: Path, pin: HistoryPin) -> None:
        self.data_dir = data_dir
        self._pin = pin

    @property
    def manifest(self) -> CheckpointManifest:
        return self._pin.manifest

    @property
    def last_lsn(self) -> int:
        """The snapshot holds every event with an lsn up to this one (0: none yet)."""
        return self._pin.manifest.last_lsn

    @property
    def last_term(self) -> int:
        return self._pin.manifest.last_term

    @property
    def events(self) -> int:
        """How many events the snapshot's parts hold, by the manifest."""
        return self._pin.manifest.events

    @property
    def files(self) -> list[Path]:
        """The pinned part files, in lsn order; readable until ``close``."""
        return list(self._pin.files)

    @property
    def closed(self) -> bool:
        return self._pin.released

    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset over the snapshot (empty, with the schema, before a checkpoint)."""
        import pyarrow.dataset as ds

        return ds.dataset([str(f) for f in self._pin.files], schema=SCHEMA, format="parquet")

    def duckdb_view(self, con: Any, name: str = VIEW_NAME) -> None:
        """(Re)define the temporary view ``name`` on the DuckDB connection ``con``.

        The connection keeps this snapshot pinned while the view exists; defining ``name``
        again from a newer snapshot releases this one.
        """
        if self.closed:
            raise ValueError("the snapshot is closed")
        con.execute(f"CREATE OR REPLACE TEMP VIEW {_quote_name(name)} AS {self._select_sql()}")
        views = _VIEWS.setdefault(con, {})
        previous = views.get(name)
        views[name] = self
        if previous is not None and previous is not self:
            previous.close()

    def _select_sql(self) -> str:
        if not self._pin.files:
            # read_parquet refuses an empty list: an empty relation with the same columns
            columns = ", ".join(
                f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS {_quote_name(f.name)}" for f in SCHEMA
            )
            return f"SELECT {columns} WHERE false"
        paths = ", ".join(_quote_text(str(f)) for f in self._pin.files)
        # by name: a part written before a column existed (tenant_position, payload_binary,
        # payload_bytes) lacks it, and DuckDB otherwise takes the first file's columns and
        # drops the newer ones
        return f"SELECT * FROM read_parquet([{paths}], union_by_name=true)"  # noqa: S608

    def close(self) -> None:
        """Release the pin: the files may go once no other snapshot holds them. Idempotent."""
        self._pin.release()

    def __enter__(self) -> HistorySnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "OPEN"
        return (
            f"<HistorySnapshot {state} {self.data_dir} lsn<={self.last_lsn} "
            f"{self.events} events in {len(self._pin.files)} parts>"
        )


def open_snapshot(
    data_dir: str | Path, *, timeout_ms: int = DEFAULT_LIMITS.history_pin_timeout_ms
) -> HistorySnapshot:
    """Pin the latest checkpoint of a node's data dir (the node may be running).

    NotFound when ``data_dir`` is not a walship data dir; StorageError when no pin can be
    made there (see ``storage.pins``); Unavailable when none could be made in ``timeout_ms``.
    """
    path = Path(data_dir)
    return HistorySnapshot(path, pin_history(path, timeout_ms))


@contextmanager
def files(data_dir: str | Path) -> Iterator[list[Path]]:
    """The part files of the latest checkpoint, readable for the ``with`` block."""
    with open_snapshot(data_dir) as snap:
        yield snap.files


def duckdb_view(con: Any, data_dir: str | Path, name: str = VIEW_NAME) -> HistorySnapshot:
    """Define the temporary view ``name`` over the latest checkpoint of ``data_dir``.

    The snapshot stays pinned as long as ``con`` (or until closed, or until the view is
    defined again, which moves it to the newest checkpoint); it is returned for its
    ``last_lsn`` and to close early.
    """
    snap = open_snapshot(data_dir)
    try:
        snap.duckdb_view(con, name)
    except BaseException:
        snap.close()
        raise
    return snap


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
