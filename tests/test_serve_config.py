"""`walship serve --config FILE`: TOML settings under flags and environment, checked up front.

Run in-process with ``--check``, which validates every setting and the files they name and
prints them without creating or opening anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from walship.cli.config import settings_of
from walship.cli.main import app
from walship.cli.serve import serve_command

runner = CliRunner()

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "walship.toml"


def check(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["serve", "--config", str(config), "--check", *args], env=env)
    return result.exit_code, result.output


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_settings_come_from_the_file_and_flags_and_environment_override_them(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "node.toml",
        'node-id = "from-file"\nhttp-port = 4100\nfsync = "interval:5"\nrole = "leader"\n',
    )
    code, out = check(config)
    assert code == 0, out
    assert "node from-file" in out and "http 127.0.0.1:4100" in out
    assert "fsync interval:5" in out

    code, out = check(config, env={"WALSHIP_NODE_ID": "from-env", "WALSHIP_HTTP_PORT": "4200"})
    assert code == 0, out
    assert "node from-env" in out and "http 127.0.0.1:4200" in out

    code, out = check(config, "--node-id", "from-flag", env={"WALSHIP_NODE_ID": "from-env"})
    assert code == 0, out
    assert "node from-flag" in out


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "replication.secret").write_text("s3cret\n")
    config = write(
        conf_dir / "node.toml",
        'data-dir = "data"\nreplication-secret-file = "replication.secret"\n'
        'peers = ["http://10.0.0.2:3900", "http://10.0.0.3:3900"]\n',
    )
    # run from elsewhere: the secret is found beside the file, not in the working directory
    code, out = check(config)
    assert code == 0, out
    assert f"data {conf_dir / 'data'}" in out
    assert "replication 127.0.0.1:3910" in out  # the secret was read: the leader listens


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http-prot = 3900\n", "unknown setting 'http-prot' (did you mean 'http-port'?)"),
        ("http_port = 3900\n", "unknown setting 'http_port' (did you mean 'http-port'?)"),
        ("[node]\nhttp-port = 3900\n", "unknown setting 'node'"),
        ('http-port = "3900"\n', "http-port must be an integer, not '3900'"),
        ("node-id = 7\n", "node-id must be a string, not 7"),
        ('tls-require-client-cert = "yes"\n', "tls-require-client-cert must be true or false"),
        ("peers = [1, 2]\n", "peers must be a list of URLs"),
        ("http-port = \n", "is not valid TOML"),
        ("config = 'other.toml'\n", "unknown setting 'config'"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, text: str, says: str) -> None:
    config = write(tmp_path / "bad.toml", text)
    code, out = check(config)
    assert code == 2, out
    assert says in out
    assert out.count("\n") == 1 and out.startswith(f"walship: config file {config}")


def test_a_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """tomllib decodes the file before it parses it: a Latin-1 file (or a binary one) was a
    UnicodeDecodeError traceback."""
    config = tmp_path / "latin1.toml"
    config.write_bytes('node-id = "k\xf6ln"\n'.encode("latin-1"))
    code, out = check(config)
    assert code == 2, out
    assert out.count("\n") == 1 and out.startswith(f"walship: config file {config}")
    assert "UTF-8" in out


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, out = check(tmp_path / "nope.toml")
    assert code == 2, out
    assert out.strip() == f"walship: cannot read config file {tmp_path / 'nope.toml'}: " + (
        "No such file or directory"
    )


def test_a_bad_value_in_the_file_is_refused_like_the_same_flag(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", 'fsync = "sometimes"\n')
    code, out = check(config)
    assert code == 2
    assert "invalid --fsync" in out and "sometimes" in out


def test_check_creates_nothing(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", 'data-dir = "data"\n')
    code, out = check(config)
    assert code == 0, out
    assert not (tmp_path / "data").exists()


def test_the_example_file_names_every_setting_and_loads(tmp_path: Path) -> None:
    """deploy/walship.toml is the complete example: every flag of `walship serve` appears in
    it, set or commented out, and with its secret files beside it, it passes --check."""
    text = EXAMPLE.read_text()
    present = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) = ", text, flags=re.MULTILINE))
    missing = set(settings_of(serve_command)) - present
    assert not missing, f"deploy/walship.toml does not mention {sorted(missing)}"
    unknown = present - set(settings_of(serve_command))
    assert not unknown, f"deploy/walship.toml names settings that do not exist: {unknown}"

    copy = tmp_path / "walship.toml"
    copy.write_text(text)
    (tmp_path / "replication.secret").write_text("s3cret\n")
    (tmp_path / "admin.token").write_text("t0ken\n")
    code, out = check(copy)
    assert code == 0, out
    assert "node walship-1, data /var/lib/walship" in out
    assert "ack semi-sync" in out and "admin token set" in out
