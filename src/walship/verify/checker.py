"""The checks: the recorded history against every node's final log, lost-and-found and the
images of disks taken at each crash.

A node's *final log* is what it holds after the heal, the convergence wait and a clean stop:
its WAL records (lsn, term, chain, event id) read from the segment files, and — for history
checkpointed to Parquet and removed from the WAL — the events its query API served. Each check
returns every violation it finds (with the event ids involved, so the report can print the
requests and faults around them); none stops at the first.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from walship.verify.cluster import NodeFinal
from walship.verify.history import History, Outcome

VIOLATIONS_KEPT = 20
ACKER_DOWN = "acker_down"
"""The fault kind ``acker_down.py`` injects, whose promotions ``check_no_unclean_promotion``
reads from the history."""
"""Violations kept per check (all are counted)."""


@dataclass
class Violation:
    message: str
    event_ids: set[str] = field(default_factory=set)


@dataclass
class CheckResult:
    name: str
    claim: str
    checked: int = 0  # how many things the check looked at (writes, records, crashes ...)
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    info: dict[str, int] = field(default_factory=dict)  # counts worth reporting

    @property
    def passed(self) -> bool:
        return self.violation_count == 0

    def fail(self, message: str, event_ids: Iterable[str] = ()) -> None:
        self.violation_count += 1
        if len(self.violations) < VIOLATIONS_KEPT:
            self.violations.append(Violation(message, set(event_ids)))


@dataclass
class FinalView:
    """One node's final log, indexed for the checks."""

    final: NodeFinal
    at: dict[int, tuple[int, str]]  # lsn -> (term, event id); "" for a system record
    positions: dict[str, list[tuple[int, int]]]  # event id -> [(lsn, term)]
    lost: set[tuple[int, int, str]]  # (lsn, term, event id) in its lost-and-found

    @classmethod
    def of(cls, final: NodeFinal) -> FinalView:
        at: dict[int, tuple[int, str]] = {}
        for e in final.events:
            at[int(e["lsn"])] = (int(e["term"]), str(e["id"]))
        for lsn, term, _chain, event_id in final.wal:
            at[lsn] = (term, event_id)
        positions: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for lsn in sorted(at):
            term, event_id = at[lsn]
            if event_id:
                positions[event_id].append((lsn, term))
        lost = {
            (int(r["lsn"]), int(r["term"]), str(r.get("event", {}).get("id", "")))
            for r in final.lost_found
        }
        return cls(final, at, dict(positions), lost)

    def holds(self, lsn: int, term: int, event_id: str) -> bool:
        return self.at.get(lsn) == (term, event_id)

    def describe(self, lsn: int) -> str:
        found = self.at.get(lsn)
        if found is None:
            return f"{self.final.node_id} has no record at lsn {lsn}"
        term, event_id = found
        what = event_id[:8] if event_id else "a system record"
        return f"{self.final.node_id} holds {what} of term {term} at lsn {lsn}"


@dataclass
class RunFacts:
    """What the checks need besides the history and the final logs."""

    leader_id: str
    converged_s: float | None
    converge_timeout_s: float
    failover_used: bool


def run_checks(history: History, finals: list[NodeFinal], facts: RunFacts) -> list[CheckResult]:
    views = {f.node_id: FinalView.of(f) for f in finals}
    leader = views[facts.leader_id]
    return [
        check_converged(finals, facts),
        check_no_gap(finals),
        check_no_duplicate_ids(views, history),
        check_logs_identical(views, leader),
        check_replicated_everywhere(history, views),
        check_acknowledged_survive(history, views, leader),
        check_acks_durable_at_crash(history, views),
        check_lost_found(history, views),
        check_rejoin_after_wal_removal(history, views, leader),
        check_entity_versions(leader),
        check_no_unclean_promotion(history),
    ]


# ---------------------------------------------------------------------------------- checks


