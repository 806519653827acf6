"""The client's fast path (mesh.a2a.wire, `AgentClient.send_lean`) against the typed path
(`AgentClient.send`): the same request on the wire, and the same reading of every reply.

No server: a fake NATS connection records what each path sends and hands both the same reply.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part
from a2a.types import Artifact, Message, Part, Role, Task, TaskState, TaskStatus
from google.protobuf.json_format import MessageToDict

from coordinator import dispatch
from coordinator.decide import Ask
from coordinator.policy import Policy, QuorumRule
from mesh import envelope, votes
from mesh.a2a.client import (
    AgentClient,
    artifact_metadata,
    status_text,
    status_time,
    task_of,
    task_state,
    user_message,
    verdict_of,
)
from mesh.a2a.wire import OutgoingMessage, TaskView, data_part, read_send_reply, struct_value
from mesh.errors import AgentCallError


class FakeNats:
    """Records each request; answers each with `reply`."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def request(
        self, subject: str, body: bytes, *, timeout: float, headers: dict[str, str]
    ) -> Any:
        self.sent.append((subject, body, headers))
        return SimpleNamespace(data=self.reply, headers=None)


def _json(body: bytes) -> str:
    """A JSON-RPC request as comparable text: the id dropped (a counter), keys sorted, and
    numbers as they parse (so 1 and 1.0 differ)."""
    doc = json.loads(body)
    doc.pop("id")
    return json.dumps(doc, sort_keys=True)


DATA: list[Any] = [
    {"id": "r1", "n": 3, "ok": True, "none": None, "ratio": 0.25, "tags": ["a", "b"]},
    {"title": "Grüße — 日本語 ✓ \u2028", "emoji": "🚀", "nested": {"deep": [[1, 2.5], {"x": -0}]}},
    {"big": 2**60 + 1, "neg": -(2**53) - 3, "exact": 2**53, "f": 1e300, "tiny": 5e-324},
    [1, "two", {"three": 3}],
    "just a string",
    12,
    {},
]


@pytest.mark.parametrize("data", DATA)
async def test_the_request_equals_the_sdk_built_one(data: Any) -> None:
    metadata = {"eventId": "e1", "tenant": "acmé", "skill": "s", "maxUsd": 5, "calls": 2**60}
    typed = user_message(data=data, message_id="m-1", metadata=metadata)
    lean = OutgoingMessage(
        message_id="m-1",
        role="ROLE_USER",
        parts=[data_part(data)],
        metadata=struct_value(metadata),
    )
    nc = FakeNats(_reply(_voted()))
    client = AgentClient(nc, token="tok")  # type: ignore[arg-type]
    await client.send("a", typed, timeout=1, headers={"traceparent": "00-x"})
    await client.send_lean("a", lean, timeout=1, headers={"traceparent": "00-x"})
    await client.send_lean("a", typed, timeout=1, headers={"traceparent": "00-x"})
    (s1, b1, h1), (s2, b2, h2), (s3, b3, h3) = nc.sent
    assert _json(b1) == _json(b2) == _json(b3)
    assert s1 == s2 == s3 == "mesh.a2a.a"
    assert h1 == h2 == h3
    assert h1["Authorization"] == "Bearer tok"


def _ask(data: Any) -> Ask:
    event = envelope.new_event("release.proposed", data, tenant="acme", event_id="e-1")
    policy = Policy(
        skills=["security"],
        rule=QuorumRule(kind="majority"),
        agent_timeout_s=1.0,
        deadline_s=5.0,
    )
    return Ask(skill="security", agent="sec", event=event, policy=policy, deadline=1e12)


@pytest.mark.parametrize("data", DATA)
def test_the_coordinators_question_equals_the_one_it_built_with_protobuf(data: Any) -> None:
    req = _ask(data)
    lean = dispatch.message(req)
    assert isinstance(lean, OutgoingMessage)
    e = req.event
    typed = user_message(
        message_id=lean.message_id,
        metadata={
            "eventId": e.id,
            "eventType": e.type,
            "tenant": e.tenant,
            "skill": req.skill,
            **dispatch.Budget.of_event(e).metadata(),
        },
    )
    typed.parts.append(user_message(data=e.data).parts[0])
    as_json = dispatch.jsonrpc.request_body
    assert _json(as_json("SendMessage", {"message": lean}, 1)) == _json(
        as_json("SendMessage", {"message": MessageToDict(typed)}, 1)
    )


