"""The decision ledger's transitions on an in-memory store and a manual clock: claims, lease
take-overs, and the one transition to `dead_lettered` (never together with `decided`)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from coordinator.clock import ManualClock
from coordinator.ledger import (
    CAS_RETRY,
    Busy,
    Claim,
    DeadLettered,
    DecisionState,
    Done,
    Entry,
    Ledger,
    LostClaim,
    MemoryStore,
    StateConflict,
)
from coordinator.settle import SETTLE_WAIT_S, mark_settled
from mesh.identity import Signer, Trust
from mesh.records import Decision, Vote

KEY = "acme.e1"
LEASE_S = 2.0


class RecordingStore(MemoryStore):
    """Remembers the order of calls, to show that racers really interleave."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def get(self, key: str) -> Entry | None:
        self.calls.append("get")
        return await super().get(key)

    async def create(self, key: str, value: bytes) -> int:
        self.calls.append("create")
        return await super().create(key, value)


def ledger(store: MemoryStore, owner: str, clock: ManualClock) -> Ledger:
    return Ledger(store, owner, LEASE_S, clock=clock)


def apart(store: MemoryStore, owner: str) -> tuple[Ledger, ManualClock]:
    """A coordinator with a clock of its own (a test can stall one and not the other)."""
    clock = ManualClock()
    return ledger(store, owner, clock), clock


def vote(skill: str) -> Vote:
    return Vote(skill=skill, agent=f"agent-{skill}", outcome="voted", counted_as="approve")


async def test_two_claimants_racing_for_one_event_one_wins() -> None:
    store, clock = RecordingStore(), ManualClock()
    a, b = ledger(store, "a", clock), ledger(store, "b", clock)
    got = await asyncio.gather(
        a.claim(KEY, stream_seq=1, deadline_s=10), b.claim(KEY, stream_seq=1, deadline_s=10)
    )
    assert store.calls[:2] == ["get", "get"]  # both saw no state before either wrote
    claims = [g for g in got if isinstance(g, Claim)]
    busy = [g for g in got if isinstance(g, Busy)]
    assert len(claims) == 1 and len(busy) == 1
    assert busy[0].owner == claims[0].state.owner == "a"
    assert busy[0].retry_in_s == pytest.approx(LEASE_S)


