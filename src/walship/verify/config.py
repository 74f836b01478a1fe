"""What one ``walship verify`` run does: cluster size, duration, seed, faults, ack mode."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from walship.errors import InvalidInput

FAULT_KINDS = (
    "kill",
    "restart",
    "partition",
    "delay",
    "corrupt",
    "pause",
    "failover",
    "rejoin",
    "acker_down",
)
"""Every fault the scheduler knows, in the order ``--faults`` documents them."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration_s(text: str) -> float:
    """Seconds in ``60s``, ``1.5m``, ``500ms`` or a bare number of seconds; InvalidInput else."""
    match = _DURATION.match(text)
    if match is None:
        raise InvalidInput(f"duration must look like 60s, 2m or 500ms, not {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def parse_faults(text: str) -> tuple[str, ...]:
    """The fault kinds in a comma-separated list (``all`` for every one, ``none`` for none)."""
    text = text.strip()
    if text in ("all", ""):
        return FAULT_KINDS if text == "all" else ()
    if text == "none":
        return ()
    kinds: list[str] = []
    for part in text.split(","):
        kind = part.strip()
        if kind not in FAULT_KINDS:
            raise InvalidInput(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


@dataclass(frozen=True)
class VerifyConfig:
    """One verify run. Defaults are what ``walship verify`` runs without flags."""

    nodes: int = 3
    duration_s: float = 60.0
    seed: int = 1
    faults: tuple[str, ...] = FAULT_KINDS
    ack_mode: str = "semi-sync"
    fsync: str = "always"
    writers: int = 4
    entities: int = 8
    batch_events_max: int = 5
    root: Path | None = None
    """Where the nodes' data dirs and logs go; a temporary directory when None."""
    keep: bool = False
    """Keep ``root`` after a passing run (a failing run always keeps it)."""
    server_module: str = "walship"
    """The module each node runs as ``python -m MODULE serve ...``: another build of the
    server, such as a deliberately broken one that verify must catch."""
    server_env: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 5.0
    ack_timeout_ms: int = 1_000
    converge_timeout_s: float = 60.0
    fault_hold_s: tuple[float, float] = (0.5, 2.5)
    fault_gap_s: tuple[float, float] = (0.3, 1.5)
    segment_bytes_max: int = 4 * 1024 * 1024
    memtable_events_max: int = 5_000
    checkpoint_interval_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 9:
            raise InvalidInput("--nodes must be 1..9")
        if self.duration_s <= 0:
            raise InvalidInput("--duration must be positive")
        if self.writers < 1:
            raise InvalidInput("--writers must be at least 1")
        for kind in self.faults:
            if kind not in FAULT_KINDS:
                raise InvalidInput(f"unknown fault {kind!r}")