def test_data_no_protobuf_value_can_carry_takes_the_protobuf_message() -> None:
    msg = dispatch.message(_ask({"x": float("nan")}))
    assert isinstance(msg, Message)  # and the call fails where it always did (printing it)
    with pytest.raises(ValueError):
        data_part({"x": float("inf")})
    with pytest.raises(ValueError):
        struct_value({1: "non-string key"})


# -- replies ------------------------------------------------------------------------------------
def _voted(
    data: Any = None,
    *,
    state: int = TaskState.TASK_STATE_COMPLETED,
    meta: dict[str, Any] | None = None,
    reason: str | None = None,
    artifacts: list[Artifact] | None = None,
    stamped: bool = True,
) -> Task:
    if artifacts is None:
        part = new_data_part({"vote": "approve", "reasons": ["ok"]} if data is None else data)
        artifact = Artifact(artifact_id="a1", name="verdict", parts=[part])
        artifact.metadata.update({"brain": "rules", "inputTokens": 7} if meta is None else meta)
        artifacts = [artifact]
    status = TaskStatus(state=state)
    if reason is not None:
        status.message.CopyFrom(
            Message(
                role=Role.ROLE_AGENT,
                message_id="s1",
                parts=[Part(text=reason), Part(text=""), new_data_part({"n": 1})],
            )
        )
    if stamped:
        status.timestamp.FromDatetime(datetime(2026, 11, 30, 21, 0, 1, 123456, tzinfo=UTC))
    history = [user_message(data={"payload": "x" * 100, "n": 2**60}, message_id="m-1")]
    return Task(id="t1", context_id="c1", status=status, artifacts=artifacts, history=history)


def _reply(task: Task) -> bytes:
    return msgspec.json.encode({"jsonrpc": "2.0", "id": 1, "result": {"task": MessageToDict(task)}})


