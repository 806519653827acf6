"""The supervisor: a durable consumer of domain events that turns each into one decision.

Per event: parse → policy → claim it in the ledger (KV, compare-and-set) → live agents per
skill → ask each (timeout, bounded retries, one overall deadline; votes saved as they come) →
tally under the quorum rule → record the decision in the ledger → publish it on the event's own
subject with "expected last sequence 0" (so the server refuses a second one) → ack.

Anything it cannot decide goes to the dead-letter stream with the reason and the original body,
then is acked. Nothing is acked without one of those two outcomes. A coordinator that dies
mid-event leaves a lease that expires; the redelivered event is taken over by whoever gets it,
with the same deadline and the votes already cast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from opentelemetry.trace import SpanKind

from coordinator import dispatch
from coordinator.ledger import Busy, Claim, Done, Ledger, LostClaim, event_token, state_key
from coordinator.policy import Policies, Policy
from coordinator.quorum import tally
from coordinator.routing import Router
from mesh import envelope, subjects, telemetry
from mesh.a2a.client import A2AClient
from mesh.audit import SYSTEM_TENANT, AuditLog
from mesh.bus import Bus
from mesh.records import DeadLetter, Decision, DlqReason, Vote, encoder
from mesh.registry import Registry, RegistryView
from mesh.verdict import Choice

log = logging.getLogger(__name__)

LEASE_S = 2.0  # how long a silent owner keeps an event before others may take it over
ACK_WAIT_S = LEASE_S + 1.0  # redelivery comes only after the lease has lapsed
MAX_DELIVER = 20  # bounded: crashes and busy-naks count; the last one is dead-lettered
_WRONG_LAST_SEQUENCE = 10071


class Coordinator:
    def __init__(self, bus: Bus, policies: Policies, *, name: str | None = None) -> None:
        self.bus = bus
        self.policies = policies
        self.name = name or f"coordinator-{socket.gethostname()}-{os.getpid()}"
        self.client = A2AClient(bus)
        self.view = RegistryView(Registry(bus))
        self.router = Router(self.view)
        self.audit = AuditLog(bus, self.name)
        self._slots = asyncio.Semaphore(bus.settings.max_inflight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "run() sets up the ledger"
        return self._ledger

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure()
        kv = await self.bus.kv(subjects.DECISIONS_BUCKET)
        self._ledger = Ledger(kv, self.name, LEASE_S)
        await self.view.start()
        await self._audit_policies()
        telemetry.observe_breakers(self.router.states)
        psub = await self.bus.js.pull_subscribe(
            subjects.events_filter(),
            durable=subjects.COORDINATOR_DURABLE,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_S,
                max_deliver=MAX_DELIVER,
                max_ack_pending=self.bus.settings.max_inflight * 2,
            ),
        )
        status_sub = await self.bus.nc.subscribe(subjects.COORDINATOR_STATUS, cb=self._status)
        log.info(
            "%s consuming %s (policies: %s)",
            self.name,
            subjects.events_filter(),
            ", ".join(sorted(self.policies.by_type)),
        )
        longest = max((p.deadline_s for p in self.policies.by_type.values()), default=10.0)
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
                await status_sub.unsubscribe()
            await self.view.stop()

    async def _status(self, msg: Msg) -> None:
        """Every coordinator answers `mesh status` with what it is doing right now."""
        status = {
            "name": self.name,
            "inflight": len(self._inflight),
            "breakers": self.router.states(),
        }
        with contextlib.suppress(Exception):
            await msg.respond(msgspec.json.encode(status))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except LostClaim as e:
            # Another coordinator owns the event now; it will ack. Leave this delivery be.
            log.info("%s", e)
        except Exception:
            # Not acked: JetStream redelivers after a pause; max_deliver bounds the attempts.
            log.exception("event on %s failed; will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    # -- one event ------------------------------------------------------------------------------
    async def handle(self, msg: Msg) -> None:
        """One event, under one consumer span that continues the publisher's trace."""
        headers = msg.headers or {}
        with telemetry.tracer().start_as_current_span(
            f"process {msg.subject}",
            context=telemetry.extract(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **telemetry.messaging_attrs(
                    "process", "process", msg.subject, headers.get(subjects.H_MSG_ID, "")
                ),
                telemetry.MESSAGING_CONSUMER_GROUP: subjects.COORDINATOR_DURABLE,
            },
        ):
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
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
        if self.policies.ignored(event.type):
            await msg.ack()  # decided by nobody: event-driven agents react to it
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

        key = state_key(tenant, event.id)
        got = await self.ledger.claim(
            key, stream_seq=msg.metadata.sequence.stream, deadline_s=policy.deadline_s
        )
        if isinstance(got, Busy):
            # Someone alive holds it; look again when its lease would have lapsed.
            await msg.nak(delay=got.retry_in_s + 0.5)
            return
        if isinstance(got, Done):
            if got.state.decision is not None:
                # Idempotent (per-event subject, message ids): finishes a crashed publish.
                await self._publish(got.state.decision)
                await self._audit_decision(got.state.decision)
            log.info("event %s already %s; not deciding again", event.id, got.state.state)
            await msg.ack()
            return

        agents: dict[str, str] = {}
        for skill in policy.skills:
            live = self.view.agents_with_skill(skill)
            if live:
                agents[skill] = live[0]
        missing = [s for s in policy.skills if s not in agents and s not in got.state.votes]
        if missing:
            await self.dead_letter(
                msg, "no_agent", f"no live agent has skill(s) {', '.join(missing)}", event=event
            )
            return

        renew = asyncio.create_task(self._keep_lease(got, msg))
        try:
            votes = await self._collect(got, event, policy, agents)
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError, LostClaim):
                await renew
        decision = self._decide(event, policy, votes, started, got)
        if decision.outcome == "no_quorum" and policy.on_no_quorum == "dead_letter":
            await self.dead_letter(msg, "no_quorum", decision.reason, event=event)
            return
        final = msgspec.structs.replace(got.state, state="decided", decision=decision)
        await self.ledger.save(got, final)  # LostClaim here: someone else decides, not us
        await self._publish(decision)
        await self._audit_decision(decision)
        await msg.ack()
        _count(decision)
        log.info("event %s %s: %s (%s)", event.id, event.type, decision.outcome, decision.reason)

    async def _keep_lease(self, claim: Claim, msg: Msg) -> None:
        """While collecting: renew the ledger lease and tell JetStream we are still at it."""
        while True:
            await asyncio.sleep(LEASE_S / 3)
            await self.ledger.save(claim, claim.state)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _collect(
        self, claim: Claim, event: envelope.Event, policy: Policy, agents: dict[str, str]
    ) -> dict[str, Vote]:
        # The deadline is wall-clock in the ledger (it survives take-overs); here, monotonic.
        deadline = time.monotonic() + max(0.0, claim.state.deadline_at - time.time())
        votes = dict(claim.state.votes)  # cast before a take-over: not asked again
        # After a take-over, votes that were in flight at the crash are fetched once more even
        # past the deadline; they count only if the agent's task says it answered in time.
        grace = min(policy.agent_timeout_s, 1.0) if claim.state.takeovers else 0.0
        tasks = {
            asyncio.create_task(
                dispatch.ask(
                    self.client,
                    self.router,
                    dispatch.Ask(
                        skill=skill,
                        agent=agent,
                        event=event,
                        policy=policy,
                        deadline=deadline,
                        deadline_wall=claim.state.deadline_at,
                        grace_s=grace,
                    ),
                )
            ): skill
            for skill, agent in agents.items()
            if skill not in votes
        }
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    votes[tasks[t]] = t.result()
                state = msgspec.structs.replace(claim.state, votes=dict(votes))
                await self.ledger.save(claim, state)  # a vote survives our crash
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

    def _decide(
        self,
        event: envelope.Event,
        policy: Policy,
        votes: dict[str, Vote],
        started: float,
        claim: Claim,
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
            trace_id=telemetry.trace_id_of(),
            latency_ms=round((time.monotonic() - started) * 1000, 2),
            coordinator=self.name,
            takeovers=claim.state.takeovers,
        )

    async def _publish(self, decision: Decision) -> None:
        token = event_token(decision.event_id)
        try:
            await self.bus.publish(
                subjects.decision(decision.tenant, decision.decision_type, token),
                encoder.encode(decision),
                msg_id=f"decision:{decision.tenant}.{token}",
                # The server refuses a second message on this event's subject: "decided once"
                # holds even past the dedup window and across every coordinator.
                headers={subjects.H_EXPECTED_LAST_SUBJECT_SEQ: "0"},
            )
        except BadRequestError as e:
            if e.err_code != _WRONG_LAST_SEQUENCE:
                raise
            log.info("decision for %s was already published", decision.event_id)

    # -- audit ----------------------------------------------------------------------------------
    async def _audit_decision(self, d: Decision) -> None:
        ref = f"{d.tenant}.{event_token(d.event_id)}"
        await self.audit.append(
            d.tenant,
            "decision",
            d.event_id,
            {
                "event_type": d.event_type,
                "outcome": d.outcome,
                "reason": d.reason,
                "rule": d.rule,
                "coordinator": d.coordinator,
                "takeovers": d.takeovers,
            },
            msg_id=f"audit:decision:{ref}",
        )
        for v in d.votes:
            await self.audit.append(
                d.tenant,
                "vote",
                d.event_id,
                msgspec.to_builtins(v),
                msg_id=f"audit:vote:{ref}:{v.skill}",
            )

    async def _audit_policies(self) -> None:
        """A policy change is an audited act: record the policy set whenever it differs."""
        digest = self.policies.digest()
        last = await self.audit.last(SYSTEM_TENANT, "policy_change")
        if last is None or last.data.get("sha256") != digest:
            await self.audit.append(
                SYSTEM_TENANT,
                "policy_change",
                self.policies.source,
                {
                    "sha256": digest,
                    "event_types": sorted(self.policies.by_type),
                    "ignore": list(self.policies.ignore),
                },
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
            headers=dict(msg.headers or {}),
            event_id=event.id if event else _published_id(msg),
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
        if event is not None:
            await self.ledger.mark_dead_lettered(
                state_key(tenant, event.id), stream_seq=meta.sequence.stream, reason=reason
            )
        await self.audit.append(
            tenant,
            "dead_letter",
            record.event_id or f"seq:{meta.sequence.stream}",
            {
                "reason": reason,
                "error": error,
                "subject": msg.subject,
                "stream_seq": meta.sequence.stream,
            },
            msg_id=f"audit:dlq:{subjects.EVENTS_STREAM}:{meta.sequence.stream}",
        )
        await msg.ack()
        telemetry.meters().dead_letters.add(1, {"reason": reason, "tenant": tenant})
        log.warning(
            "event seq=%s on %s dead-lettered (%s): %s",
            meta.sequence.stream,
            msg.subject,
            reason,
            error,
        )


def _count(d: Decision) -> None:
    m = telemetry.meters()
    m.decisions.add(1, {"outcome": d.outcome, "event_type": d.event_type, "tenant": d.tenant})
    for v in d.votes:
        verdict = v.verdict.vote if v.verdict else "none"
        m.votes.add(1, {"agent": v.agent, "outcome": v.outcome, "verdict": verdict})


def _published_id(msg: Msg) -> str | None:
    """The id a producer gave an event we could not parse: its message id, without the
    `<tenant>:` prefix the mesh adds (so `mesh publish`'s printed id finds it)."""
    msg_id = (msg.headers or {}).get(subjects.H_MSG_ID)
    if msg_id is None:
        return None
    tenant, _ = subjects.parse_event_subject(msg.subject)
    return msg_id.removeprefix(f"{tenant}:")


def _counted(votes: dict[str, Vote]) -> dict[str, Choice]:
    return {s: v.counted_as for s, v in votes.items() if v.counted_as is not None}


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None
