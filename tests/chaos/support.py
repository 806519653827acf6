"""Helpers for the chaos suite: the health of a 3-node cluster we kill -9, pause and restart node
by node (`tests.support.launcher.Cluster`), the fault rounds the tests run, and the figures every
test prints.

The mesh side (coordinator and agent processes, policies, publishing, reading every outcome)
comes from `tests.support`. Every wait is bounded; a deadline that passes is a failure that says
what was still open, never a timing assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.js.errors import NotFoundError

from mesh import audit, envelope, subjects
from mesh.bus import Bus
from mesh.settings import Settings
from tests.support import samples
from tests.support.launcher import Cluster, ProcessMesh, Running, clocks
from tests.support.outcomes import (
    Outcomes,
    Publisher,
    Tally,
    ledger_mismatches,
    read_all,
    settled,
)
from tests.support.waits import eventually

NODES = 3
# Knobs for a longer soak. The defaults keep each test within about two minutes on 2 cores:
# 20 events/s is what two coordinators and six agents on a 3-node R3 cluster sustain there
# with room to catch up after a fault (about 25/s without faults).
EVENTS = int(os.environ.get("CHAOS_EVENTS", "2000"))
PER_S = float(os.environ.get("CHAOS_PER_S", "20"))
PUBLISH_BUDGET_S = 60.0  # one event is retried (same id) this long before it counts as unpublished
HEAL_TIMEOUT_S = 45.0
DRAIN_TIMEOUT_S = 90.0  # after the last publish, for every outcome to arrive
SETTLE_TIMEOUT_S = 45.0  # then for the durable to have nothing pending or unacknowledged

# Every replicated asset of the mesh: streams, the KV buckets' streams, and the coordinators'
# durable consumer. "Healthy" means each has a leader and every peer is current.
KV_STREAMS = (
    f"KV_{subjects.DECISIONS_BUCKET}",
    f"KV_{subjects.CARDS_BUCKET}",
    f"KV_{subjects.TASKS_BUCKET}",
)
ALL_STREAMS = (
    subjects.EVENTS_STREAM,
    subjects.DECISIONS_STREAM,
    subjects.DLQ_STREAM,
    subjects.AUDIT_STREAM,
    *KV_STREAMS,
)
# What the leader rounds target, in turn: the events stream, the meta group, the decision
# ledger (KV), the decisions stream.
META = "$meta"  # the JetStream meta group (streams and consumers), as a kill target
TARGETS = (
    subjects.EVENTS_STREAM,
    META,
    f"KV_{subjects.DECISIONS_BUCKET}",
    subjects.DECISIONS_STREAM,
)


# The registry's shipped clocks (not the fault tests' short ones): how long an agent may go
# unheard is exactly what a failover puts to the test.
HEARTBEAT_S = float(Settings.model_fields["heartbeat_s"].default)
CARD_TTL_S = float(Settings.model_fields["card_ttl_s"].default)


def chaos_settings() -> Settings:
    return Settings(
        heartbeat_s=HEARTBEAT_S, card_ttl_s=CARD_TTL_S, http_port=0, stream_replicas=NODES
    )


def chaos_procs(cluster: Cluster, tmp_path: Path) -> ProcessMesh:
    env = {**clocks(HEARTBEAT_S, CARD_TTL_S), "MESH_STREAM_REPLICAS": str(NODES)}
    return ProcessMesh(cluster.url, tmp_path, env, server=cluster)


@dataclass
class Rig:
    """What a chaos test works with: the cluster, a bus on it, and the process launcher."""

    cluster: Cluster
    bus: Bus
    procs: ProcessMesh

    async def start_mesh(self) -> Running:
        """Two coordinators and two replicas of each reviewer (as `mesh up --cluster 3` runs
        them), with the shipped release policy's clocks stretched to outlast a leader election:
        a vote lost to a failover is asked again instead of timing out (a reject)."""
        policy = self.procs.policy(
            {
                "release.proposed": samples.reviewer_policy(
                    agent_timeout_s=5.0, deadline_s=60.0, retries=3
                )
            }
        )
        return await self.procs.up(self.bus, policy, coordinators=2, replicas=2)

    async def check(
        self, name: str, running: Running, faults: FaultLoop, rounds: list[str]
    ) -> None:
        """A whole chaos test: EVENTS releases through `run_chaos` while `faults` runs, then
        the figures printed and the promises checked (`assert_figures`)."""
        events, expected = samples.release_events(f"{name}-{time.time_ns()}", EVENTS)
        figures = await run_chaos(
            name, self.bus, self.procs, events, expected, faults=faults, alive=running.alive
        )
        assert_figures(figures, self.procs, rounds)


# -- the cluster's health ---------------------------------------------------------------------
_META_LINE = re.compile(
    r"^\[\d+\] (\S+ \S+) \[INF\] (?:JetStream cluster new metadata leader: (\w+)/"
    r"|(Self) is new JetStream cluster metadata leader|JetStream cluster (no) metadata leader)",
    re.MULTILINE,
)


def meta_leader(cluster: Cluster) -> str:
    """The meta leader by the newest statement in any running node's log ("" if none). The
    client API does not name it without a system account; every node logs each election."""
    newest: tuple[str, str] = ("", "")
    for s in cluster.servers:
        if not cluster.running(s.name or "") or s.name in cluster.paused:
            continue
        text = (s.store_dir / "nats-server.log").read_text(errors="replace")
        for m in _META_LINE.finditer(text):
            who = m.group(2) or (s.name if m.group(3) else "")
            newest = max(newest, (m.group(1), who or ""))
    return newest[1]


async def leader_of(bus: Bus, target: str, cluster: Cluster, timeout: float = 30.0) -> str:
    """The node that leads stream `target` (or the meta group, META) now; waits out an
    election (bounded)."""

    async def leader() -> str:
        if target == META:
            return meta_leader(cluster)
        with contextlib.suppress(Exception):
            info = await bus.js.stream_info(target)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        return ""

    got: str = await eventually(leader, f"a leader for {target}", timeout=timeout, every=0.2)
    return got


async def unhealthy(bus: Bus) -> list[str]:
    """What is not fully replicated right now ([] when every stream, bucket and the durable
    has a leader and all peers current)."""
    problems = []
    for stream in ALL_STREAMS:
        try:
            info = await bus.js.stream_info(stream)
        except NotFoundError:
            continue
        except Exception as e:
            problems.append(f"{stream}: {type(e).__name__}")
            continue
        problems += _cluster_problems(stream, info.cluster)
    try:
        cinfo = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
        problems += _cluster_problems("durable coordinator", cinfo.cluster)
    except NotFoundError:
        pass
    except Exception as e:
        problems.append(f"durable coordinator: {type(e).__name__}")
    return problems


def _cluster_problems(what: str, cluster: object) -> list[str]:
    leader = getattr(cluster, "leader", None)
    if not leader:
        return [f"{what}: no leader"]
    replicas = getattr(cluster, "replicas", None) or []
    bad = [p.name for p in replicas if p.offline or not p.current]
    if len(replicas) < NODES - 1 or bad:
        return [f"{what}: peers not current {bad or 'missing'}"]
    return []


async def wait_healthy(bus: Bus, timeout: float = HEAL_TIMEOUT_S) -> float:
    """Until the cluster is whole again; returns how long that took."""
    started = time.monotonic()
    last: list[str] = []

    async def whole() -> bool:
        last[:] = await unhealthy(bus)
        return not last

    await eventually(
        whole, "the cluster was whole again", timeout=timeout, every=0.25, detail=lambda: last
    )
    return time.monotonic() - started


# -- fault rounds -----------------------------------------------------------------------------
Fault = Callable[[str], Awaitable[str]]  # breaks a node; returns what it did, for the log


def leader_rounds(
    bus: Bus,
    cluster: Cluster,
    fault: Fault,
    rounds: list[str],
    *,
    first_after_s: float,
    every_s: float,
    alive: Callable[[], None],
) -> FaultLoop:
    """A fault loop for `run_chaos`: while events are published, wait until the cluster is
    whole, then `fault(node)` the node that leads, in turn, each of TARGETS; one round every
    `every_s` at most. Each round is described in `rounds`."""

    async def loop(publisher: Publisher) -> int:
        done = 0
        began_all = time.monotonic()
        await asyncio.sleep(first_after_s)
        while not publisher.finished_at:
            healed = await wait_healthy(bus)
            if publisher.finished_at:
                break
            target = TARGETS[done % len(TARGETS)]
            node = await leader_of(bus, target, cluster)
            began = time.monotonic()
            what = await fault(node)
            done += 1
            rounds.append(
                f"{what} {done}: {node} (leader of {target}) at +{began - began_all:.0f}s, "
                f"healed {healed:.1f}s before, published {len(publisher.acked)}"
            )
            alive()
            await asyncio.sleep(max(0.0, began + every_s - time.monotonic()))
        return done

    return loop


# -- a run and its figures --------------------------------------------------------------------
@dataclass
class Figures:
    name: str
    events: int
    tally: Tally = field(default_factory=lambda: Tally([], [], [], [], []))
    faults: int = 0
    takeovers: int = 0
    decided: int = 0
    # publishing
    published: int = 0
    not_published: int = 0
    not_published_ids: list[str] = field(default_factory=list)
    publish_retried: int = 0
    duplicates: int = 0
    publish_errors: Counter[str] = field(default_factory=Counter)
    # what was stored
    mismatched: list[str] = field(default_factory=list)  # ledger ≠ published decision
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    unsettled: str = ""
    audit_missing: list[str] = field(default_factory=list)  # decided, no audit record
    audit_missing_dlq: list[str] = field(default_factory=list)  # dead-lettered, no audit record
    audit_chain: str = ""
    audit_ok: bool = True
    wrong_votes: Counter[str] = field(default_factory=Counter)  # what the uncounted votes said
    # clocks
    max_stall: float = 0.0
    # The same, by the coordinators' own `decided_at` clocks: a stall here is the mesh's; one in
    # `max_stall` alone is the reader's (a pass can wait out a failover, PASS_TIMEOUT_S).
    max_decided_gap: float = 0.0
    max_latency: float = 0.0
    elapsed: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    def details(self) -> str:
        """A few examples of whatever went wrong, one per line."""
        parts = [
            ("lost", self.tally.lost),
            ("doubled", self.tally.doubled),
            ("decided+dlq", self.tally.both),
            ("wrong", self.tally.wrong),
            ("not published", self.not_published_ids),
            ("decided but not audited", self.audit_missing),
            ("dead-lettered but not audited", self.audit_missing_dlq),
        ]
        lines = [f"  {what}: {ids[:3]}" for what, ids in parts if ids]
        lines += [
            f"  {n}x vote in a wrong decision: {what}" for what, n in self.wrong_votes.items()
        ]
        return "\n".join(lines)

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (
            f"CHAOS {self.name}: events={self.events} faults={self.faults} "
            f"lost={len(self.tally.lost)} doubled={len(self.tally.doubled)} "
            f"max_stall={self.max_stall:.1f}s max_decided_gap={self.max_decided_gap:.1f}s "
            f"max_latency={self.max_latency:.1f}s | "
            f"published={self.published} not_published={self.not_published} "
            f"decided={self.decided} dlq={len(self.tally.dead_only)} "
            f"dlq_reasons={dict(self.dlq_reasons)} decided+dlq={len(self.tally.both)} "
            f"wrong={len(self.tally.wrong)} ledger_mismatch={len(self.mismatched)} "
            f"takeovers={self.takeovers} publish_retried={self.publish_retried} "
            f"dup_acks={self.duplicates} publish_errors={dict(self.publish_errors)} "
            f"settled={not self.unsettled} audit_missing={len(self.audit_missing)} "
            f"audit_missing_dlq={len(self.audit_missing_dlq)} "
            f"audit_chain_ok={self.audit_ok}{extra} elapsed={self.elapsed:.0f}s"
        )


FaultLoop = Callable[[Publisher], Awaitable[int]]


async def run_chaos(
    name: str,
    bus: Bus,
    mesh: ProcessMesh,
    events: list[envelope.Event],
    expected: dict[str, str],
    *,
    faults: FaultLoop,
    per_s: float = PER_S,
    alive: Callable[[], None] | None = None,
) -> Figures:
    """Publish `events` at `per_s` while `faults(publisher)` breaks things (it returns how many
    faults it injected), then wait for every outcome, let the durable settle, read every
    decision and dead letter once more from the start, and count."""
    began = time.monotonic()
    figures = Figures(name, len(events))
    phases: list[str] = []

    def phase(what: str) -> None:
        """Progress on stdout as it happens (a hung run shows where it hangs)."""
        phases.append(f"{what}@{time.monotonic() - began:.0f}s")
        print(f"[chaos {name}] +{time.monotonic() - began:.0f}s {what}", flush=True)

    watcher = Outcomes(bus)
    publisher = Publisher(bus, events, per_s, budget_s=PUBLISH_BUDGET_S)
    async with watcher.watching():
        started = time.monotonic()
        phase(f"publishing {len(events)} events at {per_s:g}/s")
        async with publisher.running():
            figures.faults = await faults(publisher)
        phase(f"{figures.faults} faults injected; waiting for every outcome")
        published = [i for i in expected if i not in publisher.not_published]
        missing = await watcher.wait_all(published, timeout=DRAIN_TIMEOUT_S, alive=alive)
        if not missing:
            phase("every outcome in; waiting for the durable to settle")
            figures.unsettled = await settled(bus, timeout=SETTLE_TIMEOUT_S)
            await asyncio.sleep(0.5)  # a give-up advisory is core NATS: let it land
    phase(f"{len(missing)} without an outcome; reading every outcome again")
    final = await read_all(bus)
    phase("checking the ledger and the audit trail")

    tally = final.tally(expected)
    figures.published = len(publisher.acked)
    figures.not_published = len(publisher.not_published)
    figures.not_published_ids = sorted(publisher.not_published)
    figures.decided = sum(1 for i in expected if final.decision(i) is not None)
    # Lost: published (acknowledged) and neither decided nor dead-lettered.
    tally.lost = [i for i in tally.lost if i not in publisher.not_published]
    figures.tally = tally
    for i, want in expected.items():
        d = final.decision(i)
        if d is not None and d.outcome != want:
            figures.wrong_votes.update(
                f"{v.skill} {v.outcome} attempts={v.attempts}: {v.error[:90]}"
                for v in d.votes
                if v.outcome != "voted"
            )
    figures.dlq_reasons = Counter(
        d.reason for i in figures.tally.dead_only for d in final.dead_letters(i)
    )
    figures.takeovers = sum(1 for _, d in final.decisions if d.event_id in expected and d.takeovers)
    figures.mismatched = await ledger_mismatches(bus, final, expected)
    await _check_audit(bus, figures, final, expected)

    # Stalls: from the first publish, between consecutive first outcomes (as the watcher saw
    # them); the worst publish→outcome latency from each event's first publish attempt.
    arrivals = watcher.first_arrival()
    points = sorted([started, *(t for i, t in arrivals.items() if i in expected)])
    figures.max_stall = max((b - a for a, b in itertools.pairwise(points)), default=0.0)
    figures.max_latency = max(
        (arrivals[i] - publisher.first_try[i] for i in published if i in arrivals), default=0.0
    )
    decided_at = sorted(d.decided_at for _, d in final.decisions if d.event_id in expected)
    figures.max_decided_gap = max((b - a for a, b in itertools.pairwise(decided_at)), default=0.0)
    figures.publish_retried = publisher.retried
    figures.duplicates = publisher.duplicates
    figures.publish_errors = publisher.errors
    if watcher.errors:
        figures.extra["reader_errors"] = str(dict(watcher.errors))
    if any(final.gaps.values()):
        figures.extra["gaps"] = str({s: sorted(g)[:5] for s, g in final.gaps.items() if g})
    figures.extra["publish_window"] = f"{publisher.finished_at - started:.0f}s"
    phase("done")
    figures.extra["phases"] = ",".join(phases)
    figures.elapsed = time.monotonic() - began
    return figures


async def _check_audit(
    bus: Bus, figures: Figures, final: Outcomes, expected: dict[str, str]
) -> None:
    """Every decision has its audit record, and the tenant's hash chain verifies."""
    records = await audit.read(bus, "default")
    audited = {r.ref for _, r in records if r.kind == "decision"}
    figures.audit_missing = sorted(
        i for i in expected if final.decision(i) is not None and i not in audited
    )
    dead_audited = {r.ref for _, r in records if r.kind == "dead_letter"}
    figures.audit_missing_dlq = sorted(i for i in figures.tally.dead_only if i not in dead_audited)
    check = audit.verify(records)
    figures.audit_chain = str(check)
    figures.audit_ok = check.ok