SIGNATURE = {"meshSignature": {"instance": "i-1", "at": 1764536400.123, "signature": "c2ln"}}
TWO = [
    Artifact(artifact_id="a0", parts=[Part(text="no data here")], metadata={"brain": "first"}),
    Artifact(
        artifact_id="a1",
        parts=[new_data_part({"vote": "reject", "confidence": 1}), new_data_part([1])],
        metadata={"brain": "second", **SIGNATURE},
    ),
]
REPLIES: dict[str, bytes] = {
    "completed": _reply(_voted()),
    "signed": _reply(_voted(meta={"brain": "rules", **SIGNATURE})),
    "malformed signature": _reply(_voted(meta={"meshSignature": {"instance": 3}})),
    "unicode": _reply(_voted({"vote": "reject", "reasons": ["Grüße 🚀 日本"]}, reason="ü")),
    "big ints": _reply(_voted({"vote": "approve", "n": 2**60 + 1, "m": -(2**70)})),
    "big ints in metadata": _reply(_voted(meta={"brain": "r", "tokens": 2**62 + 5})),
    "not a verdict": _reply(_voted({"vote": "maybe"})),
    "data is a list": _reply(_voted([1, 2, 3])),
    "data is null": _reply(
        _voted(artifacts=[Artifact(artifact_id="a", parts=[Part(data=None)])])  # type: ignore[arg-type]
    ),
    "failed": _reply(_voted(state=TaskState.TASK_STATE_FAILED, reason="brain down")),
    "rejected": _reply(_voted(state=TaskState.TASK_STATE_REJECTED, reason="no such skill")),
    "working": _reply(_voted(state=TaskState.TASK_STATE_WORKING, artifacts=[])),
    "no artifacts": _reply(_voted(artifacts=[])),
    "no timestamp": _reply(_voted(stamped=False)),
    "two artifacts": _reply(_voted(artifacts=TWO)),
    "a message": msgspec.json.encode(
        {"jsonrpc": "2.0", "id": 1, "result": {"message": MessageToDict(user_message(text="hi"))}}
    ),
    "error": b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"Task not found"}}',
    "internal error": b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"x"}}',
    "busy": b'{"jsonrpc":"2.0","id":1,"error":{"code":-31429,"message":"busy",'
    b'"data":{"retryAfterMs":20}}}',
    "neither": b'{"jsonrpc":"2.0","id":1,"result":null}',
    "not json": b"<html>",
    "float id": b'{"jsonrpc":"2.0","id":1.5,"result":{"task":{"id":"t"}}}',
    "result a list": b'{"jsonrpc":"2.0","id":1,"result":[1]}',
    "task null": b'{"jsonrpc":"2.0","id":1,"result":{"task":null}}',
    "bare task": b'{"jsonrpc":"2.0","id":1,"result":{"task":{}}}',
    "state by number": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":{"state":3}}}}',
    "unknown state": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":{"state":"NOPE"}}}}',
    "bad timestamp": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":'
    b'{"state":"TASK_STATE_COMPLETED","timestamp":"yesterday"}}}}',
    "two contents": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":'
    b'{"state":"TASK_STATE_COMPLETED"},"artifacts":[{"parts":[{"text":"a","data":{}}]}]}}}',
    "text null": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":{"state":'
    b'"TASK_STATE_FAILED","message":{"parts":[{"text":null},{"text":"why"}]}}}}}',
    "wrong type": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"id":5}}}',
    "huge number": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":{"state":'
    b'"TASK_STATE_COMPLETED"},"artifacts":[{"parts":[{"data":{"vote":"approve","n":1e400}}]}]}}}',
    "huger int": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"status":{"state":'
    b'"TASK_STATE_COMPLETED"},"artifacts":[{"parts":[{"data":{"n":' + b"9" * 400 + b"}}]}]}}}",
    "null fields": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"id":null,"status":{"state":'
    b'"TASK_STATE_COMPLETED","message":null,"timestamp":null},"artifacts":[{"parts":[{"data":'
    b'{"vote":"approve"}}],"metadata":null}]}}}',
    "unknown fields": b'{"jsonrpc":"2.0","id":1,"result":{"task":{"kind":"task","status":{"state":'
    b'"TASK_STATE_COMPLETED","x":1},"artifacts":[{"parts":[{"data":{"vote":"approve"},'
    b'"mediaType":"application/json","filename":"v.json"}],"extra":[1]}]}}}',
}


def _readout(result: Any) -> Any:
    """Everything a caller of the readers (and the vote check) can learn from a result."""
    if isinstance(result, Message):
        return ("message", MessageToDict(result))
    out: dict[str, Any] = {}
    readers = {
        "task_of": task_of,
        "state": task_state,
        "status_text": status_text,
        "verdict": verdict_of,
        "metadata": artifact_metadata,
        "time": status_time,
        "signed": votes.signed_output,
    }
    for name, read in readers.items():
        try:
            value = read(result)
        except (ValueError, msgspec.ValidationError) as e:
            value = ("raises", type(e).__name__, str(e))
        if name == "task_of":
            value = "task"
        out[name] = json.dumps(msgspec.to_builtins(value), sort_keys=True)
    return out


async def _outcome(nc: FakeNats, send: Any) -> Any:
    try:
        return _readout(await send("a", user_message(text="q"), timeout=1))
    except AgentCallError as e:
        return ("error", type(e).__name__, str(e), e.code, e.retryable)


@pytest.mark.parametrize("name", REPLIES)
async def test_the_fast_reading_equals_the_typed_one(name: str) -> None:
    nc = FakeNats(REPLIES[name])
    client = AgentClient(nc, token="tok")  # type: ignore[arg-type]
    typed = await _outcome(nc, client.send)
    lean = await _outcome(nc, client.send_lean)
    assert lean == typed


@pytest.mark.parametrize("name", REPLIES)
async def test_the_view_builds_the_same_task_when_asked(name: str) -> None:
    nc = FakeNats(REPLIES[name])
    client = AgentClient(nc, token="tok")  # type: ignore[arg-type]
    try:
        typed = await client.send("a", user_message(text="q"), timeout=1)
    except AgentCallError:
        return
    lean = await client.send_lean("a", user_message(text="q"), timeout=1)
    if isinstance(lean, TaskView):
        assert lean.task() == typed
        assert lean.task() is lean.task()  # parsed once


def test_the_fast_path_reads_what_it_models_and_passes_on_the_rest() -> None:
    read = {name: read_send_reply(body) for name, body in REPLIES.items()}
    for name in ("completed", "signed", "unicode", "big ints", "failed", "two artifacts"):
        assert isinstance(read[name], TaskView), name
    for name in ("a message", "error", "busy", "state by number", "two contents", "huge number"):
        assert read[name] is None, name
    view = read["big ints"]
    assert isinstance(view, TaskView)
    assert view.data == {"vote": "approve", "n": float(2**60 + 1), "m": float(-(2**70))}
    assert type(view.first_metadata["inputTokens"]) is float  # as a protobuf Struct has it
    assert "TASK_STATE_COMPLETED" in repr(view)


# -- the agent's side: the lean reply's history rendered from the request's JSON ----------------
HISTORY_PARAMS: list[Any] = [
    {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}},
    {
        "message": {
            "role": "ROLE_USER",
            "messageId": "m-2",
            "contextId": "c",
            "metadata": {"n": 1, "big": 2**60 + 1, "s": "ü"},
            "parts": [
                {"mediaType": "application/json", "data": {"x": [1, 2.5, None, {"y": True}]}},
                {"text": "日本 🚀", "metadata": {}, "filename": ""},
                {"data": "just a string"},
                {"data": None},
            ],
        }
    },
]
_M = {"messageId": "m", "role": "ROLE_USER"}
NOT_RENDERED: list[Any] = [
    None,
    {"message": {"message_id": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}},
    {"message": {"messageId": "m", "role": 1, "parts": [{"text": "hi"}]}},
    {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "a", "data": 1}]}},
    {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"url": "u"}]}},
    {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": 5}]}},
    {
        "message": {
            "messageId": "m",
            "role": "ROLE_USER",
            "parts": [{"text": "x"}],
            "extensions": [],
        }
    },
    {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"data": {"x": 10**400}}]}},
    {
        "message": {
            "messageId": "m",
            "role": "ROLE_USER",
            "contextId": "other",
            "parts": [{"text": "x"}],
        }
    },
]


