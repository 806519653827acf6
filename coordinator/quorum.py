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

Silence is not a vote. A voter who gave no usable answer (timeout, unreachable, failed,
invalid answer) is passed in ``silent`` with what happened and what the policy counts it as:
``approve``/``reject``/``abstain`` enter the arithmetic like that vote, ``absent`` is left out,
and ``no_quorum`` is left out and turns an approval into ``no_quorum`` (it can never approve).
The reason names every silent voter with what happened ("q: no answer in 1.5 s → counted as
reject (policy)") and counts them apart from votes: a reject counted for a silent veto holder is
never called a veto, and rejects nobody cast are never called "rejected".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Literal, get_args

import msgspec

from mesh.verdict import Choice

Outcome = Literal["approved", "rejected", "no_quorum", "pending"]
# What a voter without a usable answer counts as (the policy's `timeout_counts_as`).
SilenceCount = Literal["approve", "reject", "abstain", "absent", "no_quorum"]

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


class Silent(msgspec.Struct, frozen=True):
    """A voter who gave no usable answer: what happened, and what the policy counts it as."""

    what: str  # e.g. "no answer in 1.5 s", "unavailable (no responders)"
    counts_as: SilenceCount


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


def _counted(group: frozenset[str], silent: Mapping[str, Silent], verb: str, as_: str) -> str:
    """How many of `group` voted `verb`, with those counted so for silence kept apart."""
    by_policy = len(group & silent.keys())
    cast = len(group) - by_policy
    if not by_policy:
        return f"{cast} {verb}"
    counted = f"{by_policy} counted as {as_} for no answer"
    return f"{cast} {verb}, {counted}" if cast else counted


def _effect(s: Silent) -> str:
    if s.counts_as == "absent":
        return "left out (policy)"
    if s.counts_as == "no_quorum":
        return "no approval without it (policy)"
    return f"counted as {s.counts_as} (policy)"


def _decide(
    rule: QuorumRule,
    approvers: frozenset[str],
    rejecters: frozenset[str],
    silent: Mapping[str, Silent],
) -> tuple[Outcome, str]:
    """Outcome of a closed vote; anyone not in approvers/rejecters did not take part.

    `silent` (members without a usable answer) are already in approvers/rejecters when the
    policy counts them so; the reason tells them apart (`_notes` says what happened)."""
    outcome, reason = _rule(rule, approvers, rejecters, silent)
    blockers = sorted(v for v, s in silent.items() if s.counts_as == "no_quorum")
    if outcome == "approved" and blockers:
        outcome, reason = "no_quorum", f"no approval without an answer from {', '.join(blockers)}"
    return outcome, reason


def _notes(silent: Mapping[str, Silent]) -> list[str]:
    """What happened to each silent voter, and what the policy made of it."""
    return [f"{v}: {silent[v].what} → {_effect(silent[v])}" for v in sorted(silent)]


def _rule(
    rule: QuorumRule,
    approvers: frozenset[str],
    rejecters: frozenset[str],
    silent: Mapping[str, Silent],
) -> tuple[Outcome, str]:
    vetoers = rejecters if rule.kind == "any_veto" else rejecters & set(rule.vetoes)
    if vetoers:
        cast = sorted(vetoers - silent.keys())
        counted = sorted(vetoers & silent.keys())
        parts = [f"{', '.join(cast)} vetoed"] if cast else []
        if counted:
            # The policy counts their silence as a reject, and a veto holder's reject
            # rejects; but nobody vetoed, and the record must not say so.
            parts.append(f"a reject counted for veto holder {', '.join(counted)} rejects")
        return "rejected", "; ".join(parts)
    n_app, n_rej = len(approvers), len(rejecters)
    approved = _counted(approvers, silent, "approved", "approve")
    rejected = _counted(rejecters, silent, "rejected", "reject")
    participation = n_app + n_rej
    if participation == 0:
        return "no_quorum", "no approve or reject votes"
    if participation < rule.min_participation:
        if silent.keys() & (approvers | rejecters):
            took_part = f"{approved}, {rejected}"
        else:
            took_part = f"{participation} approve/reject votes"
        return "no_quorum", f"{took_part}; min_participation is {rule.min_participation}"
    if rule.kind == "unanimous":
        if n_rej:
            return "rejected", f"{rejected}; unanimous needs no rejects"
        if approvers & silent.keys():
            return "approved", f"{approved}, none rejected; unanimous"
        return "approved", f"all {n_app} non-abstaining voters approved"
    if rule.kind == "any_veto":
        return "approved", f"{approved}, none rejected"
    if rule.kind == "k_of_n":
        assert rule.k is not None  # guaranteed by _check_static
        verdict: Outcome = "approved" if n_app >= rule.k else "rejected"
        if approvers & silent.keys():
            return verdict, f"{approved} ({participation} counted); k_of_n needs {rule.k}"
        return verdict, f"{n_app} of {participation} approved; k_of_n needs {rule.k}"
    if rule.kind == "majority":
        what = f"{n_app} approve vs {n_rej} reject"
        if silent.keys() & (approvers | rejecters):
            what = f"{approved} vs {rejected}"
        if n_app == n_rej:
            return _apply_tie(rule, what)
        return ("approved" if n_app > n_rej else "rejected"), f"{what}; majority"
    # weighted
    app_w, rej_w = _total(rule, approvers), _total(rule, rejecters)
    counted_w = app_w + rej_w
    if counted_w == 0:
        return "no_quorum", "all approve/reject votes carry zero weight"
    share = app_w / counted_w
    threshold = Fraction(rule.threshold)
    what = f"approve weight {_num(app_w)} of {_num(counted_w)} ({float(share):.3g})"
    if silent.keys() & (approvers | rejecters):
        what += f" ({approved}; {rejected})"
    if share == threshold:
        return _apply_tie(rule, f"{what} equals threshold {rule.threshold:g}")
    if share > threshold:
        return "approved", f"{what} > threshold {rule.threshold:g}"
    return "rejected", f"{what} < threshold {rule.threshold:g}"


def tally(
    rule: QuorumRule,
    electorate: Sequence[str],
    votes: Mapping[str, Choice],
    *,
    final: bool,
    silent: Mapping[str, Silent] | None = None,
) -> Tally:
    """Count ``votes`` of ``electorate`` under ``rule``; never ``pending`` when ``final``.

    ``silent``: members who gave no usable answer, counted as each one's ``counts_as`` says
    (see the module docstring); a voter is in ``votes`` or in ``silent``, not both.
    Pure function of ``(rule, set(electorate), votes and silent restricted to electorate)``:
    replayed or duplicated votes and votes from non-members cannot change it.
    Raises ValueError for a malformed rule, a vote that is not a Choice, or a voter both
    voting and silent.
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
    quiet = {v: s for v, s in (silent or {}).items() if v in members}
    both = sorted(cast.keys() & quiet.keys())
    if both:
        raise ValueError(f"{both} both voted and gave no answer")
    counted = dict(cast)
    counted.update((v, s.counts_as) for v, s in quiet.items() if s.counts_as in _CHOICES)
    approvers = frozenset(v for v, c in counted.items() if c == "approve")
    rejecters = frozenset(v for v, c in counted.items() if c == "reject")
    missing = members - cast.keys() - quiet.keys()

    outcome, reason = _decide(rule, approvers, rejecters, quiet)
    if not final and missing:
        # Missing voters count as abstaining in the current-votes evaluation above;
        # the other two extremes bound everything a mix of their votes can do.
        # Compared before silence can turn an approval into no_quorum (that mapping could make
        # outcomes look alike that a mix of votes would not): agreeing sooner is not needed.
        bounds = [(approvers, rejecters), (approvers | missing, rejecters)]
        bounds.append((approvers, rejecters | missing))
        if len({_rule(rule, a, r, quiet)[0] for a, r in bounds}) > 1:
            extremes = {_decide(rule, a, r, quiet)[0] for a, r in bounds}
            outcome = "pending"
            options = "/".join(sorted(extremes))
            reason = f"{len(missing)} missing could still make it {options}"
        else:
            reason = f"decided with {len(missing)} missing: {reason}"

    return Tally(
        outcome=outcome,
        reason="; ".join([*_notes(quiet), reason]),
        approve=float(_total(rule, approvers)),
        reject=float(_total(rule, rejecters)),
        abstain=sum(1 for c in counted.values() if c == "abstain"),
        missing=sorted(missing),
    )
