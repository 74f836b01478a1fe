"""walship as a persistence module for the ``eventsourcing`` library (9.5).

``pip install 'walship[eventsourcing]'``, then give an application::

    PERSISTENCE_MODULE=walship.eventsourcing
    WALSHIP_URLS=http://10.0.0.1:3900,http://10.0.0.2:3900   # a cluster, over HTTP
    # or
    WALSHIP_DATA_DIR=/var/lib/myapp/walship                   # a store embedded in the process

Settings, read like the library's own (``<APPNAME>_WALSHIP_…`` wins over ``WALSHIP_…``):

- ``WALSHIP_TENANT_ID``: the tenant the application's events go to; default: the
  application's name (characters a tenant id cannot hold become ``_``). Each tenant numbers
  its events 1, 2, 3 … (the notification ids), so applications sharing a node each have their
  own gapless sequence. Snapshots go to the tenant ``<tenant>-snapshots``.
- ``WALSHIP_API_KEY``, ``WALSHIP_CA_FILE`` (the CA of the nodes' HTTPS certificates),
  ``WALSHIP_CLIENT_CERT``/``WALSHIP_CLIENT_KEY`` (a client certificate),
  ``WALSHIP_TIMEOUT`` (seconds per request), ``WALSHIP_READ_FROM`` (``leader``, ``followers``
  or ``any``): how the client talks to the nodes.
- ``WALSHIP_FSYNC`` (embedded): ``always`` (default), ``never`` or ``interval:MS``.
- ``ORIGINATOR_ID_TYPE``: ``uuid`` (default) or ``text``, as for the library's SQLite module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    ProcessRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from walship.eventsourcing.backend import Backend
from walship.eventsourcing.recorders import (
    WalshipAggregateRecorder,
    WalshipApplicationRecorder,
    WalshipProcessRecorder,
    WalshipRecorder,
    WalshipSubscription,
    WalshipTrackingRecorder,
)

__all__ = [
    "WalshipAggregateRecorder",
    "WalshipApplicationRecorder",
    "WalshipFactory",
    "WalshipProcessRecorder",
    "WalshipRecorder",
    "WalshipSubscription",
    "WalshipTrackingRecorder",
]

_NOT_TENANT_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_TENANT_CHARS_MAX = 64
_SNAPSHOTS = "snapshots"


def default_tenant_id(app_name: str) -> str:
    """The tenant of an application that names none: its name, as a tenant id can hold it
    (room left for ``-snapshots``)."""
    name = _NOT_TENANT_CHARS.sub("_", app_name)[: _TENANT_CHARS_MAX - len(_SNAPSHOTS) - 1]
    return name or "default"


class WalshipFactory(InfrastructureFactory[WalshipTrackingRecorder]):
    """Recorders over a walship cluster (``WALSHIP_URLS``) or an embedded store
    (``WALSHIP_DATA_DIR``)."""

    WALSHIP_URLS = "WALSHIP_URLS"
    WALSHIP_DATA_DIR = "WALSHIP_DATA_DIR"
    WALSHIP_TENANT_ID = "WALSHIP_TENANT_ID"
    WALSHIP_API_KEY = "WALSHIP_API_KEY"
    WALSHIP_CA_FILE = "WALSHIP_CA_FILE"
    WALSHIP_CLIENT_CERT = "WALSHIP_CLIENT_CERT"
    WALSHIP_CLIENT_KEY = "WALSHIP_CLIENT_KEY"
    WALSHIP_TIMEOUT = "WALSHIP_TIMEOUT"
    WALSHIP_READ_FROM = "WALSHIP_READ_FROM"
    WALSHIP_FSYNC = "WALSHIP_FSYNC"
    ORIGINATOR_ID_TYPE = "ORIGINATOR_ID_TYPE"
    CREATE_TABLE = "CREATE_TABLE"  # accepted for the library's tests: walship has no tables

    aggregate_recorder_class = WalshipAggregateRecorder
    application_recorder_class = WalshipApplicationRecorder
    tracking_recorder_class = WalshipTrackingRecorder
    process_recorder_class = WalshipProcessRecorder

    def __init__(self, env: Environment | EnvType | None):
        super().__init__(env)
        self.tenant_id = self._tenant_id()
        self.originator_id_type = (self.env.get(self.ORIGINATOR_ID_TYPE) or "uuid").lower()
        if self.originator_id_type not in ("uuid", "text"):
            raise OSError(
                f"Invalid {self.ORIGINATOR_ID_TYPE} {self.originator_id_type!r}, "
                "must be 'uuid' or 'text'"
            )
        self.backend = self._backend()

    def _tenant_id(self) -> str:
        from walship.errors import InvalidInput
        from walship.events import validate_tenant_id

        tenant = self.env.get(self.WALSHIP_TENANT_ID) or default_tenant_id(self.env.name)
        try:
            validate_tenant_id(tenant)
            validate_tenant_id(f"{tenant}-{_SNAPSHOTS}")
        except InvalidInput as exc:
            raise OSError(
                f"{self.WALSHIP_TENANT_ID} {tenant!r}: {exc.message} (and at most "
                f"{_TENANT_CHARS_MAX - len(_SNAPSHOTS) - 1}, leaving room for '-{_SNAPSHOTS}')"
            ) from None
        return tenant

    def _backend(self) -> Backend:
        urls = [u.strip() for u in (self.env.get(self.WALSHIP_URLS) or "").split(",")]
        urls = [u for u in urls if u]
        data_dir = (self.env.get(self.WALSHIP_DATA_DIR) or "").strip()
        if bool(urls) == bool(data_dir):
            keys = self.env.create_keys(self.WALSHIP_URLS) + self.env.create_keys(
                self.WALSHIP_DATA_DIR
            )
            raise OSError(
                "walship needs exactly one of node URLs or a data dir in the environment, "
                f"with keys: {', '.join(keys)}"
            )
        if data_dir:
            from walship.eventsourcing.embedded import EmbeddedBackend

            return EmbeddedBackend(Path(data_dir), self.env.get(self.WALSHIP_FSYNC) or "always")
        return self._http_backend(urls)

    def _http_backend(self, urls: list[str]) -> Backend:
        from walship.client import Client
        from walship.client_routing import ReadFrom
        from walship.eventsourcing.remote import HttpBackend

        cert_file = self.env.get(self.WALSHIP_CLIENT_CERT)
        key_file = self.env.get(self.WALSHIP_CLIENT_KEY)
        cert: tuple[str, str] | str | None = (
            (cert_file, key_file) if cert_file and key_file else cert_file or None
        )
        timeout_text = self.env.get(self.WALSHIP_TIMEOUT)
        try:
            timeout = float(timeout_text) if timeout_text else 10.0
            read_from = ReadFrom(self.env.get(self.WALSHIP_READ_FROM) or "leader")
        except ValueError as exc:
            raise OSError(f"walship client setting: {exc}") from None
        settings: dict[str, Any] = {
            "timeout": timeout,
            "read_from": read_from,
            "api_key": self.env.get(self.WALSHIP_API_KEY) or None,
            "ca_file": self.env.get(self.WALSHIP_CA_FILE) or None,
            "cert": cert,
        }
        return HttpBackend(Client(urls, **settings))

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose == "events":
            tenant, contiguous = self.tenant_id, True
        else:  # snapshots: their own tenant, so they take no notification id
            tenant, contiguous = f"{self.tenant_id}-{purpose}", False
        return self.aggregate_recorder_class(
            self.backend,
            tenant,
            contiguous=contiguous,
            originator_id_type=self.originator_id_type,
        )

    def application_recorder(self) -> ApplicationRecorder:
        cls: type[WalshipApplicationRecorder] = self.application_recorder_class
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        if topic:
            cls = resolve_topic(topic)
            assert issubclass(cls, WalshipApplicationRecorder)
        return cls(self.backend, self.tenant_id, originator_id_type=self.originator_id_type)

    def tracking_recorder(
        self, tracking_recorder_class: type[WalshipTrackingRecorder] | None = None
    ) -> WalshipTrackingRecorder:
        cls = tracking_recorder_class
        if cls is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            cls = resolve_topic(topic) if topic else self.tracking_recorder_class
        assert cls is not None and issubclass(cls, WalshipTrackingRecorder)
        return cls(self.backend, self.tenant_id, originator_id_type=self.originator_id_type)

    def process_recorder(self) -> ProcessRecorder:
        cls: type[WalshipProcessRecorder] = self.process_recorder_class
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        if topic:
            cls = resolve_topic(topic)
            assert issubclass(cls, WalshipProcessRecorder)
        return cls(self.backend, self.tenant_id, originator_id_type=self.originator_id_type)

    def close(self) -> None:
        self.backend.close()


Factory = WalshipFactory
