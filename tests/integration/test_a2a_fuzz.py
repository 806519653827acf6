"""Fuzzing the JSON-RPC endpoint on both transports (hypothesis).

Malformed JSON, random bytes and unicode, wrong types, deep nesting, bodies over 4 MiB, unknown
methods, batches, null and odd ids — whatever comes in, every answer is a JSON-RPC 2.0 response
(a result, or an error with a spec code), HTTP never says 5xx, a stream always ends, and the
agent still serves a valid request afterwards. One agent and one nats-server for the module.
"""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agents.conformance.app import RunningConformance, serve
from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.a2a.server import MAX_BODY
from mesh.bus import Bus
from mesh.identity import resolve_identity
from mesh.settings import Settings
from tests.support import strategies
from tests.support.samples import V1 as VERSION_ONLY
from tests.support.samples import WAIT_S

NATS_MAX_PAYLOAD = "8MB"  # so a > 4 MiB request reaches the agent over NATS

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# The spec's codes, and the mesh's refusal of a caller without a valid bearer token.
SPEC_CODES = {-32700, -32600, -32601, -32602, -32603, *range(-32009, -32000)}
SPEC_CODES.add(jsonrpc.UNAUTHENTICATED)
# The fuzzer calls as the run's operator (tests/conftest.py), unless a case sends its own
# Authorization header.
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
TOKEN = {"Authorization": f"Bearer {_OPERATOR.token}"}
V1 = {**VERSION_ONLY, **TOKEN}
METHODS = [
    "SendMessage",
    "SendStreamingMessage",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "SubscribeToTask",
    "CreateTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig",
    "GetExtendedAgentCard",
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(nats_url: str) -> AsyncIterator[tuple[Bus, RunningConformance]]:
    settings_ = Settings(heartbeat_s=0.3, card_ttl_s=1.5, http_port=0, nats_url=nats_url)
    async with (
        await Bus.connect(nats_url, name="fuzz", settings=settings_) as bus,
        serve(bus, profile="full", push_allow_private=False) as running,
    ):
        yield bus, running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # A fresh connection per request: on these machines a request on a kept-alive connection
    # to uvicorn waits ~40 ms for a delayed ACK, which would make the module 20x slower.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=WAIT_S, limits=no_keepalive) as client:
        yield client


# -- what an answer may be ----------------------------------------------------------------------
def check_response(doc: Any) -> None:
    assert isinstance(doc, dict), doc
    assert doc.get("jsonrpc") == "2.0", doc
    assert "id" in doc, doc
    assert isinstance(doc["id"], str | int | None) and not isinstance(doc["id"], bool), doc
    if "error" in doc:
        assert "result" not in doc, doc
        code = doc["error"].get("code")
        assert code in SPEC_CODES, doc
        assert code != -32603, f"fuzz input reached an internal error: {doc}"
        assert isinstance(doc["error"].get("message"), str), doc
    else:
        assert "result" in doc, doc


async def over_http(http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> int:
    """Send; check every answer (one JSON body, or each SSE event); return how many."""
    async with http.stream("POST", url, content=body, headers=headers) as r:
        assert r.status_code < 500, r.status_code
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    check_response(json.loads(line[5:]))
                    seen += 1
            return seen
        check_response(json.loads(await r.aread()))
        return 1


async def over_nats(bus: Bus, subject: str, body: bytes, headers: dict[str, str]) -> int:
    nc = bus.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, body, reply=inbox, headers=headers)
        seen = 0
        while True:
            msg = await sub.next_msg(timeout=WAIT_S)
            kind = (msg.headers or {}).get(subjects.H_STREAM)
            if kind == subjects.STREAM_END:
                return seen
            check_response(json.loads(msg.data))
            seen += 1
            if kind is None:  # a plain reply: the whole answer
                return seen
    finally:
        await sub.unsubscribe()


async def both(
    http: httpx.AsyncClient,
    agent: tuple[Bus, RunningConformance],
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    bus, running = agent
    hdrs = V1 if headers is None else {**TOKEN, **headers}
    assert await over_http(http, running.http_url, body, hdrs) >= 1
    assert await over_nats(bus, running.registration.direct_subject, body, hdrs) >= 1


# -- strategies ---------------------------------------------------------------------------------
json_scalars = strategies.json_scalars(int_bits=70, text=40)
json_values = strategies.json_values(json_scalars, key=10, width=4, leaves=20)
ids = st.one_of(
    st.none(), st.integers(), st.text(max_size=20), st.booleans(), st.floats(allow_nan=False)
)
methods = st.one_of(st.sampled_from(METHODS), st.text(max_size=30), json_scalars)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """An A2A message, often valid, sometimes with a field of the wrong type."""
    msg: dict[str, Any] = {
        "role": draw(st.sampled_from(["ROLE_USER", "ROLE_AGENT", "ROLE_UNSPECIFIED", 7, None])),
        "messageId": draw(st.one_of(st.uuids().map(str), json_scalars)),
        "parts": draw(
            st.one_of(
                st.lists(st.fixed_dictionaries({"text": st.text(max_size=50)}), max_size=3),
                st.lists(st.fixed_dictionaries({"data": json_values}), max_size=2),
                json_values,
            )
        ),
    }
    if draw(st.booleans()):
        msg[draw(st.sampled_from(["taskId", "contextId", "metadata", "extensions"]))] = draw(
            json_values
        )
    return msg


@st.composite
def requests(draw: st.DrawFn) -> Any:
    method = draw(methods)
    if method in ("SendMessage", "SendStreamingMessage") and draw(st.booleans()):
        params: Any = {"message": draw(messages())}
    elif method in METHODS and draw(st.booleans()):
        params = {
            draw(st.sampled_from(["id", "taskId", "contextId", "pageSize"])): draw(json_values)
        }
    else:
        params = draw(json_values)
    doc: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "1.0", 2, None]))}
    for key, value in (("id", draw(ids)), ("method", method), ("params", params)):
        if draw(st.integers(0, 9)):  # now and then a member is missing
            doc[key] = value
    return doc


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        inner = b"[" * depth + b"]" * depth
    else:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"x","m":' + inner + b"}}"


