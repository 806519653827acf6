"""What an outside A2A client does with a mesh agent, through a2a-sdk's own client over HTTP:
stream a task from a real reviewer, cancel a running task, list tasks."""

import asyncio
import json
from pathlib import Path

import pytest
from a2a.client import ClientConfig, create_client
from a2a.helpers import new_data_part
from a2a.types import (
    CancelTaskRequest,
    ListTasksRequest,
    Message,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    TaskState,
)
from google.protobuf.json_format import MessageToDict

from agents.security_review.agent import agent as security_review
from mesh import Agent, Verdict
from mesh.a2a.client import verdict_of
from mesh.a2a.transport import bearer_interceptor
from mesh.bus import Bus
from mesh.settings import Settings
from tests.support.samples import Proposal, write_card

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "agents" / "samples"


def _token(bus: Bus) -> str:
    """The bearer token this process calls agents with (the identity its Bus runs as)."""
    assert bus.identity is not None and bus.identity.token
    return bus.identity.token


def _request(data: dict[str, object], message_id: str, **config: object) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=message_id, parts=[new_data_part(data)]),
        configuration=SendMessageConfiguration(**config) if config else None,
    )


async def test_stream_from_a_reviewer_then_list_its_tasks(bus: Bus, settings: Settings) -> None:
    release = json.loads((SAMPLES / "release_secret.json").read_text())
    async with security_review.serve(bus, settings=settings) as running:
        assert running.http_url is not None
        client = await create_client(
            running.http_url,
            client_config=ClientConfig(streaming=True),
            interceptors=[bearer_interceptor(_token(bus))],
        )
        try:
            events = [ev async for ev in client.send_message(_request(release, "stream-1"))]
            assert len(events) >= 2  # a stream, not one answer: the task, then its updates
            states = []
            for ev in events:
                doc = MessageToDict(ev)
                if "task" in doc:
                    states.append(doc["task"]["status"]["state"])
                elif "statusUpdate" in doc:
                    states.append(doc["statusUpdate"]["status"]["state"])
            assert states[-1] == "TASK_STATE_COMPLETED"
            task_id = next(
                MessageToDict(ev)["task"]["id"] for ev in events if "task" in MessageToDict(ev)
            )
            listed = await client.list_tasks(ListTasksRequest(include_artifacts=True))
        finally:
            await client.close()
    ids = [t.id for t in listed.tasks]
    assert task_id in ids
    done = next(t for t in listed.tasks if t.id == task_id)
    assert verdict_of(done).vote == "reject"  # the AWS key in the diff


async def test_cancel_a_running_task(bus: Bus, settings: Settings, tmp_path: Path) -> None:
    started = asyncio.Event()
    slow = Agent("slow-reviewer", card=write_card(tmp_path, "slow-reviewer", "slow"))

    async def review(p: Proposal) -> Verdict:
        started.set()
        await asyncio.sleep(3600)  # cancelled by the test, never finishes on its own
        return Verdict.approve("too late")

    slow.rules(review)
    async with slow.serve(bus, settings=settings) as running:
        assert running.http_url is not None
        client = await create_client(
            running.http_url,
            client_config=ClientConfig(streaming=False),
            interceptors=[bearer_interceptor(_token(bus))],
        )
        try:
            first = [
                ev
                async for ev in client.send_message(
                    _request({}, "cancel-me", return_immediately=True)
                )
            ]
            task_id = MessageToDict(first[-1])["task"]["id"]
            await asyncio.wait_for(started.wait(), 10)
            cancelled = await client.cancel_task(CancelTaskRequest(id=task_id))
        finally:
            await client.close()
    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
