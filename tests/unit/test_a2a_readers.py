"""Building messages and reading tasks with the typed client's helpers (mesh.a2a.client), and
the per-call options of the NATS transport (mesh.a2a.transport) — no server needed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.helpers import new_data_part
from a2a.types import (
    AgentCard,
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import TaskNotFoundError
from google.protobuf.json_format import MessageToDict

from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.a2a.client import (
    agent_error,
    artifact_metadata,
    status_text,
    status_time,
    task_of,
    task_state,
    user_message,
    verdict_of,
)
from mesh.a2a.transport import STATE_MAX_TIMEOUT, STATE_SUBJECT, call_context, producer
from mesh.errors import AgentCallError, AgentTimeoutError
from mesh.verdict import Verdict


def _task(state: int = TaskState.TASK_STATE_COMPLETED, **fields: Any) -> Task:
    return Task(id="t1", context_id="c1", status=TaskStatus(state=state), **fields)


def _voted(vote: str = "reject") -> Task:
    artifact = Artifact(artifact_id="a1", name="verdict", parts=[new_data_part({"vote": vote})])
    artifact.metadata.update({"brain": "rules", "inputTokens": 0})
    task = _task(artifacts=[artifact])
    task.status.timestamp.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    return task


def test_user_message_carries_data_text_and_metadata() -> None:
    m = user_message(
        data={"n": 3, "ok": True},
        text="hello",
        message_id="m-1",
        metadata={"tenant": "acme", "eventId": "e1"},
        task_id="t9",
    )
    assert isinstance(m, Message)
    assert (m.role, m.message_id, m.task_id) == (Role.ROLE_USER, "m-1", "t9")
    doc = MessageToDict(m)
    assert doc["parts"] == [
        {"data": {"n": 3.0, "ok": True}, "mediaType": "application/json"},
        {"text": "hello"},
    ]
    assert doc["metadata"] == {"tenant": "acme", "eventId": "e1"}
    assert user_message(text="x").message_id != user_message(text="x").message_id


def test_user_message_takes_msgspec_structs() -> None:
    m = user_message(data=Verdict.approve("fine"))
    assert MessageToDict(m)["parts"][0]["data"] == {
        "vote": "approve",
        "reasons": ["fine"],
        "confidence": 1.0,
    }


def test_readers_take_a_task_or_its_json() -> None:
    task = _voted()
    for form in (task, MessageToDict(task)):
        assert task_state(form) == "TASK_STATE_COMPLETED"
        assert verdict_of(form) == Verdict.reject()
        assert artifact_metadata(form) == {"brain": "rules", "inputTokens": 0.0}
        assert status_time(form) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


def test_a_task_that_did_not_complete_has_no_verdict() -> None:
    rejected = _task(TaskState.TASK_STATE_REJECTED)
    rejected.status.message.CopyFrom(
        Message(role=Role.ROLE_AGENT, message_id="s", parts=[Part(text="bad"), Part(text="input")])
    )
    assert status_text(rejected) == "bad input"
    with pytest.raises(ValueError, match="TASK_STATE_REJECTED: bad input"):
        verdict_of(rejected)
    with pytest.raises(ValueError, match="no verdict"):
        verdict_of(_task())
    assert artifact_metadata(_task()) == {}
    assert status_time(_task()) is None


def test_task_of() -> None:
    task = _voted()
    assert task_of(task) is task
    with pytest.raises(ValueError, match="message, not a task"):
        task_of(Message(message_id="m"))


def test_call_context_holds_the_mesh_options() -> None:
    context = call_context(
        timeout=2.0, max_timeout=9.0, subject="mesh.a2a.x.i1", headers={"traceparent": "t"}
    )
    assert context.timeout == 2.0
    assert context.state == {STATE_SUBJECT: "mesh.a2a.x.i1", STATE_MAX_TIMEOUT: 9.0}
    assert context.service_parameters == {"traceparent": "t"}
    assert call_context().state == {}


def test_nats_interface_urls() -> None:
    url = subjects.a2a_nats_url("mesh.a2a.agent")
    assert url == "nats:mesh.a2a.agent"
    assert subjects.a2a_subject_of_url(url) == "mesh.a2a.agent"
    assert subjects.a2a_subject_of_url("http://host/") is None
    assert subjects.a2a_subject_of_url("nats:") is None


def test_the_producer_refuses_an_interface_that_is_not_nats() -> None:
    produce = producer(object())  # type: ignore[arg-type]  # never used: the url is refused
    with pytest.raises(ValueError, match="not a NATS interface"):
        produce(AgentCard(name="a"), "http://host/", None)  # type: ignore[arg-type]


def test_request_bodies_take_typed_messages() -> None:
    body = jsonrpc.request_body("SendMessage", {"message": user_message(text="hi")}, 1)
    assert b'"role":"ROLE_USER"' in body and b'"text":"hi"' in body
    with pytest.raises(TypeError):
        jsonrpc.request_body("X", {"bad": object()}, 1)


def test_sdk_errors_map_onto_mesh_errors() -> None:
    timeout = agent_error("a", A2AClientTimeoutError("slow"), timeout=2.5)
    assert isinstance(timeout, AgentTimeoutError)
    assert (timeout.timeout_s, timeout.retryable) == (2.5, True)
    missing = agent_error("a", TaskNotFoundError())
    assert (type(missing), missing.code, missing.retryable) == (AgentCallError, -32001, False)
    network = agent_error("a", A2AClientError("connection refused"))
    assert (network.code, network.retryable) == (None, True)
