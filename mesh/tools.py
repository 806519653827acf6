"""Tools an agent's model may call, each call checked by Cedar before it runs (docs/models.md).

    from mesh.tools import model_tool

    @model_tool(input_schema={"type": "object", "properties": {"drug": {"type": "string"}},
                              "required": ["drug"]})
    async def lookup_formulary(drug: str) -> dict[str, object]:
        ...  # its docstring, if any, is the tool's description

    agent = Agent("dosing", prompt="prompt.md", tools=[lookup_formulary])

A tool is a name, the JSON schema of its input and an async function called with the input's
fields as keyword arguments; what it returns (a string, or anything JSON encodes) is the
tool result the model reads. `ClaudeBrain` offers the agent's tools next to its answer tool and
runs the model's `tool_use` blocks (`ToolRunner`), turn after turn, until the model answers:

- before anything runs, the guard (`mesh.authz.tool_guard`: Cedar's `call_tool` on
  `Tool::"<agent>/<tool>"` with the call's tenant and arguments) is asked; a deny is returned to
  the model as an error tool result carrying the reason (which names the policy), logged, put
  on the thought (`Thought.tool_uses`) and on the span, and the function is never called;
- an allowed call counts one tool call against the event's budget (`BudgetLedger.tool_call`;
  past it: BudgetExceededError, the call is not made and the brain stops);
- a tool that raises gives the model an error result (the exception's type and message).

The agent reports each denied call with its answer (`DENIED_KEY` in the artifact's metadata,
`denied_report`); the coordinator copies them into the vote (`Vote.tools_denied`), so the
decision's signed audit record names every deny and the policy that decided it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry.trace import Status, StatusCode

from mesh import budget, telemetry
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.authz import ToolGuard
    from mesh.settings import Settings

__all__ = ["ModelTool", "ToolRunner", "ToolUse", "default_guard", "model_tool"]

log = logging.getLogger(__name__)

ToolFn = Callable[..., Awaitable[Any]]

# The artifact metadata entry carrying the tool calls the guard denied, `<tool>: <reason>`.
DENIED_KEY = "toolsDenied"
# What a vote keeps of them: an agent's report is bounded like any input from the wire.
_MAX_DENIES, _MAX_DENY_CHARS = 16, 400


def denied_report(uses: Iterable[ToolUse]) -> list[str]:
    """The denied calls among `uses`, as the agent reports them with its answer."""
    return [f"{u.name}: {u.denied}" for u in uses if u.denied][:_MAX_DENIES]


def denied_of(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """The denied calls an answer's metadata reports (`denied_report`), bounded; () if none
    or not a list of strings."""
    report = metadata.get(DENIED_KEY)
    if not isinstance(report, list):
        return ()
    return tuple(str(d)[:_MAX_DENY_CHARS] for d in report[:_MAX_DENIES] if isinstance(d, str))


@dataclass(frozen=True)
class ModelTool:
    """A tool the model may call: `fn(**input)` (async), its input's JSON schema (an object),
    and what the model is told it does."""

    name: str
    fn: ToolFn
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    description: str = ""

    def __post_init__(self) -> None:
        if not inspect.iscoroutinefunction(self.fn):
            raise ConfigError(f"tool {self.name}: its function must be async (`async def`)")
        if self.input_schema.get("type") != "object":
            raise ConfigError(f"tool {self.name}: its input schema must be an object schema")

    def param(self) -> dict[str, Any]:
        """The Messages API's tool definition."""
        return {
            "name": self.name,
            "description": self.description or self.name,
            "input_schema": dict(self.input_schema),
        }


def model_tool(
    name: str | None = None,
    *,
    input_schema: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> Callable[[ToolFn], ModelTool]:
    """Declare an async function as a tool (its name and docstring by default)."""

    def wrap(fn: ToolFn) -> ModelTool:
        return ModelTool(
            name=name or fn.__name__,
            fn=fn,
            input_schema=input_schema or {"type": "object"},
            description=description if description is not None else inspect.getdoc(fn) or "",
        )

    return wrap


class ToolUse(msgspec.Struct, frozen=True, omit_defaults=True):
    """One tool call the model asked for: whether it ran, and why not (a deny names the
    policy that decided)."""

    name: str
    ran: bool
    denied: str = ""  # the guard's reason: the function was not called
    error: str = ""  # it ran and raised, or it does not exist


def default_guard(agent: str, settings: Settings | None = None) -> ToolGuard:
    """Cedar's guard from the settings (MESH_PROFILE, MESH_AUTHZ_DIR) for `agent`."""
    from mesh import authz
    from mesh.settings import get_settings

    return authz.tool_guard(authz.Authorizer.from_settings(settings or get_settings()), agent=agent)


class ToolRunner:
    """Runs the model's tool calls for one brain: guard first, then the budget, then the tool."""

    def __init__(
        self,
        tools: list[ModelTool],
        *,
        agent: str = "",
        guard: ToolGuard | None = None,
        settings: Settings | None = None,
    ) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"tools named twice: {sorted(n for n in names if names.count(n) > 1)}"
            )
        self.tools = {t.name: t for t in tools}
        self.agent = agent
        self._guard = guard
        self._settings = settings

    def params(self) -> list[dict[str, Any]]:
        return [t.param() for t in self.tools.values()]

    def guard_for(self, agent: str) -> ToolGuard:
        if self._guard is None:
            # Built on first use: an agent with tools is only then known to need Cedar.
            self._guard = default_guard(self.agent or agent, self._settings)
        return self._guard

    async def run(self, use_id: str, name: str, arguments: Any) -> tuple[dict[str, Any], ToolUse]:
        """(the tool_result block for the model, what happened)."""
        scope = budget.current.get()
        args: dict[str, Any] = dict(arguments) if isinstance(arguments, Mapping) else {}
        with telemetry.tool_span(name) as span:
            tool = self.tools.get(name)
            if tool is None:
                use = ToolUse(name=name, ran=False, error=f"there is no tool {name!r}")
                return _result(use_id, use.error, error=True), use
            refusal = self.guard_for(scope.agent if scope else "")(
                name, args, {"tenant": scope.tenant if scope else ""}
            )
            if refusal is not None:
                span.set_attribute("mesh.tool.denied", refusal)
                span.set_status(Status(StatusCode.ERROR, "denied by policy"))
                return _result(use_id, refusal, error=True), ToolUse(
                    name=name, ran=False, denied=refusal
                )
            if scope is not None and scope.ledger is not None:
                await scope.ledger.tool_call(scope)  # BudgetExceededError: not run
            try:
                output = await tool.fn(**args)
            except Exception as e:
                log.warning("tool %s raised %s", name, type(e).__name__)
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                text = f"{type(e).__name__}: {e}"
                return _result(use_id, text, error=True), ToolUse(name=name, ran=True, error=text)
            return _result(use_id, _text(output)), ToolUse(name=name, ran=True)


def _text(output: Any) -> str:
    if isinstance(output, str):
        return output
    return json.dumps(msgspec.to_builtins(output), separators=(",", ":"), default=str)


def _result(use_id: str, content: str, *, error: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": use_id, "content": content}
    if error:
        block["is_error"] = True
    return block
