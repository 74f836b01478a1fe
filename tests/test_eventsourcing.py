"""The ``eventsourcing`` library's own test cases against ``walship.eventsourcing``.

Every test case here but ``ModuleCases`` is one of the library's, imported from the installed
package (``eventsourcing.tests.persistence``, ``.application`` and ``.projection``) and run
unchanged: the subclasses only say how to make a recorder, a factory or the materialised view
the projection cases ask for. Each runs twice: on a store embedded in the test process
(``WALSHIP_DATA_DIR``) and over HTTP on a real ``walship serve`` leader (``WALSHIP_URLS``).
Every test takes a tenant of its own on that one store and that one node, so the notification
ids the library checks (1, 2, 3 …) are the tenant positions of applications sharing a node. A
few cases run a third time on the leader and its follower, reading from the follower.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar
from unittest import TestCase
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, PersistenceError, StoredEvent, Tracking
from eventsourcing.tests import application as es_application
from eventsourcing.tests import persistence as es_persistence
from eventsourcing.tests import projection as es_projection
from eventsourcing.utils import Environment, get_topic

from tests.cluster import Cluster, replication_address, stats, wait_until
from walship.apikeys import ApiKeyFile, Role
from walship.eventsourcing import (
    WalshipAggregateRecorder,
    WalshipApplicationRecorder,
    WalshipFactory,
    WalshipProcessRecorder,
    WalshipTrackingRecorder,
)
from walship.eventsourcing.backend import NewEvent
from walship.eventsourcing.embedded import acquire_store, release
from walship.testing.process import NodeProcess

MODULE = "walship.eventsourcing"

_root: Path | None = None
_cluster: Cluster | None = None
_node: NodeProcess | None = None  # the leader
_follower: NodeProcess | None = None
_embedded: Any = None


def setUpModule() -> None:
    global _root, _cluster, _node, _follower, _embedded
    _root = Path(tempfile.mkdtemp(prefix="walship-es-"))
    _cluster = Cluster(_root / "cluster")
    _node = _cluster.start_leader("es-leader")
    _follower = _cluster.start_follower("es-follower", replication_address(_node))
    # held open for the whole module: each test's factories would otherwise open and close
    # the embedded store (replaying what the tests before wrote) once per test
    _embedded = acquire_store(_root / "embedded", "never")


def tearDownModule() -> None:
    if _embedded is not None:
        release(_embedded)
    if _cluster is not None:
        _cluster.close()
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)


def new_tenant() -> str:
    return f"es-{uuid.uuid4().hex[:16]}"


class Embedded:
    """Settings for a store embedded in this process (one data dir for every test)."""

    @staticmethod
    def settings() -> dict[str, str]:
        assert _root is not None
        return {"WALSHIP_DATA_DIR": str(_root / "embedded"), "WALSHIP_FSYNC": "never"}


class OverHttp:
    """Settings for the node started by ``setUpModule``."""

    @staticmethod
    def settings() -> dict[str, str]:
        assert _node is not None
        return {"WALSHIP_URLS": _node.url}


class OverClusterReadingFollowers:
    """Settings for the leader and its follower, the follower named first and read from: the
    client finds the leader for writes, and reads its own writes on the follower."""

    @staticmethod
    def settings() -> dict[str, str]:
        assert _node is not None and _follower is not None
        return {
            "WALSHIP_URLS": f"{_follower.url},{_node.url}",
            "WALSHIP_READ_FROM": "followers",
        }


class WithFactory:
    """Makes the factories of a test (a tenant of its own) and closes them after it."""

    factories: list[WalshipFactory]

    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def factory(self, **more: str) -> WalshipFactory:
        env = {"PERSISTENCE_MODULE": MODULE, "WALSHIP_TENANT_ID": new_tenant()}
        factory = WalshipFactory.construct(Environment(env={**env, **self.settings(), **more}))
        if not hasattr(self, "factories"):
            self.factories = []
        self.factories.append(factory)
        return factory

    def tearDown(self) -> None:
        for factory in getattr(self, "factories", []):
            factory.close()
        self.factories = []


# ---------------------------------------------------------------------- the recorder test cases


class AggregateRecorderCases(WithFactory, es_persistence.AggregateRecorderTestCase):
    def create_recorder(self) -> WalshipAggregateRecorder:
        recorder = self.factory().aggregate_recorder()
        assert isinstance(recorder, WalshipAggregateRecorder)
        return recorder


class SnapshotRecorderCases(WithFactory, es_persistence.AggregateRecorderTestCase):
    """The aggregate recorder contract for the snapshot recorder too (versions with gaps)."""

    def create_recorder(self) -> WalshipAggregateRecorder:
        recorder = self.factory().aggregate_recorder(purpose="snapshots")
        assert isinstance(recorder, WalshipAggregateRecorder)
        return recorder


class ApplicationRecorderCases(WithFactory, es_persistence.ApplicationRecorderTestCase):
    def create_recorder(self) -> WalshipApplicationRecorder:
        recorder = self.factory().application_recorder()
        assert isinstance(recorder, WalshipApplicationRecorder)
        return recorder

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class TrackingRecorderCases(WithFactory, es_persistence.TrackingRecorderTestCase):
    def create_recorder(self) -> WalshipTrackingRecorder:
        return self.factory().tracking_recorder()


class ProcessRecorderCases(WithFactory, es_persistence.ProcessRecorderTestCase):
    def create_recorder(self) -> WalshipProcessRecorder:
        recorder = self.factory().process_recorder()
        assert isinstance(recorder, WalshipProcessRecorder)
        return recorder


class NonInterleavingCases(WithFactory, es_persistence.NonInterleavingNotificationIDsBaseCase):
    def create_recorder(self) -> WalshipApplicationRecorder:
        recorder = self.factory().application_recorder()
        assert isinstance(recorder, WalshipApplicationRecorder)
        return recorder


class TrackingRecorderSubclass(WalshipTrackingRecorder):
    pass


class InfrastructureFactoryCases(es_persistence.InfrastructureFactoryTestCase[WalshipFactory]):
    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def setUp(self) -> None:
        self.env = Environment("TestCase")
        self.env[WalshipFactory.PERSISTENCE_MODULE] = MODULE
        self.env[WalshipFactory.WALSHIP_TENANT_ID] = new_tenant()
        self.env.update(self.settings())
        super().setUp()

    def expected_factory_class(self) -> type[WalshipFactory]:
        return WalshipFactory

    def expected_aggregate_recorder_class(self) -> type[WalshipAggregateRecorder]:
        return WalshipAggregateRecorder

    def expected_application_recorder_class(self) -> type[WalshipApplicationRecorder]:
        return WalshipApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[WalshipTrackingRecorder]:
        return WalshipTrackingRecorder

    def tracking_recorder_subclass(self) -> type[WalshipTrackingRecorder]:
        return TrackingRecorderSubclass

    def expected_process_recorder_class(self) -> type[WalshipProcessRecorder]:
        return WalshipProcessRecorder


class ExampleApplicationCases(es_application.ExampleApplicationTestCase):
    """The library's example application (a bank account, snapshots, the notification log),
    configured the way a user would: through the process environment."""

    expected_factory_topic = get_topic(WalshipFactory)
    saved_env: ClassVar[dict[str, str | None]] = {}

    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        env = {
            "PERSISTENCE_MODULE": MODULE,
            # the application's own key (<APPNAME>_…) as a user would set it per application
            "BANKACCOUNTS_WALSHIP_TENANT_ID": new_tenant(),
            **self.settings(),
        }
        self.saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    def tearDown(self) -> None:
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        super().tearDown()


class ApplicationCases(es_application.ApplicationTestCase):
    """The library's application cases (the notification ids of saves, the aggregate cache and
    its fast-forwarding under contention, the application log), on walship through the
    process environment; ``Application`` gets a tenant of its own per test."""

    saved_env: ClassVar[dict[str, str | None]] = {}

    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        env = {
            "PERSISTENCE_MODULE": MODULE,
            "APPLICATION_WALSHIP_TENANT_ID": new_tenant(),
            **self.settings(),
        }
        self.saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    def tearDown(self) -> None:
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        super().tearDown()


class WalshipEventCounters(WalshipTrackingRecorder, es_projection.EventCountersView):
    """The materialised view the library's projection test cases ask for, kept in walship: a
    counter is an entity whose version is the count, and each increment is appended in one
    atomic append with the tracking object of the event that caused it (so an event is
    counted once, however often it is delivered)."""

    CREATED = "created-events"
    SUBSEQUENT = "subsequent-events"

    def _count(self, counter: str) -> int:
        rows = self.backend.entity_events(self.tenant_id, counter, 1, None, backward=True, limit=1)
        return rows[0].version if rows else 0

    def _increment(self, counter: str, tracking: Tracking) -> None:
        self._append([NewEvent(counter, "counter.incremented", b"", None, None)], tracking)

    def get_created_event_counter(self) -> int:
        return self._count(self.CREATED)

    def get_subsequent_event_counter(self) -> int:
        return self._count(self.SUBSEQUENT)

    def incr_created_event_counter(self, tracking: Tracking) -> None:
        self._increment(self.CREATED, tracking)

    def incr_subsequent_event_counter(self, tracking: Tracking) -> None:
        self._increment(self.SUBSEQUENT, tracking)


class EventCountersViewCases(WithFactory, es_projection.EventCountersViewTestCase):
    def construct_event_counters_view(self) -> WalshipEventCounters:
        view = self.factory().tracking_recorder(WalshipEventCounters)
        assert isinstance(view, WalshipEventCounters)
        return view


class AggregateEventCountersProjectionCases(es_projection.AggregateEventCountersProjectionTestCase):
    """An application and a projection of it into the view above, each its own tenant on
    the one node (the projection subscribes to the application's notifications)."""

    view_class = WalshipEventCounters

    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        self.env = {
            "PERSISTENCE_MODULE": MODULE,
            "APPLICATION_WALSHIP_TENANT_ID": new_tenant(),
            "EVENTCOUNTERS_WALSHIP_TENANT_ID": new_tenant(),
            **self.settings(),
        }


class EventSourcedProjectionCases(es_projection.EventSourcedProjectionTestCase):
    """An application and an event-sourced projection of it (a process recorder: its events
    and the tracking object in one append), each its own tenant on the one node."""

    @staticmethod
    def settings() -> dict[str, str]:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        self.env = {
            "PERSISTENCE_MODULE": MODULE,
            "APPLICATION_WALSHIP_TENANT_ID": new_tenant(),
            "COUNTERS_WALSHIP_TENANT_ID": new_tenant(),
            **self.settings(),
        }


# ------------------------------------------------------- walship's own cases for the module


class Orders(Application[UUID]):
    pass


class Invoices(Application[UUID]):
    pass


class ModuleCases(WithFactory, TestCase):
    """What the library's cases do not pin down about this module."""

    def test_two_applications_on_one_node_each_number_their_own_notifications(self) -> None:
        # tenants from the applications' names, as a user who sets none gets them
        env = {"PERSISTENCE_MODULE": MODULE, **self.settings()}
        apps = [Orders(env=env), Invoices(env=env)]
        try:
            tenants = [app.factory.tenant_id for app in apps]  # type: ignore[attr-defined]
            self.assertEqual(tenants, ["Orders", "Invoices"])
            ids: dict[str, list[int]] = {"Orders": [], "Invoices": []}
            for _ in range(3):
                for app in apps:  # interleaved on the one node
                    recordings = app.save(Aggregate())
                    ids[app.name].extend(r.notification.id for r in recordings)
            start = {name: got[0] - 1 for name, got in ids.items()}  # 0 unless run before
            for app in apps:
                self.assertEqual(ids[app.name], [start[app.name] + n for n in (1, 2, 3)])
                items = app.notification_log.select(start=start[app.name] + 1, limit=10)
                self.assertEqual([n.id for n in items], ids[app.name])
                self.assertEqual(app.recorder.max_notification_id(), ids[app.name][-1])
        finally:
            for app in apps:
                app.close()

    def test_a_recorder_that_knew_an_aggregate_wrongly_retries_or_refuses(self) -> None:
        """Another writer (another process) moved the aggregate: an insert that follows the
        new last version is stored after one refused try, one that repeats a version is an
        IntegrityError, and the aggregate's events are exactly what was stored."""
        tenant = new_tenant()
        mine = self.factory(WALSHIP_TENANT_ID=tenant).application_recorder()
        other = self.factory(WALSHIP_TENANT_ID=tenant).application_recorder()
        originator = uuid.uuid4()

        def ev(version: int) -> StoredEvent:
            return StoredEvent(originator, version, "topic", f"state{version}".encode())

        mine.insert_events([ev(1)])
        other.insert_events([ev(2)])  # knows nothing of it: tried as new, refused, retried
        with self.assertRaises(IntegrityError):
            mine.insert_events([ev(2)])  # it believed the aggregate at version 1
        mine.insert_events([ev(3)])
        stored = mine.select_events(originator)
        self.assertEqual([(e.originator_version, e.state) for e in stored],
                         [(1, b"state1"), (2, b"state2"), (3, b"state3")])  # fmt: skip
        self.assertEqual(mine.max_notification_id(), 3)

    def test_a_topic_walship_cannot_spell_is_stored_and_read_back(self) -> None:
        # a class defined in a function (its topic holds "<locals>")
        topic = "tests.test_eventsourcing:f.<locals>.Thing.Created"
        recorder = self.factory().application_recorder()
        originator = uuid.uuid4()
        recorder.insert_events([StoredEvent(originator, 1, topic, b"x")])
        recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "other", b"y")])
        self.assertEqual([e.topic for e in recorder.select_events(originator)], [topic])
        found = recorder.select_notifications(None, 10, topics=[topic])
        self.assertEqual([(n.id, n.topic, n.state) for n in found], [(1, topic, b"x")])


