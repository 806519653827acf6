"""What a `budget_exceeded` vote counts as: the policy's `budget_exceeded` field, through the
decision core's count with scripted votes, and how the coordinator marks such an answer."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from coordinator import decide
from coordinator.decide import Ask
from coordinator.dispatch import _budgeted
from coordinator.policy import Policy
from coordinator.quorum import QuorumRule
from mesh import envelope
from mesh.budget import refused_for_budget
from mesh.records import Vote
from mesh.verdict import Choice, Verdict

SKILLS = ["s1", "s2", "s3"]
REFUSAL = Verdict.abstain("budget_exceeded: event e1: this call's worst case would bring ...")


def policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {"skills": SKILLS, "rule": QuorumRule(kind="majority")}
    pol = Policy(**(fields | overrides))
    pol.check("vote.test")
    return pol


def voted(skill: str, choice: Choice) -> Vote:
    return Vote(skill=skill, agent=skill, outcome="voted", counted_as=choice)


def refused(pol: Policy, skill: str) -> Vote:
    """A signed budget refusal as dispatch marks it."""
    ask = Ask(skill=skill, agent=skill, event=EVENT, policy=pol, deadline=0.0)
    answer = Vote(skill=skill, agent=skill, outcome="voted", counted_as="abstain", verdict=REFUSAL)
    return _budgeted(ask, answer)


EVENT = envelope.new_event("vote.test", {}, tenant="acme", event_id="e1")


def test_budget_refusals_count_as_reject_by_default_and_the_reason_says_so() -> None:
    pol = policy()
    votes = {"s1": voted("s1", "approve"), "s2": refused(pol, "s2"), "s3": refused(pol, "s3")}
    assert votes["s2"].outcome == "budget_exceeded" and votes["s2"].counted_as == "reject"
    tally = decide.count(pol, votes, final=True)
    # As abstentions (what the agent said) one approval would carry the majority.
    assert tally.outcome == "rejected"
    assert "s2: budget_exceeded → counted as reject (policy)" in tally.reason
    assert "s3: budget_exceeded → counted as reject (policy)" in tally.reason


def test_abstain_lets_the_others_decide_where_the_rule_can_do_without_the_voter() -> None:
    pol = policy(budget_exceeded="abstain")
    votes = {"s1": voted("s1", "approve"), "s2": voted("s2", "approve"), "s3": refused(pol, "s3")}
    tally = decide.count(pol, votes, final=True)
    assert tally.outcome == "approved"
    assert "s3: budget_exceeded → counted as abstain (policy)" in tally.reason


def test_no_quorum_forbids_an_approval_and_early_decisions_wait_for_it() -> None:
    pol = policy(budget_exceeded="no_quorum", decide_early=True)
    votes = {"s1": voted("s1", "approve"), "s2": voted("s2", "approve"), "s3": refused(pol, "s3")}
    assert votes["s3"].counted_as is None
    tally = decide.count(pol, votes, final=True)
    assert tally.outcome == "no_quorum"
    assert "s3: budget_exceeded → no approval without it (policy)" in tally.reason
    # Two approvals of three settle a majority, unless the third may yet come back refused.
    two = {"s1": votes["s1"], "s2": votes["s2"]}
    assert not decide._settled(pol, two)
    assert decide._settled(policy(decide_early=True), two)


def test_a_timeout_still_counts_as_timeout_counts_as() -> None:
    pol = policy(timeout_counts_as="abstain", budget_exceeded="reject")
    late = Vote(skill="s3", agent="s3", outcome="timeout", counted_as="abstain", latency_ms=900)
    votes = {"s1": voted("s1", "approve"), "s2": refused(pol, "s2"), "s3": late}
    tally = decide.count(pol, votes, final=True)
    assert "s2: budget_exceeded → counted as reject (policy)" in tally.reason
    assert "s3: no answer in 0.9 s → counted as abstain (policy)" in tally.reason


@pytest.mark.parametrize(
    ("rule", "bad"),
    [
        (QuorumRule(kind="unanimous"), "s1, s2, s3"),
        (QuorumRule(kind="majority", vetoes=["s2"]), "s2"),
    ],
)
def test_abstain_is_refused_where_the_rule_cannot_do_without_the_voter(
    rule: QuorumRule, bad: str
) -> None:
    with pytest.raises(ValueError, match=f"would approve without {bad} "):
        policy(rule=rule, budget_exceeded="abstain")
    policy(rule=rule, budget_exceeded="no_quorum")


def test_approve_is_not_a_choice() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"skills": SKILLS, "rule": {"kind": "majority"}, "budget_exceeded": "approve"}, Policy
        )


def test_only_a_budget_abstention_is_a_refusal() -> None:
    assert refused_for_budget(REFUSAL)
    assert not refused_for_budget(Verdict.reject("budget_exceeded: but a reject is a judgement"))
    assert not refused_for_budget(Verdict.abstain("not sure about the budget_exceeded field"))
    assert not refused_for_budget(None)
    plain = Vote(
        skill="s1", agent="s1", outcome="voted", counted_as="abstain", verdict=Verdict.abstain("x")
    )
    ask = Ask(skill="s1", agent="s1", event=EVENT, policy=policy(), deadline=0.0)
    assert _budgeted(ask, plain) is plain
