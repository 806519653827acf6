"""The pluggable brain of an agent: deterministic rules or Claude, behind one interface.

    brain = select_brain(agent="security-review", rules=review, system_prompt=prompt,
                         output_type=Verdict)
    thought = await brain.think(release)      # release already decoded into the input type
    thought.output                            # a Verdict, whichever brain answered

Which brain is configuration (mesh.providers, docs/models.md): a chain such as
`anthropic:claude-sonnet-5-5,bedrock:…,rules`, tried in order, each model attempt under its own
timeout; `abstain` as the last entry answers "abstain" when no model could. ANTHROPIC_API_KEY's
presence alone no longer picks Claude (it did before issue 16: see the migration note there).

`ClaudeBrain` asks the Messages API (Anthropic, Bedrock or Vertex client) for exactly one call of
a tool whose input schema is the msgspec JSON schema of the output type, so the model's answer is
validated by the same contract as the rules' answer. Before the request leaves the process the
payload is masked (mesh.redact) and the call's budget is reserved (mesh.budget); a call that
would not fit its budget is not made.

Safety switch: set `ALLOW_MODEL_REQUESTS = False` (tests do) or the environment variable
`MESH_ALLOW_MODEL_REQUESTS=0` and `ClaudeBrain.think` refuses to call any host but a local one
(127.0.0.1, localhost, ::1), so a test can never spend tokens on the real API by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import msgspec
from opentelemetry.trace import SpanKind

from mesh import budget, telemetry
from mesh.errors import (
    BudgetExceededError,
    ConfigError,
    MeshRuntimeError,
    ModelCallError,
    ModelOutputError,
    ModelRequestsBlockedError,
)
from mesh.providers import ModelSpec, agent_models, build_client, startup_problems
from mesh.redact import Redactor
from mesh.settings import Settings, get_settings
from mesh.tools import ModelTool, ToolRunner, ToolUse
from mesh.verdict import Verdict

if TYPE_CHECKING:
    # Imported for real only by ClaudeBrain: the SDK costs ~40 MB of memory, which an agent on
    # the rules brain should not pay (measured: idle agent 110 MB → 69 MB).
    import anthropic
    from anthropic.types import MessageParam, ToolChoiceParam, ToolParam

    from mesh.authz import ToolGuard

    Client = (
        anthropic.AsyncAnthropic | anthropic.AsyncAnthropicBedrock | anthropic.AsyncAnthropicVertex
    )

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
    """What a brain produced: the typed output, which brain produced it, what it cost, and the
    tool calls its model asked for on the way (`mesh.tools`: run, denied by policy, failed)."""

    output: OutT
    brain: str
    usage: Usage = msgspec.field(default_factory=Usage)
    tool_uses: tuple[ToolUse, ...] = ()


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
        with telemetry.tool_span(name):
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
    """Claude via the Messages API, forced to answer through one tool typed as `output_type`.

    `tools` (mesh.tools.ModelTool) are offered next to that answer tool: the model may call
    them (each call guarded by Cedar first: `guard`, default `mesh.authz.tool_guard` from the
    settings, for `agent`) for up to `max_tool_rounds` turns before it must answer."""

    def __init__(
        self,
        *,
        system_prompt: str,
        output_type: type[msgspec.Struct],
        model: str = DEFAULT_MODEL,
        client: Client | None = None,
        max_tokens: int = 1024,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        redactor: Redactor | None = None,
        provider: str = "anthropic",
        tools: list[ModelTool] | None = None,
        guard: ToolGuard | None = None,
        agent: str = "",
        max_tool_rounds: int = 8,
        settings: Settings | None = None,
    ) -> None:
        self.system_prompt = system_prompt
        self.output_type = output_type
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.redactor = redactor
        self.provider = provider
        self.name = f"claude:{model}" if provider == "anthropic" else f"{provider}:{model}"
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
        self.runner = ToolRunner(tools or [], agent=agent, guard=guard, settings=settings)
        if self.tool_name in self.runner.tools:
            raise ConfigError(f"a tool may not be named {self.tool_name}: the answer tool is")
        self.max_tool_rounds = max_tool_rounds

    @property
    def tools(self) -> list[ToolParam]:
        """Every tool the model is given: the answer tool first, then the agent's."""
        return [self.tool, *self.runner.params()]  # type: ignore[list-item]

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
        from anthropic.types import ToolUseBlock

        self._check_allowed()
        scope = budget.current.get()
        data = msgspec.to_builtins(payload)
        masked = None
        if self.redactor:
            # Masked before anything leaves the process; the values stay in `masked` only.
            masked = self.redactor.mask(data, agent=scope.agent if scope else "")
            data = masked.value
        content = msgspec.json.encode(data).decode()
        messages: list[MessageParam] = [{"role": "user", "content": content}]
        # With tools of its own the model may call them first; without, it must answer.
        tool_choice: ToolChoiceParam = (
            {"type": "any"} if self.runner.tools else {"type": "tool", "name": self.tool_name}
        )
        usage = Usage()
        uses: list[ToolUse] = []
        for turn in range(self.max_tool_rounds + 1):
            if turn == self.max_tool_rounds:  # the last turn: answer now
                tool_choice = {"type": "tool", "name": self.tool_name}
            # What this turn sends, as the budget's estimate reads it.
            asked = content if len(messages) == 1 else str(messages)
            response = await self._turn(messages, tool_choice, scope, asked)
            usage = Usage(
                input_tokens=usage.input_tokens + response.usage.input_tokens,
                output_tokens=usage.output_tokens + response.usage.output_tokens,
            )
            blocks = [b for b in response.content if isinstance(b, ToolUseBlock)]
            calls = [b for b in blocks if b.name == self.tool_name]
            if calls or not blocks or not self.runner.tools:
                break
            results: list[Any] = []
            for block in blocks:
                args = masked.restore(block.input) if masked is not None else block.input
                result, use = await self.runner.run(block.id, block.name, args)
                results.append(result)
                uses.append(use)
            said = [b.model_dump(exclude_none=True) for b in response.content]
            messages.append(cast("MessageParam", {"role": "assistant", "content": said}))
            messages.append({"role": "user", "content": results})
        if not calls:
            raise ModelOutputError(
                f"{self.name}: no {self.tool_name} call in the answer "
                f"(stop_reason={response.stop_reason})"
            )
        answer = calls[0].input
        if masked is not None:
            answer = masked.restore(answer)
        try:
            output = msgspec.convert(answer, self.output_type, strict=False)
        except msgspec.ValidationError as e:
            raise ModelOutputError(f"{self.name}: invalid {self.tool_name} input: {e}") from e
        log.debug(
            "%s answered %s (in=%d out=%d tokens)",
            self.name,
            self.tool_name,
            usage.input_tokens,
            usage.output_tokens,
        )
        return Thought(output=output, brain=self.name, usage=usage, tool_uses=tuple(uses))

    async def _turn(
        self,
        messages: list[MessageParam],
        tool_choice: ToolChoiceParam,
        scope: budget.CallScope | None,
        asked: str,
    ) -> anthropic.types.Message:
        """One request to the model, under its budget (reserved before, settled after)."""
        timeout = self.timeout_s
        left = scope.budget.remaining_s() if scope else None
        if left is not None:
            timeout = max(0.001, min(timeout, left))
        offered = str(self.tool) if not self.runner.tools else str(self.tools)
        async with contextlib.AsyncExitStack() as stack:
            reservation = None
            if scope is not None and scope.ledger is not None:
                # Raises BudgetExceededError before any request when the worst case won't fit.
                reservation = await stack.enter_async_context(
                    scope.ledger.model_call(
                        scope,
                        model=self.model,
                        prompt_text=self.system_prompt + asked + offered,
                        max_tokens=self.max_tokens,
                    )
                )
            response = await self._create(messages, tool_choice, timeout)
            if reservation is not None:
                reservation.settle(
                    self.model, response.usage.input_tokens, response.usage.output_tokens
                )
            return response

    async def _create(
        self, messages: list[MessageParam], tool_choice: ToolChoiceParam, timeout: float
    ) -> anthropic.types.Message:
        import anthropic

        try:
            return await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=self.system_prompt,
                tools=self.tools,
                tool_choice=tool_choice,
                messages=messages,
                timeout=timeout,
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


