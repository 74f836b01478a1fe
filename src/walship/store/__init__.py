"""A node's event store: appends through the WAL, reads from memtables and Parquet parts.

``Store`` (``facade.py``) is the one face; its collaborators share a ``StoreCore``. What the
rest of walship imports from here: ``Store``, ``StoreConfig``, ``QueryResult``,
``PendingAppend`` (and ``INSTALL_MARKER``, the snapshot-install marker file).
"""

from walship.storage.manifest import INSTALL_MARKER
from walship.store.core import StoreConfig, StoreCore
from walship.store.facade import Store
from walship.store.reads import QueryResult
from walship.store.writes import PendingAppend

__all__ = ["INSTALL_MARKER", "PendingAppend", "QueryResult", "Store", "StoreConfig", "StoreCore"]
