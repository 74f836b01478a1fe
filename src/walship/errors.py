"""The one error tree of walship.

::

    WalshipError                    every error walship raises on purpose
    ├── InvalidInput                a request, event, frame or argument is malformed (4xx)
    │   ├── MalformedJson           the body is not JSON at all
    │   ├── MalformedMsgpack        the body is not msgpack at all
    │   ├── UnsupportedMediaType    a body in a format the route does not read (415)
    │   ├── ValidationError         an event field breaks a rule of the event model
    │   ├── LimitExceeded           a size or count crosses a named limit in ``limits.py``
    │   ├── InvalidParameter        a query or path parameter of an HTTP request is malformed
    │   │   └── UnmeetableAckMode   a write asks for more followers than the cluster has
    │   ├── MethodNotAllowed        an HTTP path exists but not for that method
    │   └── NotFound                the thing asked for does not exist
    ├── Unauthorized                no credentials, or ones no key/token matches (401)
    ├── Forbidden                   valid credentials without the role or tenant asked for (403)
    ├── RateLimited                 a key over its request rate or concurrency limit (429)
    ├── Conflict                    the request is well formed but contradicts stored state
    │   ├── VersionConflict         ``expected_version`` differs from the entity's version
    │   ├── IdConflict              an event id is stored (or in the batch) with another body
    │   ├── TrackingConflict        a batch's tracked position is not above the consumer's
    │   ├── ReadOnly                a write reached a node that is not the leader
    │   │   └── Fenced              a write reached a leader that learned it was deposed
    │   ├── DataDirLocked           another process (or Store) holds the data dir's lock
    │   └── LogCut                  a consumer's position is not on this node's log (repaired)
    ├── StorageError                the node's own storage failed
    │   ├── CorruptionError         a stored record or file fails its checksum (with location)
    │   ├── WalFailed               the WAL hit a write/fsync error and accepts nothing more
    │   └── StorageFull             the disk is full (retriable once space returns)
    ├── ReplicationError            replication stream or acknowledgement problems
    │   ├── ProtocolError           a peer sent bytes that break protocol v1 (closes one link)
    │   ├── StaleTerm               a frame from a term lower than the receiver knows
    │   ├── AuthenticationError     a peer failed the shared-secret challenge
    │   └── AckTimeout              replicas did not confirm a write in time
    ├── Unavailable                 the node cannot serve now (shutting down, still starting)
    │   ├── NotLeaseholder          a leader without a live leader lease (etcd) takes no writes
    │   ├── NotReady                the node cannot do its job now (``/health/ready``)
    │   ├── Unconfirmed             a leader that has not yet heard enough peers takes no writes
    │   └── WaitTimeout             a bounded wait (e.g. ``min_lsn``) expired
    └── InvariantViolation          an internal assumption broke; the operation stopped

Every error carries a stable machine ``code`` (the ``error`` field of HTTP error bodies) and a
``retriable`` flag that retry loops read. An error rebuilt from an HTTP answer by the client
also carries that answer's ``status``. OS and library errors are translated once at the
boundary with ``raise ... from``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WalshipError(Exception):
    """Root of every error walship raises on purpose."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False
    status: int | None = None
    """HTTP status of the answer this error was read from (client side); None when raised here."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of an HTTP error: ``error`` code, ``message`` and any details."""
        return {"error": self.code, "message": self.message, **self.details}


class InvalidInput(WalshipError):
    code = "invalid_request"
    http_status = 400


class MalformedJson(InvalidInput):
    code = "malformed_json"


class MalformedMsgpack(InvalidInput):
    code = "malformed_msgpack"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"
    http_status = 415


class ValidationError(InvalidInput):
    code = "validation_error"
    http_status = 422


class LimitExceeded(InvalidInput):
    code = "limit_exceeded"
    http_status = 413


class InvalidParameter(InvalidInput):
    code = "invalid_parameter"


class UnmeetableAckMode(InvalidParameter):
    code = "unmeetable_ack_mode"


class MethodNotAllowed(InvalidInput):
    code = "method_not_allowed"
    http_status = 405