class TestFactorySettings(TestCase):
    def test_bad_settings_are_refused_naming_the_setting(self) -> None:
        assert _root is not None and _node is not None
        base = {"PERSISTENCE_MODULE": MODULE}
        cases = [
            ({}, "WALSHIP_URLS"),  # neither
            ({"WALSHIP_URLS": _node.url, "WALSHIP_DATA_DIR": str(_root / "x")}, "exactly one"),
            ({"WALSHIP_URLS": _node.url, "WALSHIP_TENANT_ID": "no spaces"}, "WALSHIP_TENANT_ID"),
            ({"WALSHIP_URLS": _node.url, "WALSHIP_TENANT_ID": "t" * 60}, "WALSHIP_TENANT_ID"),
            ({"WALSHIP_URLS": _node.url, "ORIGINATOR_ID_TYPE": "int"}, "ORIGINATOR_ID_TYPE"),
            ({"WALSHIP_URLS": _node.url, "WALSHIP_READ_FROM": "nearest"}, "nearest"),
            ({"WALSHIP_URLS": _node.url, "WALSHIP_TIMEOUT": "soon"}, "soon"),
        ]
        for settings, named in cases:
            with self.subTest(settings=settings), self.assertRaises(OSError) as caught:
                WalshipFactory.construct(Environment("MyApp", {**base, **settings}))
            self.assertIn(named, str(caught.exception))

    def test_an_application_named_with_odd_characters_gets_a_tenant_it_can_hold(self) -> None:
        assert _node is not None
        env = Environment("My App/v2", {"PERSISTENCE_MODULE": MODULE, "WALSHIP_URLS": _node.url})
        factory = WalshipFactory.construct(env)
        try:
            self.assertEqual(factory.tenant_id, "My_App_v2")
        finally:
            factory.close()


