"""The decision core (claim → collect → tally → decide) on an in-memory ledger, a scripted asker
and manual clocks: races, take-overs and deadlines, driven step by step, with no server and no
sleeping. The real-server suites (integration, faults, chaos) prove the wiring."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from coordinator.clock import ManualClock, settle
from coordinator.decide import (
    CUTOFF_SLACK_S,
    NOBODY_LISTENING,
    WAIT_MAX_S,
    Ask,
    Decided,
    Decider,
    Job,
    Undecidable,
    Wait,
    unanswered,
)
from coordinator.ledger import Busy, Claim, DeadLettered, Done, Ledger, LostClaim, MemoryStore
from coordinator.policy import Policy
from coordinator.quorum import QuorumRule
from mesh import envelope
from mesh.records import Vote
from mesh.verdict import Choice, Verdict

LEASE_S = 2.0
SKILLS = ["s1", "s2", "s3"]
EVENT = envelope.new_event("vote.test", {}, tenant="acme", event_id="e1")
KEY = "acme.e1"


def policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "skills": SKILLS,
        "rule": QuorumRule(kind="unanimous"),
        "agent_timeout_s": 1.0,
        "deadline_s": 5.0,
        "timeout_counts_as": "reject",
    }
    return Policy(**(fields | overrides))


def job(pol: Policy, clock: ManualClock, *, seq: int = 1) -> Job:
    return Job(
        key=KEY,
        event=EVENT,
        policy=pol,
        decision_type="vote.decided",
        stream_seq=seq,
        agents={s: f"agent-{s}" for s in pol.skills},
        started=clock.monotonic(),
    )


def voted(ask: Ask, choice: Choice) -> Vote:
    return Vote(
        skill=ask.skill,
        agent=ask.agent,
        outcome="voted",
        counted_as=choice,
        verdict=Verdict(choice, [f"{ask.skill} says {choice}"]),
    )


class Voters:
    """The asker: each skill answers `choice` after `after_s` on the clock, or never (None).
    Every ask is remembered; `hold(skill)` makes that skill wait until `release(skill)`."""

    def __init__(self, clock: ManualClock, script: dict[str, tuple[float | None, Choice]]) -> None:
        self.clock = clock
        self.script = script
        self.asked: list[Ask] = []
        self.cancelled: list[str] = []
        self._gates: dict[str, asyncio.Event] = {}

    def hold(self, skill: str) -> None:
        self._gates[skill] = asyncio.Event()

    def release(self, skill: str) -> None:
        self._gates.pop(skill).set()

    async def __call__(self, ask: Ask) -> Vote:
        self.asked.append(ask)
        after, choice = self.script[ask.skill]
        try:
            if ask.skill in self._gates:
                await self._gates[ask.skill].wait()
            elif after is None:
                await asyncio.Event().wait()  # never answers
            else:
                await self.clock.sleep(after)
        except asyncio.CancelledError:
            self.cancelled.append(ask.skill)
            raise
        return voted(ask, choice)


def coordinator(
    store: MemoryStore, name: str, clock: ManualClock, asker: Callable[[Ask], Awaitable[Vote]]
) -> Decider:
    return Decider(Ledger(store, name, LEASE_S, clock=clock), asker, clock, name=name)


def done(task: asyncio.Task[Any]) -> Any:
    """The result of a run that must have finished by now (the clocks moved far enough)."""
    assert task.done(), "still running: the test did not move the clock far enough"
    return task.result()


async def state_of(store: MemoryStore) -> Any:
    return await Ledger(store, "reader", LEASE_S).read(KEY)


# -- the happy path, and what the clock does to it ---------------------------------------------
async def test_all_approve_is_decided_and_recorded() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {"s1": (0.1, "approve"), "s2": (0.2, "approve"), "s3": (0.3, "approve")})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(0.3)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    d = outcome.decision
    assert (d.outcome, d.coordinator, d.takeovers) == ("approved", "c1", 0)
    assert [v.skill for v in d.votes] == SKILLS
    assert d.latency_ms == pytest.approx(300.0)
    state = await state_of(store)
    assert state.state == "decided" and state.decision == d


class CountingStore(MemoryStore):
    """Counts round trips: what the fast path is about (issue 14)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def get(self, key: str) -> Any:
        self.calls.append("get")
        return await super().get(key)

    async def create(self, key: str, value: bytes) -> int:
        self.calls.append("create")
        return await super().create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.calls.append("update")
        if self.gate is not None:
            await self.gate.wait()  # a slow write: what arrives meanwhile waits its turn
        return await super().update(key, value, last)

    gate: asyncio.Event | None = None


async def test_a_decision_costs_a_claim_the_votes_that_do_not_end_it_and_the_final_write() -> None:
    store, clock = CountingStore(), ManualClock()
    voters = Voters(clock, {"s1": (0.1, "approve"), "s2": (0.2, "approve"), "s3": (0.3, "approve")})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(0.3)
    assert isinstance(done(run), Decided)
    # create (the claim), s1's and s2's saves, then the decided state (carrying s3's vote).
    assert store.calls == ["create", "update", "update", "update"]


