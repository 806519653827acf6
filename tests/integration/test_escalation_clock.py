"""Escalation at real, short times on a real nats-server (the unit tests drive it with a fake
clock): the first role is asked, the next one after its wait, then the final silence decides,
each act in the audit trail no earlier than the policy says, and the decision published once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from coordinator import policy
from coordinator.service import Coordinator
from mesh import approvals, envelope, subjects
from mesh.audit import read as read_audit
from mesh.bus import Bus, read_stream
from mesh.records import decision_decoder
from mesh.settings import Settings
from tests.support.samples import voting_agent
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CSO, HOS = "clinical-safety-officer", "head-of-safety"
AFTER_S, WAIT_S = 1.0, 3.0


async def test_escalation_then_silence_at_the_configured_times(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    tenant = f"esc{time.time_ns() % 1_000_000}"
    policies = policy.parse(
        {
            "med.escalate": {
                "skills": ["esc-check"],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 5.0,
                "deadline_s": 10.0,
                "decision_type": "med.escalate.decided",
                "humans": [
                    {
                        "role": CSO,
                        "wait_s": WAIT_S,
                        "escalate": [{"role": HOS, "after_s": AFTER_S}],
                    }
                ],
            }
        }
    )
    agent = voting_agent(tmp_path, "esc-voter", "esc-check")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(agent.serve(bus, http=False, settings=settings))
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policies).run(stop))
        try:
            event = envelope.new_event("med.escalate", {"vote": "approve"}, tenant=tenant)
            await bus.publish_event(event)

            async def decided() -> list[object]:
                filt = f"{subjects.DECISIONS_ROOT}.{tenant}.>"
                found = await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=filt)
                return [decision_decoder.decode(m.data) for m in found]

            [decision] = await eventually(decided, "the final silence's decision", timeout=60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)

    # The requests as published: round 0 to the first role, round 1 adds the next, then closed.
    filt = subjects.approvals_filter(tenant, "req")
    published = [
        approvals.request_decoder.decode(m.data)
        for m in await read_stream(bus, subjects.APPROVALS_STREAM, filter_subject=filt)
    ]
    assert [(r.round, r.roles, r.status) for r in published] == [
        (0, [CSO], "open"),
        (1, [CSO, HOS], "open"),
        (1, [CSO, HOS], "closed"),
    ]
    asked = published[0]
    assert asked.next_escalation_at == pytest.approx(asked.asked_at + AFTER_S)
    assert asked.expires_at == pytest.approx(asked.asked_at + WAIT_S)

    # Each act audited, in order, none before its time (the wall-clock times of the ledger).
    acts = [
        (r.data["act"], r.at)
        for _, r in await read_audit(bus, tenant)
        if r.kind == "approval" and r.ref == event.id
    ]
    assert [a for a, _ in acts] == ["asked", "escalated", "silence"]
    at = dict(acts)
    assert at["escalated"] >= asked.asked_at + AFTER_S
    assert at["silence"] >= asked.asked_at + WAIT_S

    assert decision.outcome == "rejected"  # type: ignore[attr-defined]
    assert f"asked: {CSO}, {HOS}" in decision.reason  # type: ignore[attr-defined]