class Ledger(Application[UUID]):
    is_snapshotting_enabled = True


class TestHttpWithApiKey(TestCase):
    def test_an_application_with_a_key_of_its_own_tenants(self) -> None:
        """A node that requires keys, and a write key scoped to the application's tenant and
        its snapshots' (``<tenant>-snapshots``): saves, snapshots, the notification log, a
        subscription and a tracking all work, and a key without the snapshots' tenant is
        refused when the application takes a snapshot."""
        assert _root is not None
        keys = _root / "keys.json"
        tenant = new_tenant()
        key_file = ApiKeyFile(keys)
        key = key_file.create(Role.WRITE, frozenset({tenant, f"{tenant}-snapshots"}))[1]
        narrow = key_file.create(Role.WRITE, frozenset({tenant}))[1]
        with NodeProcess(
            _root / f"keyed-{tenant}",
            fsync="never",
            extra_args=["--api-keys-file", str(keys)],
        ).start() as node:
            env = {
                "PERSISTENCE_MODULE": MODULE,
                "WALSHIP_URLS": node.url,
                "LEDGER_WALSHIP_TENANT_ID": tenant,
                "WALSHIP_API_KEY": key,
            }
            app = Ledger(env=env)
            try:
                aggregate = Aggregate()
                aggregate.trigger_event(Aggregate.Event)
                recordings = app.save(aggregate)
                self.assertEqual([r.notification.id for r in recordings], [1, 2])
                app.take_snapshot(aggregate.id)
                self.assertEqual(app.repository.get(aggregate.id).version, 2)
                self.assertEqual(len(app.notification_log.select(start=1, limit=10)), 2)
                with app.recorder.subscribe(gt=2) as subscription:
                    app.save(Aggregate())
                    self.assertEqual(next(iter(subscription)).id, 3)
                process = app.factory.process_recorder()
                process.insert_events([], tracking=Tracking("upstream", 5))
                self.assertEqual(process.max_tracking_id("upstream"), 5)
            finally:
                app.close()
            app = Ledger(env={**env, "WALSHIP_API_KEY": narrow})
            try:
                aggregate = Aggregate()
                app.save(aggregate)
                with self.assertRaises(PersistenceError) as caught:
                    app.take_snapshot(aggregate.id)
                self.assertIn("snapshots", str(caught.exception))
            finally:
                app.close()


