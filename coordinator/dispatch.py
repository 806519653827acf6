"""Asking one voter: an A2A call over NATS with a per-call timeout, bounded retries with
exponential backoff and full jitter, all inside the decision's deadline. Never raises: every
failure becomes a `Vote` whose outcome says what happened."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime
from typing import Any

import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode
from purgatory.domain.model import OpenedState

from coordinator.policy import Policy
from coordinator.routing import Router
from mesh import envelope, telemetry
from mesh.a2a.client import A2AClient, task_of, user_message, verdict_of
from mesh.errors import AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.records import CallOutcome, Vote
from mesh.verdict import Choice

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0


def backoff_s(attempt: int) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(cap, base·2^attempt)]."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def unanswered(policy: Policy) -> Choice | None:
    c = policy.timeout_counts_as
    return None if c == "absent" else c


async def ask(
    client: A2AClient,
    router: Router,
    *,
    skill: str,
    agent: str,
    event: envelope.Event,
    policy: Policy,
    deadline: float,
    deadline_wall: float = 0.0,
    grace_s: float = 0.0,
) -> Vote:
    """One voter's answer by `deadline` (a time.monotonic() value), under an `invoke_agent`
    client span whose context travels to the agent in the request headers."""
    with telemetry.tracer().start_as_current_span(
        f"invoke_agent {agent}",
        kind=SpanKind.CLIENT,
        attributes={
            telemetry.GEN_AI_OPERATION: "invoke_agent",
            telemetry.GEN_AI_AGENT_NAME: agent,
            telemetry.GEN_AI_CONVERSATION_ID: event.id,
            "mesh.skill": skill,
        },
    ) as span:
        vote = await _ask(
            client,
            router,
            skill=skill,
            agent=agent,
            event=event,
            policy=policy,
            deadline=deadline,
            deadline_wall=deadline_wall,
            grace_s=grace_s,
        )
        span.set_attribute("mesh.vote.outcome", vote.outcome)
        span.set_attribute("mesh.vote.attempts", vote.attempts)
        if vote.outcome != "voted":
            span.set_status(Status(StatusCode.ERROR, vote.error))
        m = telemetry.meters()
        m.call_latency.record(vote.latency_ms / 1000, {"agent": agent, "outcome": vote.outcome})
        if vote.outcome == "timeout":
            m.timeouts.add(1, {"agent": agent})
        if vote.attempts > 1:
            m.retries.add(vote.attempts - 1, {"agent": agent})
        return vote


async def _ask(
    client: A2AClient,
    router: Router,
    *,
    skill: str,
    agent: str,
    event: envelope.Event,
    policy: Policy,
    deadline: float,
    deadline_wall: float = 0.0,
    grace_s: float = 0.0,
) -> Vote:
    started = time.monotonic()
    message = user_message(
        data=event.data,
        # The same id on every retry and after a coordinator take-over: the agent answers a
        # repeat with the task it already has instead of working again.
        message_id=f"{event.tenant}/{event.id}/{skill}",
        metadata={"eventId": event.id, "eventType": event.type, "tenant": event.tenant},
    )
    attempts = 0
    last: AgentCallError | None = None
    failed: set[str] = set()  # replicas that failed this call: the next attempt goes elsewhere
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0.001:
            if attempts == 0 and grace_s > 0:
                # A take-over found the deadline gone. The voter may well have answered in time
                # to the coordinator that died: ask once more with the same messageId (the agent
                # returns the task it has) and let the task's own timestamp say if it counts.
                return await _recover(
                    client,
                    router,
                    skill=skill,
                    agent=agent,
                    message=message,
                    policy=policy,
                    deadline_wall=deadline_wall,
                    grace_s=grace_s,
                    started=started,
                )
            break
        attempts += 1
        route = router.route(agent, avoid=frozenset(failed))
        try:
            async with await router.breaker(route):
                result = await client.send_message(
                    agent,
                    message,
                    timeout=min(policy.agent_timeout_s, remaining),
                    max_timeout=min(policy.agent_timeout_max_s or 0.0, remaining) or None,
                    subject=route.subject,
                    headers=telemetry.inject(),
                )
            task = task_of(result)
            verdict = verdict_of(task)
        except OpenedState:
            last = AgentUnavailableError(agent)
            failed.add(route.breaker_key)
        except AgentCallError as e:
            last = e
            failed.add(route.breaker_key)
        except (ValueError, msgspec.ValidationError) as e:
            # The agent answered, but not with a usable vote: retrying will not change it.
            return Vote(
                skill=skill,
                agent=agent,
                outcome="error",
                counted_as=unanswered(policy),
                error=str(e),
                latency_ms=_ms(started),
                attempts=attempts,
            )
        else:
            meta = (task.get("artifacts") or [{}])[0].get("metadata", {})
            return Vote(
                skill=skill,
                agent=agent,
                outcome="voted",
                counted_as=verdict.vote,
                verdict=verdict,
                latency_ms=_ms(started),
                attempts=attempts,
                brain=str(meta.get("brain", "")),
            )
        if not last.retryable or attempts > policy.retries:
            break
        delay = backoff_s(attempts)
        if time.monotonic() + delay >= deadline:
            break
        await asyncio.sleep(delay)
    outcome: CallOutcome = (
        "timeout"
        if isinstance(last, AgentTimeoutError) or last is None
        else "unavailable"
        if isinstance(last, AgentUnavailableError)
        else "error"
    )
    return Vote(
        skill=skill,
        agent=agent,
        outcome=outcome,
        counted_as=unanswered(policy),
        error=str(last) if last else "deadline passed before it could be asked",
        latency_ms=_ms(started),
        attempts=attempts,
    )


async def _recover(
    client: A2AClient,
    router: Router,
    *,
    skill: str,
    agent: str,
    message: dict[str, Any],
    policy: Policy,
    deadline_wall: float,
    grace_s: float,
    started: float,
) -> Vote:
    route = router.route(agent)
    try:
        result = await client.send_message(
            agent,
            message,
            timeout=min(policy.agent_timeout_s, grace_s),
            subject=route.subject,
            headers=telemetry.inject(),
        )
        task = task_of(result)
        verdict = verdict_of(task)
    except (AgentCallError, ValueError, msgspec.ValidationError) as e:
        return Vote(
            skill=skill,
            agent=agent,
            outcome="timeout",
            counted_as=unanswered(policy),
            error=f"deadline passed during a take-over; no earlier answer ({e})",
            latency_ms=_ms(started),
            attempts=1,
        )
    answered_at = _timestamp(task)
    if answered_at is not None and answered_at <= deadline_wall:
        meta = (task.get("artifacts") or [{}])[0].get("metadata", {})
        return Vote(
            skill=skill,
            agent=agent,
            outcome="voted",
            counted_as=verdict.vote,
            verdict=verdict,
            latency_ms=_ms(started),
            attempts=1,
            brain=str(meta.get("brain", "")),
        )
    # Answered, but after the deadline: recorded for the audit, not counted.
    return Vote(
        skill=skill,
        agent=agent,
        outcome="timeout",
        counted_as=unanswered(policy),
        verdict=verdict,
        error="late vote: answered after the deadline; not counted",
        latency_ms=_ms(started),
        attempts=1,
    )


def _timestamp(task: dict[str, Any]) -> float | None:
    raw = task.get("status", {}).get("timestamp")
    try:
        return datetime.fromisoformat(str(raw)).timestamp() if raw else None
    except ValueError:
        return None


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)
