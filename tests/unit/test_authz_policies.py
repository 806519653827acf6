"""Cedar authorization (mesh.authz): the shipped profiles, deny by default, file:line errors,
the set in force kept when a change does not load, reload with its hash, the tool guard."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from mesh import authz
from mesh.authz import _source
from mesh.errors import ConfigError

PUBLISHER = authz.identity("publisher", "billing", tenant="acme")
OPERATOR = authz.identity("operator", "operator")
EVENT = authz.event_type("acme", "release.proposed")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the shipped profiles ---------------------------------------------------------------------
def test_default_profile_allows_what_the_mesh_did_before_policies() -> None:
    a = authz.Authorizer("default")
    asks: list[tuple[authz.Entity, str, authz.Entity, dict[str, Any]]] = [
        (PUBLISHER, "publish", EVENT, {"verified": True}),
        (authz.publisher("", "acme"), "publish", EVENT, {"verified": False}),
        (OPERATOR, "replay", authz.dead_letters("acme", "no_agent"), {}),
        (OPERATOR, "purge", authz.dead_letters(), {}),
        (OPERATOR, "export", authz.dead_letters("acme", "malformed"), {}),
        (authz.identity("reader", "r", tenant="acme"), "approve", authz.decision_type("acme", "t"),
         {"role": "x"}),
        (authz.identity("agent", "a"), "call_tool", authz.tool("a", "anything"),
         {"tenant": "acme", "args": {"url": "http://x"}}),
    ]  # fmt: skip
    for principal, action, resource, context in asks:
        decision = a.is_allowed(principal, action, resource, context)
        assert decision.allowed, (principal, action, decision)
        assert decision.policy_ids and decision.policy_ids[0].startswith("default-")


def test_regulated_denies_by_default_and_names_the_policy_that_decides() -> None:
    a = authz.Authorizer("regulated")
    # Allowed: a tenant's own signed publisher, naming the permit with its file and line.
    ok = a.is_allowed(authz.publisher("publisher:billing", "acme"), "publish", EVENT,
                      {"verified": True})  # fmt: skip
    assert ok.allowed
    assert ok.policy_ids == ("publish-signed-by-tenant-publisher (clinic.cedar:9)",)
    # Nothing permits these: denied, by no policy (deny by default).
    for principal, action, resource, context in [
        (authz.publisher("", "acme"), "publish", EVENT, {"verified": False}),
        (OPERATOR, "publish", EVENT, {"verified": True}),
        (OPERATOR, "purge", authz.dead_letters(), {}),
        (authz.identity("reader", "r", tenant="acme"), "replay", authz.dead_letters("acme"), {}),
        (authz.identity("agent", "x"), "call_tool", authz.tool("x", "shell"),
         {"tenant": "acme", "args": {}}),
        (PUBLISHER, "no_such_action", EVENT, {}),
    ]:  # fmt: skip
        decision = a.is_allowed(principal, action, resource, context)
        assert not decision.allowed, (principal, action)
        assert decision.policy_ids == ()
        assert "denied by default" in decision.explain()
    # A forbid wins over a permit and is named.
    dosing = authz.tool_guard(a, agent="dosing", tenant="acme")
    assert dosing("draft_prescription", {"dose_mg": 500}, {}) is None
    why = dosing("draft_prescription", {"dose_mg": 500, "url": "https://x"}, {})
    assert why is not None and "tools-no-urls (clinic.cedar:" in why


def test_approval_takes_the_group_from_entities_not_from_the_request(tmp_path: Path) -> None:
    """What helper code calls for a sign-off: the group comes from entities.json (or from a
    verified credential), the role asked for from the approval request."""
    for f in (authz.SHIPPED_POLICIES / "regulated").glob("*.cedar"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "entities.json").write_text(
        json.dumps(
            [
                {"uid": {"type": "Mesh::Identity", "id": "approver:dr-lee"}, "attrs": {},
                 "parents": [{"type": "Mesh::Group", "id": "clinical_safety_officer"}]},
                {"uid": {"type": "Mesh::Group", "id": "clinical_safety_officer"}, "attrs": {},
                 "parents": []},
            ]
        )
    )  # fmt: skip
    a = authz.Authorizer("regulated", tmp_path)
    dosing = authz.decision_type("clinic-1", "dosing.change")
    ask = {"role": "clinical_safety_officer", "event_id": "e1"}
    lee = authz.identity("approver", "dr-lee", tenant="clinic-1")
    assert a.is_allowed(lee, "approve", dosing, ask).allowed
    # Attributes are the verified identity's: the file cannot move her to another tenant.
    elsewhere = authz.identity("approver", "dr-lee", tenant="clinic-2")
    assert not a.is_allowed(elsewhere, "approve", dosing, ask).allowed
    stranger = authz.identity("approver", "mallory", tenant="clinic-1")
    denied = a.is_allowed(stranger, "approve", dosing, ask)
    assert not denied.allowed and denied.policy_ids == ()
    assert not a.is_allowed(lee, "approve", dosing, {"role": "pharmacist"}).allowed


# -- files that do not load -------------------------------------------------------------------
GOOD = '@id("p")\npermit (principal, action == Mesh::Action::"publish", resource);\n'


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # a syntax error on line 8 (the `}` after `==`), after a comment and a good policy
        ('// ok; "quoted;"\n' + GOOD + "\npermit (principal, action, resource)\nwhen {\n"
         "  context.verified ==\n};\n", 8, "unexpected token"),
        # a misspelt attribute, found by the schema on the line that names it
        ('permit (principal, action, resource)\nwhen {\n  principal.rol == "x"\n};\n', 3,
         "attribute `rol`"),
        # an unknown action
        ('permit (principal, action == Mesh::Action::"publsh", resource);\n', 1, "publsh"),
        # the last policy never ends
        (GOOD + "forbid (principal, action, resource)\n", 3, ""),
    ],
)  # fmt: skip
def test_a_malformed_file_is_refused_with_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "bad.cedar"
    path.write_text(text)
    with pytest.raises(authz.PolicyFileError) as caught:
        authz.Authorizer("regulated", tmp_path)
    assert caught.value.where == f"{path}:{line}", caught.value.message
    assert message in caught.value.problem
    assert caught.value.message.startswith(f"{path}:{line}: ")


def test_a_schema_error_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "mine.cedarschema").write_text(
        "namespace Mesh {\n  entity A;\n  entity B in [C];\n}\n"
    )
    (tmp_path / "p.cedar").write_text(GOOD)
    with pytest.raises(authz.PolicyFileError) as caught:
        authz.Authorizer("regulated", tmp_path)
    assert caught.value.where == f"{tmp_path / 'mine.cedarschema'}:3"


def test_statements_know_strings_and_comments() -> None:
    found, rest = _source.statements(
        '// a; comment\npermit (principal, action, resource)\nwhen { "a;b" == "c\\";" };\n\n'
        "forbid (principal, action, resource);  // trailing; comment\n"
    )
    assert [s.line for s in found] == [2, 5]
    assert rest is None


# -- reload -----------------------------------------------------------------------------------
def test_a_bad_change_is_refused_and_the_set_in_force_stays(tmp_path: Path) -> None:
    clock = Clock()
    policy = tmp_path / "p.cedar"
    policy.write_text(GOOD)
    a = authz.Authorizer("regulated", tmp_path, every_s=1.0, clock=clock)
    first = a.sha256
    assert a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True}).allowed

    policy.write_text(GOOD.replace("permit", "forbid") + "permit (principal, action, resource\n;")
    assert a.refresh() is None  # not looked at again within every_s
    clock.now = 1.5
    change = a.refresh()
    assert change is not None and not change.accepted
    assert change.error.startswith(f"{policy}:3: ")
    assert change.sha256 != first
    assert a.sha256 == first  # the set in force stays…
    assert a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True}).allowed  # …and decides
    clock.now = 3.0
    assert a.refresh() is None  # reported once, not every look

    # A good change is taken, with its new hash; the answer follows it at once.
    policy.write_text('@id("no-publishing")\nforbid (principal, action, resource);\n' + GOOD)
    clock.now = 4.5
    taken = a.refresh()
    assert taken is not None and taken.accepted and taken.sha256 == a.sha256 != first
    denied = a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True})
    assert not denied.allowed
    assert denied.policy_ids == ("no-publishing (p.cedar:1)",)
    assert [c.accepted for c in a.take_changes()] == [False, True]
    assert a.take_changes() == []


def test_a_new_file_in_the_folder_is_a_change(tmp_path: Path) -> None:
    (tmp_path / "a.cedar").write_text(GOOD)
    a = authz.Authorizer("regulated", tmp_path, every_s=0.0)
    (tmp_path / "b.cedar").write_text('@id("deny-all")\nforbid (principal, action, resource);\n')
    change = a.refresh()
    assert change is not None and change.accepted
    assert str(tmp_path / "b.cedar") in change.files
    assert not a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True}).allowed


def test_default_profile_adds_the_folders_policies(tmp_path: Path) -> None:
    (tmp_path / "mine.cedar").write_text(
        '@id("no-mallory")\nforbid (principal == Mesh::Identity::"publisher:mallory", '
        'action == Mesh::Action::"publish", resource);\n'
    )
    a = authz.Authorizer("default", tmp_path)
    mallory = authz.publisher("publisher:mallory", "acme")
    decision = a.is_allowed(mallory, "publish", EVENT, {"verified": True})
    assert not decision.allowed and decision.policy_ids == ("no-mallory (mine.cedar:1)",)
    assert a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True}).allowed


def test_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        authz.Authorizer("regulated", tmp_path / "nope")


# -- the tool guard, with a stand-in for the model's tool runner ----------------------------------
def run_tool_calls(
    calls: list[tuple[str, dict[str, Any]]],
    tools: Mapping[str, Callable[..., str]],
    guard: authz.ToolGuard,
    context: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """What a model's tool loop does with a guard: ask it before each call; a denied call is
    not run and its tool_result is an error carrying the reason."""
    results = []
    for name, args in calls:
        refusal = guard(name, args, context)
        if refusal is not None:
            results.append({"type": "tool_result", "is_error": True, "content": refusal})
            continue
        results.append({"type": "tool_result", "content": tools[name](**args)})
    return results


def test_a_denied_tool_call_never_runs() -> None:
    ran: list[str] = []

    def draft_prescription(dose_mg: int, url: str = "") -> str:
        ran.append(f"draft {dose_mg}")
        return "drafted"

    def shell(cmd: str) -> str:
        ran.append(f"shell {cmd}")
        return "done"

    guard = authz.tool_guard(authz.Authorizer("regulated"), agent="dosing")
    results = run_tool_calls(
        [
            ("draft_prescription", {"dose_mg": 20}),
            ("draft_prescription", {"dose_mg": 5000}),
            ("draft_prescription", {"dose_mg": 20, "url": "https://example.org/x"}),
            ("shell", {"cmd": "rm -rf /"}),
        ],
        {"draft_prescription": draft_prescription, "shell": shell},
        guard,
        {"tenant": "clinic-1"},
    )
    assert ran == ["draft 20"]  # the three denied calls left no trace
    assert [r.get("is_error", False) for r in results] == [False, True, True, True]
    assert "denied by default" in results[1]["content"]
    assert "tools-no-urls" in results[2]["content"]
    assert "'shell'" in results[3]["content"]


def test_tool_arguments_become_cedar_values() -> None:
    assert authz.cedar_value(
        {"a": 1, "b": 2.0, "c": 2.5, "d": None, "e": [1, None], "f": {"g": True}, "h": 2**70}
    ) == {"a": 1, "b": 2, "c": "2.5", "e": [1], "f": {"g": True}, "h": str(2**70)}


# -- mesh authz (offline) ---------------------------------------------------------------------
def test_cli_check_show_and_ask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from mesh.cli import app
    from mesh.settings import get_settings

    runner = CliRunner()
    r = runner.invoke(app, ["authz", "check", str(authz.SHIPPED_POLICIES / "regulated")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: 9 policies in 1 file(s), sha256 ")

    bad = tmp_path / "bad.cedar"
    bad.write_text(GOOD + "\npermit (principal, action, resource)\nwhen { principal.rol };\n")
    r = runner.invoke(app, ["authz", "check", str(bad)])
    assert r.exit_code == 3
    assert r.stderr.splitlines()[0].startswith(f"error: {bad}:5: ")
    assert "Traceback" not in r.output

    monkeypatch.setenv("MESH_PROFILE", "regulated")
    get_settings.cache_clear()
    r = runner.invoke(app, ["authz", "show", "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["profile"] == "regulated" and len(shown["policies"]) == 9
    r = runner.invoke(app, ["authz", "ask", "operator:operator", "purge", 'DeadLetter::"*"'])
    assert r.exit_code == 3 and "denied by default" in r.stderr
    r = runner.invoke(
        app,
        ["authz", "ask", "publisher:billing", "publish", 'EventType::"acme/t"', "--tenant",
         "acme", "--context", '{"verified": true}'],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "publish-signed-by-tenant-publisher" in r.stdout


def test_a_folder_that_goes_away_is_reported_once_and_the_set_stays(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.cedar").write_text(GOOD)
    a = authz.Authorizer("regulated", folder, every_s=0.0)
    (folder / "p.cedar").unlink()
    folder.rmdir()
    change = a.refresh()
    assert change is not None and not change.accepted and "is not a folder" in change.error
    assert a.refresh() is None  # once, not at every look
    assert a.is_allowed(PUBLISHER, "publish", EVENT, {"verified": True}).allowed
    folder.mkdir()
    (folder / "p.cedar").write_text(GOOD)
    assert a.refresh() is None  # back as it was: nothing changed in force


def test_the_guard_takes_the_tenant_from_a_mapping_or_an_object(tmp_path: Path) -> None:
    (tmp_path / "p.cedar").write_text(
        'permit (principal, action == Mesh::Action::"call_tool", resource)\n'
        'when { context.tenant == "clinic-1" };\n'
    )
    guard = authz.tool_guard(authz.Authorizer("regulated", tmp_path), agent="a", tenant="other")

    class Ctx:
        tenant = "clinic-1"

    assert guard("t", {}, {"tenant": "clinic-1"}) is None
    assert guard("t", {}, Ctx()) is None
    assert guard("t", {}, None) is not None  # no tenant in the context: the guard's own
