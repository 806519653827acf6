"""Small builders shared by tests (not fixtures: plain functions, explicit at the call site)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from mesh import Agent, Verdict


class Proposal(msgspec.Struct, forbid_unknown_fields=False):
    id: str = ""
    vote: str = "approve"  # what the test agents answer
    delay_s: float = 0.0  # how long a test agent takes


def write_card(folder: Path, name: str, skill: str) -> Path:
    card = {
        "name": name,
        "description": f"test agent {name}",
        "version": "1.0.0",
        "capabilities": {"streaming": True},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [{"id": skill, "name": skill, "description": "test", "tags": ["test"]}],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


def voting_agent(folder: Path, name: str, skill: str, *, honour_delay: bool = False) -> Agent:
    """An agent whose vote is whatever the event data asks for (so tests choose outcomes)."""
    agent = Agent(name, card=write_card(folder, name, skill))

    async def review(p: Proposal) -> Verdict:
        if honour_delay and p.delay_s:
            await asyncio.sleep(p.delay_s)
        return Verdict(vote=p.vote, reasons=[f"{name} says {p.vote}"])  # type: ignore[arg-type]

    review.__annotations__ = {"p": Proposal, "return": Verdict}
    agent.rules(review)
    return agent


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, every: float = 0.05
) -> None:
    """Poll `check` until true; bounded in time (the bound is a failure, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def jsonrpc(method: str, params: dict[str, Any], rid: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
