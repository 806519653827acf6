"""ClaudeBrain through the real anthropic SDK against FakeAnthropic over real HTTP on 127.0.0.1,
plus the rules brain, brain selection and the model-request guard."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest

import mesh.models
from agents.release import ReleaseProposal, decode_release
from agents.security_review.rules import review as security_review
from mesh.errors import ConfigError
from mesh.models import (
    ClaudeBrain,
    ModelCallError,
    ModelOutputError,
    ModelRequestsBlockedError,
    RulesBrain,
    select_brain,
    snake_case,
    tool_schema,
)
from mesh.settings import get_settings
from mesh.testing.fake_anthropic import FakeAnthropic, FakeHTTPError, text_message
from mesh.verdict import Verdict

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "agents" / "samples" / "release_secret.json"
PROMPT = (ROOT / "agents" / "security_review" / "prompt.md").read_text()


@pytest.fixture(autouse=True)
def _no_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


@pytest.fixture
def release() -> ReleaseProposal:
    return decode_release(SAMPLE.read_bytes())


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as f:
        yield f


def client_for(fake: FakeAnthropic, *, max_retries: int = 0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test-key", base_url=fake.base_url, max_retries=max_retries
    )


async def think(
    fake: FakeAnthropic, payload: object, *, max_retries: int = 0, **kw: Any
) -> mesh.models.Thought[Any]:
    async with client_for(fake, max_retries=max_retries) as client:
        brain = ClaudeBrain(system_prompt=PROMPT, output_type=Verdict, client=client, **kw)
        return await brain.think(payload)


def contains_ref(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or "$defs" in node or any(contains_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(contains_ref(v) for v in node)
    return False


# -- the happy path -----------------------------------------------------------------------------


async def test_verdict_is_parsed_from_the_tool_call(
    fake: FakeAnthropic, release: ReleaseProposal
) -> None:
    thought = await think(fake, release, model="claude-test-1")
    assert thought.output == Verdict("approve", ["scripted"])
    assert thought.brain == "claude:claude-test-1"
    assert len(fake.requests) == 1


async def test_request_carries_prompt_payload_and_forced_tool(
    fake: FakeAnthropic, release: ReleaseProposal
) -> None:
    await think(fake, release, model="claude-test-1", max_tokens=321)
    body = fake.requests[0]
    assert body["system"] == PROMPT
    assert body["model"] == "claude-test-1"
    assert body["max_tokens"] == 321
    assert body["tool_choice"] == {"type": "tool", "name": "submit_verdict"}
    [message] = body["messages"]
    assert message["role"] == "user"
    assert json.loads(message["content"]) == msgspec.to_builtins(release)
    # SDK 2.x sends the key as a bearer token; older ones used x-api-key.
    headers = fake.headers[0]
    assert "test-key" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])


async def test_tool_schema_is_the_inlined_msgspec_schema(fake: FakeAnthropic) -> None:
    await think(fake, {"id": "r1"})
    [tool] = fake.requests[0]["tools"]
    assert tool["name"] == "submit_verdict"
    schema = tool["input_schema"]
    assert schema == tool_schema(Verdict)
    assert schema["type"] == "object"
    assert schema["required"] == ["vote"]
    assert schema["properties"]["vote"]["enum"] == ["abstain", "approve", "reject"]
    assert not contains_ref(schema)


async def test_usage_is_recorded(fake: FakeAnthropic) -> None:
    thought = await think(fake, {"id": "r1"})
    sent = fake.responses[0]["usage"]
    assert thought.usage.input_tokens == sent["input_tokens"] > 0
    assert thought.usage.output_tokens == sent["output_tokens"] > 0


async def test_scripted_reject_with_confidence_round_trips() -> None:
    answer = {"vote": "reject", "reasons": ["src/a.py:3: AWS access key id"], "confidence": 0.8}
    async with FakeAnthropic(lambda req: answer) as fake:
        thought = await think(fake, {"id": "r1"})
    assert thought.output == Verdict("reject", ["src/a.py:3: AWS access key id"], 0.8)


async def test_async_responder_is_awaited() -> None:
    async def responder(req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"vote": "abstain", "reasons": [req["model"]]}

    async with FakeAnthropic(responder) as fake:
        thought = await think(fake, {"id": "r1"}, model="m-1")
    assert thought.output == Verdict("abstain", ["m-1"])


# -- bad model output ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool_input",
    [{"vote": "maybe"}, {"reasons": ["no vote"]}, {"vote": "approve", "reasons": "not a list"}],
)
async def test_invalid_tool_input_raises_model_output_error(tool_input: dict[str, Any]) -> None:
    async with FakeAnthropic(lambda req: tool_input) as fake:
        with pytest.raises(ModelOutputError, match="invalid submit_verdict input") as info:
            await think(fake, {"id": "r1"})
    assert info.value.retryable is False


async def test_answer_without_tool_call_raises_model_output_error() -> None:
    async with FakeAnthropic(lambda req: text_message(req, "Looks fine to me!")) as fake:
        with pytest.raises(ModelOutputError, match="no submit_verdict call"):
            await think(fake, {"id": "r1"})


async def test_call_of_another_tool_is_not_accepted() -> None:
    async with FakeAnthropic() as fake:
        fake.responder = lambda req: {
            **text_message(req, ""),
            "content": [
                {"type": "tool_use", "id": "t1", "name": "other", "input": {"vote": "approve"}}
            ],
            "stop_reason": "tool_use",
        }
        with pytest.raises(ModelOutputError, match="no submit_verdict call"):
            await think(fake, {"id": "r1"})


# -- API errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"), [(529, True), (500, True), (429, True), (400, False), (401, False)]
)
async def test_http_errors_raise_model_call_error(status: int, retryable: bool) -> None:
    async with FakeAnthropic(status=status) as fake:
        with pytest.raises(ModelCallError, match=f"HTTP {status}") as info:
            await think(fake, {"id": "r1"})
    assert info.value.status == status
    assert info.value.retryable is retryable


async def test_sdk_retries_transient_errors_before_giving_up() -> None:
    async with FakeAnthropic(status=529) as fake:
        with pytest.raises(ModelCallError):
            await think(fake, {"id": "r1"}, max_retries=2)
    assert len(fake.requests) == 3


async def test_transient_error_then_success() -> None:
    calls = 0

    def flaky(req: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise FakeHTTPError(529, "overloaded")
        return {"vote": "approve", "reasons": ["second try"]}

    async with FakeAnthropic(flaky) as fake:
        thought = await think(fake, {"id": "r1"}, max_retries=1)
    assert thought.output.reasons == ["second try"]
    assert len(fake.requests) == 2


async def test_connection_failure_is_retryable() -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with anthropic.AsyncAnthropic(
        api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=0
    ) as client:
        brain = ClaudeBrain(system_prompt="p", output_type=Verdict, client=client, timeout_s=5)
        with pytest.raises(ModelCallError) as info:
            await brain.think({"id": "r1"})
    assert info.value.retryable is True
    assert info.value.status is None


# -- the guard ----------------------------------------------------------------------------------


def recording_client(base_url: str) -> tuple[anthropic.AsyncAnthropic, list[httpx2.Request]]:
    sent: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(500)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    client = anthropic.AsyncAnthropic(
        api_key="k", base_url=base_url, http_client=http, max_retries=0
    )
    return client, sent


async def test_guard_blocks_remote_api_without_any_request() -> None:
    client, sent = recording_client("https://api.anthropic.com")
    brain = ClaudeBrain(system_prompt="p", output_type=Verdict, client=client)
    with pytest.raises(ModelRequestsBlockedError, match=r"api\.anthropic\.com"):
        await brain.think({"id": "r1"})
    assert sent == []
    assert isinstance(ModelRequestsBlockedError("x"), ConfigError)


async def test_guard_by_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", True)
    monkeypatch.setenv("MESH_ALLOW_MODEL_REQUESTS", "0")
    get_settings.cache_clear()  # settings are read once per process
    client, sent = recording_client("https://api.anthropic.com")
    brain = ClaudeBrain(system_prompt="p", output_type=Verdict, client=client)
    with pytest.raises(ModelRequestsBlockedError):
        await brain.think({"id": "r1"})
    assert sent == []


async def test_guard_off_lets_the_request_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # Proves the guard, not something else, stopped the requests above.
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", True)
    monkeypatch.delenv("MESH_ALLOW_MODEL_REQUESTS", raising=False)
    get_settings.cache_clear()
    client, sent = recording_client("https://api.anthropic.com")
    brain = ClaudeBrain(system_prompt="p", output_type=Verdict, client=client)
    with pytest.raises(ModelCallError):
        await brain.think({"id": "r1"})
    assert len(sent) == 1


async def test_guard_allows_local_hosts(fake: FakeAnthropic) -> None:
    assert mesh.models.model_requests_allowed() is False
    assert (await think(fake, {"id": "r1"})).output.vote == "approve"


# -- brain selection, rules brain, helpers ------------------------------------------------------


async def test_select_brain_uses_rules_without_configuration(
    release: ReleaseProposal, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mesh.models"):
        brain = select_brain(rules=security_review, system_prompt=PROMPT, output_type=Verdict)
    assert isinstance(brain, RulesBrain)
    assert "brain of agent: rules" in caplog.text
    thought = await brain.think(release)
    assert thought.brain == "rules"
    assert thought.output.vote == "reject"
    assert thought.usage.input_tokens == thought.usage.output_tokens == 0


def test_the_api_key_alone_no_longer_picks_claude(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16's migration: the key's presence is not configuration; a loud line says so."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with caplog.at_level(logging.WARNING, logger="mesh.models"):
        brain = select_brain(rules=security_review, system_prompt=PROMPT, output_type=Verdict)
    assert isinstance(brain, RulesBrain)
    assert "no longer picks Claude" in caplog.text and "MESH_MODEL=" in caplog.text


async def test_select_brain_uses_claude_when_configured(
    fake: FakeAnthropic,
    release: ReleaseProposal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK itself honours ANTHROPIC_BASE_URL, which is how agent processes reach a fake.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("MESH_MODEL", f"anthropic:{mesh.models.DEFAULT_MODEL}")
    brain = select_brain(rules=security_review, system_prompt=PROMPT, output_type=Verdict)
    assert isinstance(brain, ClaudeBrain)
    assert brain.name == f"claude:{mesh.models.DEFAULT_MODEL}"
    try:
        thought = await brain.think(release)
    finally:
        await brain.client.close()
    assert thought.output == Verdict("approve", ["scripted"])
    assert fake.requests[0]["system"] == PROMPT


def test_select_brain_without_prompt_falls_back_to_rules(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("MESH_MODEL", "anthropic:claude-sonnet-5-5,rules")
    with caplog.at_level(logging.WARNING, logger="mesh.models"):
        brain = select_brain(rules=security_review, system_prompt="  ", output_type=Verdict)
    assert isinstance(brain, RulesBrain)
    assert "skipped, the agent has no prompt" in caplog.text


def test_select_brain_without_anything_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no usable brain"):
        select_brain(rules=None, system_prompt=PROMPT, output_type=Verdict)


async def test_rules_brain_accepts_async_handlers() -> None:
    async def handler(payload: dict[str, Any]) -> Verdict:
        return Verdict.abstain(payload["id"])

    thought = await RulesBrain(handler).think({"id": "r9"})
    assert thought.output == Verdict("abstain", ["r9"])


class ReleaseRisk(msgspec.Struct):
    level: int
    notes: list[str] = []


class Finding(msgspec.Struct):
    path: str


class Report(msgspec.Struct):
    findings: list[Finding]
    top: Finding | None = None


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Verdict", "verdict"), ("ReleaseRisk", "release_risk"), ("HTTPResult", "http_result")],
)
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


def test_tool_schema_inlines_nested_structs() -> None:
    schema = tool_schema(Report)
    assert not contains_ref(schema)
    assert schema["properties"]["findings"]["items"]["properties"]["path"] == {"type": "string"}


async def test_tool_is_named_after_the_output_type(fake: FakeAnthropic) -> None:
    fake.responder = lambda req: {"level": 3}
    async with client_for(fake) as client:
        brain = ClaudeBrain(system_prompt="p", output_type=ReleaseRisk, client=client)
        thought = await brain.think({"id": "r1"})
    assert fake.requests[0]["tool_choice"]["name"] == "submit_release_risk"
    assert thought.output == ReleaseRisk(level=3)


# -- the fake as a process ----------------------------------------------------------------------


async def test_fake_runs_as_a_standalone_process(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.testing.fake_anthropic",
        *("--port", "0", "--port-file", str(port_file)),
        *("--vote", "reject", "--reason", "from the process"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log_lines: list[str] = []
    try:
        async with asyncio.timeout(15):  # interpreter start-up and bind
            while "listening on" not in (line := (await proc.stderr.readline()).decode()):
                assert line, f"fake exited early: {log_lines}"
                log_lines.append(line)
        base_url = line.rsplit(" ", 1)[-1].strip()
        port = int(await asyncio.to_thread(port_file.read_text))
        assert base_url == f"http://127.0.0.1:{port}"
        async with anthropic.AsyncAnthropic(
            api_key="k", base_url=base_url, max_retries=0
        ) as client:
            brain = ClaudeBrain(system_prompt="p", output_type=Verdict, client=client)
            thought = await brain.think({"id": "r1"})
        assert thought.output == Verdict("reject", ["from the process"])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 0, err.decode()
    assert "stopped after 1 request(s)" in err.decode()
