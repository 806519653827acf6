"""`mesh eval` on the shipped reviewers dataset against the real reviewer agents (real
nats-server, agents served by their runtime in this process, the command as a user runs it):
the table, the JSON shape, and the exit code when `--min-agreement` is missed. A forged answer
is never agreement; a policy is evaluated through the decision core's count."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from agents.compliance_review.agent import agent as compliance
from agents.quality_review.agent import agent as quality
from agents.security_review.agent import agent as security
from coordinator import evaluate as ev
from coordinator.policy import DEFAULT_FILE, load
from mesh.testing import MeshHarness

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "agents" / "datasets" / "reviewers.jsonl"
REVIEWERS = (security, compliance, quality)


async def mesh_cli(url: str, *args: str) -> tuple[int, str, str]:
    """`mesh …` in its own process (the agents keep serving in this one), bounded."""
    env = {**os.environ, "MESH_NATS_URL": url, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mesh.cli import main; main()",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_mesh_eval_on_the_shipped_dataset(tmp_path: Path) -> None:
    async with MeshHarness(*REVIEWERS) as mesh:
        code, out, err = await mesh_cli(
            mesh.url, "eval", str(DATASET), "--agent", "security-review"
        )
        assert code == 0, err
        assert "security-review: 30 cases, 30 labelled, agreement" in out
        assert "confusion" in out and "expected \\ got" in out
        assert "latency ms p50" in out

        code, out, err = await mesh_cli(
            mesh.url, "eval", str(DATASET), "--agent", "quality-review", "--json"
        )
        assert code == 0, err
        doc: dict[str, Any] = json.loads(out)
        assert doc["target"] == "quality-review"
        assert (doc["cases"], doc["labelled"]) == (30, 30)
        assert set(doc) >= {"agreement", "confusion", "latency_ms", "usage", "disagreements"}
        assert set(doc["confusion"]) <= {"approve", "reject"}
        assert sum(n for row in doc["confusion"].values() for n in row.values()) == 30
        agreed = sum(doc["confusion"].get(k, {}).get(k, 0) for k in ("approve", "reject"))
        assert doc["agreement"] == pytest.approx(agreed / 30)
        assert len(doc["disagreements"]) == 30 - agreed
        # The offline rules brain uses no model: zero tokens, as the answers say.
        assert doc["usage"]["input_tokens"] == 0
        assert set(doc["latency_ms"]) == {"p50", "p95", "max"}

        # A threshold at the measured agreement passes; one above it fails with exit code 1.
        measured = doc["agreement"]
        code, _, err = await mesh_cli(
            mesh.url, "eval", str(DATASET), "--agent", "quality-review",
            "--min-agreement", str(measured),
        )  # fmt: skip
        assert code == 0, err
        wrong = tmp_path / "wrong.jsonl"
        wrong.write_text(
            "".join(
                json.dumps({"id": c.id, "data": c.data, "expected": "abstain"}) + "\n"
                for c in ev.load(DATASET)[:3]
            )
        )
        code, out, err = await mesh_cli(
            mesh.url, "eval", str(wrong), "--agent", "quality-review", "--min-agreement", "0.5"
        )
        assert code == 1
        assert "agreement 0.0% is below --min-agreement 50.0%" in err


async def test_a_baseline_and_a_policy_on_the_shipped_dataset() -> None:
    cases = ev.load(DATASET)
    policy = load(DEFAULT_FILE).get("release.proposed")
    assert policy is not None
    async with MeshHarness(*REVIEWERS) as mesh, ev.Evaluator(mesh.bus) as runner:
        await _eventually_serving(runner)
        sec = await runner.agent("security-review", cases)
        # Another agent judged by security's labels: the comparison shows where they differ.
        other = await runner.agent("compliance-review", cases, labels="security-review")
        compared = ev.side_by_side(sec, other)
        decided = await runner.policy("release.proposed", policy, cases)
    assert compared["cases"] == 30
    assert compared["differences"]  # they check different things
    assert compared["agreement_between"] == pytest.approx((30 - len(compared["differences"])) / 30)
    assert all(d["security-review"] != d["compliance-review"] for d in compared["differences"])
    assert {r.got for r in decided.results} <= {"approved", "rejected"}
    assert decided.agreement is not None
    # The decision core's count: unanimous, so it approves only where every reviewer did.
    votes_of = {r.case: r.got for r in sec.results}
    for r in decided.results:
        if votes_of[r.case] == "reject":
            assert r.got == "rejected", r


async def test_a_forged_answer_is_never_agreement() -> None:
    """An answer whose signature does not verify is `invalid`, whatever vote it claims."""
    cases = ev.load(DATASET)[:4]
    async with MeshHarness(security) as mesh, ev.Evaluator(mesh.bus) as runner:
        await _eventually_serving(runner)
        original = runner.view.binding
        runner.view.binding = lambda agent, instance: None  # type: ignore[method-assign]
        try:
            report = await runner.agent("security-review", cases)
        finally:
            runner.view.binding = original  # type: ignore[method-assign]
    assert {r.got for r in report.results} == {"invalid"}
    assert report.agreement == 0.0


async def _eventually_serving(runner: ev.Evaluator) -> None:
    from tests.support.waits import eventually

    async def ready() -> bool:
        try:
            await runner.skill_of("security-review")
        except Exception:
            return False
        return bool(runner.view.agents_with_skill("release-security-review"))

    await eventually(ready, "security-review in the registry view")


async def test_past_decisions_exported_are_a_dataset(tmp_path: Path) -> None:
    """Decisions the coordinator made, with their events, become cases labelled with their
    outcome and each voter's vote; re-running them against the same agents agrees."""
    cases = {c.id: c for c in ev.load(DATASET)}
    async with MeshHarness(*REVIEWERS, policies=DEFAULT_FILE) as mesh:
        ids = {
            name: await mesh.publish("release.proposed", cases[name].data, tenant="acme")
            for name in ("clean", "secret")
        }
        for event_id in ids.values():
            await mesh.decision(event_id)
        lines = await ev.export_decisions(mesh.bus, tenant="acme")
        path = tmp_path / "past.jsonl"
        path.write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))
        past = {c.id: c for c in ev.load(path)}
        assert past[ids["clean"]].expected[ev.DECISION] == "approved"
        assert past[ids["secret"]].expected[ev.DECISION] == "rejected"
        assert past[ids["secret"]].expected["security-review"] == "reject"
        assert past[ids["secret"]].data == cases["secret"].data
        async with ev.Evaluator(mesh.bus) as runner:
            await _eventually_serving(runner)
            report = await runner.agent("security-review", list(past.values()))
    assert report.agreement == 1.0
