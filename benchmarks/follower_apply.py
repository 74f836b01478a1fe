"""Follower apply, in-process: the CPU a follower spends per event on the replication hot path.

A leader store ingests ``--events`` ~1 KB events (batches of 1,000, fsync always: its CPU per
event for those appends is reported as ``leader``); its WAL is read back as
the leader ships it (``WalCursor`` frames of at most ``--frame-kib``) and encoded as the wire
stream. A follower store (fresh data dir, fsync always, memtable large enough that no
checkpoint runs in the window) then takes the stream the way ``Follower.step`` does: the frame
decoder is fed 256 KiB reads, each ``WalBatch`` goes through ``Follower._decode_and_apply``
(verify, hold/cut atomic appends, ``Store.apply_frame``: WAL append and memtable indexing), and
the run ends when the WAL has written the last record.

Reported per event (µs of CPU): ``receive`` (frame decoding), ``verify_apply`` (the rest of the
main thread), the WAL writer thread, and the whole process. Nothing else runs in the process,
so these are the follower's event-loop, applying and WAL-writer figures without the network or
the checkpoint. Compare builds A/B in alternating runs on a shared machine:
``PYTHONPATH=/other/src python benchmarks/follower_apply.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from common import event
from walship.events import EventIn
from walship.limits import DEFAULT_LIMITS
from walship.replication.config import ReplicationConfig
from walship.replication.follower import Follower
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import (
    WAL_BATCH_OVERHEAD_BYTES,
    FrameDecoder,
    WalBatch,
    encode_parts,
)
from walship.store import Store, StoreConfig
from walship.wal.cursor import WalCursor

READ_BYTES = 256 * 1024
_NO_CHECKPOINT = replace(DEFAULT_LIMITS, memtable_events_max=10_000_000, memtable_bytes_max=1 << 40)


def _thread_cpu_s(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process (0 when it is gone)."""
    if native_id is None:
        return 0.0
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer_id() -> int | None:
    for t in threading.enumerate():
        if t.name == "walship-wal-writer":
            return t.native_id
    return None


def leader_stream(
    root: Path, n: int, frame_bytes: int
) -> tuple[list[bytes], int, dict[str, float]]:
    """The wire bytes a leader ships for ``n`` events, in 256 KiB reads; the last lsn; and
    the leader's CPU per event for the appends (batches of 1,000, fsync always, memtable
    large enough that no checkpoint runs)."""
    leader = Store.open(StoreConfig(root / "leader", limits=_NO_CHECKPOINT))
    pool = [
        [
            msgspec.json.decode(msgspec.json.encode(event(b * 1000 + i)), type=EventIn)
            for i in range(1000)
        ]
        for b in range(8)
    ]
    writer = _writer_id()
    w0, p0, t0 = _thread_cpu_s(writer), time.process_time(), time.thread_time()
    for b in range(n // 1000):
        leader.append_batch(pool[b % len(pool)])
    us = 1e6 / (n // 1000 * 1000)
    cpu = {
        "append_us": round((time.thread_time() - t0) * us, 2),
        "wal_writer_us": round((_thread_cpu_s(writer) - w0) * us, 2),
        "process_us": round((time.process_time() - p0) * us, 2),
    }
    cursor = WalCursor(leader.wal, 1)
    wire = bytearray()
    prev = (0, 0, bytes(8))
    last = leader.wal.written_lsn.value
    while cursor.next_lsn <= last:
        raw = cursor.read_files(frame_bytes - WAL_BATCH_OVERHEAD_BYTES)
        assert raw is not None
        msg = WalBatch(
            term=raw.last_term,
            prev_lsn=prev[0],
            prev_term=prev[1],
            prev_chain=prev[2],
            first_lsn=raw.first_lsn,
            last_lsn=raw.last_lsn,
            leader_lsn=last,
            leader_write_ts_us=0,
            records=raw.data,
        )
        for part in encode_parts(msg, DEFAULT_LIMITS.frame_bytes_max):
            wire += part
        prev = (raw.last_lsn, raw.last_term, raw.last_chain)
    cursor.close()
    leader.close()
    reads = [bytes(wire[i : i + READ_BYTES]) for i in range(0, len(wire), READ_BYTES)]
    return reads, last, cpu


def follower_apply(root: Path, reads: list[bytes], last: int) -> dict[str, Any]:
    """Feed the stream to a fresh follower store; CPU per event by phase."""
    store = Store.open(StoreConfig(root / "follower", limits=_NO_CHECKPOINT))
    config = ReplicationConfig(secret=b"x" * 32, leader="127.0.0.1:1")
    follower = Follower(store, config, ReplicationMetrics(store.metrics.registry), "bench-follower")
    decoder = FrameDecoder(DEFAULT_LIMITS.frame_bytes_max)
    writer = _writer_id()
    w0, p0, t0, wall0 = _thread_cpu_s(writer), time.process_time(), time.thread_time(), 0.0
    receive_s = 0.0
    wall0 = time.perf_counter()
    done = None
    for data in reads:
        r0 = time.thread_time()
        msgs = decoder.feed(data)
        receive_s += time.thread_time() - r0
        for msg in msgs:
            assert isinstance(msg, WalBatch)
            _, _, fut = follower._decode_and_apply(msg)
            done = fut or done
    main_s = time.thread_time() - t0
    assert done is not None
    done.result(timeout=120)
    wall = time.perf_counter() - wall0
    writer_s = _thread_cpu_s(writer) - w0
    process_s = time.process_time() - p0
    assert store.wal.written_lsn.value == last
    store.close()
    us = 1e6 / last
    return {
        "events": last,
        "frames_bytes": sum(map(len, reads)),
        "receive_us": round(receive_s * us, 2),
        "verify_apply_us": round((main_s - receive_s) * us, 2),
        "wal_writer_us": round(writer_s * us, 2),
        "process_us": round(process_s * us, 2),
        "wall_events_per_s": round(last / wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--frame-kib", type=int, default=4096, help="frame budget (catch-up: 4096)")
    ap.add_argument("--repeat", type=int, default=3, help="apply runs; the best is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="walship-apply-") as tmp:
        root = Path(tmp)
        reads, last, leader_cpu = leader_stream(root, args.events, args.frame_kib * 1024)
        runs = []
        for i in range(args.repeat):
            runs.append(follower_apply(root / f"run{i}", reads, last))
        best = min(runs, key=lambda r: r["process_us"])
        out = {"frame_kib": args.frame_kib, "leader": leader_cpu, "best": best, "runs": runs}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
