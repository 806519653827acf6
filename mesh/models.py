"""The pluggable brain of an agent: deterministic rules or Claude, behind one interface.

    brain = select_brain(rules=review, system_prompt=prompt, output_type=Verdict)
    thought = await brain.think(release)      # release already decoded into the input type
    thought.output                            # a Verdict, whichever brain answered

`ClaudeBrain` asks the Messages API for exactly one call of a tool whose input schema is the
msgspec JSON schema of the output type, so the model's answer is validated by the same contract
as the rules' answer. `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL` are read by the SDK itself.

Safety switch: set `ALLOW_MODEL_REQUESTS = False` (tests do) or the environment variable
`MESH_ALLOW_MODEL_REQUESTS=0` and `ClaudeBrain.think` refuses to call any host but a local one
(127.0.0.1, localhost, ::1), so a test can never spend tokens on the real API by accident.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec
from opentelemetry.trace import SpanKind

from mesh import telemetry
from mesh.errors import (
    ConfigError,
    ModelCallError,
    ModelOutputError,
    ModelRequestsBlockedError,
)
from mesh.settings import get_settings

if TYPE_CHECKING:
    # Imported for real only by ClaudeBrain: the SDK costs ~40 MB of memory, which an agent on
    # the rules brain should not pay (measured: idle agent 110 MB → 69 MB).
    import anthropic
    from anthropic.types import MessageParam, ToolChoiceToolParam, ToolParam

log = logging.getLogger(__name__)

# The newest Sonnet the pinned SDK knows; claude-sonnet-4-5 is deprecated (EOL 2026-11-30).
DEFAULT_MODEL = "claude-sonnet-5-5"

# Module switch for tests; the environment variable below can only turn requests off, never on.
ALLOW_MODEL_REQUESTS = True
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

OutT = TypeVar("OutT")


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int = 0
    output_tokens: int = 0


class Thought(msgspec.Struct, Generic[OutT], frozen=True):
    """What a brain produced: the typed output, which brain produced it, and what it cost."""

    output: OutT
    brain: str
    usage: Usage = msgspec.field(default_factory=Usage)


class Brain(Protocol):
    name: str

    async def think(self, payload: object) -> Thought[Any]:
        """Answer for `payload` (already decoded into the agent's input type)."""
        ...


def model_requests_allowed() -> bool:
    """Read at call time so tests can flip the module switch or the setting."""
    return ALLOW_MODEL_REQUESTS and get_settings().allow_model_requests


def snake_case(name: str) -> str:
    """`Verdict` → `verdict`, `ReleaseVerdict` → `release_verdict`, `HTTPResult` → `http_result`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def tool_schema(output_type: type[Any]) -> dict[str, Any]:
    """The msgspec JSON schema of `output_type` with every `$ref` inlined.

    The Messages API wants a self-contained object schema as a tool's `input_schema`; msgspec
    puts structs under `$defs` and refers to them, so the references are resolved here.
    """
    schema = msgspec.json.schema(output_type)
    defs: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any, trail: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[-1]
                if name in trail:
                    raise ConfigError(
                        f"{output_type.__name__}: recursive type {name} cannot be a tool schema",
                        hint="use a non-recursive output struct",
                    )
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**inline(defs[name], (*trail, name)), **inline(rest, trail)}
            return {k: inline(v, trail) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v, trail) for v in node]
        return node

    resolved: dict[str, Any] = inline(schema, ())
    if resolved.get("type") != "object":
        raise ConfigError(
            f"{output_type.__name__}: a tool's input must be an object, got {resolved.get('type')}",
            hint="use a msgspec.Struct as the output type",
        )
    return resolved


class RulesBrain:
    """Deterministic brain: calls the agent's handler (sync or async) with the payload."""

    name = "rules"

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self._fn = fn

    async def think(self, payload: object) -> Thought[Any]:
        name = getattr(self._fn, "__name__", "rules")
        with telemetry.tracer().start_as_current_span(
            f"execute_tool {name}",
            kind=SpanKind.INTERNAL,
            attributes={
                telemetry.GEN_AI_OPERATION: "execute_tool",
                telemetry.GEN_AI_TOOL_NAME: name,
            },
        ):
            return await self._think(payload)

    async def _think(self, payload: object) -> Thought[Any]:
        if inspect.iscoroutinefunction(self._fn):
            output = await self._fn(payload)
        else:
            # A thread keeps the event loop (heartbeats, other tasks) responsive while rules
            # scan a large diff; rules are pure functions, so this is safe.
            output = await asyncio.to_thread(self._fn, payload)
            if inspect.isawaitable(output):
                output = await output
        return Thought(output=output, brain=self.name)


class ClaudeBrain:
    """Claude via the Messages API, forced to answer through one tool typed as `output_type`."""

    def __init__(
        self,
        *,
        system_prompt: str,
        output_type: type[msgspec.Struct],
        model: str = DEFAULT_MODEL,
        client: anthropic.AsyncAnthropic | None = None,
        max_tokens: int = 1024,
        timeout_s: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        self.system_prompt = system_prompt
        self.output_type = output_type
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.name = f"claude:{model}"
        # The SDK reads ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL itself; its own retries honour
        # `retry-after`, and whatever still fails surfaces as a ModelCallError whose `retryable`
        # tells the caller whether trying again later can help.
        import anthropic

        self.client = client or anthropic.AsyncAnthropic(timeout=timeout_s, max_retries=max_retries)
        self.tool_name = f"submit_{snake_case(output_type.__name__)}"
        self.tool: ToolParam = {
            "name": self.tool_name,
            "description": (
                f"Submit your final {output_type.__name__}. Call this exactly once; it is the "
                "only way to answer."
            ),
            "input_schema": tool_schema(output_type),
        }

    def _check_allowed(self) -> None:
        if model_requests_allowed():
            return
        host = self.client.base_url.host
        if host in LOCAL_HOSTS:
            return
        raise ModelRequestsBlockedError(
            f"model requests are disabled and {self.client.base_url} is not local",
            hint="point ANTHROPIC_BASE_URL at a local fake, or re-enable requests: unset "
            "MESH_ALLOW_MODEL_REQUESTS and keep mesh.models.ALLOW_MODEL_REQUESTS = True",
        )

    async def think(self, payload: object) -> Thought[Any]:
        with telemetry.tracer().start_as_current_span(
            f"chat {self.model}",
            kind=SpanKind.CLIENT,
            attributes={
                telemetry.GEN_AI_OPERATION: "chat",
                telemetry.GEN_AI_PROVIDER: "anthropic",
                telemetry.GEN_AI_REQUEST_MODEL: self.model,
            },
        ) as span:
            thought = await self._think(payload)
            span.set_attribute(telemetry.GEN_AI_INPUT_TOKENS, thought.usage.input_tokens)
            span.set_attribute(telemetry.GEN_AI_OUTPUT_TOKENS, thought.usage.output_tokens)
            telemetry.record_usage(
                self.model, thought.usage.input_tokens, thought.usage.output_tokens
            )
            return thought

    async def _think(self, payload: object) -> Thought[Any]:
        import anthropic
        from anthropic.types import ToolUseBlock

        self._check_allowed()
        messages: list[MessageParam] = [
            {"role": "user", "content": msgspec.json.encode(payload).decode()}
        ]
        tool_choice: ToolChoiceToolParam = {"type": "tool", "name": self.tool_name}
        try:
            response = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=self.system_prompt,
                tools=[self.tool],
                tool_choice=tool_choice,
                messages=messages,
                timeout=self.timeout_s,
            )
        except anthropic.APIStatusError as e:
            status = e.status_code
            raise ModelCallError(
                f"{self.name}: HTTP {status}: {e.api_message or e.message}",
                status=status,
                retryable=status in (408, 409, 429) or status >= 500,
            ) from e
        except anthropic.APIConnectionError as e:
            raise ModelCallError(f"{self.name}: {e.message}", retryable=True) from e
        except anthropic.AnthropicError as e:
            raise ModelCallError(f"{self.name}: {e}", retryable=False) from e

        usage = Usage(
            input_tokens=response.usage.input_tokens, output_tokens=response.usage.output_tokens
        )
        calls = [
            block
            for block in response.content
            if isinstance(block, ToolUseBlock) and block.name == self.tool_name
        ]
        if not calls:
            raise ModelOutputError(
                f"{self.name}: no {self.tool_name} call in the answer "
                f"(stop_reason={response.stop_reason})"
            )
        try:
            output = msgspec.convert(calls[0].input, self.output_type, strict=False)
        except msgspec.ValidationError as e:
            raise ModelOutputError(f"{self.name}: invalid {self.tool_name} input: {e}") from e
        log.debug(
            "%s answered %s (in=%d out=%d tokens)",
            self.name,
            self.tool_name,
            usage.input_tokens,
            usage.output_tokens,
        )
        return Thought(output=output, brain=self.name, usage=usage)


def select_brain(
    *,
    rules: Callable[[Any], Any] | None,
    system_prompt: str | None,
    output_type: type[Any],
    model: str = DEFAULT_MODEL,
) -> Brain:
    """Claude when `ANTHROPIC_API_KEY` is set and there is a prompt; the rules otherwise."""
    has_key = bool(os.environ.get("ANTHROPIC_API_KEY"))
    has_prompt = bool(system_prompt and system_prompt.strip())
    if has_key and has_prompt and system_prompt is not None:
        brain = ClaudeBrain(system_prompt=system_prompt, output_type=output_type, model=model)
        log.info("brain: %s (ANTHROPIC_API_KEY set and a system prompt given)", brain.name)
        if not model_requests_allowed() and brain.client.base_url.host not in LOCAL_HOSTS:
            log.warning(
                "brain: model requests are disabled; %s will refuse to call %s",
                brain.name,
                brain.client.base_url,
            )
        return brain
    if rules is None:
        why = "no ANTHROPIC_API_KEY" if not has_key else "no system prompt"
        raise ConfigError(
            f"no brain for {getattr(output_type, '__name__', output_type)}: {why} and no rules",
            hint="register a rules handler, or set ANTHROPIC_API_KEY and give a prompt",
        )
    why = "ANTHROPIC_API_KEY not set" if not has_key else "no system prompt"
    log.info("brain: rules (%s)", why)
    return RulesBrain(rules)