def check_converged(finals: list[NodeFinal], facts: RunFacts) -> CheckResult:
    result = CheckResult(
        "converged",
        "after the heal every node answers and holds the leader's last lsn and term",
        checked=len(finals),
    )
    for f in finals:
        if f.error is not None:
            result.fail(f"{f.node_id}: {f.error}")
    if facts.converged_s is None:
        ends = ", ".join(f"{f.node_id} at {f.term}/{f.last_lsn} ({f.role})" for f in finals)
        result.fail(f"not converged within {facts.converge_timeout_s:.0f} s: {ends}")
    return result


def check_no_gap(finals: list[NodeFinal]) -> CheckResult:
    result = CheckResult(
        "no_lsn_gap",
        "each node's log runs from lsn 1 without a hole (WAL after its checkpoint)",
        checked=len(finals),
    )
    for f in finals:
        if f.wal_error is not None:
            result.fail(f"{f.node_id}: {f.wal_error}")
            continue
        lsns = [lsn for lsn, _, _, _ in f.wal]
        expected_first = f.wal_first_lsn
        for k, lsn in enumerate(lsns):
            if lsn != expected_first + k:
                result.fail(
                    f"{f.node_id}: WAL record {k} has lsn {lsn}, expected {expected_first + k}"
                )
                break
        if f.wal_first_lsn > 1 and f.checkpoint[0] < f.wal_first_lsn - 1:
            result.fail(
                f"{f.node_id}: the WAL starts at lsn {f.wal_first_lsn} but the checkpoint "
                f"covers only lsn {f.checkpoint[0]}: lsns in between are nowhere"
            )
        query_lsns = [int(e["lsn"]) for e in f.events]
        if any(b <= a for a, b in itertools.pairwise(query_lsns)):
            result.fail(f"{f.node_id}: query results are not in strictly increasing lsn order")
        wal_last = lsns[-1] if lsns else f.wal_first_lsn - 1
        if f.error is None and wal_last != f.last_lsn:
            result.fail(
                f"{f.node_id}: /health said last lsn {f.last_lsn}, its WAL ends at {wal_last}"
            )
    return result


def check_no_duplicate_ids(views: dict[str, FinalView], history: History) -> CheckResult:
    failed_only = _never_answered(history)
    result = CheckResult(
        "no_duplicate_ids",
        "no event id is stored twice on any node (retried and timed-out writes included)",
    )
    for node_id, view in views.items():
        result.checked += len(view.positions)
        for event_id, where in view.positions.items():
            if len(where) > 1:
                retried = " (a write whose every request failed)" if event_id in failed_only else ""
                result.fail(
                    f"{node_id}: event {event_id} is stored {len(where)} times, at "
                    f"{', '.join(f'lsn {lsn} term {term}' for lsn, term in where)}{retried}",
                    [event_id],
                )
    return result


def check_logs_identical(views: dict[str, FinalView], leader: FinalView) -> CheckResult:
    result = CheckResult(
        "logs_identical",
        "every node's log equals the final leader's: per-record (lsn, term, chain) over the "
        "WAL both hold, (lsn, term, id) over checkpointed history, same end",
    )
    mine = {lsn: (term, chain) for lsn, term, chain, _ in leader.final.wal}
    my_end = max(leader.at, default=0)
    for node_id, view in views.items():
        if view is leader:
            continue
        theirs = view.final.wal
        result.checked += len(theirs)
        for lsn, term, chain, event_id in theirs:
            expected = mine.get(lsn)
            if expected is not None and expected != (term, chain):
                result.fail(
                    f"{node_id}: record {lsn} is term {term} chain {chain.hex()}, the leader's "
                    f"is term {expected[0]} chain {expected[1].hex()}",
                    [event_id] if event_id else [],
                )
                break
        end = max(view.at, default=0)
        if end != my_end:
            result.fail(f"{node_id}: log ends at lsn {end}, the leader's at lsn {my_end}")
        for lsn in sorted(set(view.at) | set(leader.at)):
            if view.at.get(lsn) != leader.at.get(lsn):
                a, b = view.at.get(lsn), leader.at.get(lsn)
                ids = {x[1] for x in (a, b) if x is not None and x[1]}
                result.fail(f"{view.describe(lsn)}; {leader.describe(lsn)}", ids)
                break
    return result