def assert_figures(figures: Figures, mesh: ProcessMesh, rounds: list[str]) -> None:
    """Print what happened (each fault round, examples of what went wrong, the figures), then
    check the promises: never lose an event, never decide one twice, never both decide and
    dead-letter it; the ledger agrees with what was published; the audit trail has it all."""
    print("\n" + "\n".join(rounds))
    print(figures.details())
    print(figures.line())
    errors = f"\nerrors the processes logged:\n{mesh.error_summary()}"
    lost = figures.tally.lost
    assert not lost, (
        f"{len(lost)} published events have no outcome (no decision, no dead letter), "
        f"e.g. {lost[:5]}{errors}"
    )
    assert not figures.tally.doubled, (
        f"decided more than once: {figures.tally.doubled[:10]}{errors}"
    )
    assert not figures.tally.both, f"decided and dead-lettered: {figures.tally.both[:10]}{errors}"
    assert not figures.unsettled, f"{figures.unsettled}{errors}"
    assert not figures.mismatched, (
        f"ledger and published decision disagree: {figures.mismatched[:10]}"
    )
    # The audit trail is the record of what the mesh did: every decision and every dead letter
    # in it, in one unbroken chain per tenant.
    assert figures.audit_ok, f"audit chain broken: {figures.audit_chain}"
    assert not figures.audit_missing, (
        f"{len(figures.audit_missing)} decided events have no audit record, "
        f"e.g. {figures.audit_missing[:5]}{errors}"
    )
    assert not figures.audit_missing_dlq, (
        f"{len(figures.audit_missing_dlq)} dead-lettered events have no audit record, e.g. "
        f"{figures.audit_missing_dlq[:5]} (a dead letter whose audit append failed is "
        f"redelivered, found dead-lettered in the ledger and acked without its record){errors}"
    )
    assert figures.faults > 0, "no fault was injected while events were published"
