"""Budget reservations and tenant quotas, on the in-memory ledger (the KV path runs in
tests/integration/test_budgets_delegation.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mesh import envelope, subjects
from mesh.budget import Budget, BudgetLedger, CallScope, cost_micro_usd, today
from mesh.errors import BudgetExceededError
from mesh.settings import Settings

PROMPT = "x" * 200  # estimated at 200 // 2 + 16 = 116 input tokens


def ledger(tmp_path: Path, quotas: str = "") -> BudgetLedger:
    path = tmp_path / "models.toml"
    path.write_text("[prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 1.0\n" + quotas)
    return BudgetLedger(settings=Settings(models_file=path))


async def test_a_call_whose_worst_case_does_not_fit_is_refused(tmp_path: Path) -> None:
    led = ledger(tmp_path)
    scope = CallScope(tenant="t", event_id="e1", budget=Budget(tokens=116 + 100), ledger=led)
    async with led.model_call(scope, model="m", prompt_text=PROMPT, max_tokens=100) as r:
        r.settle("m", 50, 10)
    spent = await led.read(subjects.budget_event_key("t", "e1"))
    assert (spent.tokens, spent.tool_calls, spent.cost_micro_usd) == (60, 1, 60)
    with pytest.raises(BudgetExceededError, match="tokens") as e:
        async with led.model_call(scope, model="m", prompt_text=PROMPT, max_tokens=100):
            pytest.fail("the call must not be made")
    assert e.value.limit == "tokens"
    assert (await led.read(subjects.budget_event_key("t", "e1"))).tokens == 60


async def test_wall_clock_and_tool_calls(tmp_path: Path) -> None:
    led = ledger(tmp_path)
    late = CallScope(tenant="t", event_id="e2", budget=Budget(deadline=1.0), ledger=led)
    with pytest.raises(BudgetExceededError, match="wall-clock"):
        async with led.model_call(late, model="m", prompt_text="", max_tokens=1):
            pass
    calls = CallScope(tenant="t", event_id="e3", budget=Budget(tool_calls=1), ledger=led)
    await led.tool_call(calls)
    with pytest.raises(BudgetExceededError) as e:
        await led.tool_call(calls)
    assert e.value.limit == "tool_calls"


async def test_tenant_quotas_stop_one_tenant_only(tmp_path: Path) -> None:
    led = ledger(tmp_path, "[tenants.noisy]\nconcurrent_calls = 1\ncost_per_day_usd = 0.0005\n")
    noisy = CallScope(tenant="noisy", ledger=led)
    calm = CallScope(tenant="calm", ledger=led)
    async with led.model_call(noisy, model="m", prompt_text=PROMPT, max_tokens=100) as r:
        with pytest.raises(BudgetExceededError) as e:
            async with led.model_call(noisy, model="m", prompt_text=PROMPT, max_tokens=100):
                pytest.fail("over the tenant's concurrency")
        assert e.value.limit == "tenant_concurrent_calls"
        async with led.model_call(calm, model="m", prompt_text=PROMPT, max_tokens=100):
            pass  # another tenant is not held back
        r.settle("m", 300, 100)
    day = await led.read(subjects.budget_day_key("noisy", today()))
    assert day.cost_micro_usd == 400
    with pytest.raises(BudgetExceededError) as e:  # 400 + worst 216 > 500 micro-USD
        async with led.model_call(noisy, model="m", prompt_text=PROMPT, max_tokens=100):
            pytest.fail("over the tenant's daily cost")
    assert e.value.limit == "tenant_cost_per_day"


def test_the_budget_travels_from_event_to_metadata_and_back() -> None:
    e = envelope.new_event("release.proposed", {"id": "r"})
    e.time = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    e.budget, e.budgettokens, e.budgettoolcalls, e.budgetms = 2000, 3000, 4, 60_000
    body = envelope.decode(envelope.encode(e))
    b = Budget.of_event(body)
    assert b == Budget(2000, 3000, 4, e.time.timestamp() + 60)
    # Numbers cross protobuf's Struct as doubles.
    meta = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in b.metadata().items()}
    assert Budget.from_metadata(meta) == b
    assert Budget.from_metadata({}) == Budget() and Budget().metadata() == {}
    assert cost_micro_usd("claude-sonnet-5-5", 1_000_000, 0) == 3_000_000


def test_mesh_budgets_rows_of_the_coordinators_tenant_use() -> None:
    """`mesh budgets`' events_at_once rows from `mesh.status.coordinator` answers: one per
    coordinator and tenant; with --tenant, that tenant's and the `*` ones (a limit it may have)."""
    from mesh.cli.budgets import quota_rows

    answers = [
        {"name": "c1", "tenants": {"noisy": {"deciding": 2, "eventsAtOnce": 2}}},
        {
            "name": "c2",
            "tenants": {
                "*": {"deciding": 0, "eventsAtOnce": 5},
                "noisy": {"deciding": 1, "eventsAtOnce": 2},
                "quiet": {"deciding": 3, "eventsAtOnce": 5},
            },
        },
        {"name": "old", "inflight": 0},  # a coordinator from before tenant limits
    ]
    every = quota_rows(answers, None)
    assert [(r["scope"], r["tenant"], r["deciding"], r["eventsAtOnce"]) for r in every] == [
        ("c1", "noisy", 2, 2),
        ("c2", "*", 0, 5),
        ("c2", "noisy", 1, 2),
        ("c2", "quiet", 3, 5),
    ]
    assert {r["kind"] for r in every} == {"events-at-once"}
    assert [(r["scope"], r["tenant"]) for r in quota_rows(answers, "quiet")] == [
        ("c2", "*"),
        ("c2", "quiet"),
    ]
