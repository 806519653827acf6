"""The decision core: claim → collect → tally → decide, over three small protocols.

- the ledger (`coordinator.ledger.Ledger` over a `Store`: get / create / update-by-revision),
- the asker (`Asker`: one voter's answer about one event, by a deadline, as a `Vote`),
- the clock (`coordinator.clock.Clock`: wall time, monotonic time, sleep).

No NATS, no spans, no publishing here: `coordinator.service` wires this to the bus and says
what each `Outcome` means for the message (ack, nak, dead letter), and unit tests drive it with
an in-memory store, a scripted asker and a fake clock.

Rules this module owns:
- A fresh event that needs a skill no live agent has is not claimed: it waits (`Wait`, the
  service naks it with that pause), so a registry view emptied by a NATS leader election or an
  agent restarting costs no deadline; it is dead-lettered `no_agent` only once it has waited
  `Job.no_agent_wait_s` since it was published, or is near its last delivery.
- A voter that cannot be asked is not silence: when a claimed event finds a skill with no live
  agent (a take-over), or a voter's call ends with nobody listening (its last attempts
  found no responders: `unreachable`; a frozen agent still times out and counts as the
  policy says), and the votes in hand do not settle the outcome, the event is released
  (`Ledger.release`: state `waiting`, the answers kept, the deadline dropped) and waits (`Wait`).
  So is an event a take-over finds past its deadline with a voter that gave no answer in time
  (`TAKEN_OVER_LATE`): its question was in the hands of the coordinator that failed.
  Its next claim starts a fresh deadline. Bounded: once it has waited `Job.no_agent_wait_s`
  since its first release, or is near its last delivery, it is dead-lettered `no_agent` naming
  the voter(s) and how long. Not decided by policy: an approval was never possible without the
  voter, and a rejection for an outage would be a wrong outcome that looks like a judgement.
- The deadline is fixed at the first claim (wall clock, in the ledger) and kept by a take-over,
  as are the votes already cast: a voter who answered is not asked again (a re-claim of a
  released event keeps them too, under its fresh deadline).
- Every vote is saved (CAS) as it comes, which also proves the claim is still ours; a lost
  claim (the save fails, or the lease renewal does) stops the collection at once, and the loser
  neither decides nor dead-letters. One save is in flight at a time (votes that arrive during
  it go in the next), and the votes that end the collection are written only by the write that
  follows it (decided, released or dead-lettered): a crash before that write loses only
  answers that were never counted, and a take-over asks those voters again (same messageId:
  an agent answers a repeat with the task it has).
- No collection outlives its deadline: asks still pending `CUTOFF_SLACK_S` after it (plus the
  take-over grace) are cancelled and count as unanswered (the asker is expected to stop itself
  at the deadline; this is the backstop). A vote that arrives after the deadline and the grace
  is recorded with what the voter said, but counts as unanswered too.
- With `decide_early`, collection stops as soon as no missing vote could change the outcome
  (an approval never, under `timeout_counts_as = "no_quorum"`: a voter still asked may yet fall
  silent, and its silence forbids the approval).
- A vote that is no answer (timeout, unavailable, error, invalid) enters the tally as silence,
  not as a vote: the decision's reason says what happened to it and what the policy counted it
  as (`silent`, `what_happened`).
- People vote after the agents (`Policy.humans`, each the voter `human:<role>`): once the
  agents' votes are in, they are asked (`humans_to_ask`) when the policy's `ask_humans` says
  so AND their answer could still change the outcome; then the event is not decided here: the
  ledger records it `awaiting_human` (`AwaitingHuman`; `coordinator.humans` takes it from
  there). Not asked, a human voter did not vote (like an abstention).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from coordinator import canary
from coordinator.canary import VersionFilter
from coordinator.clock import Clock
from coordinator.ledger import (
    Busy,
    Claim,
    DecisionState,
    Done,
    HumanStep,
    HumanWait,
    Ledger,
    Pending,
)
from coordinator.policy import HumanVoter, Policy
from coordinator.quorum import Silent, Tally, tally
from mesh import envelope
from mesh.identity import Signer
from mesh.records import Decision, DlqReason, Vote, event_token, sign_decision
from mesh.verdict import Choice

_NO_AGENT = "no live agent has the skill"
# A fresh event with a skill nobody live has waits (nak) this long, doubling up to the cap.
WAIT_FIRST_S = 0.5
WAIT_MAX_S = 5.0
CUTOFF_SLACK_S = 1.0  # how long past the deadline the core waits for an asker to stop itself
TAKEOVER_GRACE_MAX_S = 1.0  # after a take-over: how long votes in flight at the crash may take
# Once the counted votes are in, how long a shadow candidate still asked may take to answer
# (never past the deadline): shadows never hold a decision longer than this.
SHADOW_GRACE_S = 1.0


@dataclass(frozen=True)
class Ask:
    """One voter to ask about one event, and the clocks that bound it."""

    skill: str
    agent: str
    event: envelope.Event
    policy: Policy
    deadline: float  # on the clock's monotonic time
    deadline_wall: float = 0.0  # the same deadline on the wall clock (as the ledger keeps it)
    grace_s: float = 0.0  # after a take-over past the deadline: one re-ask this long
    # Which replicas may answer, by version (coordinator.canary); None: any.
    versions: VersionFilter | None = None
    shadow: bool = False  # a candidate asked in shadow: its vote is recorded, never counted


class Asker(Protocol):
    """One voter's answer by `ask.deadline`. Never raises: every failure is a `Vote` whose
    outcome says what happened."""

    def __call__(self, ask: Ask, /) -> Awaitable[Vote]: ...


@dataclass(frozen=True)
class Job:
    """One event to decide, as the service hands it over."""

    key: str  # its key in the ledger
    event: envelope.Event
    policy: Policy
    decision_type: str
    stream_seq: int
    agents: Mapping[str, str]  # skill → a live agent with it (skills nobody has are absent)
    started: float  # clock.monotonic() when the event arrived
    trace_id: str = ""
    principal: str = ""  # who published it, from its verified signature ("" if unverified)
    # For a fresh event with a skill nobody live has: how long it may wait for one, from when
    # it was published (wall clock; 0: unknown, then only the delivery count bounds it), and
    # which delivery this is of how many JetStream makes (0: unbounded).
    no_agent_wait_s: float = 0.0
    published_at: float = 0.0
    delivery: int = 1
    max_deliver: int = 0
    registry_stale_s: float = 0.0  # how far behind the registry view may be (0: current)
    # Since when (wall clock) the registry view has been current without a break: the wait is
    # counted from then at the earliest (a backlog met by a coordinator just started, or an
    # outage just over, has not waited for agents yet). 0: unknown.
    registry_current_since: float = 0.0


@dataclass
class Decided:
    """Decided and recorded in the ledger: publish it."""

    decision: Decision


@dataclass
class Undecidable:
    """Cannot be decided; the caller dead-letters it under `claim` (which it still holds)."""

    reason: DlqReason
    error: str
    claim: Claim


@dataclass
class Wait:
    """Not claimed (its deadline has not started): look again after `retry_in_s`. A fresh event
    with a skill that no live agent has, while it may still wait for one (`Job.no_agent_wait_s`):
    the registry view may be stale (a NATS leader election) or an agent restarting."""

    retry_in_s: float
    reason: str


@dataclass
class AwaitingHuman:
    """The agents have voted and people are asked: recorded in the ledger (`state`); the
    service publishes the approval requests (again, idempotently, on a redelivery: `fresh`
    False) and acks the event. `coordinator.humans` decides it."""

    key: str
    state: DecisionState
    fresh: bool = True


Outcome = Busy | Done | Decided | Undecidable | Wait


LATE = "late vote: answered after the deadline; not counted"
NO_ANSWER = "no answer by the deadline"
# How an asker marks a vote whose call ended finding nobody listening (NATS no responders):
# the voter could not be asked at all (see `unreachable`).
NOBODY_LISTENING = "nobody listening"
# How an asker marks the vote of a voter that a take-over found past the deadline without an
# answer in time: the question was asked by a coordinator that died (or lost its NATS server),
# so it may never have reached the voter, or its answer never came back. That delay is the
# infrastructure's, not the voter's silence: like an unreachable voter, the event is released
# and the voter asked again under a fresh deadline (where it returns the answer it has).
TAKEN_OVER_LATE = "asked by a coordinator that failed"
# How a human voter's silence is marked (coordinator.humans): it says how long and who.
HUMAN_SILENT = "no answer from a person"
# Kept across a release: answers (a voter who answered is not asked again). Silence is not
# kept: under the fresh deadline its voter is asked again.
_KEPT = ("voted", "invalid", "error", "budget_exceeded")


def unreachable(vote: Vote) -> bool:
    """A voter that cannot be asked (nobody listened when its call ended), or whose question a
    failed coordinator held past the deadline (`TAKEN_OVER_LATE`): not silence."""
    return vote.outcome == "unavailable" and vote.error.startswith(
        (NOBODY_LISTENING, TAKEN_OVER_LATE)
    )


def unanswered(policy: Policy) -> Choice | None:
    """What a voter who gave no usable answer counts as (None: left out of the tally)."""
    match policy.timeout_counts_as:
        case "absent" | "no_quorum":
            return None
        case counts:
            return counts


def counted(votes: Mapping[str, Vote]) -> dict[str, Choice]:
    """The votes cast (a vote that is not an answer is silence: see `silent`)."""
    return {
        s: v.counted_as
        for s, v in votes.items()
        if v.outcome == "voted" and v.counted_as is not None
    }


def silent(policy: Policy, votes: Mapping[str, Vote]) -> dict[str, Silent]:
    """Voters with no usable answer: what happened to each, and what it counts as."""
    out = {}
    for skill, v in votes.items():
        if v.outcome in ("voted", "cancelled"):
            continue  # a vote, or not needed (decide_early): neither is silence
        human = policy.human(skill)
        says = human.silence if human is not None else policy.timeout_counts_as
        if v.outcome == "budget_exceeded":
            says = policy.budget_exceeded
        counts = v.counted_as or ("no_quorum" if says == "no_quorum" else "absent")
        out[skill] = Silent(what=what_happened(v), counts_as=counts)
    return out


def what_happened(vote: Vote) -> str:
    """A vote that is no answer, in words for the decision's reason."""
    error = vote.error if len(vote.error) <= 120 else vote.error[:119] + "…"
    if vote.outcome == "timeout":
        if vote.error.startswith(HUMAN_SILENT):
            return vote.error
        if vote.error == LATE:
            return "answered after the deadline"
        if not vote.latency_ms:
            return NO_ANSWER
        seconds = f"{vote.latency_ms / 1000:.1f} s"
        tries = f" ({vote.attempts} attempts)" if vote.attempts > 1 else ""
        return f"no answer in {seconds}{tries}"
    if vote.outcome == "unavailable":
        return f"unavailable ({error})" if error else "unavailable"
    if vote.outcome == "invalid":
        return f"invalid answer ({error})" if error else "invalid answer"
    if vote.outcome == "budget_exceeded":
        return "budget_exceeded"
    return f"failed ({error})" if error else "failed"


