"""Budgets that travel and delegation, on a real NATS server with agents and a coordinator in
this process (the calls still cross NATS: metadata and headers are what the agents read)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator import policy
from coordinator.service import Coordinator
from mesh import Agent, Verdict, budget, envelope, subjects
from mesh.a2a.client import (
    AgentClient,
    artifact_metadata,
    status_text,
    task_of,
    task_state,
    user_message,
    verdict_of,
)
from mesh.a2a.lean import LeanSend
from mesh.bus import Bus, tail
from mesh.delegate import delegate
from mesh.models import ChainBrain, ClaudeBrain
from mesh.records import Decision
from mesh.settings import Settings
from mesh.testing.fake_anthropic import FakeAnthropic
from tests.support.samples import Proposal, write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_an_event_whose_budget_runs_out_gets_budget_exceeded_votes(
    bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["bx-a", "bx-b", "bx-c"]
    async with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("MESH_MODEL", "anthropic:claude-sonnet-5-5,rules")
        agents = []
        for n in names:
            agent = Agent(n, card=write_card(tmp_path, n, f"skill-{n}"), prompt="Vote on it.")

            def review(p: Proposal) -> Verdict:
                return Verdict.reject("the rules must not run: the budget stops the chain")

            agent.rules(review)
            agents.append(agent)
        policies = policy.parse(
            {
                "vote.budgeted": {
                    "skills": [f"skill-{n}" for n in names],
                    "rule": {"kind": "majority"},
                    "agent_timeout_s": 5.0,
                    "deadline_s": 10.0,
                }
            }
        )
        data = {"id": "r1"}
        async with (
            agents[0].serve(bus, http=False, settings=settings) as a0,
            agents[1].serve(bus, http=False, settings=settings),
            agents[2].serve(bus, http=False, settings=settings),
        ):
            assert isinstance(a0.brain, ChainBrain)
            claude = a0.brain.brains[0]
            assert isinstance(claude, ClaudeBrain)
            # Exactly one call's worst case: the first call fits, and once it has spent
            # anything at all no second worst case can (the voters ask the same question).
            content = msgspec.json.encode(agents[0].decode_input(data)).decode()
            worst = (
                budget.estimate_input_tokens(claude.system_prompt + content + str(claude.tool))
                + claude.max_tokens
            )
            event = envelope.new_event("vote.budgeted", data)
            event.budgettokens = worst
            stop = asyncio.Event()
            task = asyncio.create_task(Coordinator(bus, policies).run(stop))
            try:
                await bus.publish_event(event)

                async def decision() -> Decision | None:
                    for _, _, body in await tail(bus, subjects.DECISIONS_STREAM, 20):
                        d = msgspec.json.decode(body, type=Decision)
                        if d.event_id == event.id:
                            return d
                    return None

                decided = await eventually(decision)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        assert len(fake.requests) == 1  # no model call past the budget was made
    brains = sorted(v.brain for v in decided.votes)
    assert brains == ["budget_exceeded", "budget_exceeded", "claude:claude-sonnet-5-5"]
    for v in decided.votes:
        if v.brain == "budget_exceeded":
            assert v.outcome == "budget_exceeded" and v.verdict is not None
            assert v.counted_as == "reject"  # the policy's default
            assert v.verdict.reasons[0].startswith("budget_exceeded: event ")
            assert "tokens" in v.verdict.reasons[0]
    # Counted as abstentions, one approval would have carried the majority: running out of
    # budget must not approve. The reason says what the policy made of them.
    assert decided.outcome == "rejected"
    assert decided.reason.count("budget_exceeded → counted as reject (policy)") == 2
    # What the event spent, settled to the real figure, is in the budgets bucket.
    ledger = budget.BudgetLedger(bus)
    spent = await ledger.read(subjects.budget_event_key("default", event.id))
    assert spent.tool_calls == 1  # the refused calls reserved nothing
    assert 0 < spent.tokens < worst


async def test_a_delegation_chain_carries_trace_and_budget_and_stops_at_the_hop_limit(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    seen: list[tuple[str, int, budget.Budget, str, str, str]] = []

    def make(name: str, other_skill: str) -> Agent:
        agent = Agent(name, card=write_card(tmp_path, name, f"skill-{name}"))

        async def handler(p: Proposal) -> Verdict:
            scope = budget.current.get()
            assert scope is not None
            seen.append(
                (
                    name,
                    scope.hops,
                    scope.budget,
                    scope.tenant,
                    scope.event_id,
                    scope.headers.get("traceparent", ""),
                )
            )
            if p.vote == "stop-here" and scope.hops >= 1:
                return Verdict.approve(f"{name} at hop {scope.hops}")
            return await delegate(other_skill, p)

        agent.rules(handler)
        return agent

    ping, pong = make("dl-ping", "skill-dl-pong"), make("dl-pong", "skill-dl-ping")
    sent_budget = budget.Budget(cost_micro_usd=5_000, tokens=9_000, deadline=4_000_000_000.0)
    metadata: dict[str, Any] = {
        "tenant": "acme",
        "eventId": "evt-deleg-1",
        "skill": "skill-dl-ping",
        **sent_budget.metadata(),
    }
    async with (
        ping.serve(bus, http=False, settings=settings),
        pong.serve(bus, http=False, settings=settings),
    ):
        client = AgentClient(bus)
        # One hop and back: ping asks pong, which answers; ping returns pong's verdict.
        answer = await client.send(
            "dl-ping",
            user_message(data={"id": "x", "vote": "stop-here"}, metadata=metadata),
            timeout=20,
            headers={"traceparent": TRACEPARENT},
        )
        task = task_of(answer)
        assert task_state(task) == "TASK_STATE_COMPLETED", status_text(task)
        assert [(n, h) for n, h, *_ in seen] == [("dl-ping", 0), ("dl-pong", 1)]
        for _, _, carried, tenant, event_id, traceparent in seen:
            assert carried == sent_budget
            assert (tenant, event_id) == ("acme", "evt-deleg-1")
            assert traceparent.split("-")[1] == TRACEPARENT.split("-")[1]  # one trace
        # A loop: each asks the other until the hop limit cuts it, with a clear error.
        seen.clear()
        answer = await client.send(
            "dl-ping",
            user_message(data={"id": "y", "vote": "loop"}, metadata=metadata),
            timeout=20,
        )
        task = task_of(answer)
    limit = settings.max_hops
    assert task_state(task) == "TASK_STATE_FAILED"
    assert f"would be hop {limit + 1}, past the limit of {limit}" in status_text(task)
    assert [h for _, h, *_ in seen] == list(range(limit + 1))
    # Each delegation was counted as a tool call against the event's budget.
    spent = await budget.BudgetLedger(bus).read(subjects.budget_event_key("acme", "evt-deleg-1"))
    assert spent.tool_calls == 1 + limit


async def test_a_call_the_tenants_quota_refuses_is_answered_on_the_lean_path(
    bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model agent whose process holds every model-call slot of a tenant answers that tenant's
    next call `budget_exceeded` on the lean path (mesh.a2a.lean: no SDK task machinery, one
    store write), with no model request; another tenant's call is still a model call on the
    SDK path, and once the slot is given back the tenant's calls are model calls again."""
    models = tmp_path / "models.toml"
    models.write_text("[tenants.noisy]\nconcurrent_calls = 1\n")
    configured = settings.model_copy(update={"models_file": models})
    release = asyncio.Event()

    async def respond(body: dict[str, Any]) -> dict[str, Any]:
        if "hold-me" in json.dumps(body["messages"]):
            await release.wait()
        return {"vote": "approve", "reasons": ["the model answered"]}

    lean_calls: list[str] = []
    real_send = LeanSend.send

    async def counting(self: LeanSend, params: Any, context: Any) -> dict[str, Any]:
        out = await real_send(self, params, context)
        lean_calls.append(out["task"]["artifacts"][0]["metadata"]["brain"])
        return out

    monkeypatch.setattr(LeanSend, "send", counting)
    async with FakeAnthropic(respond) as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("MESH_MODEL", "anthropic:claude-sonnet-5-5,rules")
        agent = Agent("lean-quota", card=write_card(tmp_path, "lean-quota", "s"), prompt="Vote.")

        def review(p: Proposal) -> Verdict:
            return Verdict.reject("the rules must not run: the quota ends the chain")

        agent.rules(review)
        async with agent.serve(bus, http=False, settings=configured):
            client = AgentClient(bus)

            def call(tenant: str, vote: str) -> Any:
                message = user_message(data={"id": vote, "vote": vote}, metadata={"tenant": tenant})
                return client.send("lean-quota", message, timeout=20)

            held = asyncio.create_task(call("noisy", "hold-me"))
            await eventually(lambda: len(fake.requests) == 1, "the first call reached the model")
            refused = task_of(await call("noisy", "next"))
            other = task_of(await call("quiet", "other"))
            assert lean_calls == ["budget_exceeded"]  # only the refusal took the lean path
            release.set()
            first = task_of(await held)
            again = task_of(await call("noisy", "again"))
    for task in (refused, other, first, again):
        assert task_state(task) == "TASK_STATE_COMPLETED", status_text(task)
    assert verdict_of(refused).reasons[0].startswith("budget_exceeded: tenant noisy")
    assert artifact_metadata(refused)["brain"] == "budget_exceeded"
    assert [artifact_metadata(t)["brain"] for t in (first, other, again)] == [
        "claude:claude-sonnet-5-5"
    ] * 3
    assert len(fake.requests) == 3  # the held call, the other tenant's, and the one after
    assert lean_calls == ["budget_exceeded"]
