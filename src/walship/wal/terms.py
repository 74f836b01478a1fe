"""The persisted term history ``[(term, first_lsn), ...]`` kept next to the WAL.

A term starts at the lsn of its first record. The history only grows (a truncation by
divergence repair may drop terms that start after the cut), is replaced atomically, and lets
two nodes find the last position their logs share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import msgspec

from walship.errors import CorruptionError, invariant
from walship.fsutil import atomic_write
from walship.position import Lsn, Term

FILE_NAME = "term_history.json"


@dataclass(frozen=True, slots=True)
class TermStart:
    term: Term
    first_lsn: Lsn


class TermHistory:
    """The ordered list of term starts, persisted as JSON."""

    def __init__(self, path: Path, entries: list[TermStart]) -> None:
        self._path = path
        self._entries = entries

    @classmethod
    def load(cls, directory: Path) -> TermHistory:
        """Load the history; an absent file is an empty history."""
        path = directory / FILE_NAME
        if not path.exists():
            return cls(path, [])
        try:
            raw = msgspec.json.decode(path.read_bytes(), type=list[tuple[int, int]])
        except msgspec.DecodeError as exc:
            raise CorruptionError(f"unreadable term history {path}: {exc}") from exc
        entries = [TermStart(Term(t), Lsn(lsn)) for t, lsn in raw]
        for a, b in itertools.pairwise(entries):
            if not (a.term < b.term and a.first_lsn <= b.first_lsn):
                raise CorruptionError(
                    f"term history {path} is not increasing at term {b.term.value}"
                )
        return cls(path, entries)

    @property
    def entries(self) -> list[TermStart]:
        return list(self._entries)

    @property
    def current(self) -> Term:
        """The highest term known; Term(0) when none."""
        return self._entries[-1].term if self._entries else Term(0)

    def start(self, term: Term, first_lsn: Lsn) -> None:
        """Record that ``term`` begins at ``first_lsn``; persisted before returning."""
        if self._entries:
            last = self._entries[-1]
            invariant(term > last.term, f"term {term.value} is not above {last.term.value}")
            invariant(first_lsn >= last.first_lsn, "a term cannot start before the previous one")
            if first_lsn == last.first_lsn:
                # the previous term wrote nothing; it is superseded at the same start
                self._entries[-1] = TermStart(term, first_lsn)
                self._save()
                return
        self._entries.append(TermStart(term, first_lsn))
        self._save()

    def term_at(self, lsn: Lsn) -> Term:
        """The term that wrote ``lsn``; Term(0) for lsn 0 or before any term."""
        found = Term(0)
        for entry in self._entries:
            if entry.first_lsn <= lsn:
                found = entry.term
            else:
                break
        return found

    def end_of_term(self, term: Term, last_lsn: Lsn) -> Lsn | None:
        """The last lsn written in ``term`` given the log ends at ``last_lsn``; None if unknown."""
        for i, entry in enumerate(self._entries):
            if entry.term == term:
                if i + 1 < len(self._entries):
                    return Lsn(self._entries[i + 1].first_lsn.value - 1)
                return last_lsn
        return None

    def truncate_after(self, lsn: Lsn) -> None:
        """Forget terms that start after ``lsn`` (divergence repair cut the log there)."""
        kept = [e for e in self._entries if e.first_lsn <= lsn]
        if kept != self._entries:
            self._entries = kept
            self._save()

    def to_list(self) -> list[tuple[int, int]]:
        return [(e.term.value, e.first_lsn.value) for e in self._entries]

    def _save(self) -> None:
        atomic_write(self._path, msgspec.json.encode(self.to_list()))