# -- the properties -----------------------------------------------------------------------------
@FUZZ
@given(body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
async def test_random_bytes_and_unicode(
    http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance], body: bytes
) -> None:
    await both(http, agent, body)


@FUZZ
@given(doc=requests())
async def test_random_requests(
    http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance], doc: Any
) -> None:
    await both(http, agent, json.dumps(doc).encode())


@settings(FUZZ, max_examples=80)
@given(batch=st.lists(requests(), max_size=4), single=requests())
async def test_batches_and_bare_values(
    http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance], batch: list[Any], single: Any
) -> None:
    await both(http, agent, json.dumps(batch).encode())
    await both(http, agent, json.dumps(single.get("params")).encode())


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=1, max_value=20_000), kind=st.sampled_from(["array", "object"]))
# Around the recursion limit (1000), where one JSON parser gives up and the next may not.
@example(depth=900, kind="array")
@example(depth=990, kind="object")
@example(depth=1000, kind="array")
@example(depth=5000, kind="object")
async def test_deep_nesting(
    http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance], depth: int, kind: str
) -> None:
    await both(http, agent, nested(depth, kind))


@settings(max_examples=80, deadline=None)
@given(
    doc=requests(),
    headers=st.dictionaries(
        st.sampled_from(
            ["A2A-Version", "Content-Type", "A2A-Extensions", "traceparent", "Authorization"]
        ),
        st.one_of(
            st.text(alphabet=string.printable.strip(), max_size=30),
            st.text(alphabet=string.printable.strip(), min_size=1, max_size=60).map(
                "Bearer ".__add__
            ),
        ),
        max_size=3,
    ),
)
async def test_random_headers(
    http: httpx.AsyncClient,
    agent: tuple[Bus, RunningConformance],
    doc: Any,
    headers: dict[str, str],
) -> None:
    await both(http, agent, json.dumps(doc).encode(), headers)


async def test_huge_bodies(http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance]) -> None:
    """Over 4 MiB: refused with -32600 before parsing (valid JSON or not)."""
    filler = "z" * (MAX_BODY + 10)
    valid = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": filler}}
    ).encode()
    for body in (valid, b"\x00" * (MAX_BODY + 1), b"[" * (MAX_BODY + 1)):
        bus, running = agent
        r = await http.post(running.http_url, content=body, headers=V1)
        assert r.status_code < 500
        assert r.json()["error"]["code"] == -32600
        reply = await bus.nc.request(
            running.registration.direct_subject, body, timeout=WAIT_S, headers=V1
        )
        assert json.loads(reply.data)["error"]["code"] == -32600


async def test_still_serving_after_the_fuzz(
    http: httpx.AsyncClient, agent: tuple[Bus, RunningConformance]
) -> None:
    """Runs last in the module: the agent answers a valid request on both transports."""
    bus, running = agent
    message = {
        "role": "ROLE_USER",
        "messageId": f"tck-complete-task-{uuid.uuid4().hex}",
        "parts": [{"text": "after the fuzz"}],
    }
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "last", "method": "SendMessage", "params": {"message": message}}
    ).encode()
    r = await http.post(running.http_url, content=body, headers=V1)
    assert r.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    message["messageId"] = f"tck-complete-task-{uuid.uuid4().hex}"
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "last", "method": "SendMessage", "params": {"message": message}}
    ).encode()
    reply = await bus.nc.request(
        running.registration.direct_subject, body, timeout=WAIT_S, headers=V1
    )
    assert json.loads(reply.data)["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
