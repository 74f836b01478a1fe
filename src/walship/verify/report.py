"""The result of a verify run: a table for people, JSON for machines, an exit code for CI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from walship.verify.checker import CheckResult

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_HARNESS = 2
"""The harness could not run the workload or the faults as asked; nothing was proved."""

VIOLATIONS_SHOWN = 5


@dataclass
class Report:
    seed: int
    settings: dict[str, Any]
    root: str
    notes: list[str] = field(default_factory=list)
    faults_injected: dict[str, int] = field(default_factory=dict)
    fault_log: list[str] = field(default_factory=list)
    writes: dict[str, Any] = field(default_factory=dict)
    run_s: float = 0.0
    convergence_s: float | None = None
    checks: list[CheckResult] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    excerpts: dict[str, list[str]] = field(default_factory=dict)
    """The history around each failed check's first violation."""

    @property
    def violations(self) -> int:
        return sum(c.violation_count for c in self.checks)

    @property
    def exit_code(self) -> int:
        if self.violations:
            return EXIT_VIOLATION
        if self.harness_errors or not self.checks:
            return EXIT_HARNESS
        return EXIT_OK

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
            "seed": self.seed,
            "settings": self.settings,
            "data_dir": self.root,
            "notes": self.notes,
            "faults_injected": self.faults_injected,
            "faults_total": sum(self.faults_injected.values()),
            "fault_log": self.fault_log,
            "writes": self.writes,
            "run_s": round(self.run_s, 3),
            "convergence_s": None if self.convergence_s is None else round(self.convergence_s, 3),
            "checks": [
                {
                    "name": c.name,
                    "passed": c.passed,
                    "claim": c.claim,
                    "checked": c.checked,
                    "violations": c.violation_count,
                    "info": c.info,
                    "examples": [
                        {"message": v.message, "event_ids": sorted(v.event_ids)}
                        for v in c.violations
                    ],
                }
                for c in self.checks
            ],
            "failed_checks": self.failed_checks,
            "harness_errors": self.harness_errors,
            "history_around_violations": self.excerpts,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def render(self, console: Console) -> None:
        """The human report: settings, faults, writes, one row per check, then each failure
        with its history."""
        s = self.settings
        console.print(
            f"walship verify: {s['nodes']} nodes, {self.run_s:.1f} s, seed {self.seed}, ack mode "
            f"{s['ack_mode']}, fsync {s['fsync']}, faults {','.join(s['faults']) or 'none'}",
            soft_wrap=True,
            markup=False,
        )
        for note in self.notes:
            console.print(f"note: {note}", style="yellow", soft_wrap=True, markup=False)
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items()))
        console.print(
            f"faults injected: {sum(self.faults_injected.values())} ({faults or 'none'})",
            soft_wrap=True,
            markup=False,
        )
        w = self.writes
        levels = ", ".join(
            f"{k} {v}" for k, v in sorted(w.get("receipts_by_durability", {}).items())
        )
        console.print(
            f"writes: {w.get('requests', 0)} requests ({w.get('retries', 0)} retries), "
            f"{w.get('events_attempted', 0)} events; acknowledged: {levels or 'none'} "
            f"({w.get('duplicate_receipts', 0)} duplicate receipts)",
            soft_wrap=True,
            markup=False,
        )
        errors = ", ".join(f"{k} x{v}" for k, v in list(w.get("errors", {}).items())[:6])
        console.print(
            f"failed requests: {sum(w.get('errors', {}).values())} ({errors or 'none'}); "
            f"events never acknowledged: {w.get('events_never_acknowledged', 0)} "
            f"({w.get('events_never_acknowledged_present', 0)} stored once, "
            f"{w.get('events_never_acknowledged_absent', 0)} absent)",
            soft_wrap=True,
            markup=False,
        )
        converged = "never" if self.convergence_s is None else f"{self.convergence_s:.2f} s"
        console.print(f"convergence after the heal: {converged}", markup=False)
        table = Table(title=None, show_lines=False)
        table.add_column("check")
        table.add_column("result")
        table.add_column("checked", justify="right")
        table.add_column("violations", justify="right")
        for c in self.checks:
            table.add_row(
                c.name,
                "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]",
                str(c.checked),
                str(c.violation_count),
            )
        console.print(table)
        cut = sum(c.info.get("cut_to_lost_found", 0) for c in self.checks)
        if cut:
            console.print(
                f"{cut} acknowledged writes (never `replicated`) were cut by divergence repair "
                "into lost-and-found",
                markup=False,
            )
        for error in self.harness_errors:
            console.print(f"harness error: {error}", style="red", soft_wrap=True, markup=False)
        for c in self.checks:
            if c.passed:
                continue
            console.print(f"\nFAIL {c.name}: {c.violation_count} violation(s)", style="bold red")
            console.print(f"  claim: {c.claim}", soft_wrap=True, markup=False)
            for v in c.violations[:VIOLATIONS_SHOWN]:
                console.print(f"  - {v.message}", soft_wrap=True, markup=False)
            excerpt = self.excerpts.get(c.name)
            if excerpt:
                console.print("  history around the first violation:", markup=False)
                for line in excerpt:
                    console.print(f"    {line}", soft_wrap=True, markup=False)
        verdict = {
            EXIT_OK: "[bold green]PASS[/bold green]: every check held",
            EXIT_VIOLATION: f"[bold red]FAIL[/bold red]: {self.violations} violation(s) in "
            f"{', '.join(self.failed_checks)}",
            EXIT_HARNESS: "[bold yellow]INCOMPLETE[/bold yellow]: the harness could not run "
            "as asked",
        }[self.exit_code]
        console.print(
            f"\n{verdict} (seed {self.seed}; data dirs, node logs and history.jsonl: {self.root})"
        )