class NotFound(InvalidInput):
    code = "not_found"
    http_status = 404


class Unauthorized(WalshipError):
    """A request without credentials, or with ones that match no API key or admin token.

    Its message never repeats what was presented."""

    code = "unauthorized"
    http_status = 401


class Forbidden(WalshipError):
    """Valid credentials whose role or tenants do not cover the request."""

    code = "forbidden"
    http_status = 403


class RateLimited(WalshipError):
    """A key sent more requests than its limits allow; ``retry_after_s`` says when to retry."""

    code = "rate_limited"
    http_status = 429
    retriable = True


class Conflict(WalshipError):
    code = "conflict"
    http_status = 409


class VersionConflict(Conflict):
    code = "version_conflict"


class IdConflict(Conflict):
    code = "id_conflict"


class TrackingConflict(Conflict):
    """A batch's ``tracking`` position is not above the consumer's stored one: nothing of the
    batch was stored (``stored_position`` says where the consumer is)."""

    code = "tracking_conflict"


class ReadOnly(Conflict):
    code = "read_only"


class Fenced(ReadOnly):
    """A leader that learned of a higher term (it was deposed) accepts no more writes."""

    code = "fenced"


class DataDirLocked(Conflict):
    """A data dir is open elsewhere: one process (one ``Store``) per data dir, DESIGN invariant 9.

    ``pid`` is the holder's process id when it could be read from the lock file, else None."""

    code = "data_dir_locked"


class LogCut(Conflict):
    """A subscription's position names events this node's log no longer holds (a failover
    repair cut them, or they never reached this history): the consumer must rebuild from a
    position it trusts. ``kept_lsn`` (when known) is where the log still agrees."""

    code = "log_cut"


class StorageError(WalshipError):
    code = "storage_error"
    http_status = 503


class CorruptionError(StorageError):
    code = "corruption"


class WalFailed(StorageError):
    code = "wal_failed"


class StorageFull(StorageError):
    code = "storage_full"
    http_status = 507
    retriable = True


class ReplicationError(WalshipError):
    code = "replication_error"
    http_status = 503
    retriable = True


class ProtocolError(ReplicationError):
    code = "protocol_error"


class StaleTerm(ProtocolError):
    """A peer spoke from a term lower than one this node already knows: it was deposed."""

    code = "stale_term"
    retriable = False


class AuthenticationError(ReplicationError):
    code = "authentication_failed"
    http_status = 401
    retriable = False


class AckTimeout(ReplicationError):
    code = "ack_timeout"


class Unavailable(WalshipError):
    code = "unavailable"
    http_status = 503
    retriable = True


class TlsVerificationFailed(WalshipError):
    """Client side: the server's TLS certificate did not verify against the trusted CAs. A
    setting to fix (the CA file, the URL's host name), never retried."""

    code = "tls_verification_failed"


class NotLeaseholder(Unavailable):
    """A leader under automatic failover that does not hold a live lease takes no writes."""

    code = "no_leader_lease"


class NotReady(Unavailable):
    """The node serves but cannot do its job now; ``reasons`` lists why (``readiness.py``)."""

    code = "not_ready"


class Unconfirmed(Unavailable):
    """A leader that started again asks its peers whether a newer term exists before it
    takes writes (DESIGN invariant 10); until enough of them answered it takes none."""

    code = "leadership_unconfirmed"


class WaitTimeout(Unavailable):
    code = "wait_timeout"
    http_status = 504


class InvariantViolation(WalshipError):
    code = "invariant_violation"


def invariant(condition: bool, message: str) -> None:
    """Raise InvariantViolation when ``condition`` is false.

    Used where a broken assumption would corrupt data (lsn order, term monotonicity); it stays
    on in production.
    """
    if not condition:
        raise InvariantViolation(message)


_BY_CODE: dict[str, type[WalshipError]] = {}


def _register(cls: type[WalshipError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _register(sub)


_register(WalshipError)


def error_class_for(code: str) -> type[WalshipError]:
    """The error class for a wire/HTTP ``error`` code; WalshipError when the code is unknown."""
    return _BY_CODE.get(code, WalshipError)
