"""Delegation: an agent's handler asks another agent, by skill, through the mesh.

    @agent.rules
    async def review(release: ReleaseProposal) -> Verdict:
        legal = await delegate("compliance-review", release)   # a Verdict by default
        ...

The call runs under the current task's `mesh.budget.CallScope` and carries it on: the tenant
and event (message metadata `tenant`, `eventId`), what is left of the budget (`meshBudget`: the
event's spending is shared through the budgets bucket, so the callee's model calls draw on the
same budget), the delegation depth (`meshHops`), and the trace (a `traceparent` header from an
`invoke_agent` client span, so the callee's span is a child of this handler's). The caller's
identity is this process's own (its A2A token): the callee checks it as it checks any caller.

A delegation one hop past `MESH_MAX_HOPS` is not sent: `HopLimitError`, so a loop
(A → B → A → …) ends with a clear error instead of running until the budget or the timeouts do.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar, overload

import msgspec
from a2a.types import TaskState
from google.protobuf.json_format import MessageToDict
from opentelemetry.trace import SpanKind

from mesh import budget, subjects, telemetry
from mesh.a2a.client import AgentClient, status_text, task_of, task_state, user_message
from mesh.errors import AgentCallError, AgentUnavailableError, ConfigError, HopLimitError
from mesh.registry import Registry
from mesh.verdict import Verdict

log = logging.getLogger(__name__)

T = TypeVar("T")


@overload
async def delegate(skill: str, data: Any, *, timeout: float = 30.0) -> Verdict: ...
@overload
async def delegate(skill: str, data: Any, *, output_type: type[T], timeout: float = 30.0) -> T: ...
async def delegate(
    skill: str, data: Any, *, output_type: Any = Verdict, timeout: float = 30.0
) -> Any:
    """The answer of a live agent with `skill` to `data`, as `output_type`.

    Raises HopLimitError (too deep), AgentUnavailableError (nobody has the skill),
    AgentCallError (the task did not complete), BudgetExceededError (no tool call left), or
    ConfigError (called outside an agent's task)."""
    scope = budget.current.get()
    if scope is None or scope.bus is None:
        raise ConfigError(
            "delegate() needs a running agent's task to call from",
            hint="call it from an @agent.rules handler of an agent served on a mesh",
        )
    bus = scope.bus
    hops = scope.hops + 1
    if hops > bus.settings.max_hops:
        raise HopLimitError(
            f"{scope.agent}: delegating to {skill!r} would be hop {hops}, past the limit of "
            f"{bus.settings.max_hops} (event {scope.event_id or '-'})",
            hops=hops,
        )
    registrations = await Registry(bus).by_skill(skill)
    agents = sorted({r.agent for r in registrations})
    if not agents:
        raise AgentUnavailableError(f"skill {skill}")
    target = agents[0]
    left = scope.budget.remaining_s()
    if left is not None:
        timeout = max(0.001, min(timeout, left))
    if scope.ledger is not None:
        await scope.ledger.tool_call(scope)
    metadata: dict[str, Any] = {
        "tenant": scope.tenant,
        "eventId": scope.event_id,
        "skill": skill,
        subjects.META_HOPS: hops,
        **scope.budget.metadata(),
    }
    with telemetry.tracer().start_as_current_span(
        f"invoke_agent {target}",
        context=telemetry.extract(scope.headers) if not _in_span() else None,
        kind=SpanKind.CLIENT,
        attributes={
            telemetry.GEN_AI_OPERATION: "invoke_agent",
            telemetry.GEN_AI_AGENT_NAME: target,
            "mesh.skill": skill,
            "mesh.delegation.hops": hops,
        },
    ):
        headers = telemetry.inject()
        message = user_message(data=data, metadata=metadata)
        sent = await AgentClient(bus).send(target, message, timeout=timeout, headers=headers)
    task = task_of(sent)
    if task.status.state != TaskState.TASK_STATE_COMPLETED:
        raise AgentCallError(
            target, f"delegated task ended {task_state(task)}: {status_text(task)}"
        )
    for artifact in task.artifacts:
        for part in artifact.parts:
            if part.HasField("data"):
                try:
                    return msgspec.convert(MessageToDict(part.data), output_type, strict=False)
                except msgspec.ValidationError as e:
                    raise AgentCallError(target, f"answer is not a {output_type}: {e}") from None
    raise AgentCallError(target, "delegated task completed without a data artifact")


def _in_span() -> bool:
    from opentelemetry import trace

    return trace.get_current_span().get_span_context().is_valid
