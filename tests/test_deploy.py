"""deploy/: the systemd unit, the container build file and the example config use exactly the
README's install steps, and those steps work.

- the unit passes ``systemd-analyze verify`` (with its ExecStart pointed at this checkout's
  ``walship``; verify insists the binary exists) and runs what the README installs where the
  README installs it;
- the Containerfile runs the README's pipx command and starts what the unit starts;
- the README's "As a service" block, run in a sandbox (``sudo`` dropped, its paths moved
  under a temp dir, the user and systemctl steps left out), installs walship with pipx, and
  the installed command serves the installed example config.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.readme_blocks import BIN, ROOT, Reader, blocks

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "walship.service"
CONTAINERFILE = DEPLOY / "Containerfile"


def unit_value(key: str, text: str | None = None) -> str:
    found = re.findall(rf"^{key}=(.*)$", text or UNIT.read_text(), flags=re.MULTILINE)
    assert len(found) == 1, f"{key}= in the unit: {found}"
    return found[0].strip()


def service_block() -> list[str]:
    return blocks()["service"]


def pipx_install_command() -> str:
    (command,) = [c for c in service_block() if " pipx install " in f" {c} "]
    return command.removeprefix("sudo ")


def readme_paths() -> tuple[str, str]:
    """Where the README's service steps put the ``walship`` command and the config file."""
    bin_dir = re.search(r"PIPX_BIN_DIR=(\S+)", pipx_install_command())
    assert bin_dir, pipx_install_command()
    (config,) = [
        c.split()[-1] for c in service_block() if "install " in c and "deploy/walship.toml" in c
    ]
    return f"{bin_dir.group(1)}/walship", config


def verify_unit(unit: Path, tmp_path: Path, walship: Path) -> None:
    """``systemd-analyze verify`` on a copy of ``unit`` that runs ``walship``; no complaint."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package has it)")
    copy = tmp_path / "unit" / "walship.service"
    copy.parent.mkdir(exist_ok=True)
    exec_start = unit_value("ExecStart", unit.read_text())
    program = exec_start.split()[0]
    copy.write_text(unit.read_text().replace(f"ExecStart={program}", f"ExecStart={walship}"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "walship" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_the_unit_runs_what_the_readme_installs_and_passes_systemd_analyze(
    tmp_path: Path,
) -> None:
    walship, config = readme_paths()
    assert unit_value("ExecStart") == f"{walship} serve --config {config}"
    assert unit_value("RestartPreventExitStatus") == "2"  # a bad setting: do not loop
    verify_unit(UNIT, tmp_path, BIN / "walship")


def test_a_broken_unit_is_caught_by_the_check(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    broken = tmp_path / "broken.service"
    broken.write_text(UNIT.read_text().replace("RestartSec=", "RestartSek="))
    with pytest.raises(AssertionError, match="RestartSek"):
        verify_unit(broken, tmp_path, BIN / "walship")


def test_the_containerfile_installs_as_the_readme_does() -> None:
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    runs = [
        line.removeprefix("RUN ").strip() for line in text.splitlines() if line.startswith("RUN ")
    ]
    copied = re.search(r"^COPY \. (\S+)$", text, flags=re.MULTILINE)
    assert copied, "the Containerfile copies the checkout"
    readme_install = pipx_install_command().replace("pipx install .", f"pipx install {copied[1]}")
    assert any(run.startswith(readme_install) for run in runs), (readme_install, runs)
    assert any("apt-get install -y --no-install-recommends pipx" in run for run in runs), runs
    _, config = readme_paths()
    assert re.search(rf"^COPY deploy/walship.toml {re.escape(config)}$", text, flags=re.MULTILINE)
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, flags=re.MULTILINE)
    assert entrypoint, "the Containerfile has an ENTRYPOINT"
    assert json.loads(entrypoint[1]) == unit_value("ExecStart").split()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_service_install_works_in_a_sandbox(tmp_path: Path) -> None:
    """Run the README's "As a service" block with its paths moved under ``tmp_path``: pipx
    installs walship from a copy of this checkout, the config and secrets are installed, the
    `--check` step passes, the installed unit verifies, and its ExecStart serves."""
    if shutil.which("pipx") is None:
        pytest.skip("pipx is not installed (apt-get install pipx; .ci/run does)")
    checkout = tmp_path / "checkout"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell its files")
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)

    moved = {
        "/opt/pipx": tmp_path / "opt" / "pipx",
        "/usr/local/bin": tmp_path / "usr" / "local" / "bin",
        "/etc/walship": tmp_path / "etc" / "walship",
        "/etc/systemd/system": tmp_path / "etc" / "systemd" / "system",
    }
    (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
    group = grp.getgrgid(os.getgid()).gr_name
    reader = Reader(checkout)
    reader.env["PATH"] = f"{moved['/usr/local/bin']}{os.pathsep}{reader.env['PATH']}"
    ran = []
    for readme_command in service_block():
        command = readme_command.replace("sudo ", "")
        if command.startswith(("useradd ", "systemctl ")):
            continue  # they change this machine: a user, a running service
        for old, new in moved.items():
            command = command.replace(old, str(new))
        command = command.replace("-g walship", f"-g {shlex.quote(group)}")
        ran.append(command)
        # pip fetches and builds walship's dependencies: minutes on a busy machine
        output = reader.run(command, timeout_s=480 if "pipx" in command else 60)
        if "--check" in command:
            assert "settings OK" in output, output
    assert len(ran) >= 6, ran

    installed = moved["/usr/local/bin"] / "walship"
    assert installed.exists(), f"pipx did not put walship in {installed}"
    unit = moved["/etc/systemd/system"] / "walship.service"
    verify_unit(unit, tmp_path, installed)

    exec_start = unit_value("ExecStart", unit.read_text())
    for old, new in moved.items():
        exec_start = exec_start.replace(old, str(new))
    reader.env.update(
        WALSHIP_DATA_DIR=str(tmp_path / "var" / "lib" / "walship"),
        WALSHIP_HTTP_PORT="0",
        WALSHIP_REPLICATION_PORT="0",
    )
    node = reader.serve(exec_start)
    health = node.health()
    assert health["role"] == "leader" and health["node_id"] == "walship-1"
    assert node.stop() == 0
