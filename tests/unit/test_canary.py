"""Canary and shadow candidates (coordinator.canary) through the decision core: sticky shares,
shadow votes that never count, stopped candidates that get no traffic, and the gate's counts
over a KV bucket (an in-memory one here; tests/integration/test_canary_gate.py uses nats-server)."""

from __future__ import annotations

import asyncio
import itertools
import math
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from coordinator.canary import Book, CanaryState, Rollout, comparisons, judge, picked, steer
from coordinator.clock import ManualClock, settle
from coordinator.decide import Ask, Decided, Decider, Job
from coordinator.ledger import Ledger, MemoryStore
from coordinator.policy import Policy, parse
from coordinator.quorum import QuorumRule
from mesh import envelope
from mesh.errors import PolicyError
from mesh.records import Decision, Vote
from mesh.verdict import Choice, Verdict

CANDIDATE = "2.0+0123456789ab"
STABLE = "1.0+ba9876543210"
SKILLS = ["s1", "s2", "s3"]
AGENTS = {s: f"agent-{s}" for s in SKILLS}


def _policy(rule: str = "unanimous", **overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "skills": SKILLS,
        "rule": QuorumRule(kind="majority") if rule == "majority" else QuorumRule(kind=rule),  # type: ignore[arg-type]
        "agent_timeout_s": 1.0,
        "deadline_s": 5.0,
        "timeout_counts_as": "reject",
    }
    return Policy(**(fields | overrides))


def _event(i: int, *, subject: str | None = None, tenant: str = "acme") -> envelope.Event:
    e = envelope.new_event("vote.test", {}, tenant=tenant, event_id=f"e{i}")
    return msgspec.structs.replace(e, subject=subject)


def _job(pol: Policy, event: envelope.Event, clock: ManualClock) -> Job:
    return Job(
        key=f"{event.tenant}.{event.id}",
        event=event,
        policy=pol,
        decision_type="vote.decided",
        stream_seq=1,
        agents=AGENTS,
        started=clock.monotonic(),
    )


def _vote(ask: Ask, said: str, version: str) -> Vote:
    if said == "timeout":
        return Vote(skill=ask.skill, agent=ask.agent, outcome="timeout", error="no answer")
    choice: Choice = said  # type: ignore[assignment]
    return Vote(
        skill=ask.skill,
        agent=ask.agent,
        outcome="voted",
        counted_as=choice,
        verdict=Verdict(choice, [f"{ask.skill} says {said}"]),
        version=version,
        shadow=ask.shadow,
    )


