"""Quorum arithmetic: worked examples per rule, then hypothesis properties."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.quorum import Outcome, QuorumRule, SilenceCount, Silent, Tally, tally
from mesh.verdict import Choice

CHOICES: tuple[Choice, ...] = get_args(Choice)
ABC = ["a", "b", "c"]


def outcome(rule: QuorumRule, electorate: Sequence[str], votes: dict[str, Any], final: bool) -> str:
    return tally(rule, electorate, votes, final=final).outcome


# --- examples ---------------------------------------------------------------------------------


def test_unanimous() -> None:
    rule = QuorumRule(kind="unanimous")
    assert outcome(rule, ABC, {"a": "approve", "b": "approve", "c": "approve"}, True) == "approved"
    assert outcome(rule, ABC, {"a": "approve", "b": "abstain", "c": "approve"}, True) == "approved"
    assert outcome(rule, ABC, {"a": "approve", "b": "reject", "c": "approve"}, True) == "rejected"
    assert outcome(rule, ABC, {v: "abstain" for v in ABC}, True) == "no_quorum"
    # one reject settles it before the others answer; approvals alone never do
    assert outcome(rule, ABC, {"a": "reject"}, False) == "rejected"
    assert outcome(rule, ABC, {"a": "approve", "b": "approve"}, False) == "pending"


def test_majority_and_ties() -> None:
    votes = {"a": "approve", "b": "reject", "c": "abstain"}
    assert outcome(QuorumRule(kind="majority"), ABC, votes, True) == "rejected"
    assert outcome(QuorumRule(kind="majority", tie="approve"), ABC, votes, True) == "approved"
    assert outcome(QuorumRule(kind="majority", tie="no_quorum"), ABC, votes, True) == "no_quorum"
    two_one = {"a": "approve", "b": "approve", "c": "reject"}
    assert outcome(QuorumRule(kind="majority"), ABC, two_one, True) == "approved"
    five = ["a", "b", "c", "d", "e"]
    early = {"a": "approve", "b": "approve", "c": "approve"}
    assert outcome(QuorumRule(kind="majority"), five, early, False) == "approved"
    assert outcome(QuorumRule(kind="majority"), five, {"a": "approve"}, False) == "pending"


def test_abstentions_shrink_the_majority_base() -> None:
    five = ["a", "b", "c", "d", "e"]
    votes: dict[str, Choice] = {
        "a": "approve",
        "b": "abstain",
        "c": "abstain",
        "d": "abstain",
        "e": "reject",
    }
    result = tally(QuorumRule(kind="majority", tie="approve"), five, votes, final=True)
    assert (result.outcome, result.approve, result.reject, result.abstain) == ("approved", 1, 1, 3)


def test_k_of_n_counts_approvals_regardless_of_abstentions() -> None:
    rule = QuorumRule(kind="k_of_n", k=2)
    result = tally(rule, ABC, {"a": "approve", "b": "approve"}, final=False)
    assert result.outcome == "approved"
    assert "2 of 2 approved; k_of_n needs 2" in result.reason
    assert result.missing == ["c"]
    assert outcome(rule, ABC, {"a": "approve", "b": "abstain", "c": "abstain"}, True) == "rejected"
    assert outcome(rule, ABC, {"a": "reject", "b": "reject"}, False) == "rejected"
    assert outcome(rule, ABC, {"a": "approve", "b": "reject"}, False) == "pending"
    # k larger than a shrunken electorate: cannot approve, but tally does not raise
    assert outcome(QuorumRule(kind="k_of_n", k=5), ABC, {v: "approve" for v in ABC}, True) == (
        "rejected"
    )


def test_weighted_threshold_and_exact_tie() -> None:
    rule = QuorumRule(kind="weighted", weights={"a": 3.0, "b": 1.0, "c": 2.0})
    assert outcome(rule, ABC, {"a": "approve", "b": "reject", "c": "reject"}, True) == "rejected"
    assert outcome(rule, ABC, {"a": "approve", "b": "approve", "c": "reject"}, True) == "approved"
    result = tally(rule, ABC, {"a": "approve", "b": "approve", "c": "reject"}, final=True)
    assert (result.approve, result.reject) == (4.0, 2.0)
    # exact tie at the threshold goes to the tie policy rather than to float rounding
    halves = QuorumRule(kind="weighted", weights={"a": 0.25, "b": 0.25, "c": 0.5}, tie="no_quorum")
    assert outcome(halves, ABC, {"a": "approve", "b": "approve", "c": "reject"}, True) == (
        "no_quorum"
    )
    assert outcome(halves, ABC, {"a": "approve", "c": "reject"}, True) == "rejected"
    high = QuorumRule(kind="weighted", threshold=0.7)
    assert outcome(high, ABC, {"a": "approve", "b": "approve", "c": "reject"}, True) == "rejected"
    assert outcome(high, ABC, {"a": "approve", "b": "approve", "c": "abstain"}, True) == "approved"


def test_weighted_missing_weight_defaults_to_one_and_zero_weight_is_no_quorum() -> None:
    rule = QuorumRule(kind="weighted", weights={"a": 0.0})
    assert outcome(rule, ABC, {"a": "approve", "b": "reject"}, True) == "rejected"
    assert outcome(rule, ABC, {"a": "approve", "b": "abstain", "c": "abstain"}, True) == (
        "no_quorum"
    )


def test_veto_rejects_even_before_final_and_names_vetoer() -> None:
    rule = QuorumRule(kind="majority", vetoes=["security-review"])
    electorate = ["security-review", "x", "y", "z"]
    votes: dict[str, Choice] = {"x": "approve", "y": "approve", "security-review": "reject"}
    result = tally(rule, electorate, votes, final=False)
    assert result.outcome == "rejected"
    assert "security-review vetoed" in result.reason
    # a missing veto holder keeps an otherwise won vote open
    assert outcome(rule, electorate, {"x": "approve", "y": "approve", "z": "approve"}, False) == (
        "pending"
    )


def test_any_veto() -> None:
    rule = QuorumRule(kind="any_veto")
    assert outcome(rule, ABC, {"a": "approve", "b": "abstain", "c": "approve"}, True) == "approved"
    assert outcome(rule, ABC, {"a": "approve", "b": "abstain", "c": "reject"}, True) == "rejected"
    assert outcome(rule, ABC, {"b": "reject"}, False) == "rejected"
    assert outcome(rule, ABC, {"a": "approve", "b": "approve"}, False) == "pending"
    assert outcome(rule, ABC, {"a": "abstain"}, True) == "no_quorum"


def test_min_participation() -> None:
    rule = QuorumRule(kind="majority", min_participation=3)
    assert outcome(rule, ABC, {"a": "approve", "b": "approve", "c": "abstain"}, True) == (
        "no_quorum"
    )
    assert outcome(rule, ABC, {"a": "approve", "b": "approve", "c": "reject"}, True) == "approved"
    # c could still abstain, which would leave the vote without quorum
    assert outcome(rule, ABC, {"a": "approve", "b": "approve"}, False) == "pending"
    # all-but-one abstained already: quorum is impossible, which is itself settled
    assert outcome(rule, ABC, {"a": "abstain", "b": "abstain"}, False) == "no_quorum"


def test_non_member_votes_ignored() -> None:
    rule = QuorumRule(kind="majority")
    votes: dict[str, Choice] = {
        "a": "approve",
        "mallory": "reject",
        "eve": "reject",
        "b": "abstain",
    }
    result = tally(rule, ABC, votes, final=True)
    assert (result.outcome, result.reject, result.missing) == ("approved", 0, ["c"])


def test_empty_electorate_and_no_votes() -> None:
    kinds: list[Any] = ["unanimous", "majority", "weighted", "any_veto"]
    for kind in kinds:
        rule = QuorumRule(kind=kind)
        assert tally(rule, [], {"x": "approve"}, final=True).outcome == "no_quorum"
        assert tally(rule, ABC, {}, final=True).outcome == "no_quorum"
        assert tally(rule, ABC, {}, final=False).outcome == "pending"


def test_everyone_voted_final_flag_irrelevant() -> None:
    votes: dict[str, Choice] = {"a": "abstain", "b": "reject", "c": "abstain"}
    for rule in (QuorumRule(kind="unanimous"), QuorumRule(kind="majority", min_participation=2)):
        assert tally(rule, ABC, votes, final=True) == tally(rule, ABC, votes, final=False)


def test_invalid_choice_raises() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        tally(QuorumRule(kind="majority"), ABC, {"a": "yes"}, final=True)  # type: ignore[dict-item]


HUNG = Silent(what="no answer in 1.5 s", counts_as="reject")


def test_a_silent_veto_holder_rejects_but_is_not_said_to_veto() -> None:
    rule = QuorumRule(kind="k_of_n", k=1, vetoes=["security"])
    result = tally(
        rule, ["security", "quality"], {"quality": "approve"}, final=True, silent={"security": HUNG}
    )
    assert result.outcome == "rejected"
    assert result.reason == (
        "security: no answer in 1.5 s → counted as reject (policy); "
        "a reject counted for veto holder security rejects"
    )
    # with a real veto too, each is named for what it is
    both = tally(
        QuorumRule(kind="majority", vetoes=["a", "b"]),
        ABC,
        {"a": "reject"},
        final=True,
        silent={"b": HUNG},
    )
    assert both.reason == (
        "b: no answer in 1.5 s → counted as reject (policy); "
        "a vetoed; a reject counted for veto holder b rejects"
    )


def test_every_voter_failing_is_not_reported_as_rejects() -> None:
    failed = Silent(what="failed (boom)", counts_as="reject")
    four = ["a", "b", "c", "d"]
    result = tally(
        QuorumRule(kind="unanimous"), four, {}, final=True, silent=dict.fromkeys(four, failed)
    )
    assert result.outcome == "rejected"
    assert "4 rejected" not in result.reason and "0 rejected" not in result.reason
    assert result.reason == (
        "a: failed (boom) → counted as reject (policy); b: failed (boom) → counted as reject "
        "(policy); c: failed (boom) → counted as reject (policy); d: failed (boom) → counted "
        "as reject (policy); 4 counted as reject for no answer; unanimous needs no rejects"
    )
    # one real reject and one counted, kept apart
    mixed = tally(
        QuorumRule(kind="unanimous"),
        ABC,
        {"a": "approve", "b": "reject"},
        final=True,
        silent={"c": HUNG},
    )
    assert mixed.reason.endswith(
        "1 rejected, 1 counted as reject for no answer; unanimous needs no rejects"
    )


def test_silence_counted_as_no_quorum_can_never_approve() -> None:
    out = Silent(what="unavailable (no responders)", counts_as="no_quorum")
    rule = QuorumRule(kind="k_of_n", k=1)
    blocked = tally(rule, ABC, {"a": "approve", "b": "approve"}, final=True, silent={"c": out})
    assert blocked.outcome == "no_quorum"
    assert blocked.reason == (
        "c: unavailable (no responders) → no approval without it (policy); "
        "no approval without an answer from c"
    )
    # a reject still rejects
    vetoed = tally(
        QuorumRule(kind="unanimous"), ABC, {"a": "reject"}, final=True, silent={"c": out}
    )
    assert vetoed.outcome == "rejected"


def test_absent_and_abstain_silence_are_named_in_the_reason() -> None:
    rule = QuorumRule(kind="majority")
    quiet = {"c": Silent(what="no answer by the deadline", counts_as="absent")}
    result = tally(rule, ABC, {"a": "approve", "b": "approve"}, final=True, silent=quiet)
    assert result.outcome == "approved"
    assert result.reason.startswith("c: no answer by the deadline → left out (policy); ")
    assert result.abstain == 0 and result.missing == []


def test_a_voter_both_voting_and_silent_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="both voted and gave no answer"):
        tally(QuorumRule(kind="majority"), ABC, {"a": "approve"}, final=True, silent={"a": HUNG})


@pytest.mark.parametrize(
    ("rule", "size", "message"),
    [
        (QuorumRule(kind="k_of_n"), 3, "needs k"),
        (QuorumRule(kind="k_of_n", k=4), 3, "k <= electorate size"),
        (QuorumRule(kind="k_of_n", k=0), 3, "k >= 1"),
        (QuorumRule(kind="majority", k=2), 3, "only applies to k_of_n"),
        (QuorumRule(kind="weighted", threshold=1.0), 3, "threshold"),
        (QuorumRule(kind="weighted", threshold=-0.1), 3, "threshold"),
        (QuorumRule(kind="weighted", threshold=float("nan")), 3, "threshold"),
        (QuorumRule(kind="weighted", weights={"a": -1.0}), 3, "weight of 'a'"),
        (QuorumRule(kind="weighted", weights={"a": float("inf")}), 3, "weight of 'a'"),
        (QuorumRule(kind="majority", min_participation=4), 3, "min_participation"),
        (QuorumRule(kind="majority", min_participation=-1), 3, "min_participation"),
    ],
)
def test_validate_rejects_bad_rules(rule: QuorumRule, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule.validate(size)


def test_validate_accepts_good_rules_and_decoding_forbids_unknown_fields() -> None:
    QuorumRule(kind="k_of_n", k=3, min_participation=3).validate(3)
    QuorumRule(kind="weighted", threshold=0.0, weights={"a": 0.0}).validate(0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"kind": "majority", "quorum": 2}', type=QuorumRule)


# --- properties -------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]
OUTSIDERS = ["x", "y"]
RANK = {"rejected": 0, "no_quorum": 1, "approved": 2}
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the two properties that pin down semantics get more cases
THOROUGH = settings(FAST, max_examples=1000)


@st.composite
def rules(draw: st.DrawFn) -> QuorumRule:
    kind: Any = draw(st.sampled_from(["unanimous", "majority", "k_of_n", "weighted", "any_veto"]))
    tie: Any = draw(st.sampled_from(["reject", "approve", "no_quorum"]))
    return QuorumRule(
        kind=kind,
        k=draw(st.integers(1, 6)) if kind == "k_of_n" else None,
        # few distinct weights and thresholds so exact ties actually happen
        weights=draw(
            st.dictionaries(st.sampled_from(NAMES), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]))
        ),
        threshold=draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 2 / 3, 0.75])),
        vetoes=draw(st.lists(st.sampled_from(NAMES + OUTSIDERS), max_size=2, unique=True)),
        min_participation=draw(st.integers(0, 4)),
        tie=tie,
    )


@st.composite
def elections(draw: st.DrawFn) -> tuple[QuorumRule, list[str], dict[str, Choice]]:
    electorate = draw(st.permutations(NAMES))[: draw(st.integers(0, 5))]
    ballots = draw(st.lists(st.sampled_from([*CHOICES, None]), min_size=5, max_size=5))
    # None = has not voted yet
    votes = {v: c for v, c in zip(electorate, ballots, strict=False) if c is not None}
    return draw(rules()), electorate, votes


def completions(electorate: Sequence[str], votes: Mapping[str, Choice]) -> list[dict[str, Choice]]:
    missing = [v for v in electorate if v not in votes]
    return [
        {**votes, **dict(zip(missing, filling, strict=True))}
        for filling in itertools.product(CHOICES, repeat=len(missing))
    ]


def reference_outcome(
    rule: QuorumRule, electorate: Sequence[str], votes: Mapping[str, Choice]
) -> str:
    """Independent restatement of the final semantics, as a sign of a margin."""
    cast = {v: votes[v] for v in set(electorate) if v in votes}
    app = [v for v, c in cast.items() if c == "approve"]
    rej = [v for v, c in cast.items() if c == "reject"]
    if any(rule.kind == "any_veto" or v in rule.vetoes for v in rej):
        return "rejected"
    if not (app or rej) or len(app) + len(rej) < rule.min_participation:
        return "no_quorum"
    margin: Fraction | int
    if rule.kind == "weighted":
        aw = sum(Fraction(rule.weights.get(v, 1.0)) for v in app)
        rw = sum(Fraction(rule.weights.get(v, 1.0)) for v in rej)
        if aw + rw == 0:
            return "no_quorum"
        margin = aw - Fraction(rule.threshold) * (aw + rw)
    elif rule.kind == "majority":
        margin = len(app) - len(rej)
    elif rule.kind == "k_of_n":
        margin = 1 if len(app) >= (rule.k or 0) else -1
    else:  # unanimous and any_veto: one approve, no reject (any_veto rejects were vetoes)
        margin = -1 if rej else 1
    if margin == 0:
        return {"reject": "rejected", "approve": "approved", "no_quorum": "no_quorum"}[rule.tie]
    return "approved" if margin > 0 else "rejected"


@THOROUGH
@given(elections())
def test_final_outcome_matches_reference_model(
    election: tuple[QuorumRule, list[str], dict[str, Choice]],
) -> None:
    rule, electorate, votes = election
    assert outcome(rule, electorate, votes, True) == reference_outcome(rule, electorate, votes)


@THOROUGH
@given(elections())
def test_early_decision_is_exactly_what_every_completion_agrees_on(
    election: tuple[QuorumRule, list[str], dict[str, Choice]],
) -> None:
    rule, electorate, votes = election
    finals = {outcome(rule, electorate, full, True) for full in completions(electorate, votes)}
    early = outcome(rule, electorate, votes, False)
    # sound (a decision holds for every completion) and complete (never pending needlessly)
    assert early == (finals.pop() if len(finals) == 1 else "pending")


@FAST
@given(elections())
def test_final_is_never_pending_and_matches_abstaining_for_missing(
    election: tuple[QuorumRule, list[str], dict[str, Choice]],
) -> None:
    rule, electorate, votes = election
    result = tally(rule, electorate, votes, final=True)
    assert result.outcome in ("approved", "rejected", "no_quorum")
    filled = {**{v: "abstain" for v in electorate}, **votes}
    assert outcome(rule, electorate, filled, True) == result.outcome


@FAST
@given(elections(), st.dictionaries(st.sampled_from(OUTSIDERS), st.sampled_from(CHOICES)))
def test_non_member_votes_never_change_the_tally(
    election: tuple[QuorumRule, list[str], dict[str, Choice]], noise: dict[str, Choice]
) -> None:
    rule, electorate, votes = election
    for final in (True, False):
        assert tally(rule, electorate, {**noise, **votes}, final=final) == tally(
            rule, electorate, votes, final=final
        )


@FAST
@given(elections(), st.randoms(use_true_random=False), st.booleans())
def test_order_and_duplicates_do_not_matter(
    election: tuple[QuorumRule, list[str], dict[str, Choice]], rnd: random.Random, final: bool
) -> None:
    rule, electorate, votes = election
    replayed = list(votes.items()) * rnd.randint(1, 3)
    rnd.shuffle(replayed)
    shuffled_electorate = electorate * 2
    rnd.shuffle(shuffled_electorate)
    expected = tally(rule, electorate, votes, final=final)
    assert tally(rule, shuffled_electorate, dict(replayed), final=final) == expected


@FAST
@given(elections(), st.data())
def test_turning_a_reject_into_approve_never_hurts(
    election: tuple[QuorumRule, list[str], dict[str, Choice]], data: st.DataObject
) -> None:
    # Holds for every kind, vetoes included: an approved vote has no vetoing reject to flip.
    rule, electorate, votes = election
    rejecters = sorted(v for v, c in votes.items() if c == "reject")
    if not rejecters:
        return
    flipped = {**votes, data.draw(st.sampled_from(rejecters)): "approve"}
    before: Outcome = tally(rule, electorate, votes, final=True).outcome
    after: Outcome = tally(rule, electorate, flipped, final=True).outcome
    assert RANK[after] >= RANK[before]


@FAST
@given(elections(), st.sampled_from(NAMES), st.booleans())
def test_veto_holder_rejecting_always_rejects(
    election: tuple[QuorumRule, list[str], dict[str, Choice]], vetoer: str, final: bool
) -> None:
    rule, electorate, votes = election
    rule = msgspec.structs.replace(rule, vetoes=[*rule.vetoes, vetoer])
    result = tally(rule, [*electorate, vetoer], {**votes, vetoer: "reject"}, final=final)
    assert result.outcome == "rejected"
    assert vetoer in result.reason


@FAST
@given(elections())
def test_counts_are_consistent(election: tuple[QuorumRule, list[str], dict[str, Choice]]) -> None:
    rule, electorate, votes = election
    result: Tally = tally(rule, electorate, votes, final=False)
    assert result.abstain + len(result.missing) <= len(electorate)
    assert result.missing == sorted(set(electorate) - votes.keys())
    if rule.kind != "weighted":
        assert result.approve + result.reject + result.abstain + len(result.missing) == len(
            electorate
        )


# --- silence ----------------------------------------------------------------------------------
COUNTS: tuple[SilenceCount, ...] = get_args(SilenceCount)
WHAT = ["no answer in 1.5 s", "failed (boom)", "unavailable (no responders)"]


@st.composite
def silent_elections(
    draw: st.DrawFn,
) -> tuple[QuorumRule, list[str], dict[str, Choice], dict[str, Silent]]:
    rule, electorate, votes = draw(elections())
    quiet = {
        v: Silent(what=draw(st.sampled_from(WHAT)), counts_as=draw(st.sampled_from(COUNTS)))
        for v in electorate
        if v not in votes and draw(st.booleans())
    }
    return rule, electorate, votes, quiet


def as_votes(votes: Mapping[str, Choice], quiet: Mapping[str, Silent]) -> dict[str, Choice]:
    """Silence as the votes it counts as (absent and no_quorum: none)."""
    counted = {v: s.counts_as for v, s in quiet.items() if s.counts_as in CHOICES}
    return {**votes, **counted}  # type: ignore[dict-item]


@THOROUGH
@given(silent_elections())
def test_silence_changes_the_words_not_the_arithmetic(
    election: tuple[QuorumRule, list[str], dict[str, Choice], dict[str, Silent]],
) -> None:
    rule, electorate, votes, quiet = election
    expected = reference_outcome(rule, electorate, as_votes(votes, quiet))
    if expected == "approved" and any(s.counts_as == "no_quorum" for s in quiet.values()):
        expected = "no_quorum"
    assert tally(rule, electorate, votes, final=True, silent=quiet).outcome == expected


@THOROUGH
@given(silent_elections())
def test_the_reason_names_silence_and_never_calls_it_a_vote(
    election: tuple[QuorumRule, list[str], dict[str, Choice], dict[str, Silent]],
) -> None:
    rule, electorate, votes, quiet = election
    members = set(electorate)
    cast_rejects = {v for v, c in votes.items() if c == "reject" and v in members}
    cast_approvals = {v for v, c in votes.items() if c == "approve" and v in members}
    for final in (True, False):
        reason = tally(rule, electorate, votes, final=final, silent=quiet).reason
        for voter, s in quiet.items():
            assert f"{voter}: {s.what} → " in reason, reason
        body = re.sub(r"decided with \d+ missing: ", "", reason)
        for part in body.split("; "):
            if part.endswith(" vetoed"):  # only voters who cast a reject veto
                assert set(part.removesuffix(" vetoed").split(", ")) <= cast_rejects, reason
        for n in re.findall(r"\b(\d+) rejected", reason):
            assert int(n) == len(cast_rejects), reason
        for n in re.findall(r"(?<!of )\b(\d+) approved", reason):
            assert int(n) <= len(cast_approvals), reason


@THOROUGH
@given(silent_elections())
def test_early_decision_with_silence_holds_for_every_completion(
    election: tuple[QuorumRule, list[str], dict[str, Choice], dict[str, Silent]],
) -> None:
    rule, electorate, votes, quiet = election
    early = tally(rule, electorate, votes, final=False, silent=quiet).outcome
    still_out = [v for v in electorate if v not in quiet]
    finals = {
        tally(rule, electorate, full, final=True, silent=quiet).outcome
        for full in completions(still_out, votes)
    }
    if early != "pending":
        assert finals == {early}
    if not quiet:  # without silence it is also complete: never pending needlessly
        assert early == (next(iter(finals)) if len(finals) == 1 else "pending")
