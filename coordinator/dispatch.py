"""Asking one voter (the service's `Asker`): an A2A call over NATS with a per-call timeout,
retried on another replica each time (full-jitter backoff), all inside the decision's deadline.
Never raises: every failure becomes a `Vote` whose outcome says what happened.

Two kinds of failure, retried differently:
- infrastructure (`infrastructure`): nobody listening, an agent's "busy", a JSON-RPC internal
  error (-32603, e.g. an agent's task store in a leader election). The path failed, not the
  agent's judgement: retried until the deadline (pauses capped at 1 s, at least the agent's
  `retry_after_s`), not counted against `retries`;
- everything else (a timeout, every replica's breaker open, an error answer): at most the
  policy's `retries` more attempts.
A call whose last attempts found nobody listening (whatever earlier ones met: an instance that
timed out and then vanished is gone) ends `unavailable` with an error starting
`decide.NOBODY_LISTENING`: the voter cannot be asked, and the decision core releases the event
to wait for it rather than count it as silence.
The per-call timeout counts from when the call is sent (admission has already found it room)
and never reaches past the deadline.

An answer counts only if the instance that gave it signed it (`mesh.votes`) with the key its
verified card binds, for exactly what was asked: this event, tenant, skill and messageId. An
answer that is unsigned, wrongly signed or signed for something else is an `invalid` vote:
counted as the policy counts a voter that gave no usable answer (never as the vote it claims),
recorded with what it claimed and why it was refused, and not retried (the same replica would
answer the same; an impostor would too).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import msgspec
from a2a.types import Message, Task
from opentelemetry.trace import SpanKind, Status, StatusCode

from coordinator.decide import NOBODY_LISTENING, TAKEN_OVER_LATE, Ask, unanswered
from coordinator.policy import Policy
from coordinator.routing import BreakerOpen, NoReplica, Router, is_busy
from mesh import envelope, subjects, telemetry, versions, votes
from mesh._internal.retry import RetryPolicy
from mesh.a2a import jsonrpc, wire
from mesh.a2a.client import (
    AgentClient,
    artifact_metadata,
    status_time,
    task_of,
    user_message,
    verdict_of,
)
from mesh.a2a.wire import OutgoingMessage, TaskView
from mesh.budget import Budget, refused_for_budget
from mesh.errors import (
    AgentBusyError,
    AgentCallError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from mesh.records import CallOutcome, Vote
from mesh.tools import denied_of
from mesh.verdict import Verdict

log = logging.getLogger(__name__)


def retry_policy(policy: Policy) -> RetryPolicy:
    """`retries` more attempts after the first; the pause after the n-th failure is uniform in
    [0, min(1 s, 0.1 s·2^(n-1))] and never reaches past the decision's deadline."""
    return RetryPolicy(attempts=policy.retries + 1, base_s=0.1, max_s=1.0)


# Agents whose last attempt from this process found nobody listening (no responders). A call
# stopped by an open breaker sent nothing; this says whether that breaker opened on nobody
# listening (the voter cannot be asked: the event waits for it) or on an instance that was
# there and failed (a hung one's timeouts: silence, counted as the policy says). Bounded by
# the number of agent names.
_UNHEARD: set[str] = set()

# Infrastructure failures: as many attempts as fit before the deadline (that is the bound).
INFRA_RETRY = RetryPolicy(attempts=sys.maxsize, base_s=0.05, max_s=1.0)


def infrastructure(e: AgentCallError) -> bool:
    """A failure of the path to the agent rather than of the agent: worth retrying until the
    deadline (see the module docstring)."""
    return (
        is_busy(e)
        or type(e) is AgentUnavailableError  # no responders (an open breaker is not this)
        or e.code == jsonrpc.INTERNAL_ERROR
    )


def _infra_pause(e: AgentCallError, infra_failures: int, deadline: float) -> float | None:
    wait = INFRA_RETRY.delay(infra_failures)
    if isinstance(e, AgentBusyError) and e.retry_after_s > wait:
        wait = e.retry_after_s  # the agent said when it will have room
    return wait if time.monotonic() + wait < deadline else None