async def _decide(
    pol: Policy,
    event: envelope.Event,
    answer: Any,
    *,
    stopped: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[Decision, list[Ask]]:
    """One decision on a fresh ledger; `answer(ask)` is the Vote each ask gets at once."""
    clock, asked = ManualClock(), []

    async def asker(ask: Ask) -> Vote:
        asked.append(ask)
        vote: Vote = answer(ask)
        return vote

    decider = Decider(
        Ledger(MemoryStore(), "c1", 2.0, clock=clock),
        asker,
        clock,
        name="c1",
        stopped=lambda: stopped,
    )
    run = asyncio.create_task(decider.run(_job(pol, event, clock)))
    await settle()
    assert run.done(), "every ask answers at once: the decision must be made"
    outcome = run.result()
    assert isinstance(outcome, Decided)
    return outcome.decision, asked


# -- canary: a sticky share of events --------------------------------------------------------------
async def test_a_ten_percent_canary_gets_about_ten_percent_of_events() -> None:
    """N events with distinct subjects: the candidate answers k of them, k within 4 standard
    deviations of a Binomial(N, 0.1) (a deterministic hash; the bound says it is spread as the
    share says, whatever the ids)."""
    n, share = 1000, 0.1
    canary = Rollout(agent="agent-s1", version=CANDIDATE, share=share)
    pol = _policy(canary=canary)
    to_candidate = 0
    for i in range(n):
        _, asked = await _decide(
            pol, _event(i, subject=f"svc-{i}"), lambda a: _vote(a, "approve", "")
        )
        (s1,) = [a for a in asked if a.agent == "agent-s1"]
        assert s1.versions is not None
        if s1.versions.only == CANDIDATE:
            to_candidate += 1
        else:  # a stable event never reaches the candidate
            assert CANDIDATE in s1.versions.never and not s1.versions.only
        others = [a for a in asked if a.agent != "agent-s1"]
        assert all(a.versions is None for a in others)  # other voters are not steered
    sd = math.sqrt(n * share * (1 - share))
    assert abs(to_candidate - n * share) <= 4 * sd, to_candidate


@pytest.mark.parametrize("sticky", ["subject", "tenant", "event_id"])
def test_the_same_key_goes_to_the_same_version_every_time(sticky: str) -> None:
    canary = Rollout(agent="a", version=CANDIDATE, share=0.5, sticky=sticky)  # type: ignore[arg-type]
    for key in range(50):
        events = [
            _event(
                key if sticky == "event_id" else 1000 * key + j,
                subject=f"svc-{key}" if sticky == "subject" else f"other-{j}",
                tenant=f"t{key}" if sticky == "tenant" else f"x{j}",
            )
            for j in range(5)
        ]
        assert len({picked(canary, e) for e in events}) == 1
    # And the key is what decides: 50 keys at share 0.5 do not all go one way.
    assert (
        0
        < sum(picked(canary, _event(k, subject=f"svc-{k}", tenant=f"t{k}")) for k in range(50))
        < 50
    )


def test_a_stopped_canary_gets_no_traffic_even_when_its_events_are_picked() -> None:
    canary = Rollout(agent="a", version=CANDIDATE, share=1.0)
    event = _event(1, subject="svc")
    assert steer(canary, None, "a", event).only == CANDIDATE  # type: ignore[union-attr]
    stopped = steer(canary, None, "a", event, frozenset({("a", CANDIDATE)}))
    assert stopped is not None and CANDIDATE in stopped.never and stopped.strict
    assert not stopped.admits(CANDIDATE) and stopped.admits(STABLE)


# -- shadow: recorded, never counted ---------------------------------------------------------------
STABLE_VOTES = list(itertools.product(["approve", "reject", "abstain", "timeout"], repeat=3))


@pytest.mark.parametrize("rule", ["unanimous", "majority"])
@pytest.mark.parametrize("shadow_says", ["approve", "reject", "abstain", "timeout"])
async def test_a_shadow_vote_never_changes_an_outcome(rule: str, shadow_says: str) -> None:
    """Every combination of stable votes, with and without a shadow candidate that says
    `shadow_says`: the same outcome, the same reason, the same counted votes; the shadow vote
    is in `shadow_votes`, marked, counted as nothing."""
    shadow = Rollout(agent="agent-s2", version=CANDIDATE, share=1.0)
    for stable in STABLE_VOTES:
        by_skill = dict(zip(SKILLS, stable, strict=True))

        def answer(ask: Ask, by_skill: dict[str, str] = by_skill) -> Vote:
            if ask.shadow:
                assert ask.versions is not None and ask.versions.only == CANDIDATE
                return _vote(ask, shadow_says, CANDIDATE)
            return _vote(ask, by_skill[ask.skill], STABLE)

        event = _event(1, subject="svc")
        plain, _ = await _decide(_policy(rule), event, answer)
        with_shadow, asked = await _decide(_policy(rule, shadow=shadow), event, answer)
        assert (with_shadow.outcome, with_shadow.reason) == (plain.outcome, plain.reason), stable
        assert with_shadow.votes == plain.votes
        (sv,) = with_shadow.shadow_votes
        assert sv.shadow and sv.counted_as is None and sv.skill == "s2"
        assert [a.skill for a in asked if a.shadow] == ["s2"]
        # The counted s2 vote came from a stable replica: the candidate is never asked for it.
        (counted_s2,) = [a for a in asked if a.skill == "s2" and not a.shadow]
        assert counted_s2.versions is not None and CANDIDATE in counted_s2.versions.never


async def test_a_stopped_shadow_is_not_asked() -> None:
    shadow = Rollout(agent="agent-s2", version=CANDIDATE, share=1.0)
    d, asked = await _decide(
        _policy(shadow=shadow),
        _event(1),
        lambda a: _vote(a, "approve", STABLE),
        stopped=frozenset({("agent-s2", CANDIDATE)}),
    )
    assert not d.shadow_votes and not any(a.shadow for a in asked)


def test_a_policy_checks_its_canary_table() -> None:
    base = {"skills": ["s"], "rule": {"kind": "unanimous"}}
    ok = parse({"t.x": {**base, "canary": {"agent": "a", "version": CANDIDATE, "share": 0.1}}})
    assert ok.by_type["t.x"].canary == Rollout(agent="a", version=CANDIDATE, share=0.1)
    for bad in (
        {"share": 0},
        {"share": 1.5},
        {"version": ""},
        {"sticky": "moon"},
        {"min_sample": 0},
    ):
        table = {"agent": "a", "version": CANDIDATE, "share": 0.1, **bad}
        with pytest.raises(PolicyError):
            parse({"t.x": {**base, "shadow": table}})


# -- the gate --------------------------------------------------------------------------------------
def _decision(votes: list[Vote], shadows: list[Vote] = []) -> Decision:  # noqa: B006
    return Decision(
        event_id="e1",
        event_type="vote.test",
        tenant="acme",
        decision_type="vote.decided",
        outcome="approved",
        reason="",
        rule="majority",
        votes=votes,
        decided_at=0.0,
        latency_ms=0.0,
        shadow_votes=shadows,
    )


def _said(skill: str, said: str, version: str = STABLE, *, shadow: bool = False) -> Vote:
    ask = Ask(skill=skill, agent=f"agent-{skill}", event=_event(1), policy=_policy(), deadline=0)
    return msgspec.structs.replace(_vote(ask, said, version), shadow=shadow)


def test_shadow_votes_are_compared_with_the_stable_vote_of_their_skill() -> None:
    rollout = Rollout(agent="agent-s2", version=CANDIDATE, share=1.0)
    stable = [_said("s1", "approve"), _said("s2", "approve"), _said("s3", "reject")]
    agree = _said("s2", "approve", CANDIDATE, shadow=True)
    differ = _said("s2", "reject", CANDIDATE, shadow=True)
    abstain = _said("s2", "abstain", CANDIDATE, shadow=True)
    assert comparisons(_decision(stable, [agree]), rollout, "shadow") == [True]
    assert comparisons(_decision(stable, [differ]), rollout, "shadow") == [False]
    assert comparisons(_decision(stable, [abstain]), rollout, "shadow") == []
    other = _said("s2", "reject", "3.0+cccccccccccc", shadow=True)
    assert comparisons(_decision(stable, [other]), rollout, "shadow") == []


def test_a_canary_vote_is_compared_with_its_peers() -> None:
    rollout = Rollout(agent="agent-s1", version=CANDIDATE, share=0.1)
    peers = [_said("s2", "approve"), _said("s3", "approve")]
    assert comparisons(
        _decision([_said("s1", "reject", CANDIDATE), *peers]), rollout, "canary"
    ) == [False]
    assert comparisons(
        _decision([_said("s1", "approve", CANDIDATE), *peers]), rollout, "canary"
    ) == [True]
    # Its stable version's votes are not the candidate's.
    assert comparisons(_decision([_said("s1", "reject", STABLE), *peers]), rollout, "canary") == []
    tie = [_said("s2", "approve"), _said("s3", "reject")]
    assert comparisons(_decision([_said("s1", "reject", CANDIDATE), *tie]), rollout, "canary") == []


def test_the_gate_stops_only_past_the_threshold_over_the_minimum_sample() -> None:
    rollout = Rollout(agent="a", version=CANDIDATE, share=0.1, max_disagreement=0.2, min_sample=10)
    state = CanaryState(agent="a", version=CANDIDATE, mode="canary")
    state = judge(state, rollout, [False] * 5, by="c1")  # 100% but only 5 compared
    assert state.state == "running"
    state = judge(state, rollout, [True] * 15, by="c1")  # 5/20 = 25% > 20%
    assert state.state == "stopped" and state.stopped_by == "c1" and "5 of 20" in state.reason
    under = judge(
        CanaryState(agent="a", version=CANDIDATE, mode="canary"),
        rollout,
        [False] * 2 + [True] * 8,
        by="c1",
    )
    assert under.state == "running"  # 20% is not above 20%
    assert judge(state, rollout, [False], by="c2") is state  # stopped stays stopped


class _Entry:
    def __init__(self, value: bytes, revision: int) -> None:
        self.value, self.revision = value, revision


class _KV:
    """The KeyValue calls Book makes, in memory, with nats-py's errors."""

    def __init__(self) -> None:
        self.data: dict[str, _Entry] = {}
        self.seq = 0

    async def get(self, key: str) -> _Entry:
        if key not in self.data:
            raise KeyNotFoundError
        return self.data[key]

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise KeyWrongLastSequenceError
        return await self.put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if key not in self.data or self.data[key].revision != last:
            raise KeyWrongLastSequenceError
        return await self.put(key, value)

    async def put(self, key: str, value: bytes) -> int:
        self.seq += 1
        self.data[key] = _Entry(value, self.seq)
        return self.seq

    async def keys(self) -> list[str]:
        return list(self.data)

    async def delete(self, key: str) -> None:
        self.seq += 1  # a delete marker is a message too
        self.data.pop(key, None)

    async def status(self) -> Any:
        state = SimpleNamespace(first_seq=1 if self.seq else 0, last_seq=self.seq)
        return SimpleNamespace(stream_info=SimpleNamespace(state=state))


async def test_two_books_count_into_one_state_and_exactly_one_reports_the_stop() -> None:
    kv = _KV()
    c1, c2 = (Book(kv, name=n, keys=kv.keys) for n in ("c1", "c2"))  # type: ignore[arg-type]
    shadow = Rollout(
        agent="agent-s2", version=CANDIDATE, share=1.0, min_sample=4, max_disagreement=0.5
    )
    stable = [_said("s1", "approve"), _said("s2", "approve"), _said("s3", "approve")]
    differ = _decision(stable, [_said("s2", "reject", CANDIDATE, shadow=True)])
    stops = []
    for book in (c1, c2, c1, c2, c1):
        stops += await book.observe(differ, None, shadow)
    (stop,) = stops  # the 4th comparison stopped it; the 5th found it stopped
    assert stop.compared == 4 and stop.disagreed == 4 and stop.stopped_by == "c2"
    await c1.refresh()
    assert c1.stopped == {("agent-s2", CANDIDATE)}
    assert await c1.resume("agent-s2", CANDIDATE)
    await c2.refresh()
    assert c2.stopped == frozenset()
