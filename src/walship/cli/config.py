"""``walship serve --config FILE``: a node's settings from a TOML file, under flags and env.

The file holds the same settings as the flags, each key a flag's name without its leading
dashes (``http-port = 3900``); a flag's value is a string, an integer or a boolean as the flag
takes, and ``peers``/``etcd`` may also be a list of URLs. click does the layering: a flag on
the command line wins, then its ``WALSHIP_*`` environment variable, then the file, then the
built-in default. A file that is not TOML, an unknown key or a value of the wrong type is a
one-line error (exit 2, as a bad flag is) before anything starts. Relative paths in the file
are relative to the file's own directory, so a file and the secrets beside it move together.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from typer.models import OptionInfo

from walship.errors import InvalidInput

CONFIG_ENV = "WALSHIP_CONFIG"
EXIT_BAD_CONFIG = 2  # as a bad flag: the file is the flags written down

LIST_KEYS = frozenset({"peers", "etcd"})
"""Settings that take comma-separated URLs on the command line and a TOML list in the file."""

_NOT_SETTINGS = frozenset({"config", "check"})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag as the file sees it: the parameter it fills and the type of its value."""

    name: str
    kind: type


def settings_of(command: Callable[..., object]) -> dict[str, Setting]:
    """``{key: Setting}`` for every option of a typer command function, keyed by the flag's
    long name without ``--`` (``--config`` and ``--check`` are not settings)."""
    hints = typing.get_type_hints(command, include_extras=True)
    out: dict[str, Setting] = {}
    for name in inspect.signature(command).parameters:
        hint = hints.get(name)
        if name in _NOT_SETTINGS or typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *extras = typing.get_args(hint)
        info = next((e for e in extras if isinstance(e, OptionInfo)), None)
        if info is None:
            continue
        # with Annotated, typer keeps the first declaration where a default would be
        decls = [d for d in (info.default, *(info.param_decls or ())) if isinstance(d, str)]
        flag = next((d for d in decls if d.startswith("--")), "--" + name.replace("_", "-"))
        # a boolean pair ("--part-worker/--no-part-worker") is set by its first name
        out[flag.split("/")[0][2:]] = Setting(name, _base_kind(base))
    return out


def _base_kind(hint: object) -> type:
    """``int`` for ``int``, ``Path`` for ``Path | None``: the type a value must have."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    assert isinstance(hint, type), hint
    return hint


def load_config(path: Path, settings: Mapping[str, Setting]) -> dict[str, Any]:
    """The settings in the TOML file at ``path`` as ``{parameter name: value}`` for click's
    ``default_map``. InvalidInput naming the file and the first bad key otherwise."""
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise InvalidInput(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib decodes the whole file first
        raise InvalidInput(
            f"config file {path} is not UTF-8 text (TOML must be): {exc.reason} at byte {exc.start}"
        ) from exc
    out: dict[str, Any] = {}
    for key, value in table.items():
        setting = settings.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, list(settings), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInput(
                f"config file {path}: unknown setting {key!r}{hint}; settings are the flags "
                f"of `walship serve` without their dashes"
            )
        out[setting.name] = _value(path, key, value, setting.kind)
    return out


def _value(path: Path, key: str, value: object, kind: type) -> Any:
    """``value`` checked against the type of the flag ``key`` (paths made absolute)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(path, key, "true or false", value)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(path, key, "an integer", value)
    if key in LIST_KEYS and isinstance(value, list):
        if value and all(isinstance(v, str) and v for v in value):
            return ",".join(value)
        raise _wrong_type(path, key, "a list of URLs", value)
    if not isinstance(value, str):
        raise _wrong_type(path, key, "a string", value)
    if kind is Path:
        # relative to the file, not to whatever directory the service manager starts in
        return str(path.parent.absolute() / Path(value).expanduser())
    return value


def _wrong_type(path: Path, key: str, wanted: str, value: object) -> InvalidInput:
    return InvalidInput(f"config file {path}: {key} must be {wanted}, not {value!r}")