def count(policy: Policy, votes: Mapping[str, Vote], *, final: bool) -> Tally:
    """The tally of these votes under the policy: votes as cast, silence as it says."""
    return tally(
        policy.rule, policy.voters, counted(votes), final=final, silent=silent(policy, votes)
    )


def request_id(event_id: str, voter: HumanVoter) -> str:
    """An approval request's id: `<event token>.<role first asked>`."""
    return f"{event_token(event_id)}.{voter.role}"


def humans_to_ask(policy: Policy, votes: Mapping[str, Vote]) -> list[HumanVoter]:
    """The human voters to ask, the agents' `votes` being in: none unless the policy's
    `ask_humans` says so, and none whose answer could not change the outcome."""
    if not policy.humans:
        return []
    cast = [v for v in votes.values() if v.outcome == "voted" and v.counted_as is not None]
    if policy.ask_humans == "on_disagreement":
        if len({v.counted_as for v in cast if v.counted_as != "abstain"}) < 2:
            return []
    elif policy.ask_humans == "on_low_confidence":
        low = [v for v in cast if v.verdict and v.verdict.confidence < policy.confidence_below]
        if not low:
            return []
    if count(policy, votes, final=False).outcome != "pending":
        return []  # the agents' votes settle it whatever people say
    return list(policy.humans)


