"""Moved: ``NodeProcess`` is library code in ``walship.testing.process``.

This name stays only so that code written against the old path (branches in flight) keeps
importing; nothing in the package uses it, and new code imports ``walship.testing.process``.
"""

from walship.testing.process import START_LINE_MARK, NodeProcess, NodeStartError

__all__ = ["START_LINE_MARK", "NodeProcess", "NodeStartError"]