class AbstainBrain:
    """The end of a chain for agents that would rather not answer than guess: abstains."""

    name = "abstain"

    def __init__(self, output_type: type[Any]) -> None:
        if output_type is not Verdict:
            raise ConfigError(
                f"`abstain` can only end the chain of an agent that answers a Verdict, not "
                f"{getattr(output_type, '__name__', output_type)}",
                hint="end the chain with `rules`",
            )

    async def think(self, payload: object) -> Thought[Any]:
        return Thought(output=Verdict.abstain("no model could answer"), brain=self.name)


class ChainBrain:
    """Each brain in turn until one answers: a model that fails (HTTP error, connection, its
    attempt's timeout, an answer that is not the tool call) hands over to the next. A call
    refused for its budget ends the chain at once: spending elsewhere would not be cheaper."""

    def __init__(self, brains: list[Brain], *, timeouts: list[float | None]) -> None:
        self.brains = brains
        self.timeouts = timeouts
        self.name = " → ".join(b.name for b in brains)

    async def think(self, payload: object) -> Thought[Any]:
        failures: list[str] = []
        for brain, timeout in zip(self.brains, self.timeouts, strict=True):
            try:
                if timeout is None:
                    return await brain.think(payload)
                async with asyncio.timeout(timeout):
                    return await brain.think(payload)
            except BudgetExceededError:
                raise
            except TimeoutError:
                failures.append(f"{brain.name}: no answer within {timeout:.1f}s")
            except MeshRuntimeError as e:  # ModelCallError, ModelOutputError
                failures.append(str(e))
            except ModelRequestsBlockedError as e:
                failures.append(e.message)
            log.warning("brain %s failed, trying the next: %s", brain.name, failures[-1])
        raise ModelCallError(
            "every brain of the chain failed: " + "; ".join(failures), retryable=True
        )