def message(req: Ask) -> OutgoingMessage | Message:
    """The question to one voter: the event's data and what the voter signs its answer for. As
    msgspec-made JSON (mesh.a2a.wire), equal to what `user_message` would print; as a protobuf
    Message when the data is something only that path says how to handle (`wire.struct_value`
    refuses it: e.g. a non-finite number, which it refuses where it always did, in the call)."""
    e = req.event
    message_id = subjects.vote_message_id(e.tenant, e.id, req.skill)
    metadata = {
        "eventId": e.id,
        "eventType": e.type,
        "tenant": e.tenant,
        "skill": req.skill,
        **Budget.of_event(e).metadata(),  # what the event may spend (mesh.budget)
    }
    part = _data_part(e) if e.data is not None else None
    if part is not None:
        try:
            return OutgoingMessage(
                message_id=message_id,
                role="ROLE_USER",
                parts=[part],
                metadata=wire.struct_value(msgspec.to_builtins(metadata)),
            )
        except ValueError:
            pass
    # No data (no part, as `user_message(data=None)` builds it), or data only protobuf carries.
    return user_message(data=e.data, message_id=message_id, metadata=metadata)


# The event's data as a message part's JSON, made once per event rather than once per voter
# (protobuf conversion was ~16% of the coordinator's CPU with 3 voters: bench --profile). Keyed
# by the Event object (one per delivery, shared by its voters); the last few kept. None: data
# the msgspec path does not carry (`message` takes the protobuf one).
_PARTS: dict[int, tuple[envelope.Event, msgspec.Raw | None]] = {}
_PARTS_KEPT = 64


def _data_part(event: envelope.Event) -> msgspec.Raw | None:
    held = _PARTS.get(id(event))
    if held is not None and held[0] is event:
        return held[1]
    try:
        part: msgspec.Raw | None = wire.data_part(event.data)
    except (ValueError, TypeError):
        part = None
    if len(_PARTS) >= _PARTS_KEPT:
        del _PARTS[next(iter(_PARTS))]  # the oldest
    _PARTS[id(event)] = (event, part)
    return part


async def ask(client: AgentClient, router: Router, req: Ask) -> Vote:
    """One voter's answer by the deadline, under an `invoke_agent` client span whose context
    travels to the agent in the request headers."""
    with telemetry.tracer().start_as_current_span(
        f"invoke_agent {req.agent}",
        kind=SpanKind.CLIENT,
        attributes={
            telemetry.GEN_AI_OPERATION: "invoke_agent",
            telemetry.GEN_AI_AGENT_NAME: req.agent,
            telemetry.GEN_AI_CONVERSATION_ID: req.event.id,
            "mesh.skill": req.skill,
        },
    ) as span:
        vote = await _ask(client, router, req)
        span.set_attribute("mesh.vote.outcome", vote.outcome)
        span.set_attribute("mesh.vote.attempts", vote.attempts)
        if vote.outcome != "voted":
            span.set_status(Status(StatusCode.ERROR, vote.error))
        m = telemetry.meters()
        labels = {"agent": req.agent, "outcome": vote.outcome}
        m.call_latency.record(vote.latency_ms / 1000, labels)
        if vote.outcome == "timeout":
            m.timeouts.add(1, {"agent": req.agent})
        if vote.attempts > 1:
            m.retries.add(vote.attempts - 1, {"agent": req.agent})
        return vote


def _vote(
    req: Ask,
    started: float,
    attempts: int,
    outcome: CallOutcome,
    *,
    task: Task | TaskView | None = None,
    verdict: Verdict | None = None,
    counted: bool = False,
    error: str = "",
) -> Vote:
    """A Vote: counted as the verdict's choice, or as the policy says for no usable answer."""
    meta = artifact_metadata(task) if task is not None else {}
    return Vote(
        shadow=req.shadow,
        skill=req.skill,
        agent=req.agent,
        outcome=outcome,
        counted_as=verdict.vote if counted and verdict else unanswered(req.policy),
        verdict=verdict,
        latency_ms=_ms(started),
        attempts=attempts,
        brain=str(meta.get("brain", "")) if counted else "",
        error=error,
        tools_denied=denied_of(meta) if counted else (),
    )


