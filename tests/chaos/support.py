"""Helpers for the chaos suite: a 3-node cluster we can kill -9, pause and restart node by node,
a paced publisher that retries with the same event id, and the figures every test prints.

The mesh side (coordinator and agent processes, policies, reading every outcome) comes from
`tests.faults.support`. Every wait is bounded; a deadline that passes is a failure that says
what was still open, never a timing assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nats.js.errors import NotFoundError

from mesh import audit, envelope, subjects
from mesh.bus import Bus
from mesh.dev.launcher import Child
from mesh.records import dead_letter_decoder, decision_decoder
from mesh.registry import Registry
from mesh.server import EmbeddedServer, LocalCluster
from mesh.settings import Settings
from tests.faults.support import (
    REVIEWERS,
    SAMPLE_OUTCOME,
    FaultMesh,
    Outcomes,
    assert_alive,
    eventually,
    ledger_mismatches,
    release_event,
    reviewer_policy,
    sample,
    wait_consuming,
    write_policy,
)

NODES = 3
# Knobs for a longer soak. The defaults keep each test within about two minutes on 2 cores:
# 20 events/s is what two coordinators and six agents on a 3-node R3 cluster sustain there
# with room to catch up after a fault (about 25/s without faults).
EVENTS = int(os.environ.get("CHAOS_EVENTS", "2000"))
PER_S = float(os.environ.get("CHAOS_PER_S", "20"))
SAMPLES = ("clean", "secret", "phi", "clean", "untested")
PUBLISH_BUDGET_S = 60.0  # one event is retried (same id) this long before it counts as unpublished
HEAL_TIMEOUT_S = 45.0
DRAIN_TIMEOUT_S = 90.0  # after the last publish, for every outcome to arrive
SETTLE_TIMEOUT_S = 45.0  # then for the durable to have nothing pending or unacknowledged
PASS_TIMEOUT_S = 30.0  # one pass of the outcome reader

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


# The registry's shipped clocks (not the fault tests' short ones): how long an agent may go
# unheard is exactly what a failover puts to the test.
HEARTBEAT_S = float(Settings.model_fields["heartbeat_s"].default)
CARD_TTL_S = float(Settings.model_fields["card_ttl_s"].default)


def chaos_settings() -> Settings:
    return Settings(
        heartbeat_s=HEARTBEAT_S, card_ttl_s=CARD_TTL_S, http_port=0, stream_replicas=NODES
    )


# -- the cluster ------------------------------------------------------------------------------
class ChaosCluster:
    """`LocalCluster(3)` plus what chaos does to its nodes. A node killed with SIGKILL comes back
    with the same name, store folder, client port, cluster port and routes."""

    def __init__(self, base_dir: Path) -> None:
        self.cluster = LocalCluster(NODES, base_dir)
        self.paused: set[str] = set()
        self._client_ports: dict[str, int] = {}

    def start(self) -> ChaosCluster:
        self.cluster.start()
        for s in self.cluster.servers:
            assert s.name is not None
            self._client_ports[s.name] = int(urlsplit(s.url).port or 0)
        return self

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def names(self) -> list[str]:
        return [s.name or "" for s in self.cluster.servers]

    def server(self, name: str) -> EmbeddedServer:
        for s in self.cluster.servers:
            if s.name == name:
                return s
        raise KeyError(f"no node {name!r} (nodes: {self.names})")

    def kill9(self, name: str) -> None:
        s = self.server(name)
        assert s.proc is not None and s.proc.poll() is None, f"{name} is not running"
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)

    async def restart(self, name: str, attempts: int = 5) -> None:
        """Start a killed node again on its own ports (the port may linger a moment)."""
        s = self.server(name)
        s.port = self._client_ports[name]
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(s.start)
                return
            except Exception:
                if attempt == attempts:
                    raise
                await asyncio.sleep(1.0)

    def pause(self, name: str) -> None:
        s = self.server(name)
        assert s.proc is not None and s.proc.poll() is None, f"{name} is not running"
        self.paused.add(name)
        s.proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        s = self.server(name)
        self.paused.discard(name)
        if s.proc is not None and s.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                s.proc.send_signal(signal.SIGCONT)

    def resume_all(self) -> None:
        for name in list(self.paused):
            self.resume(name)

    def stop(self) -> None:
        self.resume_all()  # a stopped process cannot handle SIGTERM
        self.cluster.stop()


META = "$meta"  # the JetStream meta group (streams and consumers), as a kill target
_META_LINE = re.compile(
    r"^\[\d+\] (\S+ \S+) \[INF\] (?:JetStream cluster new metadata leader: (\w+)/"
    r"|(Self) is new JetStream cluster metadata leader|JetStream cluster (no) metadata leader)",
    re.MULTILINE,
)


def meta_leader(cluster: ChaosCluster) -> str:
    """The meta leader by the newest statement in any running node's log ("" if none). The
    client API does not name it without a system account; every node logs each election."""
    newest: tuple[str, str] = ("", "")
    for s in cluster.cluster.servers:
        if s.proc is None or s.proc.poll() is not None or s.name in cluster.paused:
            continue
        text = (s.store_dir / "nats-server.log").read_text(errors="replace")
        for m in _META_LINE.finditer(text):
            who = m.group(2) or (s.name if m.group(3) else "")
            newest = max(newest, (m.group(1), who or ""))
    return newest[1]


async def leader_of(
    bus: Bus, target: str, cluster: ChaosCluster | None = None, timeout: float = 30.0
) -> str:
    """The node that leads stream `target` (or the meta group, META) now; waits out an
    election (bounded)."""

    async def leader() -> str:
        if target == META:
            assert cluster is not None, "the meta leader is read from the nodes' logs"
            return meta_leader(cluster)
        with contextlib.suppress(Exception):
            info = await bus.js.stream_info(target)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        return ""

    got: str = await eventually(f"a leader for {target}", leader, timeout=timeout, every=0.2)
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

    try:
        await eventually("the cluster healed", whole, timeout=timeout, every=0.25)
    except AssertionError:
        raise AssertionError(
            f"the cluster was not whole again within {timeout:.0f}s: {last}"
        ) from None
    return time.monotonic() - started


# -- the mesh ---------------------------------------------------------------------------------
def chaos_mesh(cluster: ChaosCluster, tmp_path: Path) -> FaultMesh:
    mesh = FaultMesh(cluster.url, tmp_path, card_ttl_s=CARD_TTL_S)
    mesh.topology.extra_env["MESH_HEARTBEAT_S"] = str(HEARTBEAT_S)
    mesh.topology.extra_env["MESH_STREAM_REPLICAS"] = str(NODES)
    return mesh


def chaos_policy(tmp_path: Path) -> Path:
    """The shipped release policy with clocks that outlast a leader election: a vote lost to a
    failover is asked again instead of timing out (which would count as a reject)."""
    return write_policy(
        tmp_path / "policies.toml",
        {"release.proposed": reviewer_policy(agent_timeout_s=5.0, deadline_s=60.0, retries=3)},
    )


@dataclass
class Replicas:
    """The reviewer processes, by agent name (2 replicas each, as `mesh up --cluster 3`)."""

    by_agent: dict[str, list[Child]] = field(default_factory=dict)

    def all(self) -> list[Child]:
        return [c for children in self.by_agent.values() for c in children]


def spawn_replica(mesh: FaultMesh, agent: str, tag: str) -> Child:
    return mesh.topology.spawn(f"{agent}-{tag}", REVIEWERS[agent])


async def registered_pids(bus: Bus, agent: str) -> set[int]:
    return {r.pid for r in await Registry(bus).live() if r.agent == agent}


async def start_mesh(
    mesh: FaultMesh, bus: Bus, policy: Path, *, coordinators: int = 2, replicas: int = 2
) -> tuple[list[Child], Replicas]:
    agents = Replicas(
        {
            agent: [spawn_replica(mesh, agent, str(r + 1)) for r in range(replicas)]
            for agent in REVIEWERS
        }
    )
    coords = [mesh.coordinator(policy) for _ in range(coordinators)]
    alive = assert_alive(*agents.all(), *coords)

    async def all_registered() -> bool:
        for agent, children in agents.by_agent.items():
            if {c.proc.pid for c in children} - await registered_pids(bus, agent):
                return False
        return True

    await eventually("every replica registered", all_registered, timeout=60, alive=alive)
    for c in coords:
        await wait_consuming(mesh, c, timeout=60)
    return coords, agents


def make_events(run: str, count: int = EVENTS) -> tuple[list[envelope.Event], dict[str, str]]:
    events, expected = [], {}
    for i in range(count):
        kind = SAMPLES[i % len(SAMPLES)]
        event = release_event(f"{run}-{i:05d}-{kind}", sample(kind))
        expected[event.id] = SAMPLE_OUTCOME[kind]
        events.append(event)
    return events, expected


# -- publishing -------------------------------------------------------------------------------
@dataclass
class Publisher:
    """Publishes at a steady pace; a publish that fails is retried with the same event id (the
    stream's duplicate window makes a retry of a stored event a no-op). An event still not
    acknowledged after `budget_s` counts as not published (it is not expected to be decided)."""

    bus: Bus
    events: list[envelope.Event]
    per_s: float
    budget_s: float = PUBLISH_BUDGET_S
    first_try: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    not_published: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0  # retries the server recognised as already stored
    retried: int = 0  # events that needed more than one attempt
    errors: Counter[str] = field(default_factory=Counter)
    finished_at: float = 0.0

    async def run(self) -> None:
        start = time.monotonic()
        try:
            for i, event in enumerate(self.events):
                pause = start + i / self.per_s - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                await self._one(event)
        finally:
            self.finished_at = time.monotonic()

    async def _one(self, event: envelope.Event) -> None:
        now = time.monotonic()
        self.first_try[event.id] = now
        give_up = now + self.budget_s
        for attempt in itertools.count(1):
            try:
                ack = await self.bus.publish_event(event)
            except Exception as e:  # timeout, no responders, reconnecting, leader change...
                self.errors[type(e).__name__] += 1
                if time.monotonic() >= give_up:
                    self.not_published[event.id] = f"{type(e).__name__}: {e}"
                    return
                await asyncio.sleep(0.25)
                continue
            self.acked[event.id] = time.monotonic()
            self.retried += attempt > 1
            self.duplicates += bool(ack.duplicate)
            return


# -- reading outcomes -------------------------------------------------------------------------
class ChaosOutcomes(Outcomes):
    """`Outcomes` that keeps its place message by message and rides out failovers. (The shared
    reader advances its cursor only after a whole pass, so a get_msg that times out mid-pass,
    which failovers cause, makes the next pass read the same messages again and count them
    twice; and it skips a sequence that a leader in transition answers "not found" for.)

    A pass that fails (timeout, no leader) or takes longer than PASS_TIMEOUT_S is counted in
    `errors`, and the next pass resumes where it stopped; `complete` says whether the last pass
    read up to the end."""

    def __init__(self, bus: Bus, *, skip_gaps: bool = False) -> None:
        super().__init__(bus)
        self.skip_gaps = skip_gaps  # a final read, after settling: a gap is really a gap
        self.errors: Counter[str] = Counter()
        self.complete = False

    async def refresh(self) -> None:
        try:
            await asyncio.wait_for(super().refresh(), PASS_TIMEOUT_S)
        except Exception as e:
            self.errors[type(e).__name__] += 1
            self.complete = False
        else:
            self.complete = True

    async def _refresh(self) -> None:
        for stream in (subjects.DECISIONS_STREAM, subjects.DLQ_STREAM):
            try:
                info = await self.bus.js.stream_info(stream)
            except NotFoundError:
                continue
            last = info.state.last_seq
            seq = max(self._next[stream], info.state.first_seq or 1)
            while seq <= last:
                try:
                    raw = await self.bus.js.get_msg(stream, seq)
                except NotFoundError:
                    if not self.skip_gaps:
                        break  # look again on the next pass
                    seq += 1
                    self._next[stream] = seq
                    continue
                now = time.monotonic()
                if stream == subjects.DECISIONS_STREAM:
                    self.decisions.append((now, decision_decoder.decode(raw.data or b"")))
                else:
                    record = dead_letter_decoder.decode(raw.data or b"")
                    self.dead.append((now, record))
                    self.dead_by_seq[seq] = record
                seq += 1
                self._next[stream] = seq

    def first_arrival(self) -> dict[str, float]:
        first: dict[str, float] = {}
        for t, d in self.decisions:
            first[d.event_id] = min(t, first.get(d.event_id, t))
        for t, dl in self.dead:
            if dl.event_id:
                first[dl.event_id] = min(t, first.get(dl.event_id, t))
        return first


async def settled(bus: Bus, timeout: float) -> str:
    """Until the coordinators' durable has nothing pending and nothing unacknowledged (as
    `tests.faults.support.wait_settled`, riding out a failed request); "" once settled."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return ""
            last = f"{info.num_pending} pending and {info.num_ack_pending} unacknowledged events"
        except Exception as e:
            last = f"no answer ({type(e).__name__})"
        if time.monotonic() >= deadline:
            return f"after {timeout:.0f}s the coordinator durable still has {last}"
        await asyncio.sleep(0.2)


