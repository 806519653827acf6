"""One simulated mesh: several coordinators and agent replicas in one process, on in-memory
parts, driven by one seeded random scheduler in virtual time (tests/sim/loop.py).

What is real: the decision core (`coordinator.decide.Decider`), the ledger's transitions
(`coordinator.ledger.Ledger`) and the outcome handling (`coordinator.settle`: ack / nak /
dead letter, ledger first). What is simulated, all drawing from the run's one
`random.Random(seed)`:

- `SimKV`: JetStream KV's compare-and-set (create fails if the key exists, update by last
  revision, one revision sequence per bucket), with stale reads (a get answers an older
  revision), writes that fail before they land and writes that land but whose reply is lost;
- `SimConsumer`: the events stream's durable consumer: redelivery after `ack_wait` (reset by
  in_progress), nak with a delay, `max_deliver`, the max-deliveries advisory (handled as
  `coordinator.dlq.AdvisoryDeadLetters.handle` does: ledger mark with patience, then the
  record), lost acks/naks, duplicate deliveries;
- agents: answers, delays, timeouts, errors, late answers that ignore the deadline, crashes
  (a replica that is down has nobody listening: the asker's vote says so, as
  coordinator.dispatch's does, and the decision core releases the event to wait for it);
- coordinators: crashes (all its tasks cancelled; a new incarnation with a new name restarts
  later), pauses (its I/O blocks while the world's clocks go on: its lease lapses).

After the run, `check` holds the outcome to the promises (see `Violation` kinds there).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
from nats.js.api import PubAck

from coordinator import policy as policy_mod
from coordinator import settle
from coordinator.decide import (
    LATE,
    NOBODY_LISTENING,
    Ask,
    AwaitingHuman,
    Decider,
    Job,
    unanswered,
)
from coordinator.humans import Desk
from coordinator.inbox import Inbox
from coordinator.ledger import (
    DecisionState,
    Entry,
    Ledger,
    StateConflict,
    state_key,
)
from coordinator.service import Coordinator
from coordinator.settle import SETTLE_WAIT_S
from mesh import approvals, envelope, records, subjects
from mesh.audit import AuditLog
from mesh.records import DeadLetter, Decision, DlqReason, Vote
from mesh.verdict import Choice, Verdict
from tests.sim import people
from tests.sim.streams import SimBus, SimIOError, SimStream

WALL0 = 1_700_000_000.0
# The advisory listener's message id for a record it stores itself (tests/sim/mutants.py puts
# back the old one, which differed from the coordinator's and so made a second record).
ADVISORY_OWN_MSG_ID = False
LEASE_S = 2.0  # as coordinator.service
ACK_WAIT_S = LEASE_S + 1.0
SKILLS = ["sec", "qual", "lic"]
# How long an event may wait for an agent (Settings.no_agent_wait_s, shortened: runs are short).
NO_AGENT_WAIT_S = 4.0
# How often the registry view still lists a replica that is down (a card lives `card_ttl_s`
# after its last heartbeat, so a dead agent stays listed for seconds): its calls find nobody.
STALE_VIEW_P = 0.2
TENANT = "acme"

POLICIES = policy_mod.parse(
    {
        # Silence is a reject; a take-over keeps deadline and votes.
        "rel.unanimous": {
            "skills": SKILLS,
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 2.0,
            "deadline_s": 5.0,
            "timeout_counts_as": "reject",
        },
        # Stops early; no quorum is a dead letter (a second road to the DLQ, under a claim).
        "rel.majority": {
            "skills": SKILLS,
            "rule": {"kind": "majority", "min_participation": 2},
            "agent_timeout_s": 1.5,
            "deadline_s": 4.0,
            "timeout_counts_as": "no_quorum",
            "decide_early": True,
            "on_no_quorum": "dead_letter",
        },
        # Silence left out: k of n with a participation floor; no_quorum is published.
        "rel.two": {
            "skills": SKILLS,
            "rule": {"kind": "k_of_n", "k": 2, "min_participation": 2, "vetoes": ["sec"]},
            "agent_timeout_s": 1.0,
            "deadline_s": 3.0,
            "timeout_counts_as": "reject",
            "decide_early": True,
        },
        # People vote after the agents (coordinator.humans): asked only while the agents'
        # votes leave it open; cso first, hos may answer too from the escalation; silence
        # rejects.
        "rel.human": {
            "skills": SKILLS,
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 1.5,
            "deadline_s": 4.0,
            "timeout_counts_as": "reject",
            "humans": [
                {"role": "cso", "wait_s": 6.0, "escalate": [{"role": "hos", "after_s": 3.0}]}
            ],
        },
        # Two people; a majority may be reached before both answered (the other is "not
        # needed"); the dpo's silence is no quorum.
        "rel.human2": {
            "skills": SKILLS,
            "rule": {"kind": "majority", "min_participation": 3},
            "agent_timeout_s": 1.5,
            "deadline_s": 4.0,
            "timeout_counts_as": "no_quorum",
            "ask_humans": "on_disagreement",
            "humans": [
                {"role": "cso", "wait_s": 5.0, "escalate": [{"role": "hos", "after_s": 2.0}]},
                {"role": "dpo", "wait_s": 8.0, "silence": "no_quorum"},
            ],
        },
    },
    source="tests/sim",
)
EVENT_TYPES = [*sorted(POLICIES.by_type), "rel.unknown"]  # the last has no policy
# Events for people are drawn less often: a run with one costs about twice as much (timers,
# answers, refusals, their audit records), and the short run's budget is fixed.
EVENT_WEIGHTS = [1 if t.startswith("rel.human") else 3 for t in EVENT_TYPES]


@dataclass
class Knobs:
    """Fault rates and sizes of one run, drawn from the seed."""

    coordinators: int
    events: int
    max_deliver: int
    p_stale: float
    p_write_fail: float
    p_reply_lost: float
    p_lost_ack: float
    p_dup_delivery: float
    p_agent_error: float
    p_agent_late: float
    p_agent_hang: float
    fault_every_s: float
    faults_until: float
    p_io_pause: float  # a stall (GC, swap, SIGSTOP) right at a round trip: between two steps
    skew_s: float  # each coordinator's wall clock is off by up to this much (NTP drift)

    @classmethod
    def draw(cls, rng: random.Random) -> Knobs:
        calm = rng.random() < 0.2  # some runs without faults: the happy paths stay covered
        f = 0.0 if calm else 1.0
        return cls(
            coordinators=rng.choice([1, 2, 2, 3]),
            events=rng.choice([1, 2, 3]),
            max_deliver=rng.choice([2, 3, 5, 20]),
            p_stale=f * rng.choice([0.0, 0.05, 0.2]),
            p_write_fail=f * rng.choice([0.0, 0.02, 0.1]),
            p_reply_lost=f * rng.choice([0.0, 0.02, 0.1]),
            p_lost_ack=f * rng.choice([0.0, 0.05, 0.2]),
            p_dup_delivery=f * rng.choice([0.0, 0.1]),
            p_agent_error=rng.choice([0.0, 0.05, 0.2]),
            p_agent_late=rng.choice([0.0, 0.1, 0.3]),
            p_agent_hang=rng.choice([0.0, 0.05, 0.2]),
            fault_every_s=rng.choice([0.5, 2.0, 6.0]),
            faults_until=0.0 if calm else rng.uniform(2.0, 25.0),
            p_io_pause=f * rng.choice([0.0, 0.0, 0.01, 0.03]),
            skew_s=f * rng.choice([0.0, 0.0, 0.05, 0.5]),
        )


# -- the ledger's storage: JetStream KV in memory -------------------------------------------
class SimKV:
    """One KV bucket: every version of every key is kept, so reads can be stale."""

    def __init__(self) -> None:
        self.history: dict[str, list[Entry]] = {}
        self.written: dict[str, list[float]] = {}  # world time each version landed
        self.revision = 0

    def latest(self, key: str) -> Entry | None:
        versions = self.history.get(key)
        return versions[-1] if versions else None

    def read(self, key: str, stale_by: int = 0) -> Entry | None:
        versions = self.history.get(key, [])
        at = len(versions) - 1 - stale_by
        return versions[at] if at >= 0 else None

    def create(self, key: str, value: bytes) -> int:
        if self.latest(key) is not None:
            raise StateConflict(f"{key}: already exists")
        return self._put(key, value)

    def update(self, key: str, value: bytes, last: int) -> int:
        current = self.latest(key)
        if (current.revision if current else 0) != last:
            raise StateConflict(f"{key}: revision {last} is no longer the latest")
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.history.setdefault(key, []).append(Entry(value, self.revision))
        self.written.setdefault(key, []).append(asyncio.get_running_loop().time())
        return self.revision


class NodeStore:
    """`coordinator.ledger.Store` as one coordinator incarnation sees the bucket: each call
    is a round trip (latency, its pause), may read stale, may fail before or after it lands."""

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node

    async def get(self, key: str) -> Entry | None:
        await self.node.io()
        w = self.world
        stale = 1 if w.rng.random() < w.knobs.p_stale else 0
        return w.kv.read(key, stale)

    async def create(self, key: str, value: bytes) -> int:
        return await self._write(key, lambda: self.world.kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        return await self._write(key, lambda: self.world.kv.update(key, value, last))

    async def _write(self, key: str, write: Callable[[], int]) -> int:
        w = self.world
        await self.node.io()
        if w.rng.random() < w.knobs.p_write_fail:
            w.note(f"{self.node.name} kv write {key}: failed")
            raise SimIOError("kv write failed")
        rev = write()  # StateConflict passes through, as the real store's does
        w.note(f"{self.node.name} kv {key} rev {rev}: {_state_of(w.kv.latest(key))}")
        await self.node.io()  # the reply's trip: others may act before it arrives
        if w.rng.random() < w.knobs.p_reply_lost:
            w.note(f"{self.node.name} kv write {key}: reply lost (it landed)")
            raise SimIOError("kv reply lost")
        return rev


def _state_of(entry: Entry | None) -> str:
    if entry is None:
        return "-"
    s = msgspec.json.decode(entry.value, type=DecisionState)
    votes = ",".join(f"{k}={v.outcome[0]}" for k, v in s.votes.items())
    return f"{s.state} owner={s.owner} seq={s.stream_seq} t/o={s.takeovers} votes[{votes}]"


# -- the events stream and the coordinators' durable consumer ------------------------------
@dataclass
class Pending:
    seq: int
    event: envelope.Event
    subject: str
    delivered: int = 0
    acked: bool = False
    gave_up: bool = False
    available_at: float = 0.0
    published_at: float = 0.0  # world time


class SimConsumer:
    def __init__(self, world: World) -> None:
        self.world = world
        self.messages: dict[int, Pending] = {}
        self._waiters: list[asyncio.Future[None]] = []

    def publish(self, event: envelope.Event) -> int:
        seq = len(self.messages) + 1
        self.messages[seq] = Pending(
            seq,
            event,
            subjects.event(event.tenant, event.type),
            available_at=self.world.now(),
            published_at=self.world.now(),
        )
        self.world.note(f"publish event {event.id} {event.type} seq {seq}")
        self.wake()
        return seq

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def settled(self) -> bool:
        return all(m.acked or m.gave_up for m in self.messages.values())

    def _pick(self) -> Pending | None:
        now = self.world.now()
        for m in self.messages.values():
            if m.acked or m.gave_up or m.available_at > now:
                continue
            if m.delivered >= self.world.knobs.max_deliver:
                m.gave_up = True  # JetStream stops and announces it
                self.world.advisory(m)
                continue
            return m
        return None

    async def next(self) -> SimDelivery:
        w = self.world
        loop = asyncio.get_running_loop()
        while True:
            m = self._pick()
            if m is not None:
                m.delivered += 1
                m.available_at = w.now() + ACK_WAIT_S
                if m.delivered < w.knobs.max_deliver and w.rng.random() < w.knobs.p_dup_delivery:
                    m.available_at = w.now()  # delivered again at once: a duplicate
                w.note(f"deliver seq {m.seq} (#{m.delivered})")
                return SimDelivery(w, m, m.delivered)
            due = [p.available_at for p in self.messages.values() if not (p.acked or p.gave_up)]
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            timer = loop.call_later(max(0.0, min(due) - w.now()), _resolve, fut) if due else None
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimDelivery:
    """`coordinator.settle.Delivery` for one delivery of one message (to one incarnation)."""

    def __init__(self, world: World, msg: Pending, num: int, node: Node | None = None) -> None:
        self.world = world
        self.msg = msg
        self.num = num
        self.node = node

    @property
    def stream_seq(self) -> int:
        return self.msg.seq

    @property
    def num_delivered(self) -> int:
        return self.num

    @property
    def subject(self) -> str:
        return self.msg.subject

    async def _send(self, what: str) -> bool:
        assert self.node is not None
        await self.node.io()
        if self.world.rng.random() < self.world.knobs.p_lost_ack:
            self.world.note(f"{self.node.name} {what} seq {self.msg.seq}: lost")
            return False
        self.world.note(f"{self.node.name} {what} seq {self.msg.seq}")
        return True

    async def ack(self) -> None:
        if await self._send("ack"):
            self.msg.acked = True
            self.world.acked_by[self.msg.seq] = self.world.now()

    async def nak(self, delay: float) -> None:
        if await self._send(f"nak {delay:.2f}") and not self.msg.acked:
            self.msg.available_at = self.world.now() + delay
            self.world.consumer.wake()

    async def in_progress(self) -> None:
        if await self._send("in_progress") and not self.msg.acked:
            self.msg.available_at = self.world.now() + ACK_WAIT_S

    def dead_letter_record(
        self, reason: DlqReason, error: str, *, event: envelope.Event | None
    ) -> DeadLetter:
        return records.dead_letter(
            reason=reason,
            error=error,
            subject=self.msg.subject,
            body=envelope.encode(self.msg.event),
            attempts=self.num,
            stream_seq=self.msg.seq,
            event=event,
            at=self.world.wall(),
        )


# -- where outcomes go ------------------------------------------------------------------------
class SimOutlet:
    """`coordinator.settle.Outlet` for one incarnation: the decisions stream (one message per
    event subject, "expected last sequence 0"), the DLQ (deduplicated by message id), audit."""

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node

    async def _call(self, what: str) -> None:
        await self.node.io()
        if self.world.rng.random() < self.world.knobs.p_write_fail:
            self.world.note(f"{self.node.name} {what}: failed")
            raise SimIOError(f"{what} failed")

    async def _reply(self, what: str) -> None:
        await self.node.io()
        if self.world.rng.random() < self.world.knobs.p_reply_lost:
            self.world.note(f"{self.node.name} {what}: reply lost (it landed)")
            raise SimIOError(f"{what}: reply lost")

    async def publish_decision(self, decision: Decision) -> None:
        await self._call("publish decision")
        self.world.publish_decision(decision, self.node.name)
        await self._reply("publish decision")

    async def audit_decision(self, decision: Decision, unverified: str) -> None:
        # The service's own code: the record and its message id, appended by the real AuditLog.
        await Coordinator._audit_decision(cast(Any, self.node), decision, unverified)

    async def ask_people(self, state: DecisionState, key: str) -> None:
        await Coordinator.ask_people(cast(Any, self.node), state, key)

    async def publish_dead_letter(self, record: DeadLetter) -> None:
        # The service's own code: the DLQ record under its message id, then its audit record.
        await Coordinator._publish_dead_letter(cast(Any, self.node), record)


# -- agents -----------------------------------------------------------------------------------
@dataclass
class Replica:
    name: str
    skill: str
    up: bool = True


@dataclass
class MadeVote:
    event_id: str
    skill: str
    choice: Choice
    at: float  # wall clock when the agent answered


@dataclass
class AgentTask:
    """What one replica does with one request (A2A: the same messageId finds the same task)."""

    nonce: str
    done_at: float  # world time when it answers
    error: bool


class SimAsker:
    """`coordinator.decide.Asker` for one incarnation: what coordinator.dispatch.ask does,
    on simulated agents (one attempt; a take-over past the deadline fetches the task the agent
    already has and counts it only if it was answered by the deadline, as `_recover` does)."""

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node

    def _start(self, key: tuple[str, str, str], ask: Ask) -> AgentTask:
        w, pol = self.world, ask.policy
        roll = w.rng.random()
        now = w.now()
        if roll < w.knobs.p_agent_hang:
            took = pol.agent_timeout_s * w.rng.uniform(1.0, 4.0)  # answers, but far too late
        else:
            took = w.rng.expovariate(1.0 / (pol.agent_timeout_s * 0.4))
        error = w.rng.random() < w.knobs.p_agent_error
        nonce = f"sim:{len(w.made)}"
        w.made[nonce] = MadeVote(
            ask.event.id, ask.skill, w.truth[(ask.event.id, ask.skill)], WALL0 + now + took
        )
        task = AgentTask(nonce, now + took, error)
        w.agent_tasks[key] = task
        return task

    async def __call__(self, ask: Ask) -> Vote:
        w = self.world
        replica = w.replicas[ask.agent]
        pol = ask.policy
        silent = unanswered(pol)
        now = w.now()
        remaining = ask.deadline - now
        if not replica.up:
            await asyncio.sleep(w.rng.uniform(0.0, 0.05))
            # Nobody listening on every attempt (dispatch marks it so): not silence.
            error = f"{NOBODY_LISTENING}: {ask.agent}: no live instance answered"
            return Vote(ask.skill, ask.agent, "unavailable", silent, error=error)
        key = (ask.event.id, ask.skill, ask.agent)
        task = w.agent_tasks.get(key) or self._start(key, ask)
        recovering = remaining <= 0.001
        if recovering and ask.grace_s <= 0:
            return Vote(ask.skill, ask.agent, "timeout", silent, error="deadline passed")
        wait = min(pol.agent_timeout_s, ask.grace_s if recovering else remaining)
        # A broken asker (late) ignores its deadline; the core's cutoff is the backstop. Not
        # while recovering: there the core trusts the asker's check of the answer's time.
        late = not recovering and w.rng.random() < w.knobs.p_agent_late
        if task.done_at > now + wait and not late:
            await asyncio.sleep(wait)
            return Vote(ask.skill, ask.agent, "timeout", silent, error="no answer")
        await asyncio.sleep(max(0.0, task.done_at - now))
        if not replica.up or w.agent_tasks.get(key) is not task:
            return Vote(ask.skill, ask.agent, "unavailable", silent, error="agent went away")
        if task.error:
            return Vote(ask.skill, ask.agent, "error", silent, error="agent failed")
        made = w.made[task.nonce]
        w.note(f"{self.node.name} vote {ask.event.id} {ask.skill}={made.choice} ({task.nonce})")
        # The nonce names the answer; the ask's time, the deadline it was asked under
        # (tests/sim/check.py judges a counted vote against that one).
        verdict = Verdict(made.choice, [task.nonce, f"asked at {now!r}"])
        if recovering and made.at > ask.deadline_wall:
            return Vote(ask.skill, ask.agent, "timeout", silent, verdict=verdict, error=LATE)
        return Vote(ask.skill, ask.agent, "voted", made.choice, verdict=verdict)


# -- coordinators -----------------------------------------------------------------------------
class SimClock:
    """`coordinator.clock.Clock` on the loop's virtual time; the wall clock off by `skew`."""

    def __init__(self, world: World, skew: float = 0.0) -> None:
        self.world = world
        self.skew = skew

    def time(self) -> float:
        return self.world.wall() + self.skew

    def monotonic(self) -> float:
        return self.world.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class Node:
    """One incarnation of one coordinator: the real Decider, Ledger and Settler."""

    def __init__(self, world: World, slot: int, gen: int) -> None:
        self.world = world
        self.name = f"c{slot}.{gen}"
        self.slot = slot
        self.alive = True
        self.paused_until = 0.0
        skew = world.rng.uniform(-world.knobs.skew_s, world.knobs.skew_s)
        clock = SimClock(world, skew)
        self.ledger = Ledger(NodeStore(world, self), self.name, LEASE_S, clock=clock)
        self.decider = Decider(self.ledger, SimAsker(world, self), clock, name=self.name)
        self.settler = settle.Settler(self.ledger, SimOutlet(world, self))
        # What `Coordinator._audit_decision` / `_publish_dead_letter` use (`self.bus`,
        # `self.audit`): this incarnation's bus and its own AuditLog (tips kept in memory,
        # lost with it), stamped by its skewed wall clock.
        self.bus = SimBus(world, self)
        self.audit = AuditLog(
            cast(Any, self.bus), self.name, every_records=1 << 30, clock=clock.time
        )
        # The approvals side, as coordinator.service wires it: the real desk (trusting the
        # simulated people) and the real inbox over the simulated approvals stream.
        self.desk = Desk(self.ledger, clock, name=self.name, trust=people.TRUST)
        self.inbox = Inbox(cast(Any, self.bus), self.desk, self.audit, self.settler, name=self.name)
        self.inbox_slots = asyncio.Semaphore(world.rng.choice([1, 4]))
        self._inbox = self.inbox  # what `Coordinator.ask_people` uses
        self.tasks: set[asyncio.Task[Any]] = set()
        self.slots = asyncio.Semaphore(world.rng.choice([1, 2, 4]))

    async def io(self) -> None:
        """One round trip to the server: latency, and no further while paused or dead."""
        w = self.world
        await asyncio.sleep(w.rng.expovariate(200.0))  # ~5 ms
        if w.now() < w.knobs.faults_until and w.rng.random() < w.knobs.p_io_pause:
            stall = w.rng.uniform(0.5, 2.0) * LEASE_S  # often long enough to lose the lease
            w.note(f"STALL {self.name} for {stall:.2f}s")
            self.paused_until = max(self.paused_until, w.now() + stall)
        while self.alive and self.paused_until > w.now():
            await asyncio.sleep(self.paused_until - w.now())
        if not self.alive:
            await asyncio.get_running_loop().create_future()  # a dead process does nothing more

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self) -> None:
        self.spawn(self.consume())
        self.spawn(self.consume_approvals())

    async def consume_approvals(self) -> None:
        while True:
            await self.inbox_slots.acquire()
            msg = await self.world.approvals.next(self)
            self.world.note(f"{self.name} approvals seq {msg.msg.seq} {msg.subject}")
            self.spawn(self.approval(msg))

    async def approval(self, msg: Any) -> None:
        try:
            await self.inbox._guarded(msg)  # the service's loop: a failure naks it (1 s)
        finally:
            self.inbox_slots.release()

    def crash(self) -> None:
        self.alive = False
        for task in list(self.tasks):
            task.cancel()

    async def consume(self) -> None:
        while True:
            await self.slots.acquire()
            delivery = await self.world.consumer.next()
            delivery.node = self
            self.spawn(self.handle(delivery))

    async def handle(self, delivery: SimDelivery) -> None:
        try:
            await settle.guarded(delivery, self._handle(delivery))
        finally:
            self.slots.release()

    async def _handle(self, delivery: SimDelivery) -> None:
        """What coordinator.service._handle does, minus decoding and signatures."""
        w = self.world
        event = delivery.msg.event
        pol = POLICIES.get(event.type)
        if pol is None:
            await self.settler.dead_letter(
                delivery, "unknown_type", f"no policy for {event.type}", event=event
            )
            return
        agents: dict[str, str] = {}
        for skill in pol.skills:
            # The registry view: live replicas, but a stale view may still list a dead one.
            live = [
                r.name
                for r in w.replicas.values()
                if r.skill == skill and (r.up or w.rng.random() < STALE_VIEW_P)
            ]
            if live:
                agents[skill] = w.rng.choice(live)
        job = Job(
            key=state_key(event.tenant, event.id),
            event=event,
            policy=pol,
            decision_type=POLICIES.decision_type(event.type),
            stream_seq=delivery.stream_seq,
            agents=agents,
            started=w.now(),
            no_agent_wait_s=NO_AGENT_WAIT_S,
            published_at=WALL0 + delivery.msg.published_at,
            delivery=delivery.num_delivered,
            max_deliver=w.knobs.max_deliver,
        )
        outcome = await self.decider.run(job, on_renew=delivery.in_progress)
        w.note(f"{self.name} outcome seq {delivery.stream_seq}: {type(outcome).__name__}")
        if isinstance(outcome, AwaitingHuman):
            # As the service does: the requests published (again on a redelivery), then acked.
            await self.inbox.asked(outcome.state, outcome.key, fresh=outcome.fresh)
            await delivery.ack()
            return
        await self.settler.settle(delivery, event, outcome)


