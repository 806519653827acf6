"""The supervisor: a durable consumer of domain events that turns each into one decision.

Per event: parse → policy → live agents per skill → ask each (timeout, bounded retries, one
overall deadline) → tally under the quorum rule → publish the decision → ack. Anything it
cannot decide goes to the dead-letter stream with the reason and the original body, then is
acked. Nothing is acked without one of those two outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import socket
import time

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from coordinator.policy import Policies, Policy
from coordinator.quorum import tally
from mesh import envelope, subjects
from mesh.a2a.client import A2AClient, task_of, user_message, verdict_of
from mesh.bus import Bus
from mesh.errors import AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.records import CallOutcome, DeadLetter, Decision, DlqReason, Vote, encoder
from mesh.registry import Registry, RegistryView
from mesh.verdict import Choice

log = logging.getLogger(__name__)

_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 1.0
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class DecisionState(msgspec.Struct, omit_defaults=True):
    state: str  # collecting | decided | dead_lettered
    coordinator: str
    at: float
    outcome: str = ""


_state_dec = msgspec.json.Decoder(DecisionState)


def state_key(tenant: str, event_id: str) -> str:
    # KV keys allow a narrow alphabet; any other id is hashed (tenant keeps ids apart).
    safe = event_id if _KEY_OK.match(event_id) else hashlib.sha256(event_id.encode()).hexdigest()
    return f"{tenant}.{safe}"


class Coordinator:
    def __init__(self, bus: Bus, policies: Policies, *, name: str | None = None) -> None:
        self.bus = bus
        self.policies = policies
        self.name = name or f"coordinator-{socket.gethostname()}-{os.getpid()}"
        self.client = A2AClient(bus)
        self.view = RegistryView(Registry(bus))
        self._slots = asyncio.Semaphore(bus.settings.max_inflight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._state: KeyValue | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure()
        self._state = await self.bus.kv(subjects.DECISIONS_BUCKET)
        await self.view.start()
        longest = max((p.deadline_s for p in self.policies.by_type.values()), default=10.0)
        psub = await self.bus.js.pull_subscribe(
            subjects.events_filter(),
            durable=subjects.COORDINATOR_DURABLE,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                # An event is held for its whole deadline plus room to publish the outcome.
                ack_wait=longest + 15.0,
                max_deliver=5,
                max_ack_pending=self.bus.settings.max_inflight * 2,
            ),
        )
        log.info(
            "%s consuming %s (policies: %s)",
            self.name,
            subjects.events_filter(),
            ", ".join(sorted(self.policies.by_type)),
        )
        try:
            while not stop.is_set():
                free = max(1, min(64, self._slots._value))  # fetch no more than we can start
                try:
                    msgs = await psub.fetch(free, timeout=0.5)
                except TimeoutError:
                    continue
                except Exception as e:  # reconnecting, leader change: try again shortly
                    log.warning("fetch failed: %s", e)
                    await asyncio.sleep(0.2)
                    continue
                for msg in msgs:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._guarded(msg))
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
        finally:
            if self._inflight:  # drain: finish what we started (each is deadline-bounded)
                await asyncio.wait(self._inflight, timeout=longest + 5)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            await self.view.stop()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            # Not acked: JetStream redelivers after a pause; max_deliver bounds the attempts.
            log.exception("event on %s failed; will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    # -- one event ------------------------------------------------------------------------------
    async def handle(self, msg: Msg) -> None:
        started = time.monotonic()
        tenant, subject_type = subjects.parse_event_subject(msg.subject)
        try:
            event = envelope.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            await self.dead_letter(msg, "malformed", f"not a valid CloudEvent: {e}")
            return
        if event.type != subject_type or event.tenant != tenant:
            await self.dead_letter(
                msg,
                "malformed",
                f"envelope says type={event.type!r} tenant={event.tenant!r} but it was "
                f"published on {msg.subject}",
                event=event,
            )
            return
        policy = self.policies.get(event.type)
        if policy is None:
            known = ", ".join(sorted(self.policies.by_type)) or "none"
            await self.dead_letter(
                msg,
                "unknown_type",
                f"no policy for event type {event.type!r} (known: {known})",
                event=event,
            )
            return
        assert self._state is not None
        key = state_key(tenant, event.id)
        prior = await self._get_state(key)
        if prior is not None and prior.state in ("decided", "dead_lettered"):
            log.info(
                "event %s already %s by %s; not deciding again",
                event.id,
                prior.state,
                prior.coordinator,
            )
            await msg.ack()
            return

        agents: dict[str, str] = {}
        for skill in policy.skills:
            live = self.view.agents_with_skill(skill)
            if live:
                agents[skill] = live[0]
        missing = [s for s in policy.skills if s not in agents]
        if missing:
            await self.dead_letter(
                msg, "no_agent", f"no live agent has skill(s) {', '.join(missing)}", event=event
            )
            return

        await self._state.put(
            key, encoder.encode(DecisionState("collecting", self.name, time.time()))
        )
        votes = await self._collect(event, policy, agents)
        decision = self._decide(event, policy, votes, started)
        await self.bus.publish(
            subjects.decision(tenant, decision.decision_type),
            encoder.encode(decision),
            msg_id=f"decision:{key}",  # a second publish for the same event is deduplicated
        )
        await self._state.put(
            key, encoder.encode(DecisionState("decided", self.name, time.time(), decision.outcome))
        )
        await msg.ack()
        log.info("event %s %s: %s (%s)", event.id, event.type, decision.outcome, decision.reason)

    async def _get_state(self, key: str) -> DecisionState | None:
        assert self._state is not None
        try:
            entry = await self._state.get(key)
        except KeyNotFoundError:
            return None
        return _state_dec.decode(entry.value) if entry.value else None

    async def _collect(
        self, event: envelope.Event, policy: Policy, agents: dict[str, str]
    ) -> dict[str, Vote]:
        deadline = time.monotonic() + policy.deadline_s
        tasks = {
            asyncio.create_task(self._ask(skill, agent, event, policy, deadline)): skill
            for skill, agent in agents.items()
        }
        votes: dict[str, Vote] = {}
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    votes[tasks[t]] = t.result()
                if policy.decide_early and pending:
                    early = tally(policy.rule, policy.skills, _counted(votes), final=False)
                    if early.outcome in ("approved", "rejected"):
                        break
        finally:
            for t in pending:
                t.cancel()
                skill = tasks[t]
                votes[skill] = Vote(
                    skill=skill,
                    agent=agents[skill],
                    outcome="cancelled",
                    error="not needed: the outcome could no longer change",
                )
        return votes

    async def _ask(
        self, skill: str, agent: str, event: envelope.Event, policy: Policy, deadline: float
    ) -> Vote:
        """One voter's answer; never raises (failures become a Vote with the outcome)."""
        started = time.monotonic()
        message = user_message(
            data=event.data,
            # The same id on every retry, so an agent can recognise a repeat.
            message_id=f"{event.tenant}/{event.id}/{skill}",
            metadata={"eventId": event.id, "eventType": event.type, "tenant": event.tenant},
        )
        attempts = 0
        last: AgentCallError | None = None
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            try:
                result = await self.client.send_message(
                    agent, message, timeout=min(policy.agent_timeout_s, remaining)
                )
                task = task_of(result)
                verdict = verdict_of(task)
            except AgentCallError as e:
                last = e
            except (ValueError, msgspec.ValidationError) as e:
                # The agent answered, but not with a usable vote: retrying will not change it.
                return Vote(
                    skill=skill,
                    agent=agent,
                    outcome="error",
                    counted_as=_unanswered(policy),
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
            # Exponential backoff with full jitter, never past the deadline.
            delay = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempts))
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
            counted_as=_unanswered(policy),
            error=str(last) if last else "deadline passed",
            latency_ms=_ms(started),
            attempts=attempts,
        )

    def _decide(
        self, event: envelope.Event, policy: Policy, votes: dict[str, Vote], started: float
    ) -> Decision:
        result = tally(policy.rule, policy.skills, _counted(votes), final=True)
        assert result.outcome != "pending"
        return Decision(
            event_id=event.id,
            event_type=event.type,
            tenant=event.tenant,
            decision_type=self.policies.decision_type(event.type),
            outcome=result.outcome,
            reason=result.reason,
            rule=policy.rule.kind,
            votes=[votes[s] for s in policy.skills],
            decided_at=time.time(),
            latency_ms=_ms(started),
            coordinator=self.name,
        )

    # -- dead letters ---------------------------------------------------------------------------
    async def dead_letter(
        self, msg: Msg, reason: DlqReason, error: str, *, event: envelope.Event | None = None
    ) -> None:
        tenant, event_type = subjects.parse_event_subject(msg.subject)
        tenant = tenant if subjects.valid_token(tenant) else "unknown"
        meta = msg.metadata
        record = DeadLetter(
            reason=reason,
            error=error,
            subject=msg.subject,
            tenant=tenant,
            body_b64=DeadLetter.encode_body(msg.data),
            headers={k: v for k, v in (msg.headers or {}).items()},
            event_id=event.id if event else (msg.headers or {}).get(subjects.H_MSG_ID),
            event_type=event.type if event else event_type or None,
            attempts=meta.num_delivered,
            stream_seq=meta.sequence.stream,
            trace_id=_trace_id(event.traceparent if event else None),
            at=time.time(),
        )
        await self.bus.publish(
            subjects.dlq(tenant, reason),
            encoder.encode(record),
            msg_id=f"dlq:{subjects.EVENTS_STREAM}:{meta.sequence.stream}",
        )
        if event is not None and self._state is not None:
            await self._state.put(
                state_key(tenant, event.id),
                encoder.encode(DecisionState("dead_lettered", self.name, time.time(), reason)),
            )
        await msg.ack()
        log.warning(
            "event seq=%s on %s dead-lettered (%s): %s",
            meta.sequence.stream,
            msg.subject,
            reason,
            error,
        )


def _counted(votes: dict[str, Vote]) -> dict[str, Choice]:
    return {s: v.counted_as for s, v in votes.items() if v.counted_as is not None}


def _unanswered(policy: Policy) -> Choice | None:
    c = policy.timeout_counts_as
    return None if c == "absent" else c


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None
