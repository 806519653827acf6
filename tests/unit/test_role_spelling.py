"""One spelling of approver roles (`clinical-safety-officer`), decided in one place
(`mesh.approvals.approver_role`): policies, credentials, trust files and Cedar cannot disagree."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from coordinator import policy as policies
from coordinator.clock import ManualClock
from coordinator.humans import Settled, cedar_authorize
from coordinator.ledger import MemoryStore
from mesh import authz
from mesh.approvals import approver_role, role_problem
from mesh.errors import PolicyError
from tests.unit.test_decide import KEY
from tests.unit.test_humans import People, agents_vote, desk, human_policy, request_now


@pytest.mark.parametrize(
    ("written", "spelled"),
    [
        ("clinical_safety_officer", "clinical-safety-officer"),
        (" Clinical-Safety-Officer ", "clinical-safety-officer"),
        ("clinical-safety-officer", "clinical-safety-officer"),
        ("cso", "cso"),
    ],
)
def test_the_one_spelling(written: str, spelled: str) -> None:
    assert approver_role(written) == spelled
    assert role_problem(spelled) is None


def test_a_policy_role_with_underscores_is_refused_naming_the_spelling() -> None:
    raw = {
        "x.y": {
            "skills": ["a"],
            "rule": {"kind": "unanimous"},
            "humans": [{"role": "clinical_safety_officer"}],
        }
    }
    with pytest.raises(PolicyError, match="spelled 'clinical-safety-officer'"):
        policies.parse(raw)


def test_a_cedar_group_or_role_with_underscores_is_refused_with_file_and_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "mine.cedar").write_text(
        '@id("ok")\npermit (principal, action == Mesh::Action::"replay", resource);\n'
        '@id("csos")\npermit (\n  principal in Mesh::Group::"clinical_safety_officer",\n'
        '  action == Mesh::Action::"approve", resource);\n'
    )
    with pytest.raises(authz.PolicyFileError, match=r"mine\.cedar:5.*'clinical-safety-officer'"):
        authz.Authorizer("regulated", tmp_path)
    (tmp_path / "mine.cedar").write_text(
        'permit (principal, action == Mesh::Action::"approve", resource)\n'
        'when { context has role && context.role == "head_of_safety" };\n'
    )
    with pytest.raises(authz.PolicyFileError, match=r"mine\.cedar:2.*'head-of-safety'"):
        authz.Authorizer("regulated", tmp_path)


def test_cedar_sees_the_one_spelling_whatever_a_caller_writes() -> None:
    a = authz.Authorizer("regulated")  # the shipped clinic set: Group "clinical-safety-officer"
    dosing = authz.decision_type("clinic-1", "dosing.change")
    for group, role in [
        ("clinical-safety-officer", "clinical-safety-officer"),
        ("clinical_safety_officer", "clinical_safety_officer"),
    ]:
        who = authz.identity("human", "lee", tenant="clinic-1", groups=[group])
        assert a.is_allowed(who, "approve", dosing, {"role": role, "event_id": "e"}).allowed
    nobody = authz.identity("human", "lee", tenant="clinic-1", groups=["head-of-safety"])
    ask = {"role": "clinical-safety-officer", "event_id": "e"}
    assert not a.is_allowed(nobody, "approve", dosing, ask).allowed


async def test_a_person_whose_trust_file_says_underscores_approves_under_regulated() -> None:
    """The policy says `clinical-safety-officer`, an older trust file says
    `clinical_safety_officer`, the shipped Cedar set names the group with '-': the desk's role
    check and Cedar's both let the person answer."""
    authorize = cedar_authorize(types.SimpleNamespace(profile="regulated", authz_dir=None))
    assert authorize is not None
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical_safety_officer")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    d = desk(store, clock, trust=people.trust, authorize=authorize)
    got = await d.answer(KEY, people.answer("alice", request, yes=True))
    assert isinstance(got, Settled), got


def test_creds_issue_a_person_in_the_one_spelling(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mesh.cli import app
    from mesh.identity import IdentityDir, load_trust

    ids = IdentityDir.init(tmp_path / "identity")
    issue = ["creds", "human", "lee", "--tenant", "clinic", "--dir", str(ids.path)]
    ran = CliRunner().invoke(app, [*issue, "--role", "Clinical_Safety_Officer"])
    assert ran.exit_code == 0, ran.output
    [lee] = [k for k in load_trust(ids.trust_path).keys.values() if k.name == "lee"]
    assert lee.claims == ["clinical-safety-officer"]
    bad = CliRunner().invoke(
        app, ["creds", "human", "x", "--tenant", "clinic", "--role", "a b", "--dir", str(ids.path)]
    )
    assert bad.exit_code != 0 and "approver role 'a b'" in bad.output
