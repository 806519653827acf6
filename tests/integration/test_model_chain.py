"""Brain chains against the local Anthropic-compatible server: model A failing → model B, then
the rules; redaction as the server sees it; the start-up reachability probe."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from mesh.models import ChainBrain, build_brain, probe
from mesh.settings import Settings
from mesh.testing.fake_anthropic import FakeAnthropic, FakeHTTPError
from mesh.verdict import Verdict

pytestmark = pytest.mark.integration

MODEL_A = "claude-opus-5-5"
MODEL_B = "claude-haiku-5-5"


def rules(payload: object) -> Verdict:
    return Verdict.reject("the rules answered")


@pytest.fixture
def configured(fake: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("MESH_MODEL", f"anthropic:{MODEL_A},anthropic:{MODEL_B},rules")
    path = tmp_path / "models.toml"
    # Short attempts: model A hanging must hand over to B without the test waiting long.
    path.write_text("[default]\ntimeout_s = 1.0\n")
    return Settings(models_file=path)


@pytest.fixture
async def fake() -> Any:
    async with FakeAnthropic() as f:
        yield f


def chain(settings: Settings, **kw: Any) -> ChainBrain:
    brain, notes = build_brain(
        agent="chained",
        rules=rules,
        system_prompt="Vote on it.",
        output_type=Verdict,
        settings=settings,
        **kw,
    )
    assert notes == [] and isinstance(brain, ChainBrain)
    return brain


async def test_model_a_failing_hands_over_to_b_then_to_the_rules(
    fake: FakeAnthropic, configured: Settings
) -> None:
    down = {MODEL_A}

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        if request["model"] in down:
            raise FakeHTTPError(529, "overloaded")
        return {"vote": "approve", "reasons": [f"{request['model']} answered"]}

    fake.responder = respond
    brain = chain(configured)
    thought = await brain.think({"id": "r1"})
    assert thought.brain == f"claude:{MODEL_B}"
    assert thought.output == Verdict("approve", [f"{MODEL_B} answered"])
    assert [r["model"] for r in fake.requests] == [MODEL_A, MODEL_B]

    down.add(MODEL_B)
    thought = await brain.think({"id": "r2"})
    assert thought.brain == "rules"
    assert thought.output == Verdict.reject("the rules answered")
    assert [r["model"] for r in fake.requests[2:]] == [MODEL_A, MODEL_B]


async def test_an_attempt_past_its_timeout_hands_over(
    fake: FakeAnthropic, configured: Settings
) -> None:
    never = asyncio.Event()

    async def respond(request: dict[str, Any]) -> dict[str, Any]:
        if request["model"] == MODEL_A:
            await never.wait()  # hangs until the attempt's timeout cancels the client call
        return {"vote": "approve", "reasons": ["b"]}

    fake.responder = respond
    try:
        thought = await chain(configured).think({"id": "r1"})
    finally:
        never.set()
    assert thought.brain == f"claude:{MODEL_B}"


async def test_the_server_never_receives_masked_values(
    fake: FakeAnthropic, configured: Settings, tmp_path: Path
) -> None:
    assert configured.models_file is not None
    configured.models_file.write_text(
        "[default]\ntimeout_s = 5.0\n"
        '[default.redact]\nfields = ["$.patient.name"]\n'
        'detectors = ["email", "phone", "iban", "card", "aws_key"]\n'
    )
    secrets = [
        "Jane Doe",
        "jane.doe@example.org",
        "+44 20 7946 0958",
        "GB82 WEST 1234 5698 7654 32",
        "4111 1111 1111 1111",
        "AKIAIOSFODNN7EXAMPLE",
    ]

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        # The model quotes what it saw: the placeholders, which come back as the values.
        sent = request["messages"][0]["content"]
        return {"vote": "reject", "reasons": [f"saw {sent}"]}

    fake.responder = respond
    payload = {
        "patient": {"name": secrets[0]},
        "note": " / ".join(secrets[1:]),
    }
    thought = await chain(configured).think(payload)
    received = json.dumps(fake.requests)
    for secret in secrets:
        assert secret not in received, secret
    assert "[[FIELD_1]]" in received and "[[EMAIL_1]]" in received
    # Restored in the agent's output: the reasons hold the real values again.
    for secret in secrets:
        assert secret in thought.output.reasons[0], secret


async def test_probe_names_an_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, then closed)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MESH_MODEL", f"anthropic:{MODEL_A},rules")
    brain, _ = build_brain(
        agent="a", rules=rules, system_prompt="Vote.", output_type=Verdict, settings=Settings()
    )
    [line] = await probe(brain)
    assert f"claude:{MODEL_A}: endpoint 127.0.0.1:{port} unreachable" in line
    assert "fail over to the next brain" in line
    async with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        brain, _ = build_brain(
            agent="a", rules=rules, system_prompt="Vote.", output_type=Verdict, settings=Settings()
        )
        assert await probe(brain) == []