def _answered(
    router: Router,
    req: Ask,
    msg: Message | OutgoingMessage,
    task: Task | TaskView,
    verdict: Verdict,
    *,
    started: float,
    attempts: int,
) -> Vote:
    """The Vote for an answer: counted if its signature proves the instance it names gave it
    for this question; `invalid` otherwise."""
    view = router.view
    if not view.checks_votes:  # MESH_INSECURE=bus (the registry said so once, loudly)
        vote = _vote(req, started, attempts, "voted", task=task, verdict=verdict, counted=True)
        # Nothing is checked in this mode: the answer's own word is all there is.
        claimed = str(artifact_metadata(task).get(versions.VERSION_KEY, ""))
        return msgspec.structs.replace(_budgeted(req, vote), version=claimed)
    question = votes.Question(
        agent=req.agent,
        tenant=req.event.tenant,
        event_id=req.event.id,
        skill=req.skill,
        message_id=msg.message_id,
    )
    output, signed = votes.signed_output(task)
    binding = (
        view.binding(req.agent, signed.instance)
        if isinstance(signed, votes.VoteSignature)
        else None
    )
    reason = votes.refusal(question, output, signed, binding)
    if reason is not None:
        log.warning(
            "invalid vote from %s on event %s (skill %s): %s",
            req.agent,
            req.event.id,
            req.skill,
            reason,
        )
        return _vote(req, started, attempts, "invalid", verdict=verdict, error=reason)
    assert isinstance(signed, votes.VoteSignature)
    vote = _budgeted(
        req, _vote(req, started, attempts, "voted", task=task, verdict=verdict, counted=True)
    )
    # The version is the signing instance's, as its verified card says: the signature proves
    # which instance answered and the card signature what that instance runs, so an answer
    # cannot claim another version (what its metadata says is not read).
    return msgspec.structs.replace(
        vote,
        instance=signed.instance,
        signed_at=signed.at,
        signature=signed.signature,
        version=view.version(req.agent, signed.instance),
    )


def _budgeted(req: Ask, vote: Vote) -> Vote:
    """A refusal to spend past the budget is no judgement: counted as the policy says."""
    if not refused_for_budget(vote.verdict):
        return vote
    counts = req.policy.budget_exceeded
    return msgspec.structs.replace(
        vote, outcome="budget_exceeded", counted_as=None if counts == "no_quorum" else counts
    )


async def _ask(client: AgentClient, router: Router, req: Ask) -> Vote:
    started = time.monotonic()
    msg = message(req)
    policy = req.policy
    retry = retry_policy(policy)
    attempts = 0
    counted = 0  # failed attempts that count against the policy's `retries`
    infra = 0  # failed attempts that were the infrastructure's (bounded by the deadline)
    last: AgentCallError | None = None
    failed: set[str] = set()  # replicas that failed this call: the next attempt goes elsewhere
    # Whether the call ended reaching nobody: its last attempt that says anything found nobody
    # listening (no responders). An open breaker sends nothing: it counts as what the agent's
    # last real attempt found (`_UNHEARD`). What an earlier attempt found is history: an
    # instance that timed out and then vanished (killed mid-call, or killed just before and
    # its server had not yet noticed the closed socket, so the request went nowhere) is gone
    # now. Such a voter cannot be asked, which the decision core does not count as silence
    # (`decide.unreachable`); it waits for the voter, bounded, rather than decide on an outage.
    found = ""
    while True:
        remaining = req.deadline - time.monotonic()
        if remaining <= 0.001:
            if attempts == 0 and req.grace_s > 0:
                # A take-over found the deadline gone. The voter may well have answered in time
                # to the coordinator that died: ask once more with the same messageId (the agent
                # returns the task it has) and let the task's own timestamp say if it counts.
                return await _recover(client, router, req, msg, started)
            break
        attempts += 1
        try:
            route = router.route(req.agent, avoid=frozenset(failed), versions=req.versions)
        except NoReplica as e:
            # A canary's or shadow's version filter admits no live replica: asking any other
            # version is what it forbids; nothing to retry until one registers.
            return _vote(req, started, attempts, "unavailable", error=str(e))
        try:
            async with router.call(route, slow_s=policy.agent_timeout_s / 2):
                result = await client.send_lean(
                    req.agent,
                    msg,
                    timeout=min(policy.agent_timeout_s, remaining),
                    max_timeout=min(policy.agent_timeout_max_s or 0.0, remaining) or None,
                    subject=route.subject,
                    headers=telemetry.inject(),
                )
            task = task_of(result)
            verdict = verdict_of(task)
        except BreakerOpen:
            # Every replica's breaker is open: fail fast, under `retries` (not infrastructure).
            last, tripped = AgentUnavailableError(req.agent), True
            failed.add(route.breaker_key)
        except AgentCallError as e:
            last, tripped = e, False
            failed.add(route.breaker_key)
        except (ValueError, msgspec.ValidationError) as e:
            # The agent answered, but not with a usable vote: retrying will not change it.
            _UNHEARD.discard(req.agent)
            return _vote(req, started, attempts, "error", error=str(e))
        else:
            _UNHEARD.discard(req.agent)
            return _answered(router, req, msg, task, verdict, started=started, attempts=attempts)
        found = _found(req.agent, last, tripped=tripped) or found
        if not tripped and infrastructure(last):
            infra += 1
            delay = _infra_pause(last, infra, req.deadline)
        elif last.retryable:
            counted += 1
            delay = retry.pause(counted, deadline=req.deadline)  # None: attempts or time used up
        else:
            break
        if delay is None:
            break
        await asyncio.sleep(delay)
    return _failed(req, started, attempts, last, nobody=found == "nobody")


