"""`mesh call` exits 1 when the task it gets back failed, and 0 when it completed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from mesh import Agent, Verdict
from mesh.bus import Bus
from mesh.errors import ModelCallError
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.samples import Proposal, write_card

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def mesh_call(server: EmbeddedServer, agent: str, body: str) -> tuple[int, str, str]:
    env = {**os.environ, "MESH_NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mesh.cli import main; main()",
        "call",
        agent,
        body,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_exit_code_follows_the_task_state(
    nats_server: EmbeddedServer, bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    agent = Agent("call-exit", card=write_card(tmp_path, "call-exit", "skill-call-exit"))

    def review(p: Proposal) -> Verdict:
        if p.vote == "fail":
            raise ModelCallError("every brain of the chain failed: scripted", retryable=True)
        return Verdict.approve("fine")

    agent.rules(review)
    async with agent.serve(bus, http=False, settings=settings):
        code, out, err = await mesh_call(nats_server, "call-exit", '{"vote": "approve"}')
        assert code == 0, err
        assert json.loads(out)["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        code, out, err = await mesh_call(nats_server, "call-exit", '{"vote": "fail"}')
    assert code == 1, (out, err)
    assert json.loads(out)["task"]["status"]["state"] == "TASK_STATE_FAILED"
    assert "the task ended TASK_STATE_FAILED" in err


async def test_mesh_budgets_shows_use_and_limits(
    nats_server: EmbeddedServer, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh import budget

    models = tmp_path / "models.toml"
    models.write_text("[tenants.acme]\ncost_per_day_usd = 2.5\nconcurrent_calls = 3\n")
    monkeypatch.setenv("MESH_MODELS_FILE", str(models))
    ledger = budget.BudgetLedger(bus, settings=Settings(models_file=models))
    scope = budget.CallScope(
        tenant="acme", event_id="e-1", budget=budget.Budget(tokens=10_000), ledger=ledger
    )
    async with ledger.model_call(
        scope, model="claude-haiku-4-5", prompt_text="x", max_tokens=10
    ) as r:
        r.settle("claude-haiku-4-5", 1000, 200)  # $1/$5 per MTok: 1000 + 1000 micro-USD
    from mesh import subjects

    kv = await bus.kv(subjects.BUDGETS_BUCKET)  # a model call in flight holds a slot: no spend
    await kv.put(subjects.budget_slot_key("acme", 0), b'{"until": 1e12}')
    env = {
        **os.environ,
        "MESH_NATS_URL": nats_server.url,
        "MESH_MODELS_FILE": str(models),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mesh.cli import main; main()",
        "budgets",
        "--events",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert len(json.loads(out)) == 2
    rows = {r["kind"]: r for r in json.loads(out)}
    assert rows["tenant-day"]["tenant"] == "acme"
    assert rows["tenant-day"]["costUsd"] == 0.002
    assert rows["tenant-day"]["costPerDayUsd"] == 2.5
    assert rows["tenant-day"]["concurrentCalls"] == 3
    assert rows["event"]["scope"] == "e-1" and rows["event"]["tokens"] == 1200
