"""OpenTelemetry for the mesh, in one place: set-up, context over NATS headers, span names and
attributes by the semantic conventions, and the metric instruments.

Configured by the standard variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT, …): with
an OTLP endpoint, spans go there. `MESH_TRACE_STREAM=1` also keeps recent spans in a JetStream
stream so `mesh trace EVENT_ID` works with no extra infrastructure. `MESH_TELEMETRY=off` (or
OTEL_SDK_DISABLED=true) turns everything off: the API then hands out no-op tracers and meters.

Library code only calls `tracer()`, `meters()`, `inject()`, `extract()`; only process entry points
call `setup()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagate import extract as _extract
from opentelemetry.propagate import inject as _inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from mesh import subjects
from mesh.providers import price_of
from mesh.settings import get_settings

log = logging.getLogger(__name__)

_SCOPE = "quorum-mesh"

# Semantic-convention attribute names (messaging, GenAI), so instrumented modules import them
# from one place. Written out because OpenTelemetry keeps them in a private `_incubating`
# package; tests/unit/test_telemetry_names.py holds them equal to the installed semconv.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_AGENT_VERSION = "gen_ai.agent.version"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"


def enabled() -> bool:
    # OTEL_SDK_DISABLED is OpenTelemetry's own switch, honoured as the SDK would.
    sdk_off = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
    return get_settings().telemetry and not sdk_off


def tracer() -> trace.Tracer:
    """The mesh's tracer; while no tracer provider that records is set (nothing exports), one
    whose spans cost next to nothing and still carry an incoming trace context onwards."""
    if isinstance(trace.get_tracer_provider(), _NOT_RECORDING):
        return _FREE
    return trace.get_tracer(_SCOPE)


def tool_span(name: str) -> Any:
    """The `execute_tool <name>` span (GenAI conventions) of a rules brain or a model's tool
    call, made current for the block: `with telemetry.tool_span(name) as span: ...`."""
    return tracer().start_as_current_span(
        f"execute_tool {name}",
        kind=trace.SpanKind.INTERNAL,
        attributes={GEN_AI_OPERATION: "execute_tool", GEN_AI_TOOL_NAME: name},
    )


# The API's providers that record nothing: its no-op one and, while no provider is set, its proxy.
_NOT_RECORDING = (trace.NoOpTracerProvider, trace.ProxyTracerProvider)


class _FreeSpan:
    """`NoOpTracer.start_as_current_span`'s effect without its generator-based context manager,
    `use_span` and attribute handling: the current span becomes what the no-op tracer makes
    current (a non-recording span with the given context's span context), only when a
    `context` is given (without one, the no-op tracer makes the current span current again)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: otel_context.Context | None) -> None:
        self._context = context
        self._token: object = None

    def __enter__(self) -> trace.Span:
        if self._context is None:
            return trace.get_current_span()
        span = trace.get_current_span(self._context)
        if not isinstance(span, trace.NonRecordingSpan):
            span = trace.NonRecordingSpan(span.get_span_context())
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class _FreeTracer(trace.NoOpTracer):
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: otel_context.Context | None = None, **_: Any
    ) -> _FreeSpan:
        return _FreeSpan(context)


_FREE = _FreeTracer()


