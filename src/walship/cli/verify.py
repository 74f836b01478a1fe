"""``walship verify``: run a local cluster under faults and check no acknowledged write is lost."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from walship.cli.output import console, err_console, fail, progress_bar
from walship.errors import InvalidInput
from walship.verify.config import FAULT_KINDS, VerifyConfig, parse_duration_s, parse_faults
from walship.verify.run import run_verify


def verify_command(
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, max=9, help="Nodes: one leader, the rest followers.")
    ] = 3,
    duration: Annotated[
        str, typer.Option("--duration", help="How long to write under faults: 60s, 2m, 500ms.")
    ] = "60s",
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="Seed of the fault schedule and the workload (default: a random one)."
        ),
    ] = None,
    faults: Annotated[
        str,
        typer.Option(
            "--faults",
            help=f"Comma-separated fault kinds ({','.join(FAULT_KINDS)}), all or none.",
        ),
    ] = ",".join(FAULT_KINDS),
    ack_mode: Annotated[
        str,
        typer.Option("--ack-mode", help="The leader's ack mode: async, semi-sync, quorum:N, sync."),
    ] = "semi-sync",
    fsync: Annotated[str, typer.Option("--fsync", help="Every node's fsync policy.")] = "always",
    writers: Annotated[
        int, typer.Option("--writers", min=1, max=64, help="Concurrent writers.")
    ] = 4,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the report as JSON to this file.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Put the nodes' data dirs and logs here (default: a temporary directory, "
            "removed when the run passes).",
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the data dirs and logs of a passing run too.")
    ] = False,
    server_module: Annotated[
        str,
        typer.Option(
            "--server-module",
            help="Run each node as `python -m MODULE serve ...` instead of walship: for "
            "checking verify itself against a deliberately broken build.",
        ),
    ] = "walship",
) -> None:
    """Start a local cluster, write to it under a seeded fault schedule, then prove that no
    acknowledged write was lost, duplicated or reordered. Exit 1 on a violation."""
    if seed is None:
        seed = secrets.randbelow(1_000_000)
    try:
        config = VerifyConfig(
            nodes=nodes,
            duration_s=parse_duration_s(duration),
            seed=seed,
            faults=parse_faults(faults),
            ack_mode=ack_mode,
            fsync=fsync,
            writers=writers,
            root=data_dir,
            keep=keep,
            server_module=server_module,
        )
    except InvalidInput as exc:
        fail(exc.message, 2)
    err_console.print(f"walship verify: seed {seed}", markup=False)
    # the bar follows the workload under faults (the run's long part, its length known);
    # each phase is a line above it
    with progress_bar(config.duration_s, "writing under faults", unit="s") as bar:

        def progress(message: str) -> None:
            bar.progress.console.print(f"  {message}", style="dim", soft_wrap=True, markup=False)

        def tick(done_s: float, total_s: float, so_far: str) -> None:
            bar.update(completed=done_s, description=f"writing under faults ({so_far})")

        result = run_verify(config, progress, tick)
    result.render(console)
    if report is not None:
        result.write_json(report)
    raise typer.Exit(result.exit_code)
