"""``walship verify``: a fault-injection checker that acknowledged writes survive.

It starts a leader and followers as real ``walship serve`` processes on 127.0.0.1, each
follower's replication link through a fault-injecting proxy, runs a concurrent write workload
while a seeded schedule kills, restarts, pauses, partitions, delays and corrupts, then heals
everything, waits for the cluster to converge and checks the history against every node's
log. Layered on top: ``history`` ← ``cluster`` ← ``workload``/``faults`` ← ``checker`` ←
``report`` ← ``run``; the CLI command is in ``walship.cli.verify``.
"""

from __future__ import annotations

from walship.verify.config import FAULT_KINDS, VerifyConfig
from walship.verify.run import run_verify

__all__ = ["FAULT_KINDS", "VerifyConfig", "run_verify"]
