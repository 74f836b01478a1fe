"""Offline simulation of the store's compaction policy over a long ingest (issue 15, item 3).

Feeds checkpoint parts, one after another, through the product's own ``pick_run`` with the
product's limits, and applies every merge it asks for at once, as the compactor thread would
with time to spare; no file is written, so 50,000,000 events take a second or two. Per window
of ``--window`` events it reports the events and bytes the merges wrote (the merge work a
node pays for in that window), the merges, the largest merge, and the parts a query must
open at the window's end (a read by entity reads one row group per part). At the end: the
write amplification (Parquet writes per event, checkpoint included) and the compaction
rewrites per event, the figures ``/api/v1/stats`` gives for a real node.

Checkpoint sizes default to the sustained benchmark's (~28,500 events of ~1.1 KB in a 32 MiB
memtable); ``--jitter`` varies them at random (seeded: ``--seed``) as a loaded node's timer
and memtable budget do. Bytes are events times ``--part-bytes-per-event`` (260: the sustained
run's Parquet size per event).

    python benchmarks/compaction_sim.py [--events 50000000] [--window 1000000]
        [--checkpoint-events 28500] [--jitter 0.5] [--seed 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walship.limits import Limits
from walship.storage.compaction import pick_run
from walship.storage.parquet import PartInfo


def part(first: int, last: int, bytes_per_event: int) -> PartInfo:
    """A part's manifest entry as ``pick_run`` sees it (only lsns and sizes matter)."""
    events = last - first + 1
    return PartInfo(
        file=f"{first:016x}-{last:016x}.parquet", first_lsn=first, last_lsn=last,
        events=events, bytes=events * bytes_per_event, sha256="",
        min_ts_us=0, max_ts_us=0, row_groups=[],
    )  # fmt: skip


Policy = Callable[[list[PartInfo], int, int], "tuple[int, int] | None"]


def settled(p: PartInfo, limits: Limits) -> bool:
    """A part ``pick_run`` never merges again: more than half of ``compaction_events_max``."""
    return 2 * p.events > limits.compaction_events_max


@dataclass
class Window:
    """What the merges did while one window of events was checkpointed."""

    index: int
    checkpointed_events: int = 0
    merge_events: int = 0
    merge_bytes: int = 0
    merges: int = 0
    largest_merge_events: int = 0
    parts_at_end: int = 0
    most_parts: int = 0

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Simulation:
    """The parts and counters of one simulated ingest."""

    limits: Limits
    bytes_per_event: int
    policy: Policy = pick_run
    parts: list[PartInfo] = field(default_factory=list)
    last_lsn: int = 0
    checkpointed: int = 0
    rewritten: int = 0
    most_parts: int = 0

    def checkpoint(self, events: int, window: Window) -> None:
        """A checkpoint of ``events`` events, then every merge the policy picks."""
        self.parts.append(part(self.last_lsn + 1, self.last_lsn + events, self.bytes_per_event))
        self.last_lsn += events
        self.checkpointed += events
        window.checkpointed_events += events
        window.most_parts = max(window.most_parts, len(self.parts))
        limits = self.limits
        while (run := self.policy(self.parts, limits.compaction_fanin_min,
                                  limits.compaction_events_max)) is not None:  # fmt: skip
            start, end = run
            if end - start < 2:
                raise AssertionError(f"the policy chose a merge of one part: {run}")
            if any(settled(p, limits) for p in self.parts[start:end]):
                # what keeps the merge work per window flat: history is never merged again
                raise AssertionError(f"the policy merges a settled part again: {run}")
            merged = part(self.parts[start].first_lsn, self.parts[end - 1].last_lsn,
                          self.bytes_per_event)  # fmt: skip
            self.parts[start:end] = [merged]
            self.rewritten += merged.events
            window.merge_events += merged.events
            window.merge_bytes += merged.bytes
            window.merges += 1
            window.largest_merge_events = max(window.largest_merge_events, merged.events)
        self.most_parts = max(self.most_parts, window.most_parts)
        window.parts_at_end = len(self.parts)

    @property
    def write_amplification(self) -> float:
        return (self.checkpointed + self.rewritten) / self.checkpointed

    @property
    def rewrites_per_event(self) -> float:
        return self.rewritten / self.checkpointed


def simulate(
    events: int,
    window: int,
    checkpoint_events: int,
    *,
    jitter: float = 0.0,
    seed: int = 15,
    limits: Limits | None = None,
    bytes_per_event: int = 260,
    policy: Policy = pick_run,
) -> tuple[Simulation, list[Window]]:
    """Run ``events`` events in checkpoints of about ``checkpoint_events`` (times a factor in
    ``1 ± jitter``) through the policy: the simulation and its windows."""
    rng = random.Random(seed)
    sim = Simulation(limits or Limits(), bytes_per_event, policy)
    windows: list[Window] = [Window(1)]
    done = 0
    while done < events:
        size = checkpoint_events
        if jitter:
            size = max(1, round(checkpoint_events * rng.uniform(1 - jitter, 1 + jitter)))
        size = min(size, events - done)
        if done // window + 1 > len(windows):
            windows.append(Window(len(windows) + 1))
        sim.checkpoint(size, windows[-1])
        done += size
    return sim, windows


def report(sim: Simulation, windows: list[Window], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "compaction_sim",
        "events": sim.checkpointed,
        "window_events": args.window,
        "checkpoint_events": args.checkpoint_events,
        "jitter": args.jitter,
        "seed": args.seed,
        "compaction_fanin_min": sim.limits.compaction_fanin_min,
        "compaction_events_max": sim.limits.compaction_events_max,
        "write_amplification": round(sim.write_amplification, 3),
        "compaction_rewrites_per_event": round(sim.rewrites_per_event, 3),
        "parts_at_end": len(sim.parts),
        "most_parts": sim.most_parts,
        "windows": [w.as_row() for w in windows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--events", type=int, default=50_000_000)
    ap.add_argument("--window", type=int, default=1_000_000)
    ap.add_argument("--checkpoint-events", type=int, default=28_500)
    ap.add_argument("--jitter", type=float, default=0.0, help="checkpoint sizes vary ±this")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--part-bytes-per-event", type=int, default=260)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    if args.events < 1 or args.window < 1 or args.checkpoint_events < 1:
        ap.error("--events, --window and --checkpoint-events must be positive")
    if not 0 <= args.jitter < 1:
        ap.error("--jitter must be in [0, 1)")
    sim, windows = simulate(args.events, args.window, args.checkpoint_events,
                            jitter=args.jitter, seed=args.seed,
                            bytes_per_event=args.part_bytes_per_event)  # fmt: skip
    out = report(sim, windows, args)
    print(f"{'window':>6} {'merge events':>13} {'merge MB':>9} {'merges':>6} "
          f"{'largest':>8} {'parts':>5}")  # fmt: skip
    for w in windows:
        print(f"{w.index:>6} {w.merge_events:>13,} {w.merge_bytes / 1e6:>9.1f} {w.merges:>6} "
              f"{w.largest_merge_events:>8,} {w.parts_at_end:>5}")  # fmt: skip
    print(f"write amplification {out['write_amplification']} (compaction rewrites per event "
          f"{out['compaction_rewrites_per_event']}); parts at the end {out['parts_at_end']}, "
          f"at most {out['most_parts']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
