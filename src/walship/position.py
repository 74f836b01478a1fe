"""Log positions as small value types: ``Lsn``, ``Term``, ``Position(term, lsn)`` and
``LogPoint(term, lsn, chain)``.

They print as fixed-width hex, so names and logs sort in log order, and parse back from it.
No bare ints cross module boundaries where a position is meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering

from walship.errors import InvalidInput

_U64_MAX = (1 << 64) - 1


@total_ordering
@dataclass(frozen=True, slots=True)
class Lsn:
    """A log sequence number: gapless, from 1; 0 means "before the first record"."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= _U64_MAX:
            raise InvalidInput(f"lsn out of range: {self.value}")

    def __str__(self) -> str:
        return f"{self.value:016x}"

    def __int__(self) -> int:
        return self.value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Lsn):
            return NotImplemented
        return self.value < other.value

    def next(self) -> Lsn:
        return Lsn(self.value + 1)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse fixed-width hex (as printed) or a plain decimal prefixed with ``#``."""
        try:
            if text.startswith("#"):
                return cls(int(text[1:], 10))
            return cls(int(text, 16))
        except ValueError as exc:
            raise InvalidInput(f"not an lsn: {text!r}") from exc


@total_ordering
@dataclass(frozen=True, slots=True)
class Term:
    """A leader epoch; every promotion starts a higher one. 0 means "no term yet"."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= _U64_MAX:
            raise InvalidInput(f"term out of range: {self.value}")

    def __str__(self) -> str:
        return f"{self.value:08x}"

    def __int__(self) -> int:
        return self.value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Term):
            return NotImplemented
        return self.value < other.value

    @classmethod
    def parse(cls, text: str) -> Term:
        try:
            return cls(int(text, 16))
        except ValueError as exc:
            raise InvalidInput(f"not a term: {text!r}") from exc


@total_ordering
@dataclass(frozen=True, slots=True)
class Position:
    """Where a log ends: the term and lsn of its last record. Ordered by (term, lsn)."""

    term: Term
    lsn: Lsn

    def __str__(self) -> str:
        return f"{self.term}/{self.lsn}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Position):
            return NotImplemented
        return (self.term, self.lsn) < (other.term, other.lsn)

    @classmethod
    def parse(cls, text: str) -> Position:
        term, sep, lsn = text.partition("/")
        if not sep:
            raise InvalidInput(f"not a position (want TERM/LSN): {text!r}")
        return cls(Term.parse(term), Lsn.parse(lsn))

    @classmethod
    def start(cls) -> Position:
        return cls(Term(0), Lsn(0))


@dataclass(frozen=True, slots=True)
class LogPoint:
    """A record's place in a log with the running chain hash through it: ``(term, lsn, chain)``.

    Two logs at the same point hold the same records up to it (the chain covers them all);
    this is what a follower's next frame must continue and what a subscriber names.
    """

    term: Term
    lsn: Lsn
    chain: bytes

    @property
    def position(self) -> Position:
        return Position(self.term, self.lsn)

    def __str__(self) -> str:
        return f"{self.term}/{self.lsn}/{self.chain.hex()}"