# -- the world --------------------------------------------------------------------------------
@dataclass
class Violation:
    kind: str
    event_id: str
    detail: str


@dataclass
class Result:
    seed: int
    violations: list[Violation]
    trace: list[str]
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s)"]
        lines += [f"  {v.kind} [{v.event_id}]: {v.detail}" for v in self.violations]
        lines += ["trace:", *("  " + t for t in self.trace)]
        lines.append(f"replay: make sim SEED={self.seed}")
        return "\n".join(lines)


class World:
    def __init__(self, seed: int, *, keep_trace: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.knobs = Knobs.draw(self.rng)
        self.keep_trace = keep_trace
        self.trace: list[str] = []
        self.kv = SimKV()
        self.consumer = SimConsumer(self)
        self.decisions: dict[str, Decision] = {}  # event id → the one published decision
        self.decision_attempts: dict[str, list[tuple[str, bytes]]] = {}
        self.dlq: dict[str, DeadLetter] = {}  # msg id → record
        self.audit_stream = SimStream(subjects.AUDIT_STREAM, self)
        self.approvals_stream = SimStream(subjects.APPROVALS_STREAM, self)
        self.approvals = people.SimApprovals(self)
        self.people = people.People(self)
        self.truth: dict[tuple[str, str], Choice] = {}
        self.made: dict[str, MadeVote] = {}
        self.agent_tasks: dict[tuple[str, str, str], AgentTask] = {}
        self.acked_by: dict[int, float] = {}
        self.replicas: dict[str, Replica] = {}
        self.nodes: list[Node] = []
        self.gens: list[int] = []
        self.advisories: set[asyncio.Task[Any]] = set()
        self.lost_advisories: set[str] = set()
        self.events: list[envelope.Event] = []
        self.stats: dict[str, int] = {}
        # The advisory listener publishes through the coordinator beside it (coordinator.run);
        # False: as a listener alone (mesh.testing's harness), which only logs.
        self.advisory_outlet = True

    # clocks and notes
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return WALL0 + self.now()

    def note(self, what: str) -> None:
        if self.keep_trace:
            self.trace.append(f"{self.now():9.3f} {what}")

    def bump(self, stat: str) -> None:
        self.stats[stat] = self.stats.get(stat, 0) + 1

    # the published outcomes
    def publish_decision(self, decision: Decision, by: str) -> None:
        eid = decision.event_id
        self.decision_attempts.setdefault(eid, []).append((by, records.encoder.encode(decision)))
        if eid in self.decisions:
            self.note(f"{by} decision {eid}: refused, already published")
            return
        self.decisions[eid] = decision
        self.note(f"{by} DECISION {eid}: {decision.outcome} ({decision.reason})")

    def stored(
        self,
        subject: str,
        body: bytes,
        msg_id: str | None,
        headers: dict[str, str] | None,
        *,
        by: str,
    ) -> PubAck:
        """A publish that reached the server (tests/sim/streams.py SimBus): into its stream."""
        if subject.startswith(subjects.AUDIT_ROOT + "."):
            ack = self.audit_stream.store(subject, body, msg_id, headers)
            what = "duplicate" if ack.duplicate else f"seq {ack.seq}"
            self.note(f"{by} audit {subject.rsplit('.', 1)[1]} {msg_id or ''}: {what}")
            return ack
        if subject.startswith(subjects.DLQ_ROOT + "."):
            assert msg_id is not None
            record = msgspec.json.decode(body, type=DeadLetter)
            self.publish_dead_letter(msg_id, record, by)
            return PubAck(stream=subjects.DLQ_STREAM, seq=0)
        if subject.startswith(subjects.APPROVALS_ROOT + "."):
            ack = self.approvals_stream.store(subject, body, msg_id, headers)
            if not ack.duplicate:
                self.approvals.store(subject, body)
                _, kind, request_id = subjects.parse_approval_subject(subject)
                self.note(f"{by} approval {kind} {request_id}")
                if kind == "req":
                    self.people.saw(approvals.request_decoder.decode(body))
            return ack
        raise AssertionError(f"no simulated stream takes {subject}")

    def publish_dead_letter(self, msg_id: str, record: DeadLetter, by: str) -> None:
        if msg_id in self.dlq:
            self.note(f"{by} dead letter {msg_id}: duplicate")
            return
        self.dlq[msg_id] = record
        self.note(f"{by} DEAD LETTER {record.event_id} ({record.reason}) as {msg_id}")

    def advisory(self, m: Pending) -> None:
        """JetStream gave up on a message: the advisory goes to one live coordinator (a queue
        group on core NATS: with none alive, it is lost, as documented in coordinator.dlq)."""
        live = [n for n in self.nodes if n.alive]
        if not live:
            self.note(f"advisory seq {m.seq}: nobody listening, lost")
            self.lost_advisories.add(m.event.id)
            return
        node = self.rng.choice(live)
        self.note(f"advisory seq {m.seq} (max deliveries) to {node.name}")
        task = asyncio.ensure_future(self._advisory(node, m))
        self.advisories.add(task)
        task.add_done_callback(self.advisories.discard)
        node.tasks.add(task)
        task.add_done_callback(node.tasks.discard)

    async def _advisory(self, node: Node, m: Pending) -> None:
        """coordinator.dlq.AdvisoryDeadLetters.handle on this world's parts: the ledger part
        is the real `coordinator.settle.gave_up`; building and storing the record (retried)
        is a copy of dlq.py's, which is bound to NATS."""
        try:
            await self._advisory_steps(node, m)
        except asyncio.CancelledError:  # its coordinator crashed: nobody gets it again
            self.lost_advisories.add(m.event.id)
            raise

    async def _advisory_steps(self, node: Node, m: Pending) -> None:
        reason: DlqReason = "max_deliveries"
        error = f"consumer gave up after {m.delivered} deliveries (max_deliver reached)"
        record = records.dead_letter(
            reason=reason,
            error=error,
            subject=m.subject,
            body=envelope.encode(m.event),
            attempts=m.delivered,
            stream_seq=m.seq,
            event=m.event,
            at=self.wall(),
        )
        ledger = Ledger(NodeStore(self, node), "dlq", 0.0, clock=SimClock(self))
        outlet = SimOutlet(self, node) if self.advisory_outlet else None
        try:
            fresh = await settle.gave_up(
                ledger,
                outlet,
                record,
                key=state_key(m.event.tenant, m.event.id),
                patience_s=SETTLE_WAIT_S,
            )
        except Exception as e:  # AdvisoryDeadLetters logs it and counts a failure
            self.note(f"{node.name} advisory seq {m.seq} failed: {e!r}")
            self.lost_advisories.add(m.event.id)
            return
        if fresh is None:
            self.note(f"{node.name} advisory seq {m.seq}: outcome was there already")
            return
        # Under the coordinator's own message id, as dlq.py does (before: one of its own).
        msg_id = (
            subjects.dlq_msg_id(subjects.EVENTS_STREAM, m.seq, subjects.COORDINATOR_DURABLE)
            if ADVISORY_OWN_MSG_ID
            else subjects.dlq_msg_id(subjects.EVENTS_STREAM, m.seq)
        )
        for _ in range(3):  # dlq.PUBLISH_RETRY
            await node.io()
            if self.rng.random() >= self.knobs.p_write_fail:
                self.publish_dead_letter(msg_id, fresh, f"{node.name}/advisory")
                return
            await asyncio.sleep(0.2)
        self.note(f"{node.name} advisory seq {m.seq}: record not stored")
        self.lost_advisories.add(m.event.id)

    # the scheduler
    async def main(self) -> None:
        rng = self.rng
        for skill in SKILLS:
            for i in range(rng.choice([1, 1, 2])):
                name = f"{skill}-{i}"
                self.replicas[name] = Replica(name, skill)
        for slot in range(self.knobs.coordinators):
            self.gens.append(0)
            node = Node(self, slot, 0)
            self.nodes.append(node)
            node.start()
        for i in range(self.knobs.events):
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            event_type = rng.choices(EVENT_TYPES, EVENT_WEIGHTS)[0]
            event = envelope.new_event(event_type, {"n": i}, tenant=TENANT, event_id=f"e{i}")
            for skill in SKILLS:
                self.truth[(event.id, skill)] = rng.choice(["approve", "approve", "reject"])
            self.events.append(event)
            self.consumer.publish(event)
        await self.faults()
        # Faults stop: every coordinator runs again, every agent is back.
        for slot, node in enumerate(self.nodes):
            if not node.alive:
                self.restart(slot)
            node.paused_until = 0.0
        for r in self.replicas.values():
            r.up = True
        end = self.now() + 600.0
        while self.now() < end and not (
            self.consumer.settled()
            and not self.advisories
            and self.approvals.settled()
            and not self.people.tasks
        ):
            await asyncio.sleep(1.0)
        self.note("end of run")
        for node in self.nodes:
            node.crash()

    async def faults(self) -> None:
        rng, k = self.rng, self.knobs
        while self.now() < k.faults_until:
            await asyncio.sleep(rng.expovariate(1.0 / k.fault_every_s))
            roll = rng.random()
            slot = rng.randrange(len(self.nodes))
            node = self.nodes[slot]
            if roll < 0.3:
                if node.alive:
                    self.note(f"CRASH {node.name}")
                    self.bump("crashes")
                    node.crash()
                else:
                    self.restart(slot)
            elif roll < 0.55:
                pause = rng.choice([0.5, 2.5, 6.0])
                self.note(f"PAUSE {node.name} for {pause}s")
                self.bump("pauses")
                node.paused_until = self.now() + pause
            else:
                replica = rng.choice(list(self.replicas.values()))
                replica.up = not replica.up
                if not replica.up:  # its tasks die with it
                    for key in [k for k in self.agent_tasks if k[2] == replica.name]:
                        del self.agent_tasks[key]
                self.note(f"agent {replica.name} {'up' if replica.up else 'DOWN'}")

    def restart(self, slot: int) -> None:
        self.gens[slot] += 1
        node = Node(self, slot, self.gens[slot])
        self.nodes[slot] = node
        self.note(f"RESTART as {node.name}")
        node.start()


def run(
    seed: int, *, keep_trace: bool = True, mutate: Callable[[World], None] | None = None
) -> Result:
    """One schedule: build the world from the seed, run it to the end, check it."""
    from tests.sim.check import check
    from tests.sim.loop import SimLoop, Stuck

    world = World(seed, keep_trace=keep_trace)
    if mutate is not None:
        mutate(world)
    loop = SimLoop()
    violations: list[Violation] = []
    try:
        loop.run_until_complete(world.main())
    except Stuck as e:
        violations.append(Violation("stuck", "-", str(e)))
    finally:
        _close(loop)
    violations += check(world)
    return Result(seed, violations, world.trace, world.stats)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