def build_brain(
    *,
    agent: str,
    rules: Callable[[Any], Any] | None,
    system_prompt: str | None,
    output_type: type[Any],
    settings: Settings | None = None,
    tools: list[ModelTool] | None = None,
) -> tuple[Brain, list[str]]:
    """The agent's configured brain and what the start-up check found (one line each).
    `tools` go to its models (mesh.tools), each call guarded by Cedar for `agent`."""
    conf = agent_models(agent, settings)
    has_prompt = bool(system_prompt and system_prompt.strip())
    redactor = Redactor(fields=conf.redact_fields, detectors=conf.redact_detectors)
    brains: list[Brain] = []
    timeouts: list[float | None] = []
    notes: list[str] = []
    for entry in conf.chain:
        if entry == "rules":
            if rules is None:
                notes.append("`rules` is in the chain but the agent has no rules handler")
                continue
            brains.append(RulesBrain(rules))
            timeouts.append(None)
        elif entry == "abstain":
            brains.append(AbstainBrain(output_type))
            timeouts.append(None)
        else:
            assert isinstance(entry, ModelSpec)
            if not has_prompt or system_prompt is None:
                notes.append(f"{entry}: skipped, the agent has no prompt")
                continue
            problems = startup_problems(entry, settings)
            if problems:
                notes.append(f"{entry}: skipped: {', '.join(problems)}")
                continue
            client = build_client(entry, timeout_s=conf.timeout_s, settings=settings)
            brains.append(
                ClaudeBrain(
                    system_prompt=system_prompt,
                    output_type=output_type,
                    model=entry.model,
                    client=client,
                    max_tokens=conf.max_tokens,
                    timeout_s=conf.timeout_s,
                    redactor=redactor or None,
                    provider=entry.provider,
                    tools=tools,
                    agent=agent,
                    settings=settings,
                )
            )
            timeouts.append(conf.timeout_s)
    if not brains:
        raise ConfigError(
            f"{agent}: no usable brain in its chain ({', '.join(map(str, conf.chain))}, from "
            f"{conf.source}): {'; '.join(notes) or 'empty'}",
            hint="fix what is named, or end the chain with `rules` (docs/models.md)",
        )
    brain: Brain = brains[0] if len(brains) == 1 else ChainBrain(brains, timeouts=timeouts)
    if notes:
        notes.append(f"will use: {brain.name}")
    if (
        os.environ.get("ANTHROPIC_API_KEY")
        and not any(isinstance(b, ClaudeBrain) for b in brains)
        and conf.source == "default"
    ):
        notes.append(
            "ANTHROPIC_API_KEY is set but no model is configured, so the rules answer. Since "
            "issue 16 the key alone no longer picks Claude: set MESH_MODEL=anthropic:"
            f"{DEFAULT_MODEL},rules (or per agent) to use it (docs/models.md#migration)"
        )
    return brain, notes


def select_brain(
    *,
    rules: Callable[[Any], Any] | None,
    system_prompt: str | None,
    output_type: type[Any],
    agent: str = "",
    settings: Settings | None = None,
    tools: list[ModelTool] | None = None,
) -> Brain:
    """The brain `agent`'s configuration names (docs/models.md), start-up problems logged as
    warnings that say what the agent will do instead. `tools`: what its models may call."""
    brain, notes = build_brain(
        agent=agent,
        rules=rules,
        system_prompt=system_prompt,
        output_type=output_type,
        settings=settings,
        tools=tools,
    )
    for note in notes:
        log.warning("brain of %s: %s", agent or "agent", note)
    log.info("brain of %s: %s", agent or "agent", brain.name)
    return brain


async def probe(brain: Brain, *, timeout_s: float = 2.0, local_only: bool = False) -> list[str]:
    """Whether each model endpoint of `brain` accepts a TCP connection (no request is sent):
    one line per endpoint that does not. `local_only`: remote hosts are not touched (tests)."""
    brains = brain.brains if isinstance(brain, ChainBrain) else [brain]
    out = []
    for b in brains:
        if not isinstance(b, ClaudeBrain):
            continue
        url = b.client.base_url
        if local_only and url.host not in LOCAL_HOSTS:
            continue
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(url.host, port)
            writer.close()
        except (OSError, TimeoutError) as e:
            out.append(
                f"{b.name}: endpoint {url.host}:{port} unreachable ({e or 'timeout'}); "
                "calls will fail over to the next brain of the chain"
            )
    return out
