"""The package's layers: nothing outside ``walship.cli`` imports the CLI.

The CLI sits on top: it parses arguments and prints, and the library code it runs lives below
it. ``verify/`` once imported ``cli/`` (for ``NodeProcess`` and the offline WAL reader) while
``cli/`` imported ``verify/``: the one import cycle of the package. These tests keep it gone,
statically (every ``import`` statement, including the lazy ones inside functions) and at run
time (what importing the library modules actually loads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import walship

PACKAGE_DIR = Path(walship.__file__).parent
CLI = "walship.cli"
# ``python -m walship`` is the command line's own entry point
ENTRY_POINTS = {"walship.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``path`` names (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_cli(name: str) -> bool:
    return name == CLI or name.startswith(CLI + ".")


def test_no_module_outside_cli_imports_cli() -> None:
    offenders: list[str] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = module_name(path)
        if is_cli(module) or module in ENTRY_POINTS:
            continue
        names = sorted(name for name in imported_modules(path, module) if is_cli(name))
        offenders += [f"{module} imports {name}" for name in names]
    assert not offenders, "library code imports the CLI:\n" + "\n".join(offenders)


def test_the_import_walk_sees_cli_imports() -> None:
    """The walk above finds the imports it is meant to refuse (absolute, relative, lazy)."""
    main = PACKAGE_DIR / "__main__.py"
    assert "walship.cli.main" in imported_modules(main, "walship.__main__")
    verify_command = PACKAGE_DIR / "cli" / "verify.py"
    assert "walship.verify.run" in imported_modules(verify_command, "walship.cli.verify")


def test_importing_the_library_loads_no_cli_module() -> None:
    """At run time too: verify, the process helper and the offline WAL reader load no CLI."""
    code = (
        "import sys\n"
        "import walship.verify.run, walship.verify.cluster, walship.testing.process\n"
        "import walship.wal.offline, walship.storage.offline_check, walship.client\n"
        "import walship.node_reports, walship.http.server, walship.replicated_log\n"
        "cli = [m for m in sys.modules if m == 'walship.cli' or m.startswith('walship.cli.')]\n"
        "print(' '.join(sorted(cli)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"the library loaded CLI modules: {out.stdout.split()}"


def test_the_moved_cli_paths_are_used_by_nothing_here() -> None:
    """``walship.cli.process`` and ``walship.cli.uvicorn_server`` only re-export what moved to
    the library (for branches written against them); the package, the tests and the
    benchmarks import the new homes, so the shims can go."""
    moved = {"walship.cli.process", "walship.cli.uvicorn_server"}
    root = PACKAGE_DIR.parent.parent
    users: list[str] = []
    for folder in (PACKAGE_DIR, root / "tests", root / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if path.parent == PACKAGE_DIR / "cli" or path == Path(__file__):
                continue
            found = imported_modules(path, "tests.x") & moved
            users += [f"{path.relative_to(root)} imports {name}" for name in sorted(found)]
    assert not users, "\n".join(users)
