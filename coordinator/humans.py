"""People in the quorum: what happens to a decision that waits for them (ledger state
`awaiting_human`), over the ledger and a clock, with no NATS (the service wires it).

Rules this module owns:
- Every time is in the ledger, on the wall clock (asked, each escalation, the expiry), never in
  memory: whichever coordinator looks at a waiting decision (after a restart, a take-over, a
  NATS failover) computes what is due from the ledger alone. The service looks when a request's
  timer message comes round (`coordinator.service`) and when an answer arrives.
- `wake`: escalations due are applied (the next role may answer too, the round goes up, a new
  request is published); a voter past its expiry is silent, counted as its `silence` says
  (never approve); once every human voter has answered or is silent, the decision is made.
- `answer`: a person's signed vote is accepted only if its signature verifies under a trusted
  human key of the request's tenant (or, answered via the web console, under a trusted console
  key naming a trusted human of that tenant, who is then checked as below: `person_of`), it
  answers the request as the ledger has it (voter, a round not in the future, the evidence
  shown), the voter has not answered, the request has not expired, and the person may approve:
  a role asked so far (`_may_approve`, always) and, when `mesh.authz` is there, Cedar's
  `approve` (`cedar_authorize`). Refused otherwise, with the reason (the service audits every
  refusal and answers the person).
- Every move is one compare-and-set on the ledger (`Ledger.change`): two coordinators applying
  the same answer or the same expiry at once write once; the decision is made once.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from coordinator.clock import Clock
from coordinator.decide import HUMAN_SILENT as SILENT
from coordinator.decide import count, decision_of
from coordinator.ledger import DecisionState, HumanWait, Ledger
from coordinator.policy import HumanVoter
from mesh.approvals import (
    ApprovalRequest,
    HumanVote,
    evidence_digest,
    person_of,
    vote_refusal,
)
from mesh.errors import MeshRuntimeError
from mesh.identity import Signer, Trust, TrustedKey
from mesh.records import Decision, Vote
from mesh.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass
class Settled:
    """Decided by this call: publish and audit `decision` (the ledger holds it); `closed`: the
    requests this call closed (publish them)."""

    decision: Decision
    state: DecisionState
    closed: list[ApprovalRequest]


@dataclass
class Still:
    """Still waiting for people: the requests as they are now (`changed`: this call escalated
    or recorded something, so publish them and `closed`), and when to look again (wall clock,
    0: never)."""

    requests: list[ApprovalRequest]
    next_due: float
    changed: bool
    closed: list[ApprovalRequest]


@dataclass
class Gone:
    """Not waiting for people (decided, or nothing to believe): `state` says what it is. A
    decided state's decision is published again by whoever sees it (`decided`): the call that
    made it may have failed between the ledger and the publish (publishing is idempotent)."""

    state: DecisionState | None

    @property
    def decided(self) -> Decision | None:
        return self.state.decision if self.state is not None else None


@dataclass
class Refused:
    """The answer is refused (`why`); `then`: what this call moved on all the same (an expiry
    or escalation that was due came first), to publish like any other outcome; `decided`: the
    decision the ledger already holds, when that is why (publish it again: the call that made
    it may have failed between the ledger and the publish, and publishing is idempotent)."""

    why: str
    then: Settled | Still | None = None
    decided: Decision | None = None


DeskOutcome = Settled | Still | Gone | Refused

# A request exists only once the ledger says `awaiting_human` (the decision core writes that
# before the requests go out), and nothing takes an event back from there: a state before it
# (`collecting`, `waiting`) is a stale read (a KV replica behind). Read again this often, this
# far apart, then give up for now (StaleLedger: the inbox's message comes round again).
STALE_REREADS = 5
STALE_PAUSE_S = 0.05


# A decision the desk made is published again (see `Gone`, `Refused.decided`) only this soon
# after it was made: within the streams' duplicate window (120 s) a repeat is dropped by the
# server, past it the audit trail would hold the decision twice, and a timer or answer that
# comes round that late is far more likely a repeat than a repair.
REPUBLISH_WITHIN_S = 100.0


def republish(decision: Decision | None, now: float) -> Decision | None:
    """`decision` if it should be published again now (see REPUBLISH_WITHIN_S)."""
    if decision is None or now - decision.decided_at >= REPUBLISH_WITHIN_S:
        return None
    return decision


class StaleLedger(MeshRuntimeError):
    """The ledger answered with a state older than the request being handled (found by
    tests/sim: taken at face value, the request's timer was acked and the decision never made,
    and a valid answer refused)."""


def _behind(state: DecisionState | None) -> bool:
    return state is not None and state.state in ("collecting", "waiting")


def _may_approve(
    principal: TrustedKey, *, tenant: str, roles: list[str], request_id: str
) -> str | None:
    """The check that always holds (Cedar or not): a human of the request's tenant holding one
    of the roles asked so far. Why not (None: may)."""
    if principal.role != "human" or principal.tenant != tenant:
        return f"{principal.name} is not a person of tenant {tenant!r}"
    if not set(principal.claims) & set(roles):
        held = ", ".join(principal.claims) or "none"
        asked = ", ".join(roles)
        return f"{principal.name} holds no role asked for {request_id} ({asked}; holds {held})"
    return None


def _too_early(principal: TrustedKey, vote: HumanVote, wait: HumanWait) -> str | None:
    """Why `vote` was given before the person was asked (None: it was not). A person who sees
    a request before their role is asked (a chain's `next_roles`) and answers is refused then;
    the signed answer stays in the stream, readable by the tenant's people, and must not count
    when someone replays it after the escalation. So an answer counts only if it answers a
    round at or after the one in which one of the signer's roles was first asked: `roles[i]`
    was added at round i (the first role at round 0, one role per escalation step).

    The round is what the person signed, and a client signs the round it was shown. Not the
    answer's `at`: that is the person's clock, and a clock a little behind the coordinator's
    would refuse an answer given right after the escalation. A person who hand-signs a round
    not yet asked is refused then ("never asked") and counted if it is replayed once that
    round is asked: it is their own signed answer to that round."""
    held = set(principal.claims)
    first = next((i for i, role in enumerate(wait.roles) if role in held), None)
    if first is None or vote.round >= first:
        return None
    return (
        f"{principal.name} answered round {vote.round} of {wait.request_id}, before their role "
        f"was asked (round {first}): answer the request as it is now"
    )


class Authorize(Protocol):
    """A second opinion on an answer the role check allows (Cedar: `cedar_authorize`)."""

    def __call__(
        self, who: TrustedKey, *, tenant: str, roles: list[str], decision_type: str, event_id: str
    ) -> str | None: ...


def cedar_authorize(settings: Any) -> Authorize | None:
    """The Cedar check of an approval (`mesh.authz`, docs/authorization.md: action `approve` on
    the decision type, context `role` and `event_id`), when that module and its settings are
    there; None otherwise. The person's groups are the roles their trusted key holds."""
    try:
        authz: Any = importlib.import_module("mesh.authz")
    except ImportError:
        return None
    if not hasattr(authz, "Authorizer") or not hasattr(settings, "profile"):
        return None
    authorizer = authz.Authorizer.from_settings(settings)

    def authorize(
        who: TrustedKey, *, tenant: str, roles: list[str], decision_type: str, event_id: str
    ) -> str | None:
        principal = authz.identity("human", who.name, tenant=who.tenant, groups=who.claims)
        resource = authz.decision_type(tenant, decision_type)
        said = "no role asked"
        for role in [r for r in roles if r in who.claims]:
            decision = authorizer.is_allowed(
                principal, "approve", resource, {"role": role, "event_id": event_id}
            )
            if decision.allowed:
                return None
            said = decision.explain()
        return f"{who.name} may not approve {decision_type} of {tenant}: {said}"

    return authorize


class Desk:
    """Waiting decisions, moved on by time and by answers. `trust`: whose answers to believe
    (None: nothing checked, unit tests and MESH_INSECURE=bus only)."""

    def __init__(
        self,
        ledger: Ledger,
        clock: Clock,
        *,
        name: str,
        signer: Signer | None = None,
        trust: Trust | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.name = name
        self.signer = signer
        self.trust = trust
        self.authorize = authorize

    # -- time --------------------------------------------------------------------------------
    async def wake(self, key: str) -> DeskOutcome:
        """Apply what is due now (escalations, expiries) and decide when nobody is left."""
        decided: list[Decision] = []
        seen: list[DecisionState] = []

        def step(state: DecisionState) -> DecisionState | None:
            decided.clear()
            seen[:] = [state]
            now = self.clock.time()
            after = _due(state, now)
            if after is None:
                return None
            return self._maybe_decide(after, now, decided)

        state, changed = await self._change(key, step)
        return self._outcome(seen, state, changed, decided)

    async def _change(
        self, key: str, step: Callable[[DecisionState], DecisionState | None]
    ) -> tuple[DecisionState | None, bool]:
        """`Ledger.change`, read again while the ledger answers with a state from before the
        wait (stale): see STALE_REREADS."""
        for attempt in range(STALE_REREADS + 1):
            if attempt:
                await self.clock.sleep(STALE_PAUSE_S * attempt)
            state, changed = await self.ledger.change(key, step)
            if not _behind(state):
                return state, changed
        raise StaleLedger(f"{key}: the ledger keeps answering with a state before the wait")

    # -- answers -----------------------------------------------------------------------------
    async def answer(self, key: str, vote: HumanVote) -> DeskOutcome:
        """A person's answer: recorded (and the decision made, when it was the last one) or
        refused with the reason."""
        principal: TrustedKey | None = None
        if self.trust is not None:
            refusal = vote_refusal(self.trust, vote)
            if refusal is not None:
                return Refused(f"answer not believed: {refusal}")
            # Via the console: the person it names, as the trust file has them (never the
            # console's own key, which holds no approver role).
            principal = person_of(self.trust, vote)
            assert principal is not None  # vote_refusal found them
        refused: list[str] = []
        decided: list[Decision] = []
        seen: list[DecisionState] = []

        def step(state: DecisionState) -> DecisionState | None:
            refused.clear()
            decided.clear()
            seen[:] = [state]
            now = self.clock.time()
            due = _due(state, now)  # an expiry or escalation first: recorded whatever comes
            state = due or state
            why = self._refusal(state, vote, principal, now)
            if why is not None:
                refused.append(why)
                return None if due is None else self._maybe_decide(due, now, decided)
            wait = state.humans[vote.voter]
            humans = {v: w for v, w in state.humans.items() if v != vote.voter}
            votes = {**state.votes, vote.voter: _as_vote(vote, wait)}
            after = msgspec.structs.replace(state, humans=humans, votes=votes)
            return self._maybe_decide(after, now, decided)

        state, changed = await self._change(key, step)
        if state is not None and state.state != "awaiting_human" and not changed:
            # Before `refused`: that may be left from an attempt whose write lost the race to
            # the one that decided (found by tests/sim: the decision was then never published
            # again by this answer's redelivery, though its first publish had failed).
            return Refused(f"{vote.request_id} is already {state.state}", decided=state.decision)
        if refused:
            then = self._outcome(seen, state, changed, decided) if changed else None
            return Refused(refused[0], then if isinstance(then, Settled | Still) else None)
        return self._outcome(seen, state, changed, decided)

    def _refusal(
        self, state: DecisionState, vote: HumanVote, who: TrustedKey | None, now: float
    ) -> str | None:
        wait = state.humans.get(vote.voter)
        if wait is None or state.state != "awaiting_human":
            answered = state.votes.get(vote.voter)
            if answered is not None and answered.outcome == "voted":
                return f"{vote.request_id} was answered already (by {answered.agent})"
            return f"{vote.request_id} is not waiting for an answer ({vote.voter})"
        if wait.request_id != vote.request_id:
            return f"{vote.request_id} is not the request for {vote.voter}"
        if vote.round > wait.round:
            return f"round {vote.round} was never asked (the request is at round {wait.round})"
        if now >= wait.expires_at:
            return f"{vote.request_id} expired; its silence was counted"
        pending = state.pending
        assert pending is not None
        shown = evidence_digest(pending.event.data, _evidence(state))
        if vote.evidence_sha256 != shown:
            return "the answer was given to other evidence than the request's"
        if who is not None:
            why = _may_approve(
                who, tenant=vote.tenant, roles=wait.roles, request_id=wait.request_id
            )
            if why is None and self.authorize is not None:
                why = self.authorize(
                    who,
                    tenant=vote.tenant,
                    roles=wait.roles,
                    decision_type=pending.decision_type,
                    event_id=pending.event.id,
                )
            if why is None:
                why = _too_early(who, vote, wait)
            if why is not None:
                return why
        return None

    # -- deciding ----------------------------------------------------------------------------
    def _maybe_decide(
        self, state: DecisionState, now: float, decided: list[Decision]
    ) -> DecisionState:
        """`state` decided when nobody is left to wait for, or nobody left could change it."""
        pending = state.pending
        assert pending is not None
        policy = pending.policy
        if state.humans and count(policy, state.votes, final=False).outcome == "pending":
            return state
        votes = dict(state.votes)
        for voter, wait in state.humans.items():  # not needed: the outcome cannot change
            votes[voter] = Vote(
                skill=voter,
                agent="",
                outcome="cancelled",
                error=f"not needed: the outcome could no longer change ({wait.request_id})",
            )
        decision = decision_of(
            policy,
            votes,
            event=pending.event,
            decision_type=pending.decision_type,
            decided_at=now,
            latency_ms=round((now - pending.started_at) * 1000, 2),
            coordinator=self.name,
            takeovers=state.takeovers,
            trace_id=pending.trace_id,
            principal=pending.principal,
            signer=self.signer,
        )
        decided.append(decision)
        return msgspec.structs.replace(
            state, state="decided", votes=votes, humans={}, decision=decision
        )

    @staticmethod
    def _outcome(
        seen: list[DecisionState],
        state: DecisionState | None,
        changed: bool,
        decided: list[Decision],
    ) -> DeskOutcome:
        if state is None:
            return Gone(None)
        shut = closed(seen[0], state) if changed and seen else []
        if changed and decided and state.state == "decided":
            return Settled(decided[0], state, shut)
        if state.state != "awaiting_human":
            return Gone(state)
        return Still(requests(state), next_due(state), changed, shut)


# -- pure helpers ----------------------------------------------------------------------------
def _due(state: DecisionState, now: float) -> DecisionState | None:
    """`state` with the escalations and expiries due at `now` applied (None: none due)."""
    pending = state.pending
    if state.state != "awaiting_human" or pending is None:
        return None
    humans = dict(state.humans)
    votes = dict(state.votes)
    moved = False
    for voter, wait in state.humans.items():
        human = pending.policy.human(voter)
        if now >= wait.expires_at:
            votes[voter] = _silence(voter, wait, human)
            del humans[voter]
            moved = True
            continue
        steps = [s for s in wait.next if s.at <= now]
        if steps:
            humans[voter] = msgspec.structs.replace(
                wait,
                roles=[*wait.roles, *(s.role for s in steps)],
                next=[s for s in wait.next if s.at > now],
                round=wait.round + len(steps),
            )
            moved = True
    if not moved:
        return None
    return msgspec.structs.replace(state, humans=humans, votes=votes)


def _silence(voter: str, wait: HumanWait, human: HumanVoter | None) -> Vote:
    counts = human.silence if human is not None else "reject"
    asked = ", ".join(wait.roles)
    return Vote(
        skill=voter,
        agent="",
        outcome="timeout",
        counted_as=None if counts == "no_quorum" else counts,
        error=f"{SILENT} in {wait.expires_at - wait.asked_at:.0f} s (asked: {asked})",
        latency_ms=round((wait.expires_at - wait.asked_at) * 1000, 2),
    )


def _as_vote(vote: HumanVote, wait: HumanWait) -> Vote:
    """A person's answer as the decision records it: who (`agent`: `human:<name>`), when, what
    and why, with the key and signature that make it verifiable against the audit trail's
    `approval` record (which holds the whole signed answer)."""
    return Vote(
        skill=vote.voter,
        agent=f"human:{vote.by}",
        outcome="voted",
        counted_as=vote.answer,
        verdict=Verdict(vote.answer, [vote.reason] if vote.reason else []),
        latency_ms=round(max(0.0, vote.at - wait.asked_at) * 1000, 2),
        brain=f"human via {vote.via}" if vote.via else "human",
        instance=vote.signer,
        signed_at=vote.at,
        signature=vote.signature,
    )


def _evidence(state: DecisionState) -> list[Vote]:
    """What a person is shown: the agents' votes, as cast (not people's, not the not-asked)."""
    pending = state.pending
    assert pending is not None
    return [state.votes[s] for s in pending.policy.skills if s in state.votes]


def next_due(state: DecisionState) -> float:
    """When something is next due (wall clock; 0: nothing)."""
    times = [w.expires_at for w in state.humans.values()]
    times += [s.at for w in state.humans.values() for s in w.next]
    return min(times, default=0.0)


def requests(state: DecisionState) -> list[ApprovalRequest]:
    """The open approval requests of a waiting decision, as the ledger has them (unsigned)."""
    pending = state.pending
    if pending is None:
        return []
    evidence = _evidence(state)
    out = []
    for voter, wait in state.humans.items():
        human = pending.policy.human(voter)
        out.append(
            ApprovalRequest(
                id=wait.request_id,
                tenant=pending.event.tenant,
                event_id=pending.event.id,
                event_type=pending.event.type,
                decision_type=pending.decision_type,
                voter=voter,
                roles=list(wait.roles),
                round=wait.round,
                asked_at=wait.asked_at,
                expires_at=wait.expires_at,
                next_escalation_at=wait.next[0].at if wait.next else 0.0,
                next_roles=[s.role for s in wait.next[:1]],
                silence=human.silence if human is not None else "reject",
                event_data=pending.event.data,
                evidence=evidence,
            )
        )
    return out


def closed(before: DecisionState, after: DecisionState) -> list[ApprovalRequest]:
    """The requests open in `before` that `after` no longer waits for, closed, saying why."""
    gone = [r for r in requests(before) if r.voter not in after.humans]
    out = []
    for r in gone:
        vote = after.votes.get(r.voter)
        if vote is None:
            what = "closed"
        elif vote.outcome == "voted":
            what = f"{vote.counted_as} by {vote.agent}"
        elif vote.outcome == "timeout":
            what = f"silence counted as {r.silence}"
        else:
            what = "not needed: the outcome could no longer change"
        if after.decision is not None:
            what += f"; decision {after.decision.outcome}"
        out.append(msgspec.structs.replace(r, status="closed", outcome=what))
    return out