class TestHttpSubscriptionStream(OverHttp, WithFactory, TestCase):
    def test_a_subscription_is_one_event_stream_that_stop_closes_at_once(self) -> None:
        """Over HTTP a subscription holds one SSE stream open on the node while idle (the
        node's ``subscriptions``), gets an event appended meanwhile from it, and ``stop``
        closes it at once, though an idle stream hears from the node only every 15 s."""
        assert _node is not None
        node = _node

        def open_streams() -> int:
            count: int = stats(node)["subscriptions"]
            return count

        recorder = self.factory().application_recorder()
        recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "t", b"first")])
        before = open_streams()  # another test's, if any
        with recorder.subscribe(gt=None) as subscription:
            first = next(subscription)
            self.assertEqual((first.id, first.state), (1, b"first"))
            wait_until(lambda: open_streams() > before, 20, "the subscription's stream to open")
            time.sleep(0.2)  # idle: nothing to send (not the check)
            recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "t", b"second")])
            second = next(subscription)
            self.assertEqual((second.id, second.state), (2, b"second"))
            started = time.monotonic()
            subscription.stop()
        # leaving joined the thread that was blocked reading the stream
        self.assertLess(time.monotonic() - started, 5.0)
        wait_until(lambda: open_streams() <= before, 20, "the node to see the stream closed")


