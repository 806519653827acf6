"""An agent past its slots and backlog answers "busy" at once, on both transports (issue 12 §2).

A real nats-server and a real HTTP port on 127.0.0.1; the agent is `A2AServer` with one slot
and one place in its backlog, behind an executor that holds its slot until the test opens a
gate. The first request runs, the second waits, the third is answered BUSY without being read
further, and the first two still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a.server.tasks import InMemoryTaskStore
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg

from mesh import subjects
from mesh._internal import http as http_server
from mesh.a2a import jsonrpc
from mesh.a2a import nats as nats_binding
from mesh.a2a.client import AgentClient, user_message
from mesh.a2a.server import A2AServer
from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.errors import AgentBusyError
from tests.support.executors import Gated
from tests.support.samples import V1, WAIT_S
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Busy:
    server: A2AServer
    executor: Gated
    url: str
    subject: str


@pytest_asyncio.fixture(loop_scope="module")
async def busy(mod_bus: Bus) -> AsyncIterator[Busy]:
    settings = mod_bus.settings
    executor = Gated()
    sock = http_server.bind(settings)
    url = http_server.advertised_url(settings, sock.getsockname()[1])
    subject = f"test.busy.{uuid.uuid4().hex[:8]}"
    card = with_interfaces(load_card("conformance"), http_url=url, nats_subject=subject)
    server = A2AServer(
        card,
        executor,
        InMemoryTaskStore(),
        max_concurrency=1,
        max_queue=1,
        push_allow_private=False,
    )
    async with http_server.serving(server, sock):
        sub = await server.subscribe(mod_bus.nc, subject)
        try:
            yield Busy(server, executor, url, subject)
        finally:
            executor.gate.set()
            await sub.unsubscribe()
            await server.drain()
            await server.aclose()


def _headers(bus: Bus) -> dict[str, str]:
    assert bus.identity is not None
    return {**V1, subjects.H_AUTHORIZATION: f"Bearer {bus.identity.token}"}


def _send(rid: int, method: str = "SendMessage") -> bytes:
    message = MessageToDict(user_message(text="hi", message_id=f"busy-{uuid.uuid4().hex}"))
    body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": {"message": message}}
    return json.dumps(body).encode()


def _assert_busy(doc: dict[str, Any], rid: int | None) -> None:
    assert doc["id"] == rid
    assert doc["error"]["code"] == jsonrpc.BUSY == -31429
    assert doc["error"]["message"].startswith("busy: 2 requests in progress")
    assert doc["error"]["data"]["retryAfterMs"] > 0


async def _one_running_one_queued(busy: Busy) -> None:
    await eventually(
        lambda: busy.executor.started == 1 and busy.server.queued == 1,
        "one request running, one waiting",
        timeout=WAIT_S,
        detail=lambda: (busy.executor.started, busy.server.inflight, busy.server.queued),
    )


async def test_nats_third_request_is_answered_busy_at_once(mod_bus: Bus, busy: Busy) -> None:
    nc, headers = mod_bus.nc, _headers(mod_bus)
    first = asyncio.create_task(nc.request(busy.subject, _send(1), WAIT_S, headers=headers))
    second = asyncio.create_task(nc.request(busy.subject, _send(2), WAIT_S, headers=headers))
    await _one_running_one_queued(busy)

    third = await nc.request(busy.subject, _send(3), WAIT_S, headers=headers)
    _assert_busy(json.loads(third.data), 3)
    # The caller's side: a retryable error of its own type, with the pause asked for.
    client = AgentClient(mod_bus)
    with pytest.raises(AgentBusyError) as err:
        await client.send(
            "conformance", user_message(text="x"), timeout=WAIT_S, subject=busy.subject
        )
    assert err.value.retryable and err.value.code == jsonrpc.BUSY
    assert err.value.retry_after_s > 0
    # A stream's caller gets it as a stream's error: one frame, then the end.
    frames = client.stream(
        "conformance", user_message(text="x"), timeout=WAIT_S, subject=busy.subject
    )
    async with contextlib.aclosing(frames):
        with pytest.raises(AgentBusyError):
            await anext(frames)
    assert busy.executor.started == 1  # none of the refused ones reached the handler

    busy.executor.gate.set()
    for done in await asyncio.gather(first, second):
        assert json.loads(done.data)["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert busy.executor.started == 2


async def test_http_third_request_is_429_with_retry_after(mod_bus: Bus, busy: Busy) -> None:
    headers = {**_headers(mod_bus), "Content-Type": "application/json"}
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=WAIT_S, limits=no_keepalive) as http:
        first = asyncio.create_task(http.post(busy.url, content=_send(1), headers=headers))
        await eventually(lambda: busy.executor.started == 1, "first running", timeout=WAIT_S)
        second = asyncio.create_task(http.post(busy.url, content=_send(2), headers=headers))
        await _one_running_one_queued(busy)

        third = await http.post(busy.url, content=_send(3), headers=headers)
        assert third.status_code == 429
        assert int(third.headers["Retry-After"]) >= 1
        _assert_busy(third.json(), None)  # refused before its body was read
        # Who the caller is still comes first: no token is 401, busy or not.
        anonymous = await http.post(busy.url, content=_send(4), headers=V1)
        assert anonymous.status_code == 401

        busy.executor.gate.set()
        for done in await asyncio.gather(first, second):
            assert done.status_code == 200
            assert done.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert busy.executor.started == 2


async def test_a_slow_consumer_drop_is_a_warning(
    nats_url: str, mod_bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """Past a subscription's pending limit nats-py drops messages; a drop is never silent: the
    connection logs it. (A subscriber whose callback is stuck makes the drop certain, whatever
    the machine's load: the first message holds the callback, the second fills the queue.)"""
    subject = f"test.slow.{uuid.uuid4().hex[:8]}"
    stuck = asyncio.Event()

    async def hold(_: Msg) -> None:
        await stuck.wait()

    async with await Bus.connect(nats_url, name="slow", settings=mod_bus.settings) as slow:
        sub = await slow.nc.subscribe(subject, cb=hold, pending_msgs_limit=1)
        await slow.nc.flush()
        try:
            with caplog.at_level(logging.WARNING, logger="mesh.bus"):
                for rid in range(10):
                    await mod_bus.nc.publish(subject, _send(rid))
                await mod_bus.nc.flush()
                await eventually(
                    lambda: "slow consumer" in caplog.text,
                    "a slow-consumer warning",
                    timeout=WAIT_S,
                )
        finally:
            stuck.set()
            await sub.unsubscribe()


async def test_nats_backlog_is_bounded_in_bytes_too(
    mod_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room in the backlog by count is not enough: the bodies held are bounded in bytes (one
    request is always taken, whatever its size)."""
    monkeypatch.setattr(nats_binding, "HELD_BYTES_LIMIT", 1)
    executor = Gated()
    subject = f"test.bytes.{uuid.uuid4().hex[:8]}"
    card = with_interfaces(load_card("conformance"), http_url=None, nats_subject=subject)
    server = A2AServer(card, executor, InMemoryTaskStore(), max_concurrency=4, max_queue=4)
    sub = await server.subscribe(mod_bus.nc, subject)
    nc, headers = mod_bus.nc, _headers(mod_bus)
    try:
        first = asyncio.create_task(nc.request(subject, _send(1), WAIT_S, headers=headers))
        await eventually(lambda: executor.started == 1, "first running", timeout=WAIT_S)
        second = await nc.request(subject, _send(2), WAIT_S, headers=headers)
        doc = json.loads(second.data)
        assert doc["error"]["code"] == jsonrpc.BUSY, doc
        executor.gate.set()
        assert "result" in json.loads((await first).data)
    finally:
        executor.gate.set()
        await sub.unsubscribe()
        await server.drain()
        await server.aclose()