def check_replicated_everywhere(history: History, views: dict[str, FinalView]) -> CheckResult:
    result = CheckResult(
        "replicated_on_every_node",
        "every write answered `replicated` is on the final leader and every follower, at its "
        "receipt's lsn and term, and was confirmed by as many followers as it required",
    )
    for op, receipt in history.answered():
        if receipt["durability"] != "replicated":
            continue
        result.checked += 1
        event_id, lsn, term = receipt["event_id"], receipt["lsn"], receipt["term"]
        acked_by = receipt.get("acked_by") or []
        if len(acked_by) < int(receipt.get("required") or 0):
            result.fail(
                f"event {event_id} answered replicated by {op.node_id} with acked_by {acked_by}, "
                f"fewer than the {receipt.get('required')} required",
                [event_id],
            )
        for view in views.values():
            if not view.holds(lsn, term, event_id):
                result.fail(
                    f"event {event_id} answered replicated (acked_by {acked_by}) by "
                    f"{op.node_id} at lsn {lsn} term {term} is missing: {view.describe(lsn)}",
                    [event_id],
                )
    return result


def check_acknowledged_survive(
    history: History, views: dict[str, FinalView], leader: FinalView
) -> CheckResult:
    result = CheckResult(
        "acknowledged_survive",
        "every write answered 200 (local, buffered, degraded or replicated) is on the final "
        "leader at its receipt's lsn, term and version — or, if never `replicated`, was cut by "
        "divergence repair into a lost-and-found file",
    )
    versions = {int(e["lsn"]): int(e["version"]) for e in leader.final.events}
    lost_anywhere = set().union(*(v.lost for v in views.values()))
    for op, receipt in history.answered():
        result.checked += 1
        event_id, lsn, term = receipt["event_id"], receipt["lsn"], receipt["term"]
        if leader.holds(lsn, term, event_id):
            version = versions.get(lsn)
            if version is not None and version != receipt["version"]:
                result.fail(
                    f"event {event_id} at lsn {lsn}: receipt said version {receipt['version']}, "
                    f"the log holds version {version}",
                    [event_id],
                )
            continue
        if receipt["durability"] != "replicated" and (lsn, term, event_id) in lost_anywhere:
            # accounted for: cut by repair (the lost-and-found check looks closer)
            result.info["cut_to_lost_found"] = result.info.get("cut_to_lost_found", 0) + 1
            continue
        result.fail(
            f"event {event_id} answered {receipt['durability']} by {op.node_id} at lsn {lsn} "
            f"term {term} is lost: {leader.describe(lsn)}, and no lost-and-found holds it",
            [event_id],
        )
    return result


def check_acks_durable_at_crash(history: History, views: dict[str, FinalView]) -> CheckResult:
    result = CheckResult(
        "acks_durable_at_crash",
        "at every SIGKILL, the killed node's disk held every write it had answered (a leader) "
        "or confirmed in a receipt's acked_by (a follower) before the signal",
    )
    for image in history.crashes:
        result.checked += 1
        if image.error is not None:
            result.fail(f"{image.node_id} at {image.at:.3f} s: {image.error}")
            continue
        cut = views[image.node_id].lost if image.node_id in views else set()
        for op, receipt in history.answered():
            if op.finished is None or op.finished >= image.at:
                continue
            answered_here = op.node_id == image.node_id
            confirmed_here = receipt["durability"] == "replicated" and image.node_id in (
                receipt.get("acked_by") or []
            )
            if not (answered_here or confirmed_here):
                continue
            event_id, lsn, term = receipt["event_id"], receipt["lsn"], receipt["term"]
            if lsn < image.wal_first_lsn or (lsn, term, event_id) in cut:
                continue  # checkpointed to Parquet, or cut later by repair (checked there)
            if image.records.get(lsn) != (term, event_id):
                how = "answered it" if answered_here else "confirmed it to the leader"
                on_disk = image.records.get(lsn)
                result.fail(
                    f"{image.node_id} ({image.role}) {how} (event {event_id}, lsn {lsn} term "
                    f"{term}, answered at {op.finished:.3f} s) but its disk did not hold it when "
                    f"killed at {image.at:.3f} s (disk: lsn {image.wal_first_lsn}.."
                    f"{image.last_lsn}, at lsn {lsn}: {on_disk})",
                    [event_id],
                )
    return result


