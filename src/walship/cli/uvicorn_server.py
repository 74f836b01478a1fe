"""Moved: the uvicorn ``NodeServer`` is library code in ``walship.http.server``.

This name stays only so that code written against the old path (branches in flight) keeps
importing; nothing in the package uses it, and new code imports ``walship.http.server``.
"""

from walship.http.server import NodeServer, http_protocol, metrics_server

__all__ = ["NodeServer", "http_protocol", "metrics_server"]
