"""Names each Python thread's Linux thread after it, for the benchmarks' CPU per thread.

``benchmarks/sustained.py`` puts this directory on the nodes' ``PYTHONPATH``, so Python loads
this module at start-up (``site`` imports ``sitecustomize``). CPython 3.11-3.13 leaves every
thread's kernel name (``/proc/PID/task/TID/comm``) as the process's, so CPU read from
``/proc`` cannot tell the WAL writer from the checkpointer; with this, a thread started as
``walship-wal-writer`` is ``wal-writer`` there (the kernel keeps 15 bytes). Nothing of
walship changes: the name is set by the new thread itself before its target runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

_PR_SET_NAME = 15  # prctl(2)

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: leave the names alone
    _prctl = None

_bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _named_bootstrap_inner(self: threading.Thread) -> None:
    if _prctl is not None:
        with contextlib.suppress(Exception):
            name = self.name.removeprefix("walship-").encode("utf-8", "replace")[:15]
            _prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    _bootstrap_inner(self)


threading.Thread._bootstrap_inner = _named_bootstrap_inner  # type: ignore[attr-defined]