async def test_votes_arriving_during_a_save_wait_for_the_next_write() -> None:
    store, clock = CountingStore(), ManualClock()
    voters = Voters(clock, {"s1": (0.1, "approve"), "s2": (0.2, "approve"), "s3": (0.3, "approve")})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    store.gate = asyncio.Event()
    await clock.advance(0.3)  # s1's save is under way while s2 and s3 answer
    store.gate.set()
    await settle()
    assert isinstance(done(run), Decided)
    # The claim, s1's save, then the decided state with all three: s2 and s3 cost no write.
    assert store.calls == ["create", "update", "update"]
    assert (await state_of(store)).decision.outcome == "approved"


async def test_a_crash_before_the_decision_loses_only_the_unsaved_vote_which_is_asked_again() -> (
    None
):
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    voters_a = Voters(clock_a, {"s1": (0.1, "approve"), "s2": (0.2, "approve"), "s3": (0.3, "x")})
    voters_a.hold("s3")
    a = coordinator(store, "a", clock_a, voters_a)
    run_a = asyncio.create_task(a.run(job(policy(), clock_a)))
    await clock_a.advance(0.2)
    assert (await state_of(store)).votes.keys() == {"s1", "s2"}  # saved as they came
    run_a.cancel()  # a dies with s3's answer on its way (never counted anywhere)
    await settle()
    voters_b = Voters(clock_b, {s: (0.1, "approve") for s in SKILLS})
    await clock_b.advance(LEASE_S + 0.5)  # past a's lease (renewed by s2's save)
    b = coordinator(store, "b", clock_b, voters_b)
    run_b = asyncio.create_task(b.run(job(policy(), clock_b)))
    await clock_b.advance(0.1)
    assert isinstance(done(run_b), Decided)
    assert [ask.skill for ask in voters_b.asked] == ["s3"]  # only the vote not saved