def not_asked(policy: Policy, asked: list[HumanVoter]) -> dict[str, Vote]:
    """The votes of human voters not asked: no vote (like an abstention), saying why."""
    ask = {h.voter for h in asked}
    return {
        h.voter: Vote(
            skill=h.voter,
            agent="",
            outcome="cancelled",
            error=f"not asked (ask_humans = {policy.ask_humans!r})",
        )
        for h in policy.humans
        if h.voter not in ask
    }


def decision_of(
    policy: Policy,
    votes: Mapping[str, Vote],
    *,
    event: envelope.Event,
    decision_type: str,
    decided_at: float,
    latency_ms: float,
    coordinator: str,
    takeovers: int = 0,
    trace_id: str = "",
    principal: str = "",
    signer: Signer | None = None,
    shadow_votes: list[Vote] | None = None,
) -> Decision:
    """The one builder of a decision: what `votes` make under the policy's rule (voters with no
    vote did not vote), signed when there is a `signer`."""
    result = count(policy, votes, final=True)
    assert result.outcome != "pending"
    decision = Decision(
        event_id=event.id,
        event_type=event.type,
        tenant=event.tenant,
        decision_type=decision_type,
        outcome=result.outcome,
        reason=result.reason,
        rule=policy.rule.kind,
        votes=[votes[s] for s in policy.voters if s in votes],
        decided_at=decided_at,
        trace_id=trace_id,
        latency_ms=latency_ms,
        coordinator=coordinator,
        takeovers=takeovers,
        principal=principal,
        # Recorded beside the tally, never in it: `result` above saw only `votes`.
        shadow_votes=list(shadow_votes or []),
    )
    return decision if signer is None else sign_decision(signer, decision)