# -- context over NATS headers ----------------------------------------------------------------
def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers with the current W3C trace context added (traceparent, tracestate)."""
    carrier = dict(headers or {})
    _inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return _extract(dict(headers or {}))


def messaging_attrs(
    operation: str, op_type: str, destination: str, msg_id: str = ""
) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: "nats",
        MESSAGING_OPERATION_NAME: operation,
        MESSAGING_OPERATION_TYPE: op_type,
        MESSAGING_DESTINATION: destination,
    }
    if msg_id:
        attrs[MESSAGING_MESSAGE_ID] = msg_id
    return attrs


def trace_id_of(span: trace.Span | None = None) -> str:
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


# -- metrics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Meters:
    decisions: metrics.Counter
    votes: metrics.Counter
    call_latency: metrics.Histogram
    timeouts: metrics.Counter
    retries: metrics.Counter
    dead_letters: metrics.Counter
    tokens: metrics.Counter
    cost: metrics.Counter
    redactions: metrics.Counter


_meters: Meters | None = None


def meters() -> Meters:
    """The mesh's instruments (created once, on whichever MeterProvider is current)."""
    global _meters  # noqa: PLW0603  # one set of instruments per process
    if _meters is None:
        m = metrics.get_meter(_SCOPE)
        _meters = Meters(
            decisions=m.create_counter(
                "mesh.decisions", description="Decisions by outcome, event type and tenant"
            ),
            votes=m.create_counter("mesh.votes", description="Votes by agent and verdict"),
            call_latency=m.create_histogram(
                "mesh.agent.call.duration", unit="s", description="A2A call latency"
            ),
            timeouts=m.create_counter("mesh.agent.timeouts", description="Calls that timed out"),
            retries=m.create_counter("mesh.agent.retries", description="Retried calls"),
            dead_letters=m.create_counter("mesh.dead_letters", description="DLQ records by reason"),
            tokens=m.create_counter(
                "mesh.gen_ai.tokens", description="Model tokens by agent, tenant and type"
            ),
            cost=m.create_counter(
                "mesh.gen_ai.cost", unit="USD", description="Model cost by agent and tenant"
            ),
            redactions=m.create_counter(
                "mesh.redactions",
                unit="{value}",
                description="Values masked before a model call, by agent and kind",
            ),
        )
    return _meters


# Who a model call is for: set by the agent runtime around each task, read when usage is
# recorded (the brain itself does not know the agent or tenant).
call_labels: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "mesh_call_labels", default=MappingProxyType({})
)


def record_usage(model: str, input_tokens: int, output_tokens: int) -> None:
    """Token and cost counters, labelled by model and the current call's agent and tenant.

    Priced by `mesh.providers.price_of`, the one source budgets use too: the models file's
    `[prices]`, else MESH_PRICE_*, else the shipped table (docs/budgets.md)."""
    labels = {"model": model, **call_labels.get()}
    m = meters()
    m.tokens.add(input_tokens, {**labels, "type": "input"})
    m.tokens.add(output_tokens, {**labels, "type": "output"})
    price_in, price_out = price_of(model)
    m.cost.add((input_tokens * price_in + output_tokens * price_out) / 1e6, labels)


def observe_breakers(states: Any) -> None:
    """Register an observable gauge of open circuit breakers (`states()` → {key: state})."""

    def callback(_options: metrics.CallbackOptions) -> Sequence[metrics.Observation]:
        current = states()
        return [
            metrics.Observation(1 if s == "opened" else 0, {"replica": k})
            for k, s in current.items()
        ]

    metrics.get_meter(_SCOPE).create_observable_gauge(
        "mesh.breakers.open", callbacks=[callback], description="1 while a breaker is open"
    )


# -- set-up (process entry points only) ---------------------------------------------------------
_configured = False


def setup(service_name: str) -> None:
    """Tracer and meter providers from the environment; idempotent; a no-op when disabled."""
    global _configured  # noqa: PLW0603  # providers are process-wide by OTel's design
    if _configured or not enabled():
        return
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if otlp or _trace_stream_on():
        provider = TracerProvider(resource=resource)
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    else:
        # Spans nobody exports are pure cost: a no-op provider (and not the API's proxy, which
        # a2a-sdk's per-call span decorators pay ~19% of an agent's CPU for) when none is set.
        trace.set_tracer_provider(trace.NoOpTracerProvider())
    global _resource  # noqa: PLW0603  # for the meter provider, made when metrics are exported
    _resource = resource


# The process's resource once `setup` ran with telemetry on (None: off, or not set up).
_resource: Resource | None = None
_metrics_on = False


def _export_metrics() -> None:
    """The SDK's meter provider with a Prometheus reader, made when something will read it
    (a /metrics endpoint): until then the instruments are the API's proxies, whose `add` and
    `record` do nothing (the coordinator without MESH_METRICS_PORT pays nothing for metrics).
    Instruments made before are bound to it by the API then."""
    global _metrics_on  # noqa: PLW0603  # one meter provider per process
    if _metrics_on or _resource is None:
        return
    _metrics_on = True
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    metrics.set_meter_provider(
        MeterProvider(resource=_resource, metric_readers=[PrometheusMetricReader()])
    )


def add_span_exporter(exporter: SpanExporter) -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))


