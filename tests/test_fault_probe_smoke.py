"""Smoke test of ``scripts/fault_probe.py``: a short seeded run starts its three nodes, writes,
subscribes, pauses a follower and ends with every check held (the long runs are by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_probe.py"


def test_fault_probe_short_run_passes(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--duration",
            "2",
            "--seed",
            "3",
            "--faults",
            "pause",
            "--fault-every",
            "1",
            "--data-dir",
            str(tmp_path / "probe"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK seed 3" in out.stdout