async def test_claiming_a_new_event_is_one_write_and_no_read() -> None:
    store, clock = RecordingStore(), ManualClock()
    got = await ledger(store, "a", clock).claim_new(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(got, Claim) and got.state.state == "collecting"
    assert store.calls == ["create"]  # the round trip a read first would cost is saved


async def test_two_claimants_of_a_new_event_racing_by_writing_first_one_wins() -> None:
    store, clock = RecordingStore(), ManualClock()
    a, b = ledger(store, "a", clock), ledger(store, "b", clock)
    got = await asyncio.gather(
        a.claim_new(KEY, stream_seq=1, deadline_s=10), b.claim_new(KEY, stream_seq=1, deadline_s=10)
    )
    assert store.calls[:3] == ["create", "create", "get"]  # the loser read what won
    claims = [g for g in got if isinstance(g, Claim)]
    busy = [g for g in got if isinstance(g, Busy)]
    assert len(claims) == 1 and len(busy) == 1 and busy[0].owner == claims[0].state.owner


async def test_dead_lettering_a_new_event_is_one_write_and_no_read() -> None:
    store, clock = RecordingStore(), ManualClock()
    got = await ledger(store, "a", clock).mark_new_dead_lettered(
        KEY, stream_seq=1, reason="over_quota", error="e"
    )
    assert isinstance(got, DeadLettered) and got.fresh and got.state.state == "dead_lettered"
    assert store.calls == ["create"]


async def test_dead_lettering_a_known_event_as_new_is_judged_as_before() -> None:
    store, clock = RecordingStore(), ManualClock()
    a, b = ledger(store, "a", clock), ledger(store, "b", clock)
    claim = await a.claim_new(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    busy = await b.mark_new_dead_lettered(KEY, stream_seq=2, reason="over_quota")
    assert isinstance(busy, Busy) and busy.owner == "a"  # its owner may still decide it
    await a.save(claim, msgspec.structs.replace(claim.state, state="decided"))
    assert isinstance(await b.mark_new_dead_lettered(KEY, stream_seq=2, reason="over_quota"), Done)
    other = "acme.e2"
    first = await b.mark_new_dead_lettered(other, stream_seq=3, reason="over_quota")
    again = await b.mark_new_dead_lettered(other, stream_seq=3, reason="over_quota")
    assert isinstance(again, DeadLettered) and not again.fresh and again.state == first.state


async def test_a_lease_renewal_keeps_a_vote_saved_while_it_waited() -> None:
    store, clock = MemoryStore(), ManualClock()
    a = ledger(store, "a", clock)
    claim = await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    async with claim.lock:  # a vote save in flight; the renewal queues behind it
        renewal = asyncio.ensure_future(a.renew(claim))
        await asyncio.sleep(0)
        await a._write(claim, msgspec.structs.replace(claim.state, votes={"s1": vote("s1")}))
    await renewal
    state = await a.read(KEY)
    assert state is not None and state.votes == {"s1": vote("s1")}


async def test_a_take_over_after_the_lease_lapses_keeps_deadline_and_votes() -> None:
    store = MemoryStore()
    (a, _stalled), (b, clock_b) = apart(store, "a"), apart(store, "b")
    claim = await a.claim(KEY, stream_seq=7, deadline_s=10)
    assert isinstance(claim, Claim)
    await a.save(claim, msgspec.structs.replace(claim.state, votes={"s1": vote("s1")}))

    await clock_b.advance(LEASE_S - 0.1)
    assert isinstance(await b.claim(KEY, stream_seq=7, deadline_s=10), Busy)  # a is alive
    await clock_b.advance(0.2)  # a said nothing for longer than its lease: presumed dead
    taken = await b.claim(KEY, stream_seq=7, deadline_s=99)
    assert isinstance(taken, Claim)
    assert taken.state.owner == "b" and taken.state.takeovers == 1
    assert taken.state.deadline_at == claim.state.deadline_at  # not the new deadline_s
    assert taken.state.votes == {"s1": vote("s1")}
    # The old owner's next write fails: it stops, and b alone finishes the event.
    with pytest.raises(LostClaim):
        await a.save(claim, claim.state)


async def test_a_decided_event_is_done_and_cannot_be_dead_lettered() -> None:
    store, clock = MemoryStore(), ManualClock()
    owner, dlq = ledger(store, "a", clock), ledger(store, "dlq", clock)
    claim = await owner.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    await owner.save(claim, msgspec.structs.replace(claim.state, state="decided"))

    refused = await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries")
    assert isinstance(refused, Done) and refused.state.state == "decided"
    again = await owner.claim(KEY, stream_seq=2, deadline_s=10)  # even a replay
    assert isinstance(again, Done)
    state = await owner.read(KEY)
    assert state is not None and state.state == "decided"


async def test_a_dead_lettered_event_cannot_be_decided_by_its_late_owner() -> None:
    store, clock = MemoryStore(), ManualClock()
    owner, dlq = ledger(store, "a", clock), ledger(store, "dlq", clock)
    claim = await owner.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    await clock.advance(LEASE_S + 1)  # the owner stalled past its lease
    marked = await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries", error="e")
    assert isinstance(marked, DeadLettered) and marked.fresh

    with pytest.raises(LostClaim):
        await owner.save(claim, msgspec.structs.replace(claim.state, state="decided"))
    state = await owner.read(KEY)
    assert state is not None
    assert (state.state, state.dead_letter_reason, state.dead_letter_error) == (
        "dead_lettered",
        "max_deliveries",
        "e",
    )


async def test_dead_lettering_under_a_claim_needs_the_claim_to_be_current() -> None:
    store = MemoryStore()
    (a, _stalled), (b, clock_b) = apart(store, "a"), apart(store, "b")
    claim = await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    await clock_b.advance(LEASE_S + 1)
    taken = await b.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(taken, Claim)

    with pytest.raises(LostClaim):
        await a.mark_dead_lettered(KEY, stream_seq=1, reason="no_quorum", claim=claim)
    state = await b.read(KEY)
    assert state is not None and (state.state, state.owner) == ("collecting", "b")

    marked = await b.mark_dead_lettered(KEY, stream_seq=1, reason="no_quorum", claim=taken)
    assert isinstance(marked, DeadLettered) and taken.state.state == "dead_lettered"


async def test_a_live_owner_is_waited_for_then_overruled() -> None:
    store, clock = MemoryStore(), ManualClock()
    owner, dlq = ledger(store, "a", clock), ledger(store, "dlq", clock)
    claim = await owner.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)

    busy = await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries")
    assert isinstance(busy, Busy) and busy.owner == "a"  # no patience: say so at once

    patient = asyncio.create_task(
        dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries", patience_s=5)
    )
    for _ in range(8):  # the owner keeps renewing its lease for 4 s...
        await clock.advance(0.5)
        await owner.save(claim, claim.state)
    assert not patient.done()
    await clock.advance(1.5)  # ...and the patience runs out
    marked = await patient
    assert isinstance(marked, DeadLettered) and marked.fresh
    with pytest.raises(LostClaim):
        await owner.save(claim, msgspec.structs.replace(claim.state, state="decided"))


async def test_a_live_owner_that_decides_while_waited_for_wins() -> None:
    store, clock = MemoryStore(), ManualClock()
    owner, dlq = ledger(store, "a", clock), ledger(store, "dlq", clock)
    claim = await owner.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    patient = asyncio.create_task(
        dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries", patience_s=60)
    )
    await clock.advance(0.5)
    await owner.save(claim, msgspec.structs.replace(claim.state, state="decided"))
    await clock.advance(1.0)
    assert isinstance(await patient, Done)


async def test_the_same_delivery_finds_its_dead_letter_and_a_replay_starts_afresh() -> None:
    store, clock = MemoryStore(), ManualClock()
    a = ledger(store, "a", clock)
    first = await a.mark_dead_lettered(KEY, stream_seq=3, reason="unknown_type", error="why")
    assert isinstance(first, DeadLettered) and first.fresh
    again = await a.mark_dead_lettered(KEY, stream_seq=3, reason="unknown_type", error="why")
    assert isinstance(again, DeadLettered) and not again.fresh  # re-publish, do not re-mark
    redelivered = await a.claim(KEY, stream_seq=3, deadline_s=10)
    assert isinstance(redelivered, Done) and redelivered.state.dead_letter_error == "why"

    await clock.advance(100)
    replay = await a.claim(KEY, stream_seq=9, deadline_s=10)  # `mesh dlq replay`: new seq
    assert isinstance(replay, Claim)
    assert replay.state.takeovers == 0 and replay.state.votes == {}
    assert replay.state.deadline_at == clock.time() + 10


class AlwaysConflicting(MemoryStore):
    """A key that changes between every read and write (a storm of writers)."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.updates += 1
        raise StateConflict("someone else wrote")


async def test_cas_rounds_are_bounded() -> None:
    store, clock = AlwaysConflicting(), ManualClock()
    seeded = DecisionState("collecting", "x", 0.0, 0.0, 1)
    await store.create(KEY, msgspec.json.encode(seeded))  # lease long expired
    a = ledger(store, "a", clock)
    with pytest.raises(LostClaim):
        await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert store.updates == CAS_RETRY.attempts
    with pytest.raises(LostClaim):
        await a.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries")
    assert store.updates == 2 * CAS_RETRY.attempts


# -- signed entries: what nobody trusted wrote is never acted on ---------------------------------
COORDINATOR = Signer.generate()
TRUST = Trust()
TRUST.add(COORDINATOR, "coordinator", "coordinator")
OUTSIDER = Signer.generate()  # a key nobody listed (or listed as a publisher's)
TRUST.add(OUTSIDER, "publisher", "p1")


def signed(store: MemoryStore, owner: str, clock: ManualClock) -> Ledger:
    return Ledger(store, owner, LEASE_S, clock=clock, signer=COORDINATOR, trust=TRUST)


def forged_decided() -> DecisionState:
    decision = Decision(
        event_id="e1",
        event_type="vote.test",
        tenant="acme",
        decision_type="vote.decided",
        outcome="approved",
        reason="all approve",
        rule="unanimous",
        votes=[vote("s1")],
        decided_at=1.0,
        latency_ms=1.0,
    )
    return DecisionState("decided", "mallory", 0.0, 0.0, 1, decision=decision)


def sign_with(signer: Signer, state: DecisionState) -> DecisionState:
    unsigned = msgspec.structs.replace(state, signer=signer.kid, signature="")
    payload = msgspec.json.encode(unsigned)
    return msgspec.structs.replace(unsigned, signature=signer.sign("ledger", payload))


FORGERIES = {
    "unsigned": msgspec.json.encode(forged_decided()),
    "untrusted key": msgspec.json.encode(sign_with(OUTSIDER, forged_decided())),
    "trusted key, altered after signing": msgspec.json.encode(
        msgspec.structs.replace(
            sign_with(COORDINATOR, msgspec.structs.replace(forged_decided(), state="collecting")),
            state="decided",
        )
    ),
    "not a state at all": b'{"state": "decided", "what": "?"}',
}


async def test_signed_writes_read_back_and_verify() -> None:
    store, clock = MemoryStore(), ManualClock()
    a = signed(store, "a", clock)
    claim = await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim) and claim.state.signer == COORDINATOR.kid
    await a.save(claim, msgspec.structs.replace(claim.state, votes={"s1": vote("s1")}))
    state = await a.read(KEY)
    assert state is not None and state.votes["s1"].counted_as == "approve"
    assert state.signature  # every write is signed


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_entry_is_replaced_by_a_fresh_claim(
    forgery: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = MemoryStore(), ManualClock()
    await store.create(KEY, FORGERIES[forgery])
    a = signed(store, "a", clock)
    assert await a.read(KEY) is None  # nothing to believe
    got = await a.claim(KEY, stream_seq=1, deadline_s=10)
    # Not Done (its "decision" is never published): claimed afresh, no votes, no take-over.
    assert isinstance(got, Claim)
    assert (got.state.state, got.state.votes, got.state.takeovers) == ("collecting", {}, 0)
    assert got.state.decision is None and got.state.deadline_at == clock.time() + 10
    assert (await a.read(KEY)) == got.state  # ours now, signed
    assert any(
        r.levelname == "ERROR" and "not written by a trusted coordinator" in r.getMessage()
        for r in caplog.records
    )


async def test_a_forged_live_lease_holds_nobody_off() -> None:
    store, clock = MemoryStore(), ManualClock()
    held = DecisionState("collecting", "mallory", clock.time() + 1e9, clock.time() + 1e9, 1)
    await store.create(KEY, msgspec.json.encode(sign_with(OUTSIDER, held)))
    got = await signed(store, "a", clock).claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(got, Claim) and got.state.owner == "a"


async def test_forged_votes_are_not_kept_by_a_take_over() -> None:
    store, clock = MemoryStore(), ManualClock()
    stale = DecisionState("collecting", "dead", 0.0, 100.0, 1, votes={"s1": vote("s1")})
    await store.create(KEY, msgspec.json.encode(stale))  # unsigned: expired lease, one "vote"
    got = await signed(store, "a", clock).claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(got, Claim) and got.state.votes == {} and got.state.takeovers == 0


async def test_a_forged_decision_does_not_stop_a_dead_letter() -> None:
    store, clock = MemoryStore(), ManualClock()
    await store.create(KEY, FORGERIES["untrusted key"])
    marked = await signed(store, "a", clock).mark_dead_lettered(
        KEY, stream_seq=1, reason="no_agent"
    )
    assert isinstance(marked, DeadLettered) and marked.fresh


async def test_a_genuine_take_over_keeps_votes_under_signatures() -> None:
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    a, b = signed(store, "a", clock_a), signed(store, "b", clock_b)
    claim = await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    await a.save(claim, msgspec.structs.replace(claim.state, votes={"s1": vote("s1")}))
    await clock_b.advance(LEASE_S + 0.1)
    taken = await b.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(taken, Claim) and taken.state.takeovers == 1
    assert list(taken.state.votes) == ["s1"]


# -- the advisory's mark: it comes once, so the mark outlasts NATS trouble (bounded) -------------
class Unavailable(MemoryStore):
    """A store whose next `failures` calls fail as JetStream does during a leader election."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or NatsTimeoutError()

    async def get(self, key: str) -> Entry | None:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return await super().get(key)


async def drive(clock: ManualClock, task: asyncio.Task[Any], step_s: float = 0.5) -> Any:
    """Advance `clock` until `task` is done (bounded), and return its result."""
    for _ in range(1000):
        if task.done():
            break
        await clock.advance(step_s)
    return task.result()


@pytest.mark.parametrize("error", [NatsTimeoutError(), ServiceUnavailableError()])
async def test_the_advisory_mark_is_tried_again_while_nats_is_unavailable(
    error: Exception,
) -> None:
    clock = ManualClock()
    store = Unavailable(failures=4, error=error)
    marking = asyncio.create_task(
        mark_settled(
            ledger(store, "dlq", clock),
            KEY,
            stream_seq=1,
            reason="max_deliveries",
            error="gave up",
            patience_s=SETTLE_WAIT_S,
        )
    )
    marked = await drive(clock, marking)
    assert isinstance(marked, DeadLettered) and marked.fresh
    state = await ledger(store, "reader", clock).read(KEY)
    assert state is not None and state.state == "dead_lettered"


async def test_the_advisory_mark_gives_up_loudly_after_its_patience() -> None:
    clock = ManualClock()
    store = Unavailable(failures=10**6)
    marking = asyncio.create_task(
        mark_settled(
            ledger(store, "dlq", clock),
            KEY,
            stream_seq=1,
            reason="max_deliveries",
            error="",
            patience_s=10.0,
        )
    )
    with pytest.raises(NatsTimeoutError):  # raised: the caller publishes nothing, logs it
        await drive(clock, marking)
    assert clock.monotonic() <= 10.0 + 0.5


class Conflicting(MemoryStore):
    """Every update loses its CAS race while `conflicts` is on."""

    conflicts = True

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.conflicts:
            raise StateConflict("someone else wrote")
        return await super().update(key, value, last)


async def test_the_advisory_mark_after_lost_races_finds_the_decision() -> None:
    clock = ManualClock()
    store = Conflicting()
    owner = ledger(store, "c1", clock)
    claim = await owner.claim(KEY, stream_seq=1, deadline_s=5)
    assert isinstance(claim, Claim)
    await clock.advance(LEASE_S + 0.1)  # the owner looks dead, but is only slow
    marking = asyncio.create_task(
        mark_settled(
            ledger(store, "dlq", clock),
            KEY,
            stream_seq=1,
            reason="max_deliveries",
            error="",
            patience_s=SETTLE_WAIT_S,
        )
    )
    await clock.advance(0.1)
    assert not marking.done()  # every CAS lost so far: it keeps looking, it does not give up
    store.conflicts = False
    decided = msgspec.structs.replace(claim.state, state="decided")
    await owner.save(claim, decided)
    marked = await drive(clock, marking)
    assert isinstance(marked, Done)  # decided after all: no dead letter


# -- released (waiting) events ----------------------------------------------------------------
async def test_a_released_event_is_reclaimed_once_with_a_fresh_deadline_and_its_votes() -> None:
    store, clock = RecordingStore(), ManualClock()
    a, b, c = (ledger(store, name, clock) for name in "abc")
    claim = await a.claim(KEY, stream_seq=3, deadline_s=10)
    assert isinstance(claim, Claim)
    since = clock.time()
    await a.release(claim, {"s1": vote("s1")}, since=since)
    state = await a.read(KEY)
    assert state is not None and state.state == "waiting" and state.deadline_at == 0.0
    await clock.advance(60.0)  # long past the first deadline
    got = await asyncio.gather(
        b.claim(KEY, stream_seq=4, deadline_s=10), c.claim(KEY, stream_seq=4, deadline_s=10)
    )
    claims = [g for g in got if isinstance(g, Claim)]
    assert len(claims) == 1 and any(isinstance(g, Busy) for g in got)
    again = claims[0].state
    assert again.state == "collecting" and again.deadline_at == clock.time() + 10
    assert again.votes == {"s1": vote("s1")} and again.waiting_since == since
    assert again.takeovers == 0  # a re-claim, not a take-over of a dead owner's work


async def test_a_released_event_can_be_dead_lettered_by_an_advisory_but_not_decided_after() -> None:
    store, clock = MemoryStore(), ManualClock()
    a = ledger(store, "a", clock)
    claim = await a.claim(KEY, stream_seq=1, deadline_s=10)
    assert isinstance(claim, Claim)
    await a.release(claim, {}, since=clock.time())
    marked = await a.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliver")
    assert isinstance(marked, DeadLettered) and marked.fresh  # nobody holds a waiting event
    assert isinstance(await a.claim(KEY, stream_seq=1, deadline_s=10), Done)