class LandedStore(MemoryStore):
    """After `hold()`, the next update lands and then waits for `gate` before it returns (its
    reply is slow): a caller cancelled meanwhile never learns the revision it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.holding = False
        self.held = asyncio.Event()

    async def update(self, key: str, value: bytes, last: int) -> int:
        revision = await super().update(key, value, last)
        if self.holding:
            self.holding = False
            self.held.set()
            await self.gate.wait()
        return revision


async def test_the_end_of_a_collection_during_a_lease_renewal_does_not_lose_the_claim() -> None:
    store, clock = LandedStore(), ManualClock()
    voters = Voters(clock, {s: (0.0, "approve") for s in SKILLS})
    for skill in SKILLS:
        voters.hold(skill)
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await settle()
    store.holding = True
    await clock.advance(LEASE_S / 3)  # the renewal's write lands; its reply is slow
    await store.held.wait()
    for skill in SKILLS:  # every vote at once: they end the collection while it waits
        voters.release(skill)
    await settle()
    store.gate.set()
    await settle()
    outcome = done(run)
    assert isinstance(outcome, Decided)  # not LostClaim: the renewal's revision was kept
    assert (await state_of(store)).state == "decided"


async def test_two_coordinators_racing_for_one_event_decide_it_once() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.5, "approve") for s in SKILLS})
    c1 = coordinator(store, "c1", clock, voters)
    c2 = coordinator(store, "c2", clock, voters)
    pol = policy()
    runs = [asyncio.create_task(c.run(job(pol, clock))) for c in (c1, c2)]
    await clock.advance(1.0)
    first, second = (done(r) for r in runs)
    assert isinstance(first, Decided) and isinstance(second, Busy)
    assert second.owner == "c1"
    assert len(voters.asked) == 3  # each voter was asked once, by the winner
    # The loser's redelivery finds the outcome.
    again = await c2.run(job(pol, clock))
    assert isinstance(again, Done) and again.state.decision == first.decision


async def test_a_voter_that_never_answers_is_cut_off_and_counts_as_unanswered() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(
        clock, {"s1": (0.1, "approve"), "s2": (None, "approve"), "s3": (0.1, "approve")}
    )
    pol = policy(deadline_s=5.0)
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(pol, clock)))
    await clock.advance(5.0 + CUTOFF_SLACK_S - 0.01)
    assert not run.done()  # the asker is trusted to stop itself until the backstop
    await clock.advance(0.02)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    silent = outcome.decision.votes[1]
    assert (silent.outcome, silent.counted_as) == ("timeout", "reject")
    assert outcome.decision.outcome == "rejected"
    assert outcome.decision.reason == (
        "s2: no answer by the deadline → counted as reject (policy); "
        "1 counted as reject for no answer; unanimous needs no rejects"
    )
    assert voters.cancelled == ["s2"]


async def test_a_late_vote_is_recorded_but_not_counted() -> None:
    store, clock = MemoryStore(), ManualClock()
    late_by = CUTOFF_SLACK_S / 2  # after the deadline, before the backstop
    voters = Voters(
        clock, {"s1": (0.1, "approve"), "s2": (5.0 + late_by, "approve"), "s3": (0.1, "approve")}
    )
    pol = policy(deadline_s=5.0, timeout_counts_as="abstain", silence_reason="a test's choice")
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(pol, clock)))
    await clock.advance(5.0 + late_by)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    late = outcome.decision.votes[1]
    assert late.outcome == "timeout" and "late vote" in late.error
    assert late.verdict is not None and late.verdict.vote == "approve"  # what it said: kept
    assert late.counted_as == "abstain"  # what it counts as: the policy's unanswered
    # unanimous over the two that answered in time, the late one abstaining
    assert outcome.decision.outcome == "approved"
    assert outcome.decision.reason == (
        "s2: answered after the deadline → counted as abstain (policy); "
        "all 2 non-abstaining voters approved"
    )


async def test_decide_early_stops_asking_once_the_outcome_cannot_change() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {"s1": (0.1, "reject"), "s2": (3.0, "approve"), "s3": (3.0, "approve")})
    pol = policy(decide_early=True)
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(pol, clock)))
    await clock.advance(0.1)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    d = outcome.decision
    assert d.outcome == "rejected"
    assert [(v.outcome, v.counted_as) for v in d.votes] == [
        ("voted", "reject"),
        ("cancelled", None),
        ("cancelled", None),
    ]
    assert sorted(voters.cancelled) == ["s2", "s3"]


async def test_without_decide_early_every_vote_is_waited_for() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {"s1": (0.1, "reject"), "s2": (3.0, "approve"), "s3": (3.0, "approve")})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(0.1)
    assert not run.done()
    await clock.advance(2.9)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    assert [v.outcome for v in outcome.decision.votes] == ["voted"] * 3


# -- take-overs and lost claims -----------------------------------------------------------------
async def test_a_take_over_keeps_the_deadline_and_the_votes_already_cast() -> None:
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    voters_a = Voters(clock_a, {"s1": (0.1, "approve"), "s2": (None, "x"), "s3": (None, "x")})
    a = coordinator(store, "a", clock_a, voters_a)
    pol = policy(deadline_s=5.0)
    run_a = asyncio.create_task(a.run(job(pol, clock_a)))
    await clock_a.advance(0.1)  # s1 answered and was saved
    assert (await state_of(store)).votes.keys() == {"s1"}
    deadline_at = (await state_of(store)).deadline_at
    run_a.cancel()  # a dies (kill -9: nothing more of it runs)
    await settle()
    with pytest.raises(asyncio.CancelledError):
        done(run_a)

    voters_b = Voters(clock_b, {s: (0.2, "approve") for s in SKILLS})
    b = coordinator(store, "b", clock_b, voters_b)
    await clock_b.advance(1.0)
    assert isinstance(await b.run(job(pol, clock_b)), Busy)  # a's lease still runs
    await clock_b.advance(1.5)  # past a's lease
    run_b = asyncio.create_task(b.run(job(pol, clock_b)))
    await clock_b.advance(0.2)
    outcome = done(run_b)
    assert isinstance(outcome, Decided)
    assert sorted(ask.skill for ask in voters_b.asked) == ["s2", "s3"]  # s1 not asked again
    assert {ask.deadline_wall for ask in voters_b.asked} == {deadline_at}
    # The deadline is the first claim's: 5 s after it, 2.5 s into b's work.
    assert voters_b.asked[0].deadline == pytest.approx(clock_b.monotonic() - 0.2 + 2.5)
    d = outcome.decision
    assert d.takeovers == 1 and d.coordinator == "b" and d.outcome == "approved"
    assert d.votes[0].agent == "agent-s1" and d.votes[0].latency_ms == 0.0  # a's vote, kept


async def test_a_take_over_past_the_deadline_gives_votes_in_flight_a_grace() -> None:
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    a = coordinator(store, "a", clock_a, Voters(clock_a, {s: (None, "x") for s in SKILLS}))
    pol = policy(deadline_s=1.0, agent_timeout_s=1.0)
    run_a = asyncio.create_task(a.run(job(pol, clock_a)))
    await settle()
    run_a.cancel()
    await settle()
    with pytest.raises(asyncio.CancelledError):
        done(run_a)

    voters_b = Voters(clock_b, {s: (0.5, "approve") for s in SKILLS})
    b = coordinator(store, "b", clock_b, voters_b)
    await clock_b.advance(3.0)  # past both a's lease and the deadline
    run_b = asyncio.create_task(b.run(job(pol, clock_b)))
    await clock_b.advance(0.5)
    outcome = done(run_b)
    assert isinstance(outcome, Decided)
    assert {ask.grace_s for ask in voters_b.asked} == {1.0}
    assert outcome.decision.outcome == "approved"  # answers within the grace count


async def test_a_lost_claim_mid_collect_stops_the_loser_from_deciding() -> None:
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    voters_a = Voters(clock_a, {s: (0.1, "reject") for s in SKILLS})
    voters_a.hold("s3")
    a = coordinator(store, "a", clock_a, voters_a)
    pol = policy(deadline_s=10.0)
    run_a = asyncio.create_task(a.run(job(pol, clock_a)))
    await clock_a.advance(0.1)  # s1, s2 saved; s3 held. Then a stalls: its clock stops.

    voters_b = Voters(clock_b, {s: (0.1, "approve") for s in SKILLS})
    b = coordinator(store, "b", clock_b, voters_b)
    await clock_b.advance(LEASE_S + 0.5)
    run_b = asyncio.create_task(b.run(job(pol, clock_b)))
    await clock_b.advance(0.1)
    won = done(run_b)
    assert isinstance(won, Decided) and won.decision.coordinator == "b"
    assert [ask.skill for ask in voters_b.asked] == ["s3"]

    voters_a.release("s3")  # a wakes up with its last vote and tries to save it
    await settle()
    with pytest.raises(LostClaim):
        done(run_a)
    state = await state_of(store)
    assert state.state == "decided" and state.decision == won.decision


async def test_a_lost_lease_renewal_stops_the_collection_at_once() -> None:
    store = MemoryStore()
    clock_a, clock_b = ManualClock(), ManualClock()
    voters_a = Voters(clock_a, {s: (None, "x") for s in SKILLS})
    a = coordinator(store, "a", clock_a, voters_a)
    run_a = asyncio.create_task(a.run(job(policy(deadline_s=10.0), clock_a)))
    await settle()
    await clock_b.advance(LEASE_S + 0.5)  # a's renewals are late (its clock has not moved)
    b_claim = await Ledger(store, "b", LEASE_S, clock=clock_b).claim(
        KEY, stream_seq=1, deadline_s=10
    )
    assert isinstance(b_claim, Claim)
    await clock_a.advance(LEASE_S / 3)  # a's next renewal finds the claim gone
    with pytest.raises(LostClaim):
        done(run_a)
    assert sorted(voters_a.cancelled) == SKILLS  # nobody is left waiting for


# -- the outcomes that are not decisions --------------------------------------------------------
async def test_a_skill_nobody_has_is_undecidable_under_the_claim() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "approve") for s in SKILLS})
    j = job(policy(), clock)
    j = Job(**{**j.__dict__, "agents": {"s1": "agent-s1", "s2": "agent-s2"}})
    outcome = await coordinator(store, "c1", clock, voters).run(j)
    assert isinstance(outcome, Undecidable)
    assert outcome.reason == "no_agent" and "s3" in outcome.error
    assert voters.asked == []
    ledger = Ledger(store, "c1", LEASE_S, clock=clock)
    marked = await ledger.mark_dead_lettered(
        KEY, stream_seq=1, reason=outcome.reason, claim=outcome.claim
    )
    assert isinstance(marked, DeadLettered)
    # The redelivery (same stream sequence) finds it dead-lettered: publish again, not decide.
    again = await coordinator(store, "c2", clock, voters).run(job(policy(), clock))
    assert isinstance(again, Done) and again.state.state == "dead_lettered"


async def test_no_quorum_goes_to_the_dead_letters_when_the_policy_says_so() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "abstain") for s in SKILLS})
    pol = policy(on_no_quorum="dead_letter")
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(pol, clock)))
    await clock.advance(0.1)
    outcome = done(run)
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_quorum"
    assert (await state_of(store)).state == "collecting"  # not decided: the caller marks it


async def test_dead_lettering_is_refused_once_decided_and_deciding_once_dead_lettered() -> None:
    # Decided first: the dead-letterer (JetStream gave up on a delivery) is refused.
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "approve") for s in SKILLS})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(0.1)
    assert isinstance(done(run), Decided)
    dlq = Ledger(store, "dlq", LEASE_S, clock=clock)
    assert isinstance(await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="terminated"), Done)

    # Dead-lettered first (the owner stalled past the dead-letterer's patience): the owner's
    # decision is refused, and the event stays dead-lettered.
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "approve") for s in SKILLS})
    voters.hold("s3")
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(0.1)
    dlq = Ledger(store, "dlq", LEASE_S, clock=ManualClock(wall=clock.time()))
    marked = await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries")
    assert isinstance(marked, Busy)  # a live owner: not without patience
    stalled = ManualClock(wall=clock.time() + LEASE_S + 1)
    dlq = Ledger(store, "dlq", LEASE_S, clock=stalled)
    marked = await dlq.mark_dead_lettered(KEY, stream_seq=1, reason="max_deliveries")
    assert isinstance(marked, DeadLettered)
    voters.release("s3")
    await settle()
    with pytest.raises(LostClaim):
        done(run)
    assert (await state_of(store)).state == "dead_lettered"


# -- signed decisions ----------------------------------------------------------------------------
async def test_a_decision_is_signed_by_its_coordinator_and_names_the_verified_principal() -> None:
    from mesh.identity import Signer, Trust
    from mesh.records import decision_refusal, decision_subject

    key = Signer.generate()
    trust = Trust()
    trust.add(key, "coordinator", "coordinator")
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "approve") for s in SKILLS})
    decider = Decider(
        Ledger(store, "c1", LEASE_S, clock=clock), voters, clock, name="c1", signer=key
    )
    signed_job = dataclasses.replace(job(policy(), clock), principal="publisher:p1")
    run = asyncio.create_task(decider.run(signed_job))
    await clock.advance(0.1)
    d = done(run).decision
    assert (d.signer, d.principal) == (key.kid, "publisher:p1")
    assert decision_refusal(trust, d) is None
    assert decision_refusal(trust, d, subject=decision_subject(d)) is None
    # What the ledger keeps is the signed decision (a re-publish after a crash is signed too).
    assert (await state_of(store)).decision == d

    # Anything changed, a key nobody trusts, or a genuine decision on another event's subject:
    assert decision_refusal(trust, msgspec.structs.replace(d, outcome="rejected")) == (
        "signature does not verify"
    )
    assert decision_refusal(trust, msgspec.structs.replace(d, principal="operator:x"))
    assert decision_refusal(trust, msgspec.structs.replace(d, signature="")) == "unsigned"
    assert "not trusted" in (decision_refusal(Trust(), d) or "")
    other = msgspec.structs.replace(d, event_id="e2")
    assert "copied to" in (decision_refusal(trust, d, subject=decision_subject(other)) or "")


def test_event_principal_is_the_trusted_key_that_signed_subject_and_body() -> None:
    from mesh.identity import Signer, Trust
    from mesh.records import event_principal, event_signature

    publisher, stranger = Signer.generate(), Signer.generate()
    trust = Trust()
    trust.add(publisher, "publisher", "p1")
    body, subj = b'{"id": "e1"}', "mesh.evt.acme.vote.test"
    header = event_signature(publisher, subj, body)
    assert event_principal(trust, subj, body, header) == ("publisher:p1", "")
    assert event_principal(trust, subj, body + b" ", header)[1] == "signature does not verify"
    # Signed for another tenant's subject: not this event.
    assert event_principal(trust, "mesh.evt.other.vote.test", body, header)[0] == ""
    assert event_principal(trust, subj, body, None) == ("", "unsigned")
    assert (
        "not trusted"
        in event_principal(trust, subj, body, event_signature(stranger, subj, body))[1]
    )
    assert event_principal(None, subj, body, header)[0] == ""


# -- reasons: silence is named for what it was, never for a vote ------------------------------
def failing(outcomes: dict[str, tuple[str, str, float, int]], clock: ManualClock) -> Any:
    """An asker whose voters fail as scripted: skill → (outcome, error, latency_ms, attempts);
    other skills approve. Built as coordinator.dispatch builds its votes."""

    async def ask(a: Ask) -> Vote:
        await clock.sleep(0.1)
        if a.skill not in outcomes:
            return voted(a, "approve")
        outcome, error, latency_ms, attempts = outcomes[a.skill]
        return Vote(
            skill=a.skill,
            agent=a.agent,
            outcome=outcome,  # type: ignore[arg-type]
            counted_as=unanswered(a.policy),
            latency_ms=latency_ms,
            attempts=attempts,
            error=error,
        )

    return ask


async def decide_with(pol: Policy, asker: Any, clock: ManualClock, advance: float = 0.1) -> Any:
    run = asyncio.create_task(coordinator(MemoryStore(), "c1", clock, asker).run(job(pol, clock)))
    await clock.advance(advance)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    return outcome.decision


async def test_every_voter_failing_is_said_so_not_counted_as_rejects() -> None:
    clock = ManualClock()
    script = {s: ("error", "agent raised: boom", 12.0, 1) for s in SKILLS}
    d = await decide_with(policy(), failing(script, clock), clock)
    assert d.outcome == "rejected"
    assert "3 rejected" not in d.reason and "vetoed" not in d.reason
    assert d.reason == (
        "s1: failed (agent raised: boom) → counted as reject (policy); "
        "s2: failed (agent raised: boom) → counted as reject (policy); "
        "s3: failed (agent raised: boom) → counted as reject (policy); "
        "3 counted as reject for no answer; unanimous needs no rejects"
    )


async def test_a_timed_out_veto_holder_is_not_said_to_veto() -> None:
    clock = ManualClock()
    pol = policy(
        skills=["security", "quality"],
        rule=QuorumRule(kind="k_of_n", k=1, vetoes=["security"]),
        retries=1,
    )
    script = {"security": ("timeout", "no answer in 1.5 s", 3012.0, 2)}
    d = await decide_with(pol, failing(script, clock), clock)
    assert d.outcome == "rejected"
    assert "vetoed" not in d.reason
    assert d.reason == (
        "security: no answer in 3.0 s (2 attempts) → counted as reject (policy); "
        "a reject counted for veto holder security rejects"
    )


async def test_unavailable_and_invalid_answers_are_named() -> None:
    clock = ManualClock()
    pol = policy(rule=QuorumRule(kind="majority"), timeout_counts_as="absent")
    script = {
        "s2": ("unavailable", "no responders on the agent's subject", 1.0, 2),
        "s3": ("invalid", "unsigned vote", 5.0, 1),
    }
    d = await decide_with(pol, failing(script, clock), clock)
    assert d.outcome == "approved"
    assert d.reason == (
        "s2: unavailable (no responders on the agent's subject) → left out (policy); "
        "s3: invalid answer (unsigned vote) → left out (policy); 1 approve vs 0 reject; majority"
    )


async def test_under_no_quorum_an_approval_waits_for_the_voters_who_may_fall_silent() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(
        clock, {"s1": (0.1, "approve"), "s2": (0.2, "approve"), "s3": (None, "approve")}
    )
    pol = policy(
        rule=QuorumRule(kind="k_of_n", k=1), timeout_counts_as="no_quorum", decide_early=True
    )
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(pol, clock)))
    await clock.advance(0.2)
    assert not run.done()  # one approval would do, but s3's silence forbids approving
    await clock.advance(5.0 + CUTOFF_SLACK_S)
    outcome = done(run)
    assert isinstance(outcome, Decided)
    d = outcome.decision
    assert (d.outcome, d.votes[2].outcome, d.votes[2].counted_as) == ("no_quorum", "timeout", None)
    assert d.reason == (
        "s3: no answer by the deadline → no approval without it (policy); "
        "no approval without an answer from s3"
    )


# -- no live agent: a fresh event waits (unclaimed), a take-over does not -----------------------
def orphan(clock: ManualClock, *, delivery: int = 1, wait_s: float = 30.0, **over: Any) -> Job:
    """An event whose skill s3 nobody live has, published now on `clock`."""
    j = job(policy(), clock)
    fields = {
        "agents": {"s1": "agent-s1", "s2": "agent-s2"},
        "no_agent_wait_s": wait_s,
        "published_at": clock.time(),
        "delivery": delivery,
        "max_deliver": 20,
    }
    return dataclasses.replace(j, **(fields | over))


async def test_a_fresh_event_with_no_live_agent_waits_unclaimed_with_growing_pauses() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(clock, {s: (0.1, "approve") for s in SKILLS})
    decider = coordinator(store, "c1", clock, voters)
    j = orphan(clock)
    pauses = []
    for delivery in range(1, 6):
        outcome = await decider.run(dataclasses.replace(j, delivery=delivery))
        assert isinstance(outcome, Wait), outcome
        assert "s3" in outcome.reason
        pauses.append(outcome.retry_in_s)
    assert pauses == [0.5, 1.0, 2.0, 4.0, WAIT_MAX_S]
    assert await state_of(store) is None  # never claimed: its deadline has not started
    assert voters.asked == []

    # The agent is back: decided, with the whole deadline (it starts at this claim).
    await clock.advance(10.0)
    run = asyncio.create_task(decider.run(dataclasses.replace(job(policy(), clock), delivery=6)))
    await clock.advance(0.1)
    outcome = done(run)
    assert isinstance(outcome, Decided) and outcome.decision.outcome == "approved"


async def test_an_event_that_waited_long_enough_is_dead_lettered_no_agent() -> None:
    store, clock = MemoryStore(), ManualClock()
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    j = orphan(clock, wait_s=30.0)
    await clock.advance(29.0)
    early = await decider.run(dataclasses.replace(j, delivery=7))
    assert isinstance(early, Wait) and early.retry_in_s <= 1.0 + 0.1  # not far past the bound
    await clock.advance(1.0)
    outcome = await decider.run(dataclasses.replace(j, delivery=8))
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"
    assert "s3" in outcome.error and "waited 30.0 s over 8 deliveries" in outcome.error
    assert (await state_of(store)).state == "collecting"  # claimed: the caller marks it


async def test_near_the_last_delivery_it_is_dead_lettered_whatever_the_time() -> None:
    store, clock = MemoryStore(), ManualClock()
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    assert isinstance(await decider.run(orphan(clock, delivery=18)), Wait)
    outcome = await decider.run(orphan(clock, delivery=19))
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"
    assert "over 19 deliveries" in outcome.error and "registry view" not in outcome.error
    stale = await coordinator(MemoryStore(), "c1", clock, Voters(clock, {})).run(
        orphan(clock, delivery=19, registry_stale_s=12.0)
    )
    assert isinstance(stale, Undecidable)
    assert "the registry view has heard nothing for 12.0 s" in stale.error
    # Without a publish time only the delivery count bounds the wait.
    store2 = MemoryStore()
    d2 = coordinator(store2, "c1", clock, Voters(clock, {}))
    assert isinstance(await d2.run(orphan(clock, published_at=0.0)), Wait)


async def test_no_wait_setting_dead_letters_at_once() -> None:
    store, clock = MemoryStore(), ManualClock()
    outcome = await coordinator(store, "c1", clock, Voters(clock, {})).run(
        orphan(clock, wait_s=0.0)
    )
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"


async def test_a_take_over_with_no_live_agent_is_released_then_dead_lettered_when_bounded() -> None:
    """A take-over that finds a voter's skill with no live agent does not dead-letter at once
    (the registry view may be mid-election): it releases the event, keeping the votes cast and
    dropping the deadline, and dead-letters it only once it has waited `no_agent_wait_s`."""
    store, clock = MemoryStore(), ManualClock()
    dead = Ledger(store, "dead", LEASE_S, clock=clock)
    first = await dead.claim(KEY, stream_seq=1, deadline_s=5.0)
    assert isinstance(first, Claim)
    cast = Vote(skill="s1", agent="agent-s1", outcome="voted", counted_as="approve")
    await dead.save(first, msgspec.structs.replace(first.state, votes={"s1": cast}))
    await clock.advance(LEASE_S + 0.1)  # its owner died; the lease lapsed
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    outcome = await decider.run(orphan(clock))
    assert isinstance(outcome, Wait) and "s3: no live agent has the skill" in outcome.reason
    state = await state_of(store)
    assert state.state == "waiting" and state.deadline_at == 0.0
    assert state.votes == {"s1": cast} and state.waiting_since == clock.time()
    # Still nobody: it waits unclaimed (no write), until the bound.
    await clock.advance(10.0)
    assert isinstance(await decider.run(orphan(clock, delivery=4)), Wait)
    assert (await state_of(store)).state == "waiting"
    await clock.advance(21.0)
    outcome = await decider.run(orphan(clock, delivery=9))
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"
    assert outcome.error == "s3: no live agent has the skill for 31 s (9 deliveries)"
    assert outcome.claim.state.takeovers == 1


async def test_a_take_over_with_no_wait_setting_dead_letters_under_its_claim() -> None:
    store, clock = MemoryStore(), ManualClock()
    first = await Ledger(store, "dead", LEASE_S, clock=clock).claim(
        KEY, stream_seq=1, deadline_s=5.0
    )
    assert isinstance(first, Claim)
    await clock.advance(LEASE_S + 0.1)
    outcome = await coordinator(store, "c1", clock, Voters(clock, {})).run(
        orphan(clock, wait_s=0.0)
    )
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"
    assert outcome.claim.state.takeovers == 1  # dead-lettered under the take-over's claim


async def test_a_replayed_dead_letter_waits_like_a_fresh_event() -> None:
    store, clock = MemoryStore(), ManualClock()
    ledger = Ledger(store, "c1", LEASE_S, clock=clock)
    assert isinstance(
        await ledger.mark_dead_lettered(KEY, stream_seq=1, reason="no_agent"), DeadLettered
    )
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    assert isinstance(await decider.run(orphan(clock, stream_seq=2)), Wait)
    # The same delivery again is what it was: dead-lettered (published again by the caller).
    again = await decider.run(orphan(clock, stream_seq=1))
    assert isinstance(again, Done) and again.state.state == "dead_lettered"


async def test_the_wait_counts_from_when_the_registry_view_became_current() -> None:
    """A backlog met by a coordinator that just started (or a view just back from an outage)
    has not waited for agents yet, however old its events are."""
    store, clock = MemoryStore(), ManualClock()
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    old = orphan(clock)  # published now
    await clock.advance(3600.0)
    fresh_view = dataclasses.replace(old, registry_current_since=clock.time() - 5.0)
    assert isinstance(await decider.run(fresh_view), Wait)
    await clock.advance(25.0)
    outcome = await decider.run(dataclasses.replace(fresh_view, delivery=8))
    assert isinstance(outcome, Undecidable) and "waited 30.0 s" in outcome.error


async def test_a_stale_registry_view_ends_the_wait_only_near_the_last_delivery() -> None:
    store, clock = MemoryStore(), ManualClock()
    decider = coordinator(store, "c1", clock, Voters(clock, {}))
    stale = orphan(clock, registry_stale_s=8.0)
    await clock.advance(600.0)  # long past the bound, but the view proves nothing
    waiting = await decider.run(dataclasses.replace(stale, delivery=10))
    assert isinstance(waiting, Wait) and "registry view has heard nothing" in waiting.reason
    assert waiting.retry_in_s == WAIT_MAX_S
    outcome = await decider.run(dataclasses.replace(stale, delivery=19))
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"


# -- a voter nobody could ask: the event is released, not decided, not dead-lettered ---------
def nobody_there(ask: Ask) -> Vote:
    return Vote(
        skill=ask.skill,
        agent=ask.agent,
        outcome="unavailable",
        counted_as=unanswered(ask.policy),
        attempts=4,
        error=f"{NOBODY_LISTENING}: {ask.skill}: no live instance answered",
    )


class Gone(Voters):
    """`Voters`, but the skills in `gone` have nobody listening (every attempt)."""

    def __init__(self, clock: ManualClock, script: dict[str, tuple[float | None, Choice]]) -> None:
        super().__init__(clock, script)
        self.gone: set[str] = set()

    async def __call__(self, ask: Ask) -> Vote:
        if ask.skill in self.gone:
            self.asked.append(ask)
            await self.clock.sleep(0.5)
            return nobody_there(ask)
        return await super().__call__(ask)


async def test_an_unreachable_voter_releases_the_event_then_a_fresh_deadline() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Gone(clock, {s: (0.1, "approve") for s in SKILLS})
    voters.gone = {"s3"}
    decider = coordinator(store, "c1", clock, voters)
    j = orphan(clock, agents={s: f"agent-{s}" for s in SKILLS})
    run = asyncio.create_task(decider.run(j))
    await clock.advance(0.5)
    outcome = done(run)
    # Not "rejected" by a silence that was no silence: released to wait for s3.
    assert isinstance(outcome, Wait), outcome
    assert "s3: s3: no live instance answered" in outcome.reason
    state = await state_of(store)
    assert state.state == "waiting" and state.deadline_at == 0.0 and state.lease_until == 0.0
    assert set(state.votes) == {"s1", "s2"}  # the answers are kept
    # s3 comes back: the next claim starts a fresh deadline and asks s3 only.
    await clock.advance(outcome.retry_in_s + 10.0)  # the old deadline (5 s) is long gone
    voters.gone.clear()
    voters.asked.clear()
    run = asyncio.create_task(decider.run(dataclasses.replace(j, delivery=2)))
    await settle()
    claimed = await state_of(store)
    assert claimed.state == "collecting"
    assert claimed.deadline_at == pytest.approx(clock.time() + 5.0)  # fresh, not the old one
    await clock.advance(0.1)
    outcome = done(run)
    assert isinstance(outcome, Decided) and outcome.decision.outcome == "approved"
    assert [a.skill for a in voters.asked] == ["s3"]


async def test_an_unreachable_voter_that_cannot_change_the_outcome_does_not_hold_it() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Gone(clock, {"s1": (0.1, "reject"), "s2": (0.1, "approve"), "s3": (0.1, "approve")})
    voters.gone = {"s3"}
    j = orphan(clock, agents={s: f"agent-{s}" for s in SKILLS})
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(j))
    await clock.advance(0.5)
    outcome = done(run)
    assert isinstance(outcome, Decided) and outcome.decision.outcome == "rejected"


async def test_a_voter_that_timed_out_is_silence_as_the_policy_says_not_unreachable() -> None:
    """A frozen agent (SIGSTOP) answers nothing: that is a timeout and counts as the policy
    says, even though the event would approve without it."""
    store, clock = MemoryStore(), ManualClock()
    voters = Voters(
        clock, {"s1": (0.1, "approve"), "s2": (0.1, "approve"), "s3": (None, "approve")}
    )
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(job(policy(), clock)))
    await clock.advance(5.0 + CUTOFF_SLACK_S)
    outcome = done(run)
    assert isinstance(outcome, Decided) and outcome.decision.outcome == "rejected"


async def test_an_event_unreachable_for_too_long_is_dead_lettered_naming_the_voter() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Gone(clock, {s: (0.1, "approve") for s in SKILLS})
    voters.gone = {"s3"}
    decider = coordinator(store, "c1", clock, voters)
    j = orphan(clock, agents={s: f"agent-{s}" for s in SKILLS})
    outcome: Any = None
    for delivery in range(1, 20):
        run = asyncio.create_task(decider.run(dataclasses.replace(j, delivery=delivery)))
        await clock.advance(0.5)
        outcome = done(run)
        if not isinstance(outcome, Wait):
            break
        await clock.advance(outcome.retry_in_s)
    assert isinstance(outcome, Undecidable) and outcome.reason == "no_agent"
    assert outcome.error.startswith("s3: s3: no live instance answered for 3")
    assert "deliveries)" in outcome.error
    # Every release kept the answers; s1 and s2 were asked once.
    assert sum(a.skill == "s1" for a in voters.asked) == 1


async def test_a_released_event_near_its_last_delivery_is_dead_lettered() -> None:
    store, clock = MemoryStore(), ManualClock()
    voters = Gone(clock, {s: (0.1, "approve") for s in SKILLS})
    voters.gone = {"s3"}
    j = orphan(clock, agents={s: f"agent-{s}" for s in SKILLS}, delivery=19)
    run = asyncio.create_task(coordinator(store, "c1", clock, voters).run(j))
    await clock.advance(0.5)
    outcome = done(run)
    assert isinstance(outcome, Undecidable) and "(19 deliveries)" in outcome.error
