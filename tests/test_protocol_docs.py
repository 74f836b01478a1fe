"""docs/replication.md's table of message types says what protocol.py defines: every type
byte, its message, and its fields in wire order (the fields are a msgpack array, so their
order is the format)."""

from __future__ import annotations

import re
from pathlib import Path

from walship.replication.protocol import MESSAGE_TYPES, Welcome

DOC = Path(__file__).resolve().parent.parent / "docs" / "replication.md"
ROW = re.compile(r"^\| (\d+) \| `(\w+)` \| [^|]+ \| ([^|]+) \|", re.M)


def documented() -> dict[int, tuple[str, list[str]]]:
    out = {}
    for code, name, fields in ROW.findall(DOC.read_text(encoding="utf-8")):
        names = re.findall(r"`(\w+)`", fields)
        if fields.strip().startswith("the fields of `Welcome`"):
            names = [*Welcome.__struct_fields__, *names[1:]]
        out[int(code)] = (name, names)
    return out


def test_every_message_type_is_documented_with_its_fields_in_wire_order() -> None:
    table = documented()
    assert sorted(table) == sorted(MESSAGE_TYPES)
    for code, cls in MESSAGE_TYPES.items():
        assert table[code] == (cls.__name__, list(cls.__struct_fields__)), code
