from __future__ import annotations

import pytest

from walship.errors import InvalidInput
from walship.position import LogPoint, Lsn, Position, Term


def test_positions_print_as_fixed_width_hex_and_parse_back() -> None:
    pos = Position(Term(3), Lsn(255))
    assert str(pos) == "00000003/00000000000000ff"
    assert Position.parse(str(pos)) == pos
    assert Lsn.parse("#42") == Lsn(42)


def test_positions_order_by_term_then_lsn() -> None:
    assert Position(Term(1), Lsn(100)) < Position(Term(2), Lsn(1))
    assert Position(Term(2), Lsn(1)) < Position(Term(2), Lsn(2))
    assert sorted([Lsn(3), Lsn(1), Lsn(2)]) == [Lsn(1), Lsn(2), Lsn(3)]


@pytest.mark.parametrize("text", ["", "zz", "1/", "/1", "-1"])
def test_malformed_positions_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        Position.parse(text if "/" in text else f"{text}/{text}")


def test_negative_lsn_is_refused() -> None:
    with pytest.raises(InvalidInput):
        Lsn(-1)


def test_a_log_point_is_its_position_and_the_chain_through_it() -> None:
    point = LogPoint(Term(2), Lsn(16), bytes.fromhex("ab" * 8))
    assert point.position == Position(Term(2), Lsn(16))
    assert str(point) == "00000002/0000000000000010/" + "ab" * 8
    assert point == LogPoint(Term(2), Lsn(16), bytes.fromhex("ab" * 8))
    assert point != LogPoint(Term(2), Lsn(16), bytes(8))  # same place, another history