class Decider:
    """With `signer`, every decision is signed (`mesh.records.sign_decision`) before the ledger
    records it, so what is published, even again after a crash, is the signed one."""

    def __init__(
        self,
        ledger: Ledger,
        ask: Asker,
        clock: Clock,
        *,
        name: str,
        signer: Signer | None = None,
        stopped: Callable[[], frozenset[tuple[str, str]]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.ask = ask
        self.clock = clock
        self.name = name
        self.signer = signer
        # (agent, version) of candidates the canary gate stopped (coordinator.canary.Book).
        self.stopped = stopped or frozenset

    async def run(
        self, job: Job, *, on_renew: Callable[[], Awaitable[None]] | None = None
    ) -> Outcome | AwaitingHuman:
        """Claim, collect, tally and record one event. `on_renew` runs after each lease renewal
        (the service tells JetStream it is still at it). LostClaim: someone else owns it now."""
        policy = job.policy
        nobody = [s for s in policy.skills if s not in job.agents]
        waited = ""
        if nobody:
            state = await self.ledger.read(job.key)
            if state is None or (
                state.state == "dead_lettered" and state.stream_seq != job.stream_seq
            ):
                # A fresh event (or a replay): nothing is claimed, so its deadline has not
                # started; it waits for an agent, bounded in time and in deliveries.
                waiting = self._waiting(job, nobody)
                if isinstance(waiting, Wait):
                    return waiting
                waited = waiting
            elif state.state == "waiting" and any(s not in state.votes for s in nobody):
                # Released, and still nobody to ask: no claim (nor a deadline) until there is,
                # or until it has waited long enough (the claim below dead-letters it then).
                still = [s for s in nobody if s not in state.votes]
                held = self._held(job, state.waiting_since, dict.fromkeys(still, _NO_AGENT))
                if isinstance(held, Wait):
                    return held
        # A first delivery is almost always a new event: claimed by one write, no read first.
        # A redelivery most likely finds a state: read first (a failed write would cost more).
        claim = self.ledger.claim_new if job.delivery == 1 and not nobody else self.ledger.claim
        got = await claim(job.key, stream_seq=job.stream_seq, deadline_s=policy.deadline_s)
        if isinstance(got, Done) and got.state.state == "awaiting_human":
            return AwaitingHuman(job.key, got.state, fresh=False)
        if not isinstance(got, Claim):
            return got
        missing = [s for s in policy.skills if s not in job.agents and s not in got.state.votes]
        if missing and waited:
            error = f"no live agent has skill(s) {', '.join(missing)}{waited}"
            return Undecidable("no_agent", error, got)
        if missing:
            # A take-over (or a re-claim) with a voter nobody can ask: released, not decided.
            return await self._release(got, job, got.state.votes, dict.fromkeys(missing, _NO_AGENT))

        # Candidates asked in shadow (the policy's `shadow`): alongside, never in the votes
        # (so never in a tally); waited for `SHADOW_GRACE_S` at most once the counted votes
        # are in; not saved before the decision (a release or a crash asks them again).
        shadow_asks = self._shadow_asks(job, got)
        try:
            votes = await self.collect(got, job, on_renew=on_renew)
            await self._shadow_wait(shadow_asks, got)
        finally:
            shadows = await _shadow_votes(job, shadow_asks)
        gone = {s: v for s, v in votes.items() if unreachable(v)}
        if gone:
            rest = {s: v for s, v in votes.items() if s not in gone}
            if count(policy, rest, final=False).outcome == "pending":
                # Their votes could change the outcome: wait for them rather than count them.
                why = {
                    s: v.error.removeprefix(NOBODY_LISTENING).lstrip(": ") for s, v in gone.items()
                }
                return await self._release(got, job, rest, why)
        asked = humans_to_ask(policy, votes)
        if asked:
            return await self._await_humans(got, job, votes, asked)
        votes = {**votes, **not_asked(policy, asked)}
        decision = self.decide(job, votes, got, shadows=shadows)
        if decision.outcome == "no_quorum" and policy.on_no_quorum == "dead_letter":
            return Undecidable("no_quorum", decision.reason, got)
        final = msgspec.structs.replace(got.state, state="decided", decision=decision)
        await self.ledger.save(got, final)  # LostClaim here: someone else decides, not us
        return Decided(decision)

    async def _await_humans(
        self, claim: Claim, job: Job, votes: Mapping[str, Vote], asked: list[HumanVoter]
    ) -> AwaitingHuman:
        """Record the event as waiting for people: every time in the ledger, on the wall clock
        (a restarted or other coordinator, or a NATS failover, loses nothing)."""
        now = self.clock.time()
        waits = {
            h.voter: HumanWait(
                request_id=request_id(job.event.id, h),
                roles=[h.role],
                asked_at=now,
                expires_at=now + h.wait_s,
                next=[HumanStep(e.role, now + e.after_s) for e in h.escalate],
            )
            for h in asked
        }
        pending = Pending(
            event=job.event,
            policy=job.policy,
            decision_type=job.decision_type,
            started_at=now - (self.clock.monotonic() - job.started),
            trace_id=job.trace_id,
            principal=job.principal,
        )
        state = msgspec.structs.replace(
            claim.state,
            state="awaiting_human",
            lease_until=0.0,
            deadline_at=0.0,
            votes={**votes, **not_asked(job.policy, asked)},
            humans=waits,
            pending=pending,
        )
        await self.ledger.save(claim, state)  # LostClaim: someone else has it
        return AwaitingHuman(job.key, claim.state)

    def _held(self, job: Job, since: float, why: Mapping[str, str]) -> Wait | str:
        """A released event, waiting `since` (wall) for the voters in `why` (skill → what
        happened): `Wait` while it may, else the dead letter's error naming them and how long."""
        now = self.clock.time()
        waited_s = max(0.0, now - since) if since else 0.0
        times = f"{job.delivery} deliver{'y' if job.delivery == 1 else 'ies'}"
        last = job.max_deliver > 0 and job.delivery >= job.max_deliver - 1
        # As for a fresh event: a stale view proves nothing, only the delivery count ends it.
        if last or (waited_s >= job.no_agent_wait_s and not job.registry_stale_s):
            return "; ".join(
                f"{skill}: {what} for {waited_s:.0f} s ({times})" for skill, what in why.items()
            )
        pause = min(WAIT_MAX_S, WAIT_FIRST_S * 2 ** max(0, job.delivery - 1))
        if not job.registry_stale_s:
            pause = min(pause, max(0.0, job.no_agent_wait_s - waited_s) + WAIT_FIRST_S / 5)
        voters = "; ".join(f"{skill}: {what}" for skill, what in why.items())
        reason = (
            f"released, waiting for a reachable voter ({voters}); waited {waited_s:.1f} s "
            f"over {times}, looking again in {pause:.1f} s"
        )
        return Wait(pause, reason)

    async def _release(
        self, claim: Claim, job: Job, votes: Mapping[str, Vote], why: Mapping[str, str]
    ) -> Wait | Undecidable:
        """Give the claimed event back to wait for the voters in `why`, keeping the answers in
        `votes`; dead-lettered `no_agent` (under the claim) once it has waited long enough."""
        since = claim.state.waiting_since or self.clock.time()
        held = self._held(job, since, why)
        if isinstance(held, str):
            return Undecidable("no_agent", held, claim)
        kept = {s: v for s, v in votes.items() if v.outcome in _KEPT}
        await self.ledger.release(claim, kept, since=since)  # LostClaim: someone else has it
        return held

    def _waiting(self, job: Job, nobody: list[str]) -> Wait | str:
        """A fresh event with skills nobody live has: `Wait` while it may, else how long it
        waited (for the dead letter's reason)."""
        since = max(job.published_at, job.registry_current_since)
        waited_s = max(0.0, self.clock.time() - since) if job.published_at else 0.0
        times = f"{job.delivery} deliver{'y' if job.delivery == 1 else 'ies'}"
        # The last delivery or the one before: dead-letter it ourselves, with our reason,
        # rather than let JetStream give up on it (one delivery spare for a failed attempt).
        last = job.max_deliver > 0 and job.delivery >= job.max_deliver - 1
        stale = (
            f"; the registry view has heard nothing for {job.registry_stale_s:.1f} s"
            if job.registry_stale_s
            else ""
        )
        # A stale view proves nothing about agents: only the delivery count ends that wait.
        if last or (waited_s >= job.no_agent_wait_s and not job.registry_stale_s):
            return f" (waited {waited_s:.1f} s over {times}{stale})"
        pause = min(WAIT_MAX_S, WAIT_FIRST_S * 2 ** max(0, job.delivery - 1))
        if job.published_at and not job.registry_stale_s:
            # Not far past the bound: the event is looked at once more when it runs out.
            pause = min(pause, max(0.0, job.no_agent_wait_s - waited_s) + WAIT_FIRST_S / 5)
        reason = (
            f"no live agent has skill(s) {', '.join(nobody)} yet; waited {waited_s:.1f} s "
            f"over {times}, looking again in {pause:.1f} s{stale}"
        )
        return Wait(pause, reason)

    async def collect(
        self, claim: Claim, job: Job, *, on_renew: Callable[[], Awaitable[None]] | None = None
    ) -> dict[str, Vote]:
        """Every voter's vote, by the deadline; saved to the ledger as they come. A voter whose
        agent has a canary or a shadow candidate is asked on the replicas `canary.steer` says."""
        policy = job.policy
        stopped = self.stopped()
        # The deadline is wall-clock in the ledger (it survives take-overs); here, monotonic.
        now = self.clock.monotonic()
        deadline = now + max(0.0, claim.state.deadline_at - self.clock.time())
        votes = dict(claim.state.votes)  # cast before a take-over: not asked again
        # After a take-over, votes that were in flight at the crash are fetched once more even
        # past the deadline; they count only if the voter says it answered in time.
        grace = min(policy.agent_timeout_s, TAKEOVER_GRACE_MAX_S) if claim.state.takeovers else 0.0
        late_after = deadline + grace
        asks: dict[asyncio.Future[Vote], str] = {
            asyncio.ensure_future(
                self.ask(
                    Ask(
                        skill=skill,
                        agent=agent,
                        event=job.event,
                        policy=policy,
                        deadline=deadline,
                        deadline_wall=claim.state.deadline_at,
                        grace_s=grace,
                        versions=canary.steer(
                            policy.canary, policy.shadow, agent, job.event, stopped
                        ),
                    )
                )
            ): skill
            for skill, agent in job.agents.items()
            if skill in policy.skills and skill not in votes
        }
        cutoff = asyncio.ensure_future(self.clock.sleep(late_after + CUTOFF_SLACK_S - now))
        renew = asyncio.ensure_future(self._keep_lease(claim, on_renew))
        pending = set(asks)
        stopped_early = False
        # Votes are saved as they come, by one save at a time in the background: votes that
        # arrive while a save is in flight go out together in the next one, and the votes
        # that end the collection (the last, or those that settle it early) are not saved
        # here at all: the caller's next write (decided, released, dead-lettered) carries them.
        saving: asyncio.Future[None] | None = None
        saved = len(votes)
        try:
            while pending and not cutoff.done():
                watched: set[asyncio.Future[Any]] = {*pending, cutoff, renew}
                if saving is not None:
                    watched.add(saving)
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if renew in done:
                    renew.result()  # raises what stopped it: LostClaim
                if saving is not None and saving.done():
                    saving.result()  # raises what stopped it: LostClaim
                    saving = None
                arrived = self.clock.monotonic()
                answered = [task for task in pending if task in done]
                for task in answered:
                    vote = task.result()
                    votes[asks[task]] = _late(vote, policy) if arrived > late_after else vote
                pending.difference_update(answered)
                if answered and pending and _settled(policy, votes):
                    stopped_early = True
                    break
                if pending and saving is None and len(votes) > saved:
                    saved = len(votes)
                    state = msgspec.structs.replace(claim.state, votes=dict(votes))
                    saving = asyncio.ensure_future(self.ledger.save(claim, state))
            if saving is not None:
                # The claim's revision must be known before the caller's next write.
                await saving
                saving = None
        finally:
            stopping: set[asyncio.Future[Any]] = {cutoff, renew, *pending}
            if saving is not None:  # only on the way out with an error: nothing to keep
                stopping.add(saving)
            for task in stopping:
                task.cancel()
            await asyncio.wait(stopping)  # they unwind; their errors are not ours to raise
        for task in pending:
            skill = asks[task]
            votes[skill] = (
                Vote(
                    skill=skill,
                    agent=job.agents[skill],
                    outcome="cancelled",
                    error="not needed: the outcome could no longer change",
                )
                if stopped_early
                else Vote(
                    skill=skill,
                    agent=job.agents[skill],
                    outcome="timeout",
                    counted_as=unanswered(policy),
                    error=NO_ANSWER,
                )
            )
        return votes

    def _deadline(self, claim: Claim) -> float:
        """The claim's deadline (wall clock in the ledger) on the monotonic clock."""
        return self.clock.monotonic() + max(0.0, claim.state.deadline_at - self.clock.time())

    def _shadow_asks(self, job: Job, claim: Claim) -> dict[asyncio.Future[Vote], str]:
        """The candidates asked in shadow on this event (`coordinator.canary.shadow_of`),
        each only on a replica of its version."""
        policy = job.policy
        if policy.shadow is None:
            return {}
        deadline, deadline_wall = self._deadline(claim), claim.state.deadline_at
        stopped = self.stopped()
        only = VersionFilter(only=policy.shadow.version, strict=True)
        voters = [(s, a) for s, a in job.agents.items() if s in policy.skills]
        return {
            asyncio.ensure_future(
                self.ask(
                    Ask(
                        skill=skill,
                        agent=job.agents[skill],
                        event=job.event,
                        policy=policy,
                        deadline=deadline,
                        deadline_wall=deadline_wall,
                        versions=only,
                        shadow=True,
                    )
                )
            ): skill
            for skill in canary.shadow_of(policy.shadow, voters, job.event, stopped)
        }

    async def _shadow_wait(self, shadows: Mapping[asyncio.Future[Vote], str], claim: Claim) -> None:
        """Give shadow asks still out `SHADOW_GRACE_S` more (never past the deadline)."""
        waiting = [t for t in shadows if not t.done()]
        grace_s = min(SHADOW_GRACE_S, max(0.0, self._deadline(claim) - self.clock.monotonic()))
        if not waiting or grace_s <= 0:
            return
        timer = asyncio.ensure_future(self.clock.sleep(grace_s))
        try:
            while waiting and not timer.done():
                watched: set[asyncio.Future[Any]] = {*waiting, timer}
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                waiting = [t for t in waiting if not t.done()]
        finally:
            timer.cancel()

    def decide(
        self,
        job: Job,
        votes: Mapping[str, Vote],
        claim: Claim,
        *,
        shadows: list[Vote] | None = None,
    ) -> Decision:
        """The decision the votes make under the policy's rule (missing voters did not vote);
        `shadows` recorded beside it, never counted."""
        return decision_of(
            job.policy,
            votes,
            event=job.event,
            decision_type=job.decision_type,
            decided_at=self.clock.time(),
            latency_ms=round((self.clock.monotonic() - job.started) * 1000, 2),
            coordinator=self.name,
            takeovers=claim.state.takeovers,
            trace_id=job.trace_id,
            principal=job.principal,
            signer=self.signer,
            shadow_votes=shadows,
        )

    async def _keep_lease(
        self, claim: Claim, on_renew: Callable[[], Awaitable[None]] | None
    ) -> None:
        """While collecting: renew the ledger lease (LostClaim ends it, and the collection)."""
        while True:
            await self.clock.sleep(self.ledger.lease_s / 3)
            # Shielded: the collection ends by cancelling this task, and a renewal cancelled
            # after its write landed would leave the claim's revision stale, so the decision's
            # own write would fail as if someone had taken the event over (found by
            # tests/faults/test_kill_coordinator.py: "taken over" with no one else alive). The
            # next write waits for it on the claim's lock.
            await asyncio.shield(self.ledger.renew(claim))
            if on_renew is not None:
                with contextlib.suppress(Exception):
                    await on_renew()


async def _shadow_votes(job: Job, shadows: Mapping[asyncio.Future[Vote], str]) -> list[Vote]:
    """The shadow asks' votes, marked shadow and counted as nothing; one still out is
    cancelled here (and recorded `cancelled`)."""
    out = []
    left = [t for t in shadows if not t.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left)
    for task, skill in shadows.items():
        vote = (
            task.result()
            if task.done() and not task.cancelled()
            else Vote(
                skill=skill,
                agent=job.agents[skill],
                outcome="cancelled",
                error="shadow: no answer by the time the counted votes were in",
            )
        )
        out.append(msgspec.structs.replace(vote, shadow=True, counted_as=None))
    return out


def _settled(policy: Policy, votes: Mapping[str, Vote]) -> bool:
    """With `decide_early`: no vote still missing could change the outcome."""
    if not policy.decide_early:
        return False
    early = count(policy, votes, final=False).outcome
    # A voter still asked may yet fall silent, and under "no_quorum" its silence forbids an
    # approval that its vote could not stop.
    no_quorum = "no_quorum" in (policy.timeout_counts_as, policy.budget_exceeded)
    return early == "rejected" or (early == "approved" and not no_quorum)


def _late(vote: Vote, policy: Policy) -> Vote:
    """A vote that arrived after the deadline: what the voter said is kept, not counted."""
    if vote.outcome != "voted":
        return vote  # not an answer to count anyway
    return msgspec.structs.replace(
        vote,
        outcome="timeout",
        counted_as=unanswered(policy),
        brain="",
        error=LATE,
    )