def metrics_asgi_app() -> Any:
    """The Prometheus exposition of this process's metrics, as an ASGI app (/metrics)."""
    from prometheus_client import make_asgi_app

    _export_metrics()
    return make_asgi_app()


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """A /metrics endpoint on its own port (processes without an HTTP server); returns it."""
    from prometheus_client import start_http_server

    _export_metrics()
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


# -- spans kept in JetStream (opt-in) -----------------------------------------------------------
class SpanRecord(msgspec.Struct, omit_defaults=True):
    trace_id: str
    span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    parent_id: str = ""
    kind: str = ""
    status: str = "UNSET"
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


def to_record(span: ReadableSpan) -> SpanRecord:
    ctx = span.get_span_context()
    parent = span.parent
    attrs = {
        k: (v if isinstance(v, str | int | float | bool) else str(v))
        for k, v in (span.attributes or {}).items()
    }
    service = str(span.resource.attributes.get("service.name", "")) if span.resource else ""
    return SpanRecord(
        trace_id=format(ctx.trace_id, "032x") if ctx else "",
        span_id=format(ctx.span_id, "016x") if ctx else "",
        parent_id=format(parent.span_id, "016x") if parent else "",
        name=span.name,
        service=service,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        kind=span.kind.name if span.kind else "",
        status=span.status.status_code.name if span.status else "UNSET",
        attributes=attrs,
    )


class JetStreamSpanExporter(SpanExporter):
    """Publishes finished spans to `mesh.trace.<trace id>` (stream MESH_TRACES, kept a day).

    The SDK calls `export` from its worker thread; the publish is handed to the process's event
    loop, where the NATS connection lives. Best effort: tracing never blocks or fails the mesh.
    """

    def __init__(self, nc: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.nc = nc
        self.loop = loop

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        payloads = [(r.trace_id, msgspec.json.encode(r)) for r in map(to_record, spans)]

        async def publish() -> None:
            for trace_id, body in payloads:
                await self.nc.publish(subjects.trace(trace_id), body)

        try:
            asyncio.run_coroutine_threadsafe(publish(), self.loop)
        except RuntimeError:  # the loop is closed: the process is stopping
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _trace_stream_on() -> bool:
    return get_settings().trace_stream


async def keep_spans_in_jetstream(bus: Any) -> None:
    """If MESH_TRACE_STREAM is on: make sure the stream exists (the operator creates it, any
    other identity checks it is there) and export spans into it."""
    if not enabled() or not _trace_stream_on():
        return
    from mesh.bus import TRACES

    await bus.ensure_stream(TRACES)
    add_span_exporter(JetStreamSpanExporter(bus.nc, asyncio.get_running_loop()))


async def read_trace(bus: Any, trace_id: str, *, wait_s: float = 1.0) -> list[SpanRecord]:
    """Every span of one trace kept in MESH_TRACES (bounded wait for late exports)."""
    from nats.js.api import DeliverPolicy

    sub = await bus.js.subscribe(
        subjects.trace(trace_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    spans: list[SpanRecord] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=wait_s)
            except Exception:  # nats' TimeoutError: nothing more within wait_s
                break
            spans.append(msgspec.json.decode(msg.data, type=SpanRecord))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return spans


def render_tree(spans: Sequence[SpanRecord], *, sdk_internals: bool = False) -> list[str]:
    """Indented lines: span, service, duration, status, and tokens where a model was called.

    a2a-sdk's own internal spans (event queue plumbing) are left out unless asked for."""
    if not sdk_internals:
        spans = [s for s in spans if not s.name.startswith("a2a.server.events.")]
    by_parent: dict[str, list[SpanRecord]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_parent.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in by_parent.get(parent, []):
            ms = (s.end_ns - s.start_ns) / 1e6
            extra = ""
            tin, tout = (
                s.attributes.get(GEN_AI_INPUT_TOKENS),
                s.attributes.get(GEN_AI_OUTPUT_TOKENS),
            )
            if tin is not None or tout is not None:
                extra = f"  tokens in={tin or 0} out={tout or 0}"
            status = "" if s.status in ("UNSET", "OK") else f"  [{s.status}]"
            lines.append(f"{'  ' * depth}{s.name}  ({s.service}, {ms:.1f} ms){status}{extra}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return lines
