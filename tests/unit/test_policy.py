import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import policy
from coordinator.quorum import Silent, tally
from mesh.errors import PolicyError
from mesh.verdict import Choice


def test_shipped_policies_load() -> None:
    p = policy.load()
    release = p.get("release.proposed")
    assert release is not None
    assert len(release.skills) == 3
    assert p.decision_type("release.proposed") == "release.decided"


def _one(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"skills": ["a", "b"], "rule": {"kind": "majority"}}
    body.update(overrides)
    return {"x.happened": body}


def test_default_decision_type_is_derived() -> None:
    assert policy.parse(_one()).decision_type("x.happened") == "x.decided"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"skils": ["a"]}, "skils"),
        ({"rule": {"kind": "k_of_n"}}, "k"),
        ({"rule": {"kind": "plurality"}}, "kind"),
        ({"rule": {"kind": "majority", "vetoes": ["zed"]}}, "zed"),
        ({"agent_timeout_s": 5, "deadline_s": 1}, "deadline_s"),
        ({"skills": []}, "skill"),
        ({"timeout_counts_as": "maybe"}, "timeout_counts_as"),
    ],
)
def test_bad_policy_is_a_clear_error(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy.parse(_one(**overrides))
    assert "x.happened" in str(err.value)
    assert words in str(err.value)


# -- silence never approves ---------------------------------------------------------------------
HOTFIX = {
    "skills": ["security", "quality"],
    "rule": {"kind": "k_of_n", "k": 1, "vetoes": ["security"]},
}


def _policy(body: dict[str, object], **overrides: object) -> dict[str, object]:
    return {"x.happened": {**body, **overrides}}


def test_shipped_hotfix_policy_lets_no_silent_security_reviewer_approve() -> None:
    hotfix = policy.load().get("release.hotfix")
    assert hotfix is not None
    assert hotfix.timeout_counts_as in ("reject", "no_quorum")
    assert not hotfix.silence_approves() and not hotfix.silence_reason


@pytest.mark.parametrize(
    "body, counts_as",
    [
        (HOTFIX, "abstain"),  # the shipped hotfix policy before issue 12
        (HOTFIX, "absent"),
        (HOTFIX, "approve"),
        ({"skills": ["a", "b", "c"], "rule": {"kind": "unanimous"}}, "abstain"),
        ({"skills": ["a", "b", "c"], "rule": {"kind": "unanimous"}}, "absent"),
        ({"skills": ["a", "b"], "rule": {"kind": "any_veto"}}, "abstain"),
        ({"skills": ["a", "b", "c"], "rule": {"kind": "majority"}}, "approve"),
    ],
)
def test_silence_that_could_approve_is_refused_without_a_reason(
    body: dict[str, object], counts_as: str
) -> None:
    with pytest.raises(PolicyError) as err:
        policy.parse(_policy(body, timeout_counts_as=counts_as))
    assert "silence" in str(err.value) and counts_as in str(err.value)
    # said explicitly, with a reason, it is the policy's to make
    reason = "the pilot's security reviewer answers in 1 s; a hotfix must not wait"
    parsed = policy.parse(_policy(body, timeout_counts_as=counts_as, silence_reason=reason))
    assert parsed.by_type["x.happened"].silence_reason == reason


@pytest.mark.parametrize(
    "body, counts_as",
    [
        (HOTFIX, "reject"),
        (HOTFIX, "no_quorum"),
        ({"skills": ["a", "b", "c"], "rule": {"kind": "unanimous"}}, "no_quorum"),
        # silence of a voter the rule can do without: the policy's choice
        ({"skills": ["a", "b", "c"], "rule": {"kind": "majority"}}, "abstain"),
        ({"skills": ["a", "b", "c"], "rule": {"kind": "k_of_n", "k": 2}}, "absent"),
        # needed, but abstaining cannot approve either: k of all n, or a lone voter
        ({"skills": ["a", "b"], "rule": {"kind": "k_of_n", "k": 2}}, "abstain"),
        ({"skills": ["a"], "rule": {"kind": "unanimous"}}, "absent"),
    ],
)
def test_silence_that_cannot_approve_needs_no_reason(
    body: dict[str, object], counts_as: str
) -> None:
    policy.parse(_policy(body, timeout_counts_as=counts_as))
    with pytest.raises(PolicyError, match="silence_reason is only for"):
        policy.parse(_policy(body, timeout_counts_as=counts_as, silence_reason="because"))


def test_a_blank_silence_reason_is_no_reason() -> None:
    with pytest.raises(PolicyError, match="silence never approves"):
        policy.parse(_policy(HOTFIX, timeout_counts_as="abstain", silence_reason="  "))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["unanimous", "majority", "k_of_n", "weighted", "any_veto"]),
    st.integers(1, 3),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
    st.integers(0, 3),
    st.sampled_from(["approve", "reject", "abstain", "absent", "no_quorum"]),
)
def test_an_accepted_policy_never_lets_a_silent_veto_holder_approve(
    kind: str, k: int, vetoes: list[str], min_participation: int, counts_as: str
) -> None:
    """Independent of how the validator decides: for every policy it accepts without a
    silence_reason, a veto holder (any voter, under any_veto) that falls silent never lets the
    event be approved, whatever the others vote."""
    skills = ["a", "b", "c"]
    rule: dict[str, object] = {"kind": kind, "vetoes": vetoes}
    rule |= {"min_participation": min_participation}
    if kind == "k_of_n":
        rule["k"] = k
    try:
        p = policy.parse(_policy({"skills": skills, "rule": rule}, timeout_counts_as=counts_as))
    except PolicyError:
        return  # refused: nothing to run
    pol = p.by_type["x.happened"]
    holders = skills if kind in ("any_veto", "unanimous") else vetoes
    silence = Silent(what="no answer", counts_as=pol.timeout_counts_as)
    for holder in holders:
        others = [s for s in skills if s != holder]
        for choices in itertools.product(("approve", "reject", "abstain"), repeat=len(others)):
            votes: dict[str, Choice] = dict(zip(others, choices, strict=True))  # type: ignore[arg-type]
            result = tally(pol.rule, skills, votes, final=True, silent={holder: silence})
            assert result.outcome != "approved", (holder, votes, result.reason)


def test_tenant_limits_fall_back_to_the_star_table_and_change_the_digest() -> None:
    plain = policy.parse(_one())
    limited = policy.parse(
        {**_one(), "tenants": {"acme": {"events_at_once": 4}, "*": {"events_at_once": 16}}}
    )
    assert plain.limits("acme") is None
    acme, other = limited.limits("acme"), limited.limits("other")
    assert acme is not None and acme.events_at_once == 4
    assert other is not None and other.events_at_once == 16
    assert limited.digest() != plain.digest()
    # A file without tenant limits keeps the digest it had before they existed (audited).
    assert plain.digest() == policy.Policies(plain.by_type, "x").digest()


@pytest.mark.parametrize(
    ("tenants", "says"),
    [
        ({"acme": {"events_at_once": 0}}, "[tenants.acme]: events_at_once must be at least 1"),
        ({"acme": {"events_at_ounce": 2}}, "[tenants.acme]: Object contains unknown field"),
        ({"acme": {"events_at_once": "2"}}, "[tenants.acme]: Expected `int | null`"),
        (["acme"], "'tenants' must be a table of tenants"),
    ],
)
def test_bad_tenant_limits_name_the_table(tenants: object, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy.parse({**_one(), "tenants": tenants})
    assert says in err.value.message