async def read_all(bus: Bus, timeout: float = 60.0) -> ChaosOutcomes:
    """Every decision and dead letter, read once more from the start (bounded)."""
    final = ChaosOutcomes(bus, skip_gaps=True)
    deadline = time.monotonic() + timeout
    while True:
        await final.refresh()
        if final.complete:
            return final
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"could not read MESH_DECISIONS and MESH_DLQ to the end within {timeout:.0f}s "
                f"(errors: {dict(final.errors)}; read {len(final.decisions)} decisions, "
                f"{len(final.dead)} dead letters)"
            )
        await asyncio.sleep(0.5)


# -- a run and its figures --------------------------------------------------------------------
@dataclass
class Figures:
    name: str
    events: int
    faults: int = 0
    published: int = 0
    not_published: int = 0
    decided: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    dead_only: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    takeovers: int = 0
    max_stall: float = 0.0
    max_latency: float = 0.0
    unsettled: str = ""
    publish_retried: int = 0
    duplicates: int = 0
    publish_errors: Counter[str] = field(default_factory=Counter)
    not_published_ids: list[str] = field(default_factory=list)
    audit_missing: list[str] = field(default_factory=list)  # decided, no audit record
    audit_missing_dlq: list[str] = field(default_factory=list)  # dead-lettered, no audit record
    audit_chain: str = ""
    audit_ok: bool = True
    wrong_votes: Counter[str] = field(default_factory=Counter)  # what the uncounted votes said
    extra: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    def details(self) -> str:
        """A few examples of whatever went wrong, one per line."""
        parts = [
            ("lost", self.lost),
            ("doubled", self.doubled),
            ("decided+dlq", self.both),
            ("wrong", self.wrong),
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
            f"lost={len(self.lost)} doubled={len(self.doubled)} "
            f"max_stall={self.max_stall:.1f}s max_latency={self.max_latency:.1f}s | "
            f"published={self.published} not_published={self.not_published} "
            f"decided={self.decided} dlq={len(self.dead_only)} "
            f"dlq_reasons={dict(self.dlq_reasons)} decided+dlq={len(self.both)} "
            f"wrong={len(self.wrong)} ledger_mismatch={len(self.mismatched)} "
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
    mesh: FaultMesh,
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

    watcher = ChaosOutcomes(bus)
    publisher = Publisher(bus, events, per_s)
    async with watcher.watching():
        started = time.monotonic()
        phase(f"publishing {len(events)} events at {per_s:g}/s")
        publishing = asyncio.create_task(publisher.run())
        try:
            figures.faults = await faults(publisher)
            await publishing
        finally:
            if not publishing.done():
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing
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

    decided, dead = final.decided_ids(), final.dead_ids()
    figures.published = len(publisher.acked)
    figures.not_published = len(publisher.not_published)
    figures.not_published_ids = sorted(publisher.not_published)
    figures.decided = sum(1 for i in expected if decided[i])
    figures.lost = sorted(i for i in published if not decided[i] and not dead[i])
    figures.doubled = sorted(i for i in expected if decided[i] > 1)
    figures.dead_only = sorted(i for i in expected if dead[i] and not decided[i])
    figures.both = sorted(i for i in expected if decided[i] and dead[i])
    figures.wrong = sorted(
        f"{i}: {d.outcome} ({d.reason})"
        for i in expected
        if (d := final.decision(i)) is not None and d.outcome != expected[i]
    )
    for i, want in expected.items():
        d = final.decision(i)
        if d is not None and d.outcome != want:
            figures.wrong_votes.update(
                f"{v.skill} {v.outcome} attempts={v.attempts}: {v.error[:90]}"
                for v in d.votes
                if v.outcome != "voted"
            )
    figures.dlq_reasons = Counter(
        d.reason for i in figures.dead_only for d in final.dead_letters(i)
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
    figures.publish_retried = publisher.retried
    figures.duplicates = publisher.duplicates
    figures.publish_errors = publisher.errors
    if watcher.errors:
        figures.extra["reader_errors"] = str(dict(watcher.errors))
    figures.extra["publish_window"] = f"{publisher.finished_at - started:.0f}s"
    phase("done")
    figures.extra["phases"] = ",".join(phases)
    figures.elapsed = time.monotonic() - began
    return figures


async def _check_audit(
    bus: Bus, figures: Figures, final: ChaosOutcomes, expected: dict[str, str]
) -> None:
    """Every decision has its audit record, and the tenant's hash chain verifies."""
    records = await audit.read(bus, "default")
    audited = {r.ref for _, r in records if r.kind == "decision"}
    figures.audit_missing = sorted(
        i for i in expected if final.decision(i) is not None and i not in audited
    )
    dead_audited = {r.ref for _, r in records if r.kind == "dead_letter"}
    figures.audit_missing_dlq = sorted(i for i in figures.dead_only if i not in dead_audited)
    check = audit.verify(records)
    figures.audit_chain = str(check)
    figures.audit_ok = check.ok


def assert_figures(figures: Figures, mesh: FaultMesh) -> None:
    """The promises: never lose an event, never decide one twice, never both decide and
    dead-letter it; the ledger agrees with what was published; the audit trail has it all."""
    errors = f"\nerrors the processes logged:\n{mesh.error_summary()}"
    assert not figures.lost, (
        f"{len(figures.lost)} published events have no outcome (no decision, no dead letter), "
        f"e.g. {figures.lost[:5]}{errors}"
    )
    assert not figures.doubled, f"decided more than once: {figures.doubled[:10]}{errors}"
    assert not figures.both, f"decided and dead-lettered: {figures.both[:10]}{errors}"
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