def check_lost_found(history: History, views: dict[str, FinalView]) -> CheckResult:
    result = CheckResult(
        "lost_found_accounted",
        "every record a node had on disk at a crash is in its final log or its lost-and-found; "
        "nothing in lost-and-found was ever answered `replicated`",
    )
    replicated = {
        (r["lsn"], r["term"], r["event_id"])
        for _, r in history.answered()
        if r["durability"] == "replicated"
    }
    for node_id, view in views.items():
        for entry in view.final.lost_found:
            result.checked += 1
            key = (int(entry["lsn"]), int(entry["term"]), str(entry.get("event", {}).get("id")))
            if entry.get("acknowledged") == "replicated" or key in replicated:
                result.fail(
                    f"{node_id}: lost-and-found {entry.get('file')} holds lsn {key[0]} term "
                    f"{key[1]} (event {key[2]}), which was answered replicated",
                    [key[2]],
                )
    for image in history.crashes:
        crashed = views.get(image.node_id)
        if crashed is None or image.error is not None:
            continue
        for lsn, (term, event_id) in image.records.items():
            if not event_id or crashed.holds(lsn, term, event_id):
                continue
            result.checked += 1
            if (lsn, term, event_id) not in crashed.lost:
                result.fail(
                    f"{image.node_id} held event {event_id} at lsn {lsn} term {term} on disk when "
                    f"killed at {image.at:.3f} s; now {crashed.describe(lsn)} and its "
                    "lost-and-found does not have it: dropped without a trace",
                    [event_id],
                )
    return result


def check_rejoin_after_wal_removal(
    history: History, views: dict[str, FinalView], leader: FinalView
) -> CheckResult:
    """The ``rejoin`` fault: a deposed leader back after the WAL at its position was gone."""
    result = CheckResult(
        "rejoin_tail_accounted",
        "a deposed leader that rejoined (after the new leader removed the WAL at its end of "
        "log): every write it answered `replicated` is on the final leader, and every record "
        "of its tail that its final log lacks is in its lost-and-found, each with the "
        "acknowledgement its client got",
    )
    for rejoin in history.rejoins:
        image = rejoin.image
        view = views.get(rejoin.node_id)
        if view is None or image.error is not None:
            continue
        _count(result, "rejoins")
        if rejoin.wal_removed:
            _count(result, "rejoins_after_wal_removal")
        levels = {
            (int(e["lsn"]), int(e["term"]), str(e.get("event", {}).get("id", ""))): str(
                e.get("acknowledged")
            )
            for e in view.final.lost_found
        }
        told: dict[tuple[int, int, str], str] = {}
        for op, receipt in history.answered():
            if op.node_id == rejoin.node_id and op.finished is not None and op.finished < image.at:
                key = (receipt["lsn"], receipt["term"], receipt["event_id"])
                told[key] = receipt["durability"]
        for key, durability in told.items():
            if durability == "replicated" and not leader.holds(*key):
                result.checked += 1
                result.fail(
                    f"event {key[2]} answered replicated by {rejoin.node_id} at lsn {key[0]} "
                    f"term {key[1]} before it was deposed is lost: {leader.describe(key[0])}",
                    [key[2]],
                )
        for lsn, (term, event_id) in sorted(image.records.items()):
            if not event_id or view.holds(lsn, term, event_id):
                continue
            result.checked += 1
            key = (lsn, term, event_id)
            level = levels.get(key)
            if level is None:
                result.fail(
                    f"{rejoin.node_id} held event {event_id} at lsn {lsn} term {term} when it was "
                    f"deposed; after rejoining ({rejoin.new_leader}'s WAL started at lsn "
                    f"{rejoin.new_wal_first_lsn}) {view.describe(lsn)} and its lost-and-found "
                    "does not have it: cut without a trace",
                    [event_id],
                )
                continue
            _count(result, "tail_in_lost_found")
            if told.get(key) == "degraded" and level != "degraded":
                result.fail(
                    f"{rejoin.node_id}'s lost-and-found says {level} for event {event_id} at lsn "
                    f"{lsn}, which it had answered degraded",
                    [event_id],
                )
    return result


