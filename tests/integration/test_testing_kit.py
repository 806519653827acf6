"""`mesh.testing` used the way a user would: the example agents and a coordinator through
`MeshHarness`, the Claude brain through `scripted_model`, the triage agent through its events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agents.compliance_review.agent import agent as compliance
from agents.domain_rules import render_prompt
from agents.quality_review.agent import agent as quality
from agents.security_review.agent import agent as security
from agents.triage.agent import agent as triage
from coordinator.policy import DEFAULT_FILE
from mesh import Bus
from mesh.testing import MeshHarness, ScriptedModel, artifact_data, verdict_of
from mesh.testing.model import TEST_API_KEY

pytestmark = pytest.mark.integration
pytest_plugins = ["mesh.testing.fixtures"]  # mesh_server, mesh_bus, scripted_model

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "agents" / "samples"
REVIEWERS = (security, compliance, quality)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


# -- the three reviewers and the project's own policies -----------------------------------------
@pytest.mark.parametrize(
    ("sample_file", "outcome", "rejecter"),
    [
        ("release_clean.json", "approved", None),
        ("release_secret.json", "rejected", "security-review"),
        ("release_phi.json", "rejected", "compliance-review"),
        ("release_untested.json", "rejected", "quality-review"),
    ],
)
async def test_reviewers_decide_the_samples(
    sample_file: str, outcome: str, rejecter: str | None
) -> None:
    async with MeshHarness(*REVIEWERS, policies=DEFAULT_FILE) as mesh:
        event_id = await mesh.publish("release.proposed", sample(sample_file))
        decision = await mesh.decision(event_id)
    assert decision.outcome == outcome, decision
    assert decision.event_type == "release.proposed"
    assert decision.decision_type == "release.decided"
    assert [v.agent for v in decision.votes] == [
        "security-review",
        "compliance-review",
        "quality-review",
    ]
    for v in decision.votes:
        assert v.outcome == "voted" and v.verdict is not None, v
        assert v.brain == "rules", v  # no ANTHROPIC_API_KEY in tests: the rules decide
        expected = "reject" if v.agent == rejecter else "approve"
        assert v.verdict.vote == expected, v
        assert v.verdict.reasons, v


async def test_harness_with_a_dict_policy_and_a_bus_of_our_own(mesh_bus: Bus) -> None:
    """Policies as a dict; the harness on a bus the test already has (the fixtures')."""
    policies = {
        "release.hotfix": {
            "skills": ["release-security-review"],
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 2.0,
            "deadline_s": 4.0,
        }
    }
    async with MeshHarness(security, policies=policies, bus=mesh_bus) as mesh:
        assert mesh.server is None  # used the given bus, started no server
        approved = await mesh.publish("release.hotfix", sample("release_clean.json"), tenant="t1")
        rejected = await mesh.publish("release.hotfix", sample("release_secret.json"))
        d1, d2 = await mesh.decision(approved), await mesh.decision(rejected)
        assert (d1.outcome, d1.tenant) == ("approved", "t1")
        assert (d2.outcome, d2.tenant) == ("rejected", "default")
        assert d2.decision_type == "release.decided"  # no decision_type: <base>.decided

        # What the coordinator cannot decide: a dead letter, and decision() says so at once.
        unknown = await mesh.publish("invoice.created", {"id": "i-1"})
        dead = await mesh.dead_letter(unknown)
        assert dead.reason == "unknown_type" and dead.event_type == "invoice.created", dead
        with pytest.raises(AssertionError, match=r"dead-lettered \(unknown_type\)"):
            await mesh.decision(unknown)
        with pytest.raises(AssertionError, match=r"was decided \(approved"):
            await mesh.dead_letter(approved)
    assert not mesh_bus.nc.is_closed  # the harness leaves a bus it did not open alone


async def test_a_wait_is_bounded_and_says_what_it_saw() -> None:
    async with MeshHarness(security, policies=DEFAULT_FILE, timeout=0.5) as mesh:
        with pytest.raises(AssertionError, match=r"no a decision on event nope within 0.5s"):
            await mesh.decision("nope")


async def test_call_an_agent_over_a2a() -> None:
    async with MeshHarness(security) as mesh:  # no policies: no coordinator
        assert mesh.coordinator is None
        task = await mesh.call("security-review", sample("release_secret.json"))
    assert task["status"]["state"] == "TASK_STATE_COMPLETED", task
    verdict = verdict_of(task)
    assert verdict.vote == "reject"
    assert any("AWS access key id" in r for r in verdict.reasons), verdict
    assert artifact_data(task)["vote"] == "reject"


# -- the Claude brain against the scripted model ------------------------------------------------
async def test_claude_brain_answers_with_the_scripted_verdict(
    scripted_model: ScriptedModel,
) -> None:
    scripted_model.script("reject", "scripted: the model found a problem", confidence=0.25)
    policies = {
        "release.proposed": {
            "skills": ["release-security-review"],
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 5.0,
            "deadline_s": 10.0,
        }
    }
    async with MeshHarness(security, policies=policies) as mesh:
        assert mesh.running[0].brain is not None
        assert mesh.running[0].brain.name.startswith("claude:"), mesh.running[0].brain.name
        # The clean sample: the rules would approve it; the scripted model rejects.
        task = await mesh.call("security-review", sample("release_clean.json"))
        decision = await mesh.decision(
            await mesh.publish("release.proposed", sample("release_clean.json"))
        )

    verdict = verdict_of(task)
    assert verdict.vote == "reject"
    assert verdict.reasons == ["scripted: the model found a problem"]
    assert verdict.confidence == 0.25
    [vote] = decision.votes
    assert decision.outcome == "rejected"
    assert vote.brain.startswith("claude:"), vote
    assert vote.verdict is not None and vote.verdict.vote == "reject"

    # The fake saw what the SDK sent: the agent's prompt.md (filled from the domain rules) as
    # the system prompt, the release as the user message, and one forced tool typed as a Verdict.
    prompt = render_prompt(ROOT / "agents" / "security_review" / "prompt.md")
    assert "`npm`, `pypi`" in prompt and "{{" not in prompt
    assert len(scripted_model.requests) == 2
    assert scripted_model.system_prompts == [prompt, prompt]
    first = scripted_model.requests[0]
    assert json.loads(first["messages"][0]["content"])["id"] == sample("release_clean.json")["id"]
    assert first["tool_choice"] == {"type": "tool", "name": "submit_verdict"}
    vote_schema = first["tools"][0]["input_schema"]["properties"]["vote"]
    assert sorted(vote_schema["enum"]) == ["abstain", "approve", "reject"]
    sent = scripted_model.headers[0]
    assert TEST_API_KEY in sent.get("x-api-key", "") + sent.get("authorization", ""), sent


async def test_scripted_model_outside_pytest_fixtures() -> None:
    async with ScriptedModel("abstain", "cannot tell") as model:
        assert model.answer == {"vote": "abstain", "reasons": ["cannot tell"]}
        env = model.environ()
        assert env["ANTHROPIC_BASE_URL"] == model.base_url
        assert model.base_url.startswith("http://127.0.0.1:")


# -- an event-driven agent ------------------------------------------------------------------------
async def test_triage_reacts_to_ticket_created() -> None:
    ticket = {
        "id": "T-1042",
        "title": "Checkout is down",
        "body": "500s for everyone since 09:12",
        "reporter": "ops@acme.example",
        "service": "checkout",
        "customer_tier": "enterprise",
    }
    # The project's policies ignore ticket.*: the coordinator acks it, the triage agent reacts.
    async with MeshHarness(triage, policies=DEFAULT_FILE) as mesh:
        event_id = await mesh.publish("ticket.created", ticket, tenant="acme")
        triaged = await mesh.event("ticket.triaged", lambda e: e.data.get("ticket_id") == "T-1042")
        assert len(mesh.events("ticket.created")) == 1
    assert triaged.tenant == "acme"
    assert triaged.data["priority"] == "p1", triaged.data
    assert triaged.data["team"] == "payments", triaged.data  # "checkout" is a payments word
    assert "outage" in triaged.data["labels"], triaged.data
    assert triaged.id != event_id


# -- secured with nothing to set up ---------------------------------------------------------------
async def test_the_kit_is_secured_without_any_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No MESH_IDENTITY anywhere: the kit makes a temporary identity folder, its server admits
    only that folder's identities, the test runs as its operator, and all of it is gone after."""
    import nats as nats_py

    from mesh.settings import get_settings
    from mesh.testing import nats_server

    for name in ("MESH_IDENTITY", "MESH_TRUST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESH_HOME", str(tmp_path / ".mesh"))
    get_settings.cache_clear()
    async with nats_server() as url:
        operator = os.environ["MESH_IDENTITY"]
        assert oct(os.stat(operator).st_mode)[-3:] == "600"
        async with await Bus.connect(url) as bus:
            assert bus.identity is not None and bus.identity.role == "operator"
            await bus.ensure()
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats_py.connect(url, allow_reconnect=False, connect_timeout=2)
        async with MeshHarness(security) as mesh:  # the harness runs as that operator too
            task = await mesh.call("security-review", sample("release_secret.json"))
            assert verdict_of(task).vote == "reject"
    assert "MESH_IDENTITY" not in os.environ
    with pytest.raises(FileNotFoundError):
        os.stat(operator)  # the temporary folder is gone


# -- the fixtures as a plugin, in a user's own test suite ----------------------------------------
def test_fixtures_work_as_a_pytest_plugin(tmp_path: Path) -> None:
    """A user's suite that only says `pytest_plugins = ["mesh.testing.fixtures"]`."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["mesh.testing.fixtures"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import os

            import mesh.models
            from mesh import subjects


            async def test_bus(mesh_server, mesh_bus, mesh_identities):
                assert mesh_bus.nc.connected_url.port == int(mesh_server.url.rsplit(":", 1)[1])
                info = await mesh_bus.js.stream_info(subjects.EVENTS_STREAM)
                assert info.config.name == subjects.EVENTS_STREAM
                assert mesh_bus.identity.role == "operator"
                assert mesh_identities.issue("reader", "r", tenant="acme").is_file()


            async def test_model(scripted_model):
                assert os.environ["ANTHROPIC_BASE_URL"] == scripted_model.base_url
                assert os.environ["ANTHROPIC_API_KEY"]


            def test_guard():
                assert "ANTHROPIC_API_KEY" not in os.environ
                assert mesh.models.model_requests_allowed() is False
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_"))}
    env["ANTHROPIC_API_KEY"] = "must-be-removed-by-the-plugin"
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert "3 passed" in ran.stdout, ran.stdout[-3000:]
