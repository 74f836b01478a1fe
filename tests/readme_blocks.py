"""The README's "Run it yourself" commands, read from the README itself so the tests run what
a reader runs, and ``Reader``, which runs them in a temp dir as a reader at a shell would.

A block is the fenced ``bash`` block right after ``<!-- run-it-yourself: NAME -->``. Its
commands are its lines with ``\\`` continuations joined and comments dropped. The ports in them
(39xx) are swapped for ports chosen at run time, consistently across blocks.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.cluster import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_BLOCK_RE = re.compile(r"<!-- run-it-yourself: (\S+) -->\n```bash\n(.*?)\n```", re.DOTALL)
_PORT_RE = re.compile(r"(?:(?<=:)|(?<=port ))39[0-9]{2}\b")  # HOST:39xx, --...-port 39xx


def blocks(readme: Path = README) -> dict[str, list[str]]:
    """``{name: [command, ...]}`` for every marked block of ``readme``."""
    out: dict[str, list[str]] = {}
    for name, body in _BLOCK_RE.findall(readme.read_text()):
        out[name] = commands(body)
    return out


def commands(body: str) -> list[str]:
    """The commands of a block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        text = _strip_comment(line).strip()
        if text:
            out.append(text)
    return out


def _strip_comment(line: str) -> str:
    """``line`` without a comment: from a ``#`` that starts a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


class PortMap:
    """README ports (3900, 3911, ...) to free ports of this machine, the same one each time."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}

    def __call__(self, command: str) -> str:
        return _PORT_RE.sub(lambda m: str(self.port(int(m.group()))), command)

    def port(self, readme_port: int) -> int:
        if readme_port not in self.ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.ports[readme_port] = int(s.getsockname()[1])
        return self.ports[readme_port]


BIN = Path(sys.executable).parent


@dataclass
class Terminal:
    """One ``walship serve`` the reader left running."""

    node_id: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=5).json()
        return body

    def stop(self) -> int:
        """SIGTERM, as systemd or a container runtime stops it; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def ctrl_c(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(30)


class Reader:
    """Runs README commands in ``cwd`` the way a reader at a shell would."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.ports = PortMap()
        self.terminals: dict[str, Terminal] = {}
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "200",
        }

    def block(self, name: str) -> list[str]:
        """Run every command of README block ``name``; the outputs of the foreground ones.
        Before the first command after a `walship serve` or `walship failover`, wait until the
        cluster has settled (a reader switching terminals takes that long)."""
        outputs = []
        settle = False
        for command in blocks()[name]:
            if command.startswith(("sudo ", "pipx ")):
                continue  # the install: tests/test_deploy.py
            if command.startswith("walship serve "):
                self.serve(command)
                settle = True
                continue
            if settle:
                self.settle()
                settle = False
            outputs.append(self.run(command))
            settle = command.startswith("walship failover ")
        if settle:
            self.settle()
        return outputs

    def run(self, command: str, timeout_s: float = 60) -> str:
        result = subprocess.run(
            ["bash", "-c", self.ports(command)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def serve(self, command: str) -> Terminal:
        node_id = re.search(r"--node-id (\S+)", command)
        name = node_id.group(1) if node_id else "walship-1"
        log = self.cwd / f"{name}.terminal.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {self.ports(command)}"],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        terminal = Terminal(name, process, log)
        self.terminals[name] = terminal

        def started() -> str | None:
            assert process.poll() is None, f"{name} exited:\n{log.read_text()}"
            found = re.search(r"serving (http://\S+)", log.read_text())
            return found.group(1) if found else None

        terminal.url = wait_until(started, 30, f"{name}'s start line")
        wait_until(terminal.health, 30, f"{name} to answer /health")
        return terminal

    def running(self) -> list[Terminal]:
        return [t for t in self.terminals.values() if t.process.poll() is None]

    def settle(self) -> None:
        """Every running follower is in its leader's in-sync set."""

        def settled() -> bool:
            views = [t.health() for t in self.running()]
            leaders = [v for v in views if v["role"] == "leader"]
            followers = len(views) - len(leaders)
            return all(v["replication"]["in_sync_count"] == followers for v in leaders)

        wait_until(settled, 30, "every follower to be in sync")

    def stop_all(self) -> None:
        for terminal in self.terminals.values():
            if terminal.process.poll() is None:
                terminal.process.kill()
                terminal.process.wait(10)
