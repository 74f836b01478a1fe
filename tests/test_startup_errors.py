"""Every way `walship serve` can fail to start is one line on stderr and the exit code that
docs/configuration.md ("Exit codes") gives: 1 for the machine (data dir, ports, host names), 2
for what the operator wrote (flags, config file, the secret/token/TLS files they name, corrupt
data).

Each case runs the real `walship` command in a child process, as an operator would: the
one-line promise covers click's usage errors and the HTTP server's start-up too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from walship.dirlock import DataDirLock
from walship.testing.process import NodeProcess

pytestmark = pytest.mark.timeout(120)

Case = Callable[[Path, int], list[str]]


def walship() -> list[str]:
    return [sys.executable, "-m", "walship"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on for the whole test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*walship(), "serve", "--fsync", "never", *args],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "80"},
    )


def secret(tmp_path: Path) -> Path:
    path = tmp_path / "replication.secret"
    path.write_text("s3cret\n")
    return path


# (case id, arguments given the temp dir and a port in use, exit code, what the line says)
CASES: list[tuple[str, Case, int, str]] = [
    (
        "data dir under a file",
        lambda d, p: ["--data-dir", str(d / "a-file" / "data"), "--http-port", "0"],
        1,
        "cannot create data dir",
    ),
    (
        "http port in use",
        lambda d, p: ["--data-dir", str(d / "data"), "--http-port", str(p)],
        1,
        "cannot listen on 127.0.0.1:",
    ),
    (
        "replication port in use",
        lambda d, p: [
            "--data-dir",
            str(d / "data"),
            "--http-port",
            "0",
            "--replication-port",
            str(p),
            "--replication-secret-file",
            str(secret(d)),
        ],
        1,
        "cannot listen for replication on 127.0.0.1:",
    ),
    (
        "http host that does not resolve",
        lambda d, p: ["--data-dir", str(d / "data"), "--http-host", "no-such-host.invalid"],
        1,
        "cannot resolve --http-host 'no-such-host.invalid'",
    ),
    (
        "secret file missing",
        lambda d, p: ["--data-dir", str(d / "data"), "--replication-secret-file", "nope"],
        2,
        "cannot read replication secret file nope",
    ),
    (
        "secret file empty",
        lambda d, p: ["--data-dir", str(d / "data"), "--replication-secret-file", "/dev/null"],
        2,
        "the replication secret from file /dev/null is empty",
    ),
    (
        "TLS certificate missing",
        lambda d, p: [
            "--data-dir",
            str(d / "data"),
            "--replication-secret-file",
            str(secret(d)),
            "--tls-cert",
            "nope.crt",
            "--tls-key",
            "nope.key",
        ],
        2,
        "--tls-cert nope.crt: no such file",
    ),
    (
        "TLS files that are not PEM",
        lambda d, p: [
            "--data-dir",
            str(d / "data"),
            "--replication-secret-file",
            str(secret(d)),
            "--tls-cert",
            str(secret(d)),
            "--tls-key",
            str(secret(d)),
        ],
        2,
        "cannot load TLS files (--tls-cert",
    ),
    (
        "admin token file missing",
        lambda d, p: ["--data-dir", str(d / "data"), "--admin-token-file", "nope"],
        2,
        "cannot read admin token file nope",
    ),
    (
        "a value of the wrong type",
        lambda d, p: ["--data-dir", str(d / "data"), "--http-port", "abc"],
        2,
        "serve: Invalid value for '--http-port'",
    ),
    (
        "an unknown flag",
        lambda d, p: ["--data-dir", str(d / "data"), "--http-prot", "3900"],
        2,
        "serve: No such option: --http-prot",
    ),
    (
        "a bad fsync policy",
        lambda d, p: ["--data-dir", str(d / "data"), "--fsync", "sometimes"],
        2,
        "invalid --fsync",
    ),
    (
        "a follower without a leader",
        lambda d, p: ["--data-dir", str(d / "data"), "--role", "follower"],
        2,
        "a follower needs --leader HOST:PORT",
    ),
    (
        "a replication lag budget the in-sync set cannot hold",
        lambda d, p: ["--data-dir", str(d / "data"), "--max-replication-lag-ms", "5000"],
        2,
        "--max-replication-lag-ms 5000 must be below --max-lag-ms 5000",
    ),
    (
        "an unknown key in the config file",
        lambda d, p: ["--config", str(_file(d / "c.toml", "http-prot = 1\n"))],
        2,
        "unknown setting 'http-prot'",
    ),
]


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("make_args", "code", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_start_up_error_is_one_line_with_the_documented_exit_code(
    tmp_path: Path, taken_port: int, make_args: Case, code: int, says: str
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    result = serve(tmp_path, *make_args(tmp_path, taken_port))
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("walship: ")
    assert says in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.slow
def test_replication_port_in_use_closes_the_node_it_opened(tmp_path: Path, taken_port: int) -> None:
    """The port is bound after the node opened (recovery decides whether it leads): the
    refusal closes the node again, and the next start on that data dir serves."""
    args = ["--replication-secret-file", str(secret(tmp_path))]
    refused = serve(
        tmp_path, "--data-dir", str(tmp_path / "data"), *args, "--replication-port", str(taken_port)
    )
    assert refused.returncode == 1, refused.stderr
    node = NodeProcess(
        tmp_path / "data", fsync="never", extra_args=[*args, "--replication-port", "0"]
    )
    try:
        node.start()
        assert node.replication_address is not None
        assert node.stop() == 0
    finally:
        node.kill()


def test_data_dir_held_by_another_process_is_one_line_and_exit_1(tmp_path: Path) -> None:
    lock = DataDirLock.acquire(tmp_path / "data")
    try:
        result = serve(tmp_path, "--data-dir", str(tmp_path / "data"), "--http-port", "0")
    finally:
        lock.release()
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("walship: cannot start: data dir") and "in use by pid" in line