# ------------------------------------------------------------ embedded, then over HTTP


class TestEmbeddedAggregateRecorder(Embedded, AggregateRecorderCases):
    pass


class TestEmbeddedSnapshotRecorder(Embedded, SnapshotRecorderCases):
    pass


class TestEmbeddedApplicationRecorder(Embedded, ApplicationRecorderCases):
    pass


class TestEmbeddedTrackingRecorder(Embedded, TrackingRecorderCases):
    pass


class TestEmbeddedProcessRecorder(Embedded, ProcessRecorderCases):
    pass


class TestEmbeddedNonInterleaving(Embedded, NonInterleavingCases):
    pass


class TestEmbeddedInfrastructureFactory(Embedded, InfrastructureFactoryCases):
    pass


class TestEmbeddedExampleApplication(Embedded, ExampleApplicationCases):
    pass


class TestEmbeddedApplication(Embedded, ApplicationCases):
    pass


class TestEmbeddedEventCountersView(Embedded, EventCountersViewCases):
    pass


class TestEmbeddedAggregateEventCountersProjection(Embedded, AggregateEventCountersProjectionCases):
    pass


class TestEmbeddedEventSourcedProjection(Embedded, EventSourcedProjectionCases):
    pass


class TestEmbeddedModule(Embedded, ModuleCases):
    pass


class TestHttpAggregateRecorder(OverHttp, AggregateRecorderCases):
    pass


class TestHttpSnapshotRecorder(OverHttp, SnapshotRecorderCases):
    pass


class TestHttpApplicationRecorder(OverHttp, ApplicationRecorderCases):
    pass


class TestHttpTrackingRecorder(OverHttp, TrackingRecorderCases):
    pass


