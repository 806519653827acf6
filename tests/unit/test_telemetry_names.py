"""The semantic-convention names mesh/telemetry.py writes out equal OpenTelemetry's own.

OpenTelemetry publishes the messaging and GenAI attribute names only in its private
`_incubating` package; the product does not import it, this test does, so a renamed
convention shows up here instead of as silently wrong span attributes.
"""

from __future__ import annotations

import pytest
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
from opentelemetry.semconv._incubating.attributes import messaging_attributes as MA

from mesh import telemetry

PAIRS = {
    "MESSAGING_SYSTEM": MA.MESSAGING_SYSTEM,
    "MESSAGING_DESTINATION": MA.MESSAGING_DESTINATION_NAME,
    "MESSAGING_OPERATION_NAME": MA.MESSAGING_OPERATION_NAME,
    "MESSAGING_OPERATION_TYPE": MA.MESSAGING_OPERATION_TYPE,
    "MESSAGING_MESSAGE_ID": MA.MESSAGING_MESSAGE_ID,
    "MESSAGING_CONSUMER_GROUP": MA.MESSAGING_CONSUMER_GROUP_NAME,
    "GEN_AI_OPERATION": GA.GEN_AI_OPERATION_NAME,
    "GEN_AI_PROVIDER": GA.GEN_AI_PROVIDER_NAME,
    "GEN_AI_AGENT_NAME": GA.GEN_AI_AGENT_NAME,
    "GEN_AI_AGENT_ID": GA.GEN_AI_AGENT_ID,
    "GEN_AI_AGENT_VERSION": GA.GEN_AI_AGENT_VERSION,
    "GEN_AI_CONVERSATION_ID": GA.GEN_AI_CONVERSATION_ID,
    "GEN_AI_REQUEST_MODEL": GA.GEN_AI_REQUEST_MODEL,
    "GEN_AI_INPUT_TOKENS": GA.GEN_AI_USAGE_INPUT_TOKENS,
    "GEN_AI_OUTPUT_TOKENS": GA.GEN_AI_USAGE_OUTPUT_TOKENS,
    "GEN_AI_TOOL_NAME": GA.GEN_AI_TOOL_NAME,
}


@pytest.mark.parametrize(("name", "expected"), PAIRS.items())
def test_semconv_name(name: str, expected: str) -> None:
    assert getattr(telemetry, name) == expected


def test_every_written_out_name_is_checked() -> None:
    written = {n for n in vars(telemetry) if n.startswith(("MESSAGING_", "GEN_AI_"))}
    assert written == set(PAIRS)
