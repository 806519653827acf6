"""The mesh's JSON-RPC dispatch (mesh.a2a.dispatch) against a2a-sdk's own dispatcher, the
reference it was rebuilt from: the same request to the same handler gets the same answer —
the same error (code, message, data, id), or a result of the same shape.

In process, no network: both are Starlette apps behind httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from a2a.server.routes import create_jsonrpc_routes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from agents.conformance.executor import ConformanceExecutor
from mesh.a2a import dispatch
from mesh.a2a.server import A2AServer
from mesh.cards import load_card, with_interfaces
from mesh.identity import resolve_identity
from mesh.settings import Settings
from tests.support import strategies
from tests.support.samples import V1 as VERSION_ONLY

# In-process code runs as the run's operator (tests/conftest.py): its token authenticates.
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None and _OPERATOR.token
TOKEN = {"Authorization": f"Bearer {_OPERATOR.token}"}
V1 = {**VERSION_ONLY, **TOKEN}


def _rpc(method: Any, params: Any = None, rid: Any = 1, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method, **extra}
    if params is not None:
        doc["params"] = params
    return json.dumps(doc).encode()


MESSAGE = {"role": "ROLE_USER", "messageId": "tck-complete-task-1", "parts": [{"text": "hi"}]}
CORPUS: list[tuple[bytes, dict[str, str]]] = [
    (_rpc("SendMessage", {"message": MESSAGE}), V1),
    (_rpc("SendMessage", {"message": MESSAGE}), TOKEN),  # no A2A-Version
    (_rpc("SendMessage", {"message": MESSAGE}), {**V1, "A2A-Version": "99.0"}),
    (_rpc("SendMessage", {"message": {"role": 7}}), V1),
    (_rpc("SendMessage", {"message": {**MESSAGE, "messageId": "mesh-internal-error-1"}}), V1),
    (_rpc("SendStreamingMessage", {"message": {**MESSAGE, "messageId": "tck-stream-001"}}), V1),
    (_rpc("SendStreamingMessage", {"message": MESSAGE}), TOKEN),
    (_rpc("GetTask", {"id": "missing"}), V1),
    (_rpc("GetTask", {"id": 5, "historyLength": "all"}), V1),
    (_rpc("GetTask", "not-an-object"), V1),
    (_rpc("GetTask", [1, 2]), V1),
    (_rpc("GetTask", {"id": "x"}, rid=None), V1),
    (_rpc("GetTask", {"id": "x"}, rid=True), V1),
    (_rpc("GetTask", {"id": "x"}, rid=1.5), V1),
    (_rpc("GetTask", {"id": "x"}, rid="abc"), V1),
    (_rpc("CancelTask", {"id": "missing"}), V1),
    (_rpc("ListTasks", {}), V1),
    (_rpc("SubscribeToTask", {"id": "missing"}), V1),
    (_rpc("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "http://10.0.0.1/"}), V1),
    (_rpc("GetTaskPushNotificationConfig", {"taskId": "t", "id": "c"}), V1),
    (_rpc("GetExtendedAgentCard", {}), V1),
    (_rpc("NoSuchMethod", {}), V1),
    (_rpc("", {}), V1),
    (_rpc(5, {}), V1),
    (_rpc("rpc.internal", {}), V1),
    (b'{"id": 1, "method": "GetTask"}', V1),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "GetTask"}', V1),
    (b'{"jsonrpc": "2.0", "id": 1}', V1),
    (b"[]", V1),
    (b"[1, 2]", V1),
    (b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}]', V1),
    (b'"just a string"', V1),
    (b"42", V1),
    (b"null", V1),
]


def _shape(doc: dict[str, Any]) -> Any:
    """An error whole; a result by its keys (ids and times differ between two runs)."""
    if "error" in doc:
        return doc
    result = doc.get("result")
    return ("result", doc.get("id"), sorted(result) if isinstance(result, dict) else result)


def _answer(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = response.text.splitlines()
        return ["sse", *(_shape(json.loads(x[5:])) for x in lines if x.startswith("data:"))]
    return _shape(response.json())


def _card() -> Any:
    return with_interfaces(
        load_card("conformance"), http_url="http://agent/", nats_subject="mesh.a2a.conformance"
    )


async def _compare(requests: list[tuple[bytes, dict[str, str]]]) -> None:
    server = A2AServer(_card(), ConformanceExecutor(), push_allow_private=False)
    # a2a-sdk's own routes, serving the same handler: the reference.
    reference = Starlette(routes=create_jsonrpc_routes(server.handler, rpc_url="/"))
    ours = server.http_app()
    try:
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=reference)) as sdk,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=ours)) as mesh,
        ):
            for body, headers in requests:
                expected = _answer(await sdk.post("http://sdk/", content=body, headers=headers))
                got = _answer(await mesh.post("http://mesh/", content=body, headers=headers))
                assert got == expected, body
    finally:
        await server.aclose()


async def test_the_corpus_is_answered_as_a2a_sdk_answers_it() -> None:
    await _compare(CORPUS)


json_scalars = strategies.json_scalars(int_bits=53, text=20)
json_values = strategies.json_values(json_scalars, key=8, width=3, leaves=10)
METHODS = sorted(dispatch.METHODS)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.one_of(st.sampled_from(METHODS), st.text(max_size=12), json_scalars))
    params = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries({"id": json_scalars}),
            st.fixed_dictionaries({"message": st.fixed_dictionaries({"role": json_scalars})}),
        )
    )
    doc: dict[str, Any] = {}
    for key, value in (
        ("jsonrpc", draw(st.sampled_from(["2.0", "2.0", "1.0", 2]))),
        ("id", draw(json_scalars)),
        ("method", method),
        ("params", params),
    ):
        if draw(st.integers(0, 5)):  # now and then a member is missing
            doc[key] = value
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=6))] = draw(json_scalars)
    return json.dumps(doc).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(requests(), min_size=1, max_size=5))
def test_random_requests_are_answered_as_a2a_sdk_answers_them(batch: list[bytes]) -> None:
    asyncio.run(_compare([(body, V1) for body in batch]))


async def test_a_nats_call_context_reads_like_the_http_one() -> None:
    context = dispatch.call_context(
        {
            "A2A-Version": "1.0",
            "A2A-Extensions": "urn:a, urn:b",
            "traceparent": "00-x",
            "Authorization": "Bearer secret",  # used up by authentication, never passed on
        }
    )
    assert context.state["headers"] == {
        "a2a-version": "1.0",
        "a2a-extensions": "urn:a, urn:b",
        "traceparent": "00-x",
    }
    assert context.requested_extensions == {"urn:a", "urn:b"}
    assert not context.user.is_authenticated


async def test_preflight_checks_come_before_parsing() -> None:
    server = A2AServer(_card(), ConformanceExecutor())
    context = dispatch.call_context(V1)
    try:
        big = await dispatch.respond(
            server.handler, b"x" * (dispatch.MAX_BODY + 1), content_type=None, context=context
        )
        wrong = await dispatch.respond(
            server.handler, _rpc("GetTask", {"id": "x"}), content_type="text/plain", context=context
        )
        bad = await dispatch.respond(
            server.handler, b'{"a": NaN}', content_type="application/json", context=context
        )
    finally:
        await server.aclose()
    codes = []
    for reply in (big, wrong, bad):
        assert isinstance(reply, dispatch.Answer)
        doc = json.loads(reply.body)
        codes.append((doc["id"], doc["error"]["code"]))
    assert codes == [(None, -32600), (1, -32005), (None, -32700)]