def _count(result: CheckResult, name: str) -> None:
    result.info[name] = result.info.get(name, 0) + 1


def check_entity_versions(leader: FinalView) -> CheckResult:
    result = CheckResult(
        "entity_versions",
        "on the final leader each entity's versions run 1, 2, 3 ... in lsn order",
        checked=len(leader.final.events),
    )
    last: dict[str, int] = {}
    for e in leader.final.events:
        entity, version = str(e["entity_id"]), int(e["version"])
        expected = last.get(entity, 0) + 1
        if version != expected:
            result.fail(
                f"entity {entity}: lsn {e['lsn']} has version {version}, expected {expected}",
                [str(e["id"])],
            )
        last[entity] = version
    return result


# ---------------------------------------------------------------------------------- summaries


def check_no_unclean_promotion(history: History) -> CheckResult:
    """Every ``acker_down`` failover (``acker_down.py``) refused the follower that lacked the
    acker's writes; a promotion that was accepted is a violation naming the ``replicated``
    writes it cut."""
    result = CheckResult(
        "no_unclean_promotion",
        "a failover while the follower that acknowledged the latest writes was unreachable "
        "refused to promote a follower lacking writes answered `replicated`",
    )
    for fault in history.faults:
        if fault.kind != ACKER_DOWN or fault.phase != "note":
            continue
        if "refused" in fault.data:
            result.checked += 1
            if not fault.data.get("unclean"):
                result.info["refused_for_another_reason"] = (
                    result.info.get("refused_for_another_reason", 0) + 1
                )
            continue
        if "promoted" not in fault.data:
            continue
        result.checked += 1
        term, lsn = int(fault.data["term"]), int(fault.data["lsn"])
        cut = sorted(
            receipt["event_id"]
            for op, receipt in history.answered()
            if receipt["durability"] == "replicated"
            and op.finished is not None
            and op.finished <= fault.at
            and (receipt["term"], receipt["lsn"]) > (term, lsn)
        )
        result.fail(
            f"{fault.data['promoted']} was promoted at {term}/{lsn} while the follower that "
            f"acknowledged later writes was unreachable: {len(cut)} writes answered "
            "replicated before it were beyond its log",
            cut,
        )
    return result


def _never_answered(history: History) -> set[str]:
    """Event ids none of whose requests was answered 200."""
    answered = {r["event_id"] for _, r in history.answered()}
    return {i for op in history.ops for i in op.event_ids if i not in answered}


def write_summary(history: History, leader: FinalView | None) -> dict[str, Any]:
    """Requests and events attempted, acknowledged per level, failures by kind, and what
    became of the writes that never got a 200."""
    ops = history.ops
    outcomes = Counter(str(op.outcome) for op in ops)
    levels: Counter[str] = Counter()
    duplicates = 0
    for _, receipt in history.answered():
        levels[receipt["durability"]] += 1
        duplicates += bool(receipt.get("duplicate"))
    errors = Counter(
        " ".join(
            filter(None, (str(op.outcome), str(op.status or ""), (op.error or "").split(":")[0]))
        )
        for op in ops
        if op.outcome not in (Outcome.OK, Outcome.PENDING)
    )
    never = _never_answered(history)
    present = sum(1 for i in never if leader is not None and i in leader.positions)
    events = {i for op in ops for i in op.event_ids}
    return {
        "requests": len(ops),
        "requests_by_outcome": dict(outcomes),
        "events_attempted": len(events),
        "receipts_by_durability": dict(levels),
        "duplicate_receipts": duplicates,
        "errors": dict(errors.most_common()),
        "events_never_acknowledged": len(never),
        "events_never_acknowledged_present": present,
        "events_never_acknowledged_absent": len(never) - present,
        "retries": sum(1 for op in ops if op.attempt > 1),
    }