def _found(agent: str, e: AgentCallError, *, tripped: bool) -> str:
    """What one failed attempt says about who listens on `agent`: "nobody", "someone" (an
    instance was there: a timeout, busy, an error answer) or "" (an open breaker: as the last
    real attempt found)."""
    if tripped:
        return "nobody" if agent in _UNHEARD else ""
    if type(e) is AgentUnavailableError:
        _UNHEARD.add(agent)
        return "nobody"
    _UNHEARD.discard(agent)
    return "someone"


def _failed(
    req: Ask, started: float, attempts: int, last: AgentCallError | None, *, nobody: bool
) -> Vote:
    """The vote of a call that got no answer; `nobody`: it reached no instance at all."""
    outcome: CallOutcome = (
        "timeout"
        if isinstance(last, AgentTimeoutError) or last is None
        else "unavailable"
        if isinstance(last, AgentUnavailableError) or is_busy(last)
        else "error"
    )
    error = str(last) if last else "deadline passed before it could be asked"
    if nobody and outcome == "unavailable":
        error = f"{NOBODY_LISTENING}: {error}"
    return _vote(req, started, attempts, outcome, error=error)


async def _recover(
    client: AgentClient,
    router: Router,
    req: Ask,
    msg: Message | OutgoingMessage,
    started: float,
) -> Vote:
    try:
        route = router.route(req.agent, versions=req.versions)
    except NoReplica as e:
        return _vote(req, started, 1, "unavailable", error=str(e))
    try:
        result = await client.send_lean(
            req.agent,
            msg,
            timeout=min(req.policy.agent_timeout_s, req.grace_s),
            subject=route.subject,
            headers=telemetry.inject(),
        )
        task = task_of(result)
        verdict = verdict_of(task)
    except (AgentCallError, ValueError, msgspec.ValidationError) as e:
        # No earlier answer: the failed coordinator's question may never have reached the voter.
        error = f"{TAKEN_OVER_LATE}: deadline passed during a take-over; no earlier answer ({e})"
        return _vote(req, started, 1, "unavailable", error=error)
    vote = _answered(router, req, msg, task, verdict, started=started, attempts=1)
    # When it answered: the time the instance signed, where checked (the task's status time is
    # whatever the answer says).
    answered_at = vote.signed_at or status_time(task)
    if vote.outcome != "voted" or (answered_at is not None and answered_at <= req.deadline_wall):
        return vote
    # Answered, but after the deadline: most likely it heard the question late (the failed
    # coordinator's NATS server was frozen) or its answer was held up. Not counted now; the
    # decision core releases the event and asks again under a fresh deadline.
    error = f"{TAKEN_OVER_LATE}: answered after the deadline during a take-over; asked again"
    return _vote(req, started, 1, "unavailable", verdict=verdict, error=error)


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)
