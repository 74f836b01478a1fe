"""One verify run from start to report: start, exercise, heal, converge, collect, check."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from walship.verify.checker import FinalView, RunFacts, run_checks, write_summary
from walship.verify.cluster import ClusterError, VerifyCluster, failover_available, python_env_for
from walship.verify.config import VerifyConfig
from walship.verify.faults import FaultScheduler, settings_for
from walship.verify.history import History
from walship.verify.report import EXIT_OK, Report
from walship.verify.workload import Workload

LINK_FAULTS = ("partition", "delay", "corrupt")
HISTORY_FILE = "history.jsonl"
"""Every request and fault of the run, next to the nodes' data dirs and logs."""

Progress = Callable[[str], None]
Tick = Callable[[float, float, str], None]
"""``(seconds written, seconds to write, what happened so far)``, a few times a second while
the workload runs (a progress bar)."""

TICK_INTERVAL_S = 0.25


def _silent(_: str) -> None:
    pass


def effective_faults(config: VerifyConfig) -> tuple[tuple[str, ...], list[str]]:
    """The fault kinds this run can inject, and a note for each one it has to leave out."""
    kinds = list(config.faults)
    notes: list[str] = []
    if "failover" in kinds and not failover_available():
        kinds.remove("failover")
        notes.append(
            "failover: not available yet in this build (no promote/repoint endpoints); "
            "left out — a killed leader is restarted instead"
        )
    if "rejoin" in kinds and not failover_available():
        kinds.remove("rejoin")
        notes.append("rejoin: needs promote/repoint endpoints, not in this build; left out")
    if "acker_down" in kinds and (config.nodes < 3 or not failover_available()):
        kinds.remove("acker_down")
        notes.append("acker_down: needs two followers and promote/repoint; left out")
    if config.nodes == 1:
        for kind in (*LINK_FAULTS, "failover", "rejoin"):
            if kind in kinds:
                kinds.remove(kind)
                notes.append(f"{kind}: needs a follower; left out with --nodes 1")
    return tuple(kinds), notes


def run_verify(
    config: VerifyConfig, progress: Progress = _silent, tick: Tick | None = None
) -> Report:
    """Run ``config`` and return its report (the cluster is gone when this returns)."""
    kinds, notes = effective_faults(config)
    config = settings_for(config, kinds)
    if config.server_module != "walship":
        env = {**python_env_for(config.server_module), **config.server_env}
        config = _with_env(config, env)
        notes.append(f"nodes run `python -m {config.server_module}`, not walship")
    root = config.root or Path(tempfile.mkdtemp(prefix="walship-verify-"))
    settings = {
        "nodes": config.nodes,
        "duration_s": config.duration_s,
        "faults": list(kinds),
        "ack_mode": config.ack_mode,
        "fsync": config.fsync,
        "writers": config.writers,
        "checkpoint_interval_ms": config.checkpoint_interval_ms,
        "segment_bytes_max": config.segment_bytes_max,
        "server_module": config.server_module,
    }
    report = Report(seed=config.seed, settings=settings, root=str(root), notes=notes)
    history = History()
    cluster = VerifyCluster(config, root, history, failover="failover" in kinds)
    try:
        progress(f"starting {config.nodes} nodes in {root}")
        cluster.start()
        progress(f"writing for {config.duration_s:g} s with faults: {', '.join(kinds) or 'none'}")
        began = history.now()
        scheduler = asyncio.run(_exercise(cluster, history, config, kinds, tick))
        report.run_s = history.now() - began
        report.faults_injected = dict(scheduler.injected)
        report.harness_errors.extend(scheduler.harness_errors)
        progress("healing every link and node, waiting for convergence")
        cluster.heal_all()
        report.convergence_s = cluster.wait_converged(config.converge_timeout_s)
        progress("collecting every node's log and checking")
        leader_id = cluster.require_leader().node_id
        finals = cluster.collect_final()
        facts = RunFacts(
            leader_id=leader_id,
            converged_s=report.convergence_s,
            converge_timeout_s=config.converge_timeout_s,
            failover_used=report.faults_injected.get("failover", 0) > 0,
        )
        report.checks = run_checks(history, finals, facts)
        leader_view = FinalView.of(next(f for f in finals if f.node_id == leader_id))
        report.writes = write_summary(history, leader_view)
        for check in report.checks:
            if not check.passed and check.violations:
                ids = set().union(*(v.event_ids for v in check.violations[:1]))
                report.excerpts[check.name] = history.excerpt(ids)
    except (ClusterError, OSError, RuntimeError) as exc:
        report.harness_errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        cluster.close()
        report.fault_log = [f.brief().strip() for f in history.faults]
        if root.is_dir():
            history.write_jsonl(root / HISTORY_FILE)
        if history.ops and not report.writes:
            report.writes = write_summary(history, None)
    if report.exit_code == EXIT_OK and config.root is None and not config.keep:
        shutil.rmtree(root, ignore_errors=True)
        report.root = f"{root} (removed: the run passed)"
    return report


def _with_env(config: VerifyConfig, env: dict[str, str]) -> VerifyConfig:
    from dataclasses import replace

    return replace(config, server_env=env)


async def _exercise(
    cluster: VerifyCluster,
    history: History,
    config: VerifyConfig,
    kinds: tuple[str, ...],
    tick: Tick | None = None,
) -> FaultScheduler:
    """The workload for ``duration_s`` with the fault schedule running alongside."""
    stop = asyncio.Event()
    scheduler = FaultScheduler(cluster, history, config, kinds)
    began = history.now()
    deadline = began + config.duration_s
    writers = asyncio.create_task(Workload(cluster, history, config).run(stop))
    ticker = None if tick is None else asyncio.create_task(_ticks(tick, history, began, config))
    try:
        await scheduler.run(deadline)
        remaining = deadline - history.now()
        if remaining > 0:
            await asyncio.sleep(remaining)
    finally:
        stop.set()
        await writers
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    if tick is not None:
        tick(config.duration_s, config.duration_s, _so_far(history))
    return scheduler


async def _ticks(tick: Tick, history: History, began: float, config: VerifyConfig) -> None:
    while True:
        tick(min(history.now() - began, config.duration_s), config.duration_s, _so_far(history))
        await asyncio.sleep(TICK_INTERVAL_S)


def _so_far(history: History) -> str:
    return f"{len(history.ops)} requests, {len(history.faults)} faults"
