"""Tools of an agent's model (mesh.tools) through the real anthropic SDK against FakeAnthropic
over HTTP on 127.0.0.1: Cedar's guard is asked before a tool runs, a denied one never runs
(its function records every call), the model gets the reason, budgets count the calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

import mesh.models
from mesh import authz, budget
from mesh.budget import Budget, BudgetLedger, CallScope
from mesh.errors import BudgetExceededError, ConfigError
from mesh.models import ClaudeBrain, Thought
from mesh.settings import Settings
from mesh.testing.fake_anthropic import FakeAnthropic, tool_calls_message, turns
from mesh.tools import ModelTool, model_tool
from mesh.verdict import Verdict

ANSWER = {"vote": "approve", "reasons": ["checked"]}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)


class Clinic:
    """The dosing agent's tools; each records the calls it really ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, dict[str, Any]]] = []

        @model_tool(
            input_schema={"type": "object", "properties": {"drug": {"type": "string"}}},
        )
        async def lookup_formulary(drug: str) -> dict[str, Any]:
            """Look a drug up in the formulary."""
            self.ran.append(("lookup_formulary", {"drug": drug}))
            return {"drug": drug, "max_daily_mg": 4000}

        @model_tool(input_schema={"type": "object"})
        async def draft_prescription(dose_mg: int, url: str = "") -> str:
            self.ran.append(("draft_prescription", {"dose_mg": dose_mg, "url": url}))
            return "drafted"

        self.tools: list[ModelTool] = [lookup_formulary, draft_prescription]


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    yield None


async def think(fake: FakeAnthropic, clinic: Clinic, **kw: Any) -> Thought[Any]:
    async with anthropic.AsyncAnthropic(
        api_key="test-key", base_url=fake.base_url, max_retries=0
    ) as c:
        brain = ClaudeBrain(
            system_prompt="You check doses.",
            output_type=Verdict,
            client=c,
            tools=clinic.tools,
            agent="dosing",
            **kw,
        )
        return await brain.think({"drug": "paracetamol", "dose_mg": 500})


def tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        block
        for m in request["messages"]
        if m["role"] == "user" and isinstance(m["content"], list)
        for block in m["content"]
        if block.get("type") == "tool_result"
    ]


async def test_an_allowed_tool_runs_and_a_denied_one_never_does() -> None:
    clinic = Clinic()
    script = turns(
        lambda req: tool_calls_message(
            req,
            [
                ("lookup_formulary", {"drug": "paracetamol"}),
                ("draft_prescription", {"dose_mg": 5000}),  # over the clinic's limit
                ("draft_prescription", {"dose_mg": 20, "url": "https://x.example"}),
            ],
        ),
        ANSWER,
    )
    async with FakeAnthropic(script) as fake:
        guard = authz.tool_guard(authz.Authorizer("regulated"), agent="dosing", tenant="clinic")
        thought = await think(fake, clinic, guard=guard)
    assert thought.output == Verdict("approve", ["checked"])
    assert clinic.ran == [("lookup_formulary", {"drug": "paracetamol"})]  # nothing else ran
    # The model was offered its tools next to the answer tool, free to call any of them.
    first = fake.requests[0]
    assert [t["name"] for t in first["tools"]] == [
        "submit_verdict",
        "lookup_formulary",
        "draft_prescription",
    ]
    assert first["tool_choice"] == {"type": "any"}
    assert first["tools"][1]["description"] == "Look a drug up in the formulary."
    # The second turn carries the results: one real, two errors naming what decided.
    ok, over, url = tool_results(fake.requests[1])
    assert "4000" in ok["content"] and not ok.get("is_error")
    assert over["is_error"] and "no policy permits it" in over["content"]
    assert url["is_error"] and "tools-no-urls" in url["content"]
    assert [(u.name, u.ran) for u in thought.tool_uses] == [
        ("lookup_formulary", True),
        ("draft_prescription", False),
        ("draft_prescription", False),
    ]
    assert "tools-no-urls (clinic.cedar:" in thought.tool_uses[2].denied


async def test_the_guard_defaults_to_cedar_from_the_settings() -> None:
    def script() -> Any:  # a conversation each: `turns` counts the requests it answered
        return turns(
            lambda req: tool_calls_message(req, [("draft_prescription", {"dose_mg": 5000})]),
            ANSWER,
        )

    clinic = Clinic()
    async with FakeAnthropic(script()) as fake:
        thought = await think(fake, clinic, settings=Settings(profile="regulated"))
    assert clinic.ran == []
    assert thought.tool_uses[0].denied.startswith("tool 'draft_prescription' may not be called")
    clinic = Clinic()
    async with FakeAnthropic(script()) as fake:  # default profile: the shipped permits
        await think(fake, clinic, settings=Settings(profile="default"))
    assert clinic.ran == [("draft_prescription", {"dose_mg": 5000, "url": ""})]


