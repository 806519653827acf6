"""Agents that react to events: at-least-once on a shared durable, with JetStream's outcomes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg

from agents.tickets import TicketTriaged
from agents.triage.agent import agent as triage_agent
from mesh import Agent, contracts, envelope, subjects
from mesh.a2a.client import AgentClient, status_text, task_of, task_state, user_message
from mesh.agent import RunningAgent
from mesh.bus import Bus, tail
from mesh.events import EventContext, Reject, Retry
from tests.support.samples import write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

FAST = (0.05,)  # backoff for tests: failures are retried almost at once


class Ping(msgspec.Struct):
    n: int
    label: str = ""


class Pong(msgspec.Struct):
    n: int


def events_agent(folder: Path, name: str = "pinger") -> Agent:
    return Agent(name, card=write_card(folder, name, f"{name}-skill"))


async def publish(bus: Bus, event_type: str, data: Any, *, tenant: str = "t1", **kw: Any) -> str:
    event = envelope.new_event(event_type, data, tenant=tenant, **kw)
    await bus.publish_event(event)
    return event.id


async def events_of(bus: Bus, event_type: str) -> list[envelope.Event]:
    # Only that type's subjects: another type's event may be in binary mode (no headers here).
    rows = await tail(bus, subjects.EVENTS_STREAM, 500)
    found = [
        envelope.decode(body)
        for _, subject, body in rows
        if subjects.parse_event_subject(subject)[1] == event_type
    ]
    return [e for e in found if e.type == event_type]


async def settled(bus: Bus, durable: str) -> bool:
    """Every event of the consumer was delivered and finished (acked, termed or given up)."""
    info = await bus.js.consumer_info(subjects.EVENTS_STREAM, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def advisories(bus: Bus, kind: str, durable: str) -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    async def on(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    subject = f"$JS.EVENT.ADVISORY.CONSUMER.{kind}.{subjects.EVENTS_STREAM}.{durable}"
    sub = await bus.nc.subscribe(subject, cb=on)
    await bus.nc.flush()  # the subscription is live on the server before anything is published
    return seen, sub


@asynccontextmanager
async def serving(agent: Agent, bus: Bus, replicas: int = 1) -> AsyncIterator[list[RunningAgent]]:
    # Agents take the bus's settings: the `settings` fixture's short clocks.
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(agent.serve(bus, http=False)) for _ in range(replicas)
        ]


def recorder() -> tuple[list[int], Callable[[EventContext], Awaitable[None]]]:
    attempts: list[int] = []

    async def record(ctx: EventContext) -> None:
        attempts.append(ctx.attempt)

    return attempts, record


# -- the triage agent -----------------------------------------------------------------------------
async def test_ticket_created_yields_one_triaged_in_the_same_tenant(bus: Bus) -> None:
    ticket = {
        "id": "T-1",
        "title": "Search is down",
        "body": "every request returns 500 since 09:12",
        "reporter": "ops@acme.example",
        "customer_tier": "enterprise",
    }
    async with serving(triage_agent, bus):
        source_id = await publish(bus, "ticket.created", ticket, tenant="acme", principal="desk")

        async def triaged() -> bool:
            return bool(await events_of(bus, "ticket.triaged"))

        await eventually(triaged)
        # Once the consumer has settled the handler is done, so no later output can appear.
        await eventually(lambda: settled(bus, "agent-triage-triage_ticket"))
    [out] = await events_of(bus, "ticket.triaged")
    assert (out.tenant, out.principal, out.source) == ("acme", "desk", "mesh://agent/triage")
    assert out.id != source_id
    result = msgspec.convert(out.data, TicketTriaged)
    assert (result.ticket_id, result.priority, result.team) == ("T-1", "p1", "platform")
    assert "enterprise" in result.labels


async def test_binary_mode_ticket_is_triaged_like_a_structured_one(bus: Bus) -> None:
    ticket = {"id": "T-2", "title": "Checkout is down", "body": "500s", "reporter": "ops@x.test"}
    event = envelope.new_event("ticket.created", ticket, tenant="acme", principal="desk")
    async with serving(triage_agent, bus):
        await bus.publish_event(event, binary=True)  # ce- headers, the ticket as the body

        async def triaged() -> bool:
            return bool(await events_of(bus, "ticket.triaged"))

        await eventually(triaged)
        await eventually(lambda: settled(bus, "agent-triage-triage_ticket"))
    [out] = await events_of(bus, "ticket.triaged")
    assert (out.tenant, out.principal) == ("acme", "desk")
    assert msgspec.convert(out.data, TicketTriaged).ticket_id == "T-2"


async def test_publish_refuses_data_that_breaks_its_schema(bus: Bus) -> None:
    before = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    bad = envelope.new_event("ticket.created", {"id": "T-3", "title": "x", "reporter": "r"})
    with pytest.raises(contracts.SchemaViolationError) as err:
        await bus.publish_event(bad)
    assert err.value.message == (
        "event ticket.created breaks its schema: data: 'body' is a required property "
        "(schema ticket.created.schema.json)"
    )
    assert (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq == before


async def test_a_handler_terminates_data_that_breaks_its_schema(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    # Published raw (past the publish check): `customer_tier` must be a string.
    data = {"id": "T-4", "title": "x", "body": "y", "reporter": "r", "customer_tier": 3}
    event = envelope.new_event("ticket.created", data, tenant="acme")
    seen, sub = await advisories(bus, "MSG_TERMINATED", "agent-triage-triage_ticket")
    caplog.set_level(logging.ERROR, logger="mesh.events")
    async with serving(triage_agent, bus):
        await bus.publish(subjects.event("acme", "ticket.created"), envelope.encode(event))
        await eventually(lambda: _true(bool(seen)))
    await sub.unsubscribe()
    assert not await events_of(bus, "ticket.triaged")
    assert any(
        "breaks the ticket.created schema: data.customer_tier: 3 is not of type 'string'"
        in r.message
        for r in caplog.records
    )


async def test_triage_also_answers_over_a2a(bus: Bus) -> None:
    ticket = {"id": "T-2", "title": "Invoice charged twice", "body": "", "reporter": "bob"}
    async with serving(triage_agent, bus):
        result = await AgentClient(bus).send("triage", user_message(data=ticket), timeout=5)
    task = task_of(result)
    assert task_state(task) == "TASK_STATE_COMPLETED"
    data = MessageToDict(task)["artifacts"][0]["parts"][0]["data"]
    assert (data["priority"], data["team"]) == ("p2", "payments")


async def test_events_only_agent_rejects_messages_but_is_registered(
    bus: Bus, tmp_path: Path
) -> None:
    agent = events_agent(tmp_path)

    @agent.on_event("test.ping")
    async def ping(p: Ping, ctx: EventContext) -> None:
        pass

    async with serving(agent, bus) as [running]:
        assert running.brain is None
        result = await AgentClient(bus).send("pinger", user_message(data={}), timeout=5)
    task = task_of(result)
    assert task_state(task) == "TASK_STATE_REJECTED"
    assert "only reacts to events (test.ping)" in status_text(task)


# -- delivery guarantees --------------------------------------------------------------------------
async def test_failure_then_success_is_redelivered_and_publishes_once(
    bus: Bus, tmp_path: Path
) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping", backoff=FAST)
    async def flaky(p: Ping, ctx: EventContext) -> None:
        await record(ctx)
        await ctx.publish("test.pong", Pong(p.n))  # published on both attempts
        if ctx.attempt == 1:
            raise RuntimeError("transient")

    async with serving(agent, bus):
        await publish(bus, "test.ping", {"n": 7})
        await eventually(lambda: _true(len(attempts) == 2))
        await eventually(lambda: settled(bus, "agent-pinger-flaky"))
    assert attempts == [1, 2]
    [pong] = await events_of(bus, "test.pong")  # the second publish had the same id: deduplicated
    assert pong.data == {"n": 7}


async def test_always_failing_stops_at_max_deliver(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping", max_deliver=3, backoff=FAST)
    async def broken(p: Ping, ctx: EventContext) -> None:
        await record(ctx)
        raise RuntimeError("always")

    seen, sub = await advisories(bus, "MAX_DELIVERIES", "agent-pinger-broken")
    async with serving(agent, bus):
        await publish(bus, "test.ping", {"n": 1})
        await eventually(lambda: _true(bool(seen)))
        await eventually(lambda: settled(bus, "agent-pinger-broken"))
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, "agent-pinger-broken")
    await sub.unsubscribe()
    assert attempts == [1, 2, 3]
    # Nothing outstanding or waiting for redelivery. (`num_redelivered` stays 1: nats-server
    # keeps the delivery count of a message that exhausted max_deliver, so it is not checked.)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert info.delivered is not None and info.delivered.consumer_seq == 3
    assert seen[0]["deliveries"] == 3


@pytest.mark.parametrize(
    "body, logged",
    [
        (envelope.encode(envelope.new_event("test.ping", {"label": "x"}, tenant="t1")), "`n`"),
        (envelope.encode(envelope.new_event("test.ping", {"n": "one"}, tenant="t1")), "$.n"),
        (b"{not json", "not a valid CloudEvent"),
    ],
    ids=["missing-field", "wrong-type", "not-a-cloudevent"],
)
async def test_poison_is_terminated_at_once(
    bus: Bus,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    logged: str,
) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping")
    async def strict(p: Ping, ctx: EventContext) -> None:
        await record(ctx)

    seen, sub = await advisories(bus, "MSG_TERMINATED", "agent-pinger-strict")
    caplog.set_level(logging.ERROR, logger="mesh.events")
    async with serving(agent, bus):
        await bus.publish(subjects.event("t1", "test.ping"), body)
        await eventually(lambda: _true(bool(seen)))
    await sub.unsubscribe()
    assert attempts == []
    assert any("poison" in r.message and logged in r.message for r in caplog.records)


async def test_reject_terminates(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping")
    async def picky(p: Ping, ctx: EventContext) -> None:
        await record(ctx)
        raise Reject("not for us")

    seen, sub = await advisories(bus, "MSG_TERMINATED", "agent-pinger-picky")
    async with serving(agent, bus):
        await publish(bus, "test.ping", {"n": 1})
        await eventually(lambda: _true(bool(seen)))
    await sub.unsubscribe()
    assert attempts == [1]


async def test_retry_redelivers(bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping")
    async def later(p: Ping, ctx: EventContext) -> None:
        await record(ctx)
        if ctx.attempt == 1:
            raise Retry(0.2)

    async with serving(agent, bus):
        await publish(bus, "test.ping", {"n": 1})
        await eventually(lambda: settled(bus, "agent-pinger-later"))
    assert attempts == [1, 2]
    # An asked-for retry is an outcome, not a failure: nothing logged as an error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_replicas_share_one_durable(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    handled: Counter[int] = Counter()

    @agent.on_event("test.ping")
    async def count(p: Ping, ctx: EventContext) -> None:
        handled[p.n] += 1

    async with serving(agent, bus, replicas=2):
        for n in range(20):
            await publish(bus, "test.ping", {"n": n})
        await eventually(lambda: _true(sum(handled.values()) >= 20))
        await eventually(lambda: settled(bus, "agent-pinger-count"))
    assert handled == Counter(range(20))


async def test_concurrency_bounds_handlers_per_replica(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    running, most, done = 0, 0, 0

    @agent.on_event("test.ping", concurrency=2)
    async def bounded(p: Ping, ctx: EventContext) -> None:
        nonlocal running, most, done
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)  # the work: long enough for others to pile up
        running -= 1
        done += 1

    for n in range(8):  # all waiting before the agent starts, so it could take them all at once
        await publish(bus, "test.ping", {"n": n})
    async with serving(agent, bus):
        await eventually(lambda: _true(done == 8))
    assert most == 2


async def test_long_handler_keeps_its_event(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    attempts, record = recorder()

    @agent.on_event("test.ping", ack_wait_s=0.3)
    async def slow(p: Ping, ctx: EventContext) -> None:
        await record(ctx)
        await asyncio.sleep(1.0)  # the work itself: three ack_waits long

    async with serving(agent, bus):
        await publish(bus, "test.ping", {"n": 1})
        await eventually(lambda: settled(bus, "agent-pinger-slow"))
    assert attempts == [1]  # in_progress kept JetStream from redelivering it meanwhile


async def test_shutdown_drains_in_flight_handlers(bus: Bus, tmp_path: Path) -> None:
    agent = events_agent(tmp_path)
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[int] = []

    @agent.on_event("test.ping")
    async def gated(p: Ping, ctx: EventContext) -> None:
        started.set()
        await release.wait()
        finished.append(p.n)

    stack = AsyncExitStack()
    await stack.enter_async_context(agent.serve(bus, http=False))
    await publish(bus, "test.ping", {"n": 1})
    await asyncio.wait_for(started.wait(), timeout=10)
    stopping = asyncio.create_task(stack.aclose())
    await eventually(lambda: _true(not stopping.done()))  # waiting for the handler
    release.set()
    await asyncio.wait_for(stopping, timeout=10)
    assert finished == [1]
    assert await settled(bus, "agent-pinger-gated")


async def _true(value: bool) -> bool:
    return value