class TestHttpProcessRecorder(OverHttp, ProcessRecorderCases):
    pass


class TestHttpNonInterleaving(OverHttp, NonInterleavingCases):
    pass


class TestHttpInfrastructureFactory(OverHttp, InfrastructureFactoryCases):
    pass


class TestHttpExampleApplication(OverHttp, ExampleApplicationCases):
    pass


class TestHttpApplication(OverHttp, ApplicationCases):
    pass


class TestHttpEventCountersView(OverHttp, EventCountersViewCases):
    pass


class TestHttpAggregateEventCountersProjection(OverHttp, AggregateEventCountersProjectionCases):
    pass


class TestHttpEventSourcedProjection(OverHttp, EventSourcedProjectionCases):
    pass


class TestHttpModule(OverHttp, ModuleCases):
    pass


class TestClusterApplicationRecorder(OverClusterReadingFollowers, ApplicationRecorderCases):
    pass


class TestClusterProcessRecorder(OverClusterReadingFollowers, ProcessRecorderCases):
    pass


class TestClusterEventSourcedProjection(OverClusterReadingFollowers, EventSourcedProjectionCases):
    pass


# the bases above are not tests by themselves (pytest would collect them)
del AggregateRecorderCases, SnapshotRecorderCases, ApplicationRecorderCases
del TrackingRecorderCases, ProcessRecorderCases, NonInterleavingCases
del InfrastructureFactoryCases, ExampleApplicationCases, EventCountersViewCases, ApplicationCases
del AggregateEventCountersProjectionCases, EventSourcedProjectionCases, ModuleCases


class _RacingLookUps:
    """A backend whose next look-up of an entity's last event lets another writer append
    between the node's answer and the recorder's use of it (the race of 100 threads saving
    one aggregate, made deterministic)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.between: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def entity_events(self, *args: Any, **kwargs: Any) -> Any:
        rows = self.backend.entity_events(*args, **kwargs)
        if self.between is not None and kwargs.get("backward"):
            between, self.between = self.between, None
            between()
        return rows


class TestRecorderMemoryRaces(TestCase):
    """What a recorder remembers of an entity's version must never fall behind the node for
    good: one writer's look-up answered before another writer's insert must not overwrite
    what that insert remembered, or every later insert of the entity is refused locally
    (eventsourcing's own fast-forwarding test then spins until its timeout)."""

    def setUp(self) -> None:
        from walship.eventsourcing.embedded import EmbeddedBackend

        assert _root is not None
        self.backend = EmbeddedBackend(_root / "embedded", "never")
        self.racing = _RacingLookUps(self.backend)
        self.recorder = WalshipAggregateRecorder(self.racing, new_tenant())

    def tearDown(self) -> None:
        self.backend.close()

    def event(self, originator_id: UUID, version: int) -> StoredEvent:
        return StoredEvent(originator_id, version, "topic:Event", b"{}")

    def test_a_look_up_overtaken_by_an_insert_keeps_the_newer_version(self) -> None:
        oid = uuid.uuid4()
        self.recorder.insert_events([self.event(oid, 1), self.event(oid, 2)])
        # a stale writer conflicts at version 2; its look-up reads version 2, and before it
        # uses the answer another writer stores version 3
        self.racing.between = lambda: self.recorder.insert_events([self.event(oid, 3)])
        with self.assertRaises(IntegrityError):
            self.recorder.insert_events([self.event(oid, 2)])
        self.assertEqual(self.recorder._recall(str(oid)), (3, 3))
        self.recorder.insert_events([self.event(oid, 4)])
        got = [e.originator_version for e in self.recorder.select_events(oid)]
        self.assertEqual(got, [1, 2, 3, 4])

    def test_a_memory_behind_the_node_is_read_again_before_refusing(self) -> None:
        oid = uuid.uuid4()
        self.recorder.insert_events([self.event(oid, 1), self.event(oid, 2)])
        with self.recorder._known_lock:  # behind the node (as a lost race leaves it)
            self.recorder._known[str(oid)] = (1, 1)
        self.recorder.insert_events([self.event(oid, 3)])
        got = [e.originator_version for e in self.recorder.select_events(oid)]
        self.assertEqual(got, [1, 2, 3])