async def test_tool_calls_count_against_the_events_budget(tmp_path: Path) -> None:
    """A model call counts one tool call (mesh.budget), each tool run one more: with room for
    one, the model is asked but its tool never runs."""
    clinic = Clinic()
    script = turns(
        lambda req: tool_calls_message(req, [("lookup_formulary", {"drug": "x"})]), ANSWER
    )
    ledger = BudgetLedger(settings=Settings())
    scope = CallScope(tenant="clinic", event_id="e1", budget=Budget(tool_calls=1), ledger=ledger)
    token = budget.current.set(scope)
    try:
        async with FakeAnthropic(script) as fake:
            with pytest.raises(BudgetExceededError) as e:
                await think(fake, clinic, settings=Settings(profile="default"))
    finally:
        budget.current.reset(token)
    assert e.value.limit == "tool_calls"
    assert clinic.ran == [] and len(fake.requests) == 1


async def test_a_tool_that_raises_or_does_not_exist_is_an_error_result() -> None:
    ran: list[str] = []

    @model_tool()
    async def flaky() -> str:
        ran.append("flaky")
        raise RuntimeError("formulary offline")

    script = turns(lambda req: tool_calls_message(req, [("flaky", {}), ("nope", {})]), ANSWER)
    async with (
        FakeAnthropic(script) as fake,
        anthropic.AsyncAnthropic(api_key="k", base_url=fake.base_url, max_retries=0) as c,
    ):
        brain = ClaudeBrain(
            system_prompt="p",
            output_type=Verdict,
            client=c,
            tools=[flaky],
            agent="x",
            guard=lambda name, args, ctx: None,
        )
        thought = await brain.think({})
    assert ran == ["flaky"]
    raised, missing = tool_results(fake.requests[1])
    assert raised["is_error"] and "formulary offline" in raised["content"]
    assert missing["is_error"] and "no tool 'nope'" in missing["content"]
    assert thought.output.vote == "approve"


async def test_the_model_must_answer_after_max_tool_rounds() -> None:
    clinic = Clinic()

    def respond(req: dict[str, Any]) -> dict[str, Any]:
        if req["tool_choice"]["type"] == "any":  # it keeps looking things up while it may
            return tool_calls_message(req, [("lookup_formulary", {"drug": "x"})])
        return ANSWER

    async with FakeAnthropic(respond) as fake:
        thought = await think(fake, clinic, guard=lambda n, a, c: None, max_tool_rounds=2)
    assert len(clinic.ran) == 2 and len(fake.requests) == 3
    assert fake.requests[2]["tool_choice"] == {"type": "tool", "name": "submit_verdict"}
    assert thought.output.vote == "approve"


def test_tools_are_declared_async_with_an_object_schema() -> None:
    def sync() -> str:
        return ""

    with pytest.raises(ConfigError, match="async"):
        ModelTool("sync", sync)  # type: ignore[arg-type]

    async def f() -> str:
        return ""

    with pytest.raises(ConfigError, match="object"):
        ModelTool("f", f, {"type": "string"})


async def test_a_denied_tool_call_is_in_the_decisions_audit_record() -> None:
    """End to end on a real nats-server: the reviewer's model calls a tool Cedar denies; the
    tool never runs, the agent reports the deny with its answer, and the coordinator's signed
    audit record of the decision names it and the policy that decided."""
    from agents.security_review.agent import agent as security
    from mesh import audit
    from mesh.testing import MeshHarness

    clinic = Clinic()
    script = turns(
        lambda req: tool_calls_message(
            req, [("draft_prescription", {"dose_mg": 20, "url": "https://x.example"})]
        ),
        ANSWER,
    )
    policies = {
        "release.proposed": {
            "skills": ["release-security-review"],
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 10.0,
            "deadline_s": 20.0,
        }
    }
    release = json.loads((ROOT / "agents" / "samples" / "release_clean.json").read_text())
    async with (
        FakeAnthropic(script) as fake,
        anthropic.AsyncAnthropic(api_key="test-key", base_url=fake.base_url, max_retries=0) as c,
    ):
        guard = authz.tool_guard(authz.Authorizer("regulated"), agent="security-review")
        brain = ClaudeBrain(
            system_prompt="You review releases.",
            output_type=Verdict,
            client=c,
            tools=clinic.tools,
            agent="security-review",
            guard=guard,
        )
        with security.override(brain):
            async with MeshHarness(security, policies=policies) as mesh:
                event_id = await mesh.publish("release.proposed", release)
                decision = await mesh.decision(event_id)
                records = await audit.read(mesh.bus, decision.tenant)
    assert clinic.ran == []  # denied: never ran
    [vote] = decision.votes
    assert vote.outcome == "voted" and vote.brain.startswith("claude:"), vote
    [denied] = vote.tools_denied
    assert denied.startswith("draft_prescription: ") and "tools-no-urls" in denied, denied
    [record] = [r for _, r in records if r.ref == event_id and r.kind == "decision"]
    [audited] = audit.votes_of(record)
    assert audited["tools_denied"] == [denied]
