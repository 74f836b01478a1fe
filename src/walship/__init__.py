"""walship: a replicated event store for Python.

The names below are imported on first use, so ``import walship`` (or only the client) does not
pay for pyarrow and the storage engine.
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Arrow's jemalloc/mimalloc pools keep freed checkpoint buffers: with the system allocator a
# node's RSS follows what it holds (~150 MB less at 1M events ingested). Read by pyarrow when
# it is first imported; a value the user set wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

if TYPE_CHECKING:
    from walship.client import AsyncClient, Client
    from walship.client_routing import ReadFrom, RetryPolicy
    from walship.events import EventIn
    from walship.store import Store, StoreConfig

_LAZY = {
    "Client": "walship.client",
    "AsyncClient": "walship.client",
    "ReadFrom": "walship.client_routing",
    "RetryPolicy": "walship.client_routing",
    "EventIn": "walship.events",
    "Store": "walship.store",
    "StoreConfig": "walship.store",
}

__all__ = [
    "AsyncClient",
    "Client",
    "EventIn",
    "ReadFrom",
    "RetryPolicy",
    "Store",
    "StoreConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'walship' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
