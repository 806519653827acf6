"""Pure quorum arithmetic: turn a rule, an electorate and the votes so far into a Tally.

Semantics, in the order they are applied when an outcome is computed:

1. Only electorate members count. ``tally`` is a pure function of
   ``(rule, set(electorate), votes restricted to electorate)``, so replaying or
   duplicating votes, or votes from non-members, can never change the result.
2. Veto: a reject from any ``vetoes`` member (from anyone, for kind ``any_veto``)
   rejects outright, before quorum is considered.
3. Quorum: with no approve/reject vote at all, or fewer than ``min_participation``
   of them, the outcome is ``no_quorum``. Abstentions are never participation.
4. The rule itself: ``unanimous`` (no reject, at least one approve), ``majority``
   (approvals vs rejects, exact tie per ``tie``), ``k_of_n`` (at least ``k``
   approvals), ``weighted`` (approve share of counted weight vs ``threshold``,
   exact equality is a tie per ``tie``), ``any_veto`` (no reject, one approve).
   A weighted vote whose counted weight is zero is ``no_quorum``.

With ``final=True`` members who have not voted simply did not vote (exactly like
abstaining). With ``final=False`` the outcome is reported only if every way the
missing members could still vote (approve, reject or abstain each) leads to the
same outcome, ``no_quorum`` included; otherwise it is ``pending``. Every rule is
monotone in the missing votes, so three completions decide this exactly: all
missing approve, all reject, all abstain. If those agree, every mix agrees.

Weights are summed as exact fractions, so ties at a threshold are exact and the
result cannot depend on summation order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Literal, get_args

import msgspec

from mesh.verdict import Choice

Outcome = Literal["approved", "rejected", "no_quorum", "pending"]

_CHOICES: frozenset[str] = frozenset(get_args(Choice))


class QuorumRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["unanimous", "majority", "k_of_n", "weighted", "any_veto"]
    k: int | None = None
    weights: dict[str, float] = {}
    threshold: float = 0.5
    vetoes: list[str] = []
    min_participation: int = 0
    tie: Literal["reject", "approve", "no_quorum"] = "reject"

    def validate(self, electorate_size: int) -> None:
        """Raise ValueError if this rule cannot work for an electorate of this size."""
        _check_static(self)
        if electorate_size < 0:
            raise ValueError(f"electorate_size must be >= 0, got {electorate_size}")
        if self.k is not None and self.k > electorate_size:
            raise ValueError(f"k_of_n needs k <= electorate size {electorate_size}, got {self.k}")
        if self.min_participation > electorate_size:
            raise ValueError(
                f"min_participation {self.min_participation} exceeds "
                f"electorate size {electorate_size}"
            )


class Tally(msgspec.Struct, frozen=True):
    outcome: Outcome
    reason: str
    approve: float
    reject: float
    abstain: int
    missing: list[str]


def _check_static(rule: QuorumRule) -> None:
    # Checks that do not depend on the (dynamic) electorate; tally enforces these
    # too, because negative weights would break the monotonicity early decisions rely on.
    if rule.kind == "k_of_n":
        if rule.k is None:
            raise ValueError("k_of_n rule needs k (number of approvals required)")
        if rule.k < 1:
            raise ValueError(f"k_of_n needs k >= 1, got {rule.k}")
    elif rule.k is not None:
        raise ValueError(f"k only applies to k_of_n, not {rule.kind}")
    if not 0.0 <= rule.threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {rule.threshold}")
    for voter, weight in rule.weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {voter!r} must be finite and >= 0, got {weight}")
    if rule.min_participation < 0:
        raise ValueError(f"min_participation must be >= 0, got {rule.min_participation}")


def _weight(rule: QuorumRule, voter: str) -> Fraction:
    if rule.kind != "weighted":
        return Fraction(1)
    return Fraction(rule.weights.get(voter, 1.0))


def _total(rule: QuorumRule, voters: frozenset[str]) -> Fraction:
    return sum((_weight(rule, v) for v in voters), Fraction(0))


def _num(x: Fraction) -> str:
    return f"{float(x):g}"


_TIE_OUTCOME: dict[str, Outcome] = {
    "reject": "rejected",
    "approve": "approved",
    "no_quorum": "no_quorum",
}


def _apply_tie(rule: QuorumRule, what: str) -> tuple[Outcome, str]:
    return _TIE_OUTCOME[rule.tie], f"{what}: tie resolves to {rule.tie}"


def _decide(
    rule: QuorumRule, approvers: frozenset[str], rejecters: frozenset[str]
) -> tuple[Outcome, str]:
    """Outcome of a closed vote; anyone not in approvers/rejecters did not take part."""
    vetoers = rejecters if rule.kind == "any_veto" else rejecters & set(rule.vetoes)
    if vetoers:
        return "rejected", f"{', '.join(sorted(vetoers))} vetoed"
    n_app, n_rej = len(approvers), len(rejecters)
    participation = n_app + n_rej
    if participation == 0:
        return "no_quorum", "no approve or reject votes"
    if participation < rule.min_participation:
        return "no_quorum", (
            f"{participation} approve/reject votes; min_participation is {rule.min_participation}"
        )
    if rule.kind == "unanimous":
        if n_rej:
            return "rejected", f"{n_rej} rejected; unanimous needs no rejects"
        return "approved", f"all {n_app} non-abstaining voters approved"
    if rule.kind == "any_veto":
        return "approved", f"{n_app} approved, none rejected"
    if rule.kind == "k_of_n":
        assert rule.k is not None  # guaranteed by _check_static
        verdict: Outcome = "approved" if n_app >= rule.k else "rejected"
        return verdict, f"{n_app} of {participation} approved; k_of_n needs {rule.k}"
    if rule.kind == "majority":
        what = f"{n_app} approve vs {n_rej} reject"
        if n_app == n_rej:
            return _apply_tie(rule, what)
        return ("approved" if n_app > n_rej else "rejected"), f"{what}; majority"
    # weighted
    app_w, rej_w = _total(rule, approvers), _total(rule, rejecters)
    counted = app_w + rej_w
    if counted == 0:
        return "no_quorum", "all approve/reject votes carry zero weight"
    share = app_w / counted
    threshold = Fraction(rule.threshold)
    what = f"approve weight {_num(app_w)} of {_num(counted)} ({float(share):.3g})"
    if share == threshold:
        return _apply_tie(rule, f"{what} equals threshold {rule.threshold:g}")
    if share > threshold:
        return "approved", f"{what} > threshold {rule.threshold:g}"
    return "rejected", f"{what} < threshold {rule.threshold:g}"


def tally(
    rule: QuorumRule, electorate: Sequence[str], votes: Mapping[str, Choice], *, final: bool
) -> Tally:
    """Count ``votes`` of ``electorate`` under ``rule``; never ``pending`` when ``final``.

    Pure function of ``(rule, set(electorate), votes restricted to electorate)``:
    replayed or duplicated votes and votes from non-members cannot change it.
    Raises ValueError for a malformed rule or a vote that is not a Choice.
    """
    _check_static(rule)
    members = frozenset(electorate)
    cast: dict[str, str] = {}
    for voter, choice in votes.items():
        if voter not in members:
            continue
        if choice not in _CHOICES:
            raise ValueError(f"vote of {voter!r} must be one of {sorted(_CHOICES)}, got {choice!r}")
        cast[voter] = choice
    approvers = frozenset(v for v, c in cast.items() if c == "approve")
    rejecters = frozenset(v for v, c in cast.items() if c == "reject")
    missing = members - cast.keys()

    outcome, reason = _decide(rule, approvers, rejecters)
    if not final and missing:
        # Missing voters count as abstaining in the current-votes evaluation above;
        # the other two extremes bound everything a mix of their votes can do.
        extremes = {outcome, _decide(rule, approvers | missing, rejecters)[0]}
        extremes.add(_decide(rule, approvers, rejecters | missing)[0])
        if len(extremes) > 1:
            outcome = "pending"
            options = "/".join(sorted(extremes))
            reason = f"{len(missing)} missing could still make it {options}"
        else:
            reason = f"decided with {len(missing)} missing: {reason}"

    return Tally(
        outcome=outcome,
        reason=reason,
        approve=float(_total(rule, approvers)),
        reject=float(_total(rule, rejecters)),
        abstain=sum(1 for c in cast.values() if c == "abstain"),
        missing=sorted(missing),
    )
