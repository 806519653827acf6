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
