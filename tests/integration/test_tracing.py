"""One trace per event: the publisher, the coordinator, every voter's agent and model span.

Everything runs in this process, but the trace context still crosses NATS for real: agents
serve requests from nats-py subscription tasks that carry no ambient context, so their spans
join the trace only through the `traceparent` header.
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator import policy
from coordinator.service import Coordinator
from mesh import Agent, Verdict, envelope
from mesh.bus import Bus, tail
from mesh.settings import Settings
from mesh.testing.fake_anthropic import FakeAnthropic
from tests.support.samples import Proposal, write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; this module owns it when it runs.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_mesh_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._mesh_test_exporter = True  # type: ignore[attr-defined]
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def _attr(span: ReadableSpan, key: str) -> object:
    return (span.attributes or {}).get(key)


async def test_one_trace_from_publish_to_every_model_call(
    spans: InMemorySpanExporter,
    bus: Bus,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["tr-a", "tr-b", "tr-c"]
    async with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key-for-the-local-fake")
        monkeypatch.setenv("MESH_MODEL", "anthropic:claude-sonnet-5-5")  # the key alone: rules
        agents = []
        for n in names:
            agent = Agent(n, card=write_card(tmp_path, n, f"skill-{n}"), prompt="Vote on it.")

            def review(p: Proposal) -> Verdict:
                return Verdict.reject("the rules brain must not run here")

            agent.rules(review)
            agents.append(agent)
        policies = policy.parse(
            {
                "vote.traced": {
                    "skills": [f"skill-{n}" for n in names],
                    "rule": {"kind": "unanimous"},
                    "agent_timeout_s": 5.0,
                    "deadline_s": 10.0,
                }
            }
        )
        async with (
            agents[0].serve(bus, http=False, settings=settings) as a0,
            agents[1].serve(bus, http=False, settings=settings),
            agents[2].serve(bus, http=False, settings=settings),
        ):
            assert a0.brain is not None and a0.brain.name.startswith("claude:")
            stop = asyncio.Event()
            task = asyncio.create_task(Coordinator(bus, policies).run(stop))
            try:
                event = envelope.new_event("vote.traced", {"id": "r1"})
                await bus.publish_event(event)

                async def decided() -> bool:
                    return any(
                        event.id.encode() in b for _, _, b in await tail(bus, "MESH_DECISIONS", 20)
                    )

                await eventually(decided)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        assert len(fake.requests) == 3  # every voter really called the model

    finished = list(spans.get_finished_spans())
    consumer = next(s for s in finished if s.name == "process mesh.evt.default.vote.traced")
    trace_id = consumer.context.trace_id
    mine = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in mine}

    # The publisher's span is the root; the coordinator continues it.
    publish = next(s for s in mine if s.name == "send mesh.evt.default.vote.traced")
    assert consumer.parent is not None and consumer.parent.span_id == publish.context.span_id
    assert _attr(consumer, "messaging.system") == "nats"
    assert _attr(consumer, "messaging.operation.type") == "process"
    assert _attr(consumer, "messaging.destination.name") == "mesh.evt.default.vote.traced"

    for n in names:
        client = next(
            s for s in mine if s.name == f"invoke_agent {n}" and s.kind == trace.SpanKind.CLIENT
        )
        server = next(
            s for s in mine if s.name == f"invoke_agent {n}" and s.kind == trace.SpanKind.SERVER
        )
        assert _attr(client, "gen_ai.operation.name") == "invoke_agent"
        assert _attr(client, "gen_ai.agent.name") == n
        assert _attr(server, "gen_ai.agent.name") == n
        # The agent's span hangs under the coordinator's call (through the NATS header).
        assert server.parent is not None and server.parent.span_id == client.context.span_id
        chat = next(
            s
            for s in mine
            if s.name.startswith("chat ") and _ancestor(s, server.context.span_id, by_id)
        )
        assert _attr(chat, "gen_ai.operation.name") == "chat"
        assert _attr(chat, "gen_ai.provider.name") == "anthropic"
        assert isinstance(_attr(chat, "gen_ai.usage.input_tokens"), int)
        assert isinstance(_attr(chat, "gen_ai.usage.output_tokens"), int)


def _ancestor(span: ReadableSpan, ancestor_id: int, by_id: dict[int, ReadableSpan]) -> bool:
    parent = span.parent
    for _ in range(50):  # bounded walk up the tree
        if parent is None:
            return False
        if parent.span_id == ancestor_id:
            return True
        up = by_id.get(parent.span_id)
        parent = up.parent if up is not None else None
    return False
