"""While nothing records spans, `telemetry.tracer()` hands out spans that cost next to nothing
and behave as the API's no-op tracer's: the current span (hence what `inject` carries on) is
what the no-op tracer would make current, inside and after the block, exceptions included."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from mesh import telemetry

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
OTHER = {"traceparent": "00-11111111111111111111111111111111-2222222222222222-01"}


def _scenario(tracer: trace.Tracer) -> list[Any]:
    seen: list[Any] = [telemetry.inject()]
    with tracer.start_as_current_span("outer", context=telemetry.extract(PARENT)) as outer:
        outer.set_attribute("a", 1)
        seen.append(telemetry.inject())
        with tracer.start_as_current_span("inner", kind=trace.SpanKind.CLIENT) as inner:
            seen.append((telemetry.inject(), inner.is_recording()))
        failing = tracer.start_as_current_span("failing", context=telemetry.extract(OTHER))
        with pytest.raises(ValueError), failing:
            seen.append(telemetry.inject())
            raise ValueError("propagates")
        seen.append(telemetry.inject())
    seen.append(telemetry.inject())
    return seen


def test_free_spans_carry_context_as_the_no_op_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)
    free = telemetry.tracer()
    assert type(free) is not trace.NoOpTracer  # the cheap one
    expected = _scenario(trace.NoOpTracer())
    assert _scenario(free) == expected
    assert expected[1] == PARENT and expected[3] == OTHER and expected[0] == {}


def test_a_recording_provider_gets_real_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with telemetry.tracer().start_as_current_span("real") as span:
        assert span.is_recording()