def _order(value: Any) -> Any:
    """The member order of every object but Struct values (data, metadata: protobuf maps)."""
    if isinstance(value, dict):
        return [(k, None if k in ("data", "metadata") else _order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_order(v) for v in value]
    return None


@pytest.mark.parametrize("params", HISTORY_PARAMS)
def test_the_lean_history_prints_as_the_message_does(params: Any) -> None:
    from google.protobuf.json_format import ParseDict

    from mesh.a2a.lean import _history_json

    message = ParseDict(params["message"], Message())
    message.task_id, message.context_id = "t", "c"
    printed = MessageToDict(message)
    rendered = _history_json(params, "t", "c")
    assert json.dumps(rendered, sort_keys=True) == json.dumps(printed, sort_keys=True)
    assert _order(rendered) == _order(printed)


@pytest.mark.parametrize("params", NOT_RENDERED)
def test_the_lean_history_leaves_the_rest_to_protobuf(params: Any) -> None:
    from mesh.a2a.lean import _history_json

    assert _history_json(params, "t", "c") is None


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-30T23:19:17.123456Z",
        "2026-11-30T23:19:17Z",
        "2026-11-30T23:19:17.1Z",
        "2026-11-30T23:19:17.123456789Z",
        "1970-01-01T00:00:00.000001Z",
        "2024-02-29T12:00:00.5Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "2026-11-30T23:19:17.123+01:00",  # an offset: protobuf's reader
        "2026-02-30T00:00:00Z",  # no such day
        "2026-11-30T23:19:60Z",
        "2026-11-30 23:19:17Z",
        "",
    ],
)
def test_status_time_is_protobufs(stamp: str) -> None:
    """The reply's status time, read without strptime, is the float protobuf's Timestamp gives,
    and what protobuf refuses is refused."""
    from datetime import UTC

    from google.protobuf.timestamp_pb2 import Timestamp

    from mesh.a2a.wire import _timestamp, _Unusual

    ts = Timestamp()
    try:
        ts.FromJsonString(stamp)
    except ValueError:
        with pytest.raises(_Unusual):
            _timestamp(stamp)
        return
    assert _timestamp(stamp) == float(ts.ToDatetime(tzinfo=UTC).timestamp())
