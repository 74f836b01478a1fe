"""An outside reader for tests/test_history.py: counts a data dir's history with DuckDB and
pyarrow through ``walship.history`` in its own process, until a stop file appears.

One JSON line per round on stdout: the round's start and end (``time.monotonic``, which is
one clock for every process on the machine), what the pinned manifest says, and the counts
DuckDB and pyarrow gave -- or the error that broke the round.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb

from walship import history


def main(data_dir: Path, stop_file: Path) -> None:
    con = duckdb.connect()
    print(json.dumps({"ready": True}), flush=True)
    while not stop_file.exists():
        t0 = time.monotonic()
        try:
            snap = history.duckdb_view(con, data_dir)  # moves the view to the newest checkpoint
            rows, lsns, top = con.execute(
                "SELECT count(*), count(DISTINCT lsn), coalesce(max(lsn), 0) FROM events"
            ).fetchone()
            # long enough for a compaction to delete parts this view reads
            time.sleep(0.05)
            again = con.execute("SELECT count(*) FROM events").fetchone()[0]
            arrow = snap.dataset().count_rows()
            line = {
                "t0": t0,
                "t1": time.monotonic(),
                "rows": rows,
                "lsns": lsns,
                "max_lsn": top,
                "again": again,
                "arrow": arrow,
                "events": snap.events,
                "last_lsn": snap.last_lsn,
            }
        except Exception as exc:
            line = {"t0": t0, "t1": time.monotonic(), "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
