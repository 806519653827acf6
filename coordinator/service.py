"""The supervisor: a durable consumer of domain events that turns each into one decision.

Per event: parse → policy → live agents per skill → the decision core (`coordinator.decide`:
claim the event in the ledger, ask each voter within one deadline, save votes as they come,
tally, record the decision) → publish it on the event's own subject with "expected last
sequence 0" (so the server refuses a second one) and audit it (one record, its votes inside),
the two at once → ack. This module is the wiring: the consume loop, spans, publishing, audit,
acks.

Zero trust: the coordinator signs every decision and every ledger write with its identity's key
and believes only ledger entries, decisions and audit records that keys in the trust file
signed. The principal a decision records is the trusted key that signed the event (its
`Mesh-Signature` header), never the event body's `principal`; an event nobody trusted signed is
decided all the same, with principal "" (its audit record says why). A decision subject that
already holds something that is not a trusted coordinator's decision of that event is a
forgery: logged at ERROR and audited, never taken for "already published".

Anything it cannot decide goes to the dead-letter stream with the reason and the original body
(ledger first, then the record: see `dead_letter`), then is acked. An event is acked only once
it is decided, dead-lettered, or of a type the policies ignore. A coordinator that dies
mid-event leaves a lease that expires; the redelivered event is taken over by whoever gets it,
with the same deadline and the votes already cast.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import socket
import time

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry.trace import SpanKind

from coordinator import admission, canary, dispatch, dlq, settle
from coordinator.clock import SYSTEM_CLOCK
from coordinator.decide import Ask, AwaitingHuman, Decided, Decider, Job
from coordinator.humans import Desk, cedar_authorize
from coordinator.inbox import Inbox
from coordinator.ledger import (
    Claim,
    DecisionState,
    Ledger,
    state_key,
)
from coordinator.policy import Policies, Policy
from coordinator.routing import Router
from coordinator.settle import Settler
from mesh import authz, contracts, envelope, records, subjects, telemetry
from mesh._internal.consume import JetStreamFetch, PullLoop
from mesh.a2a.client import AgentClient
from mesh.audit import CHECKPOINT_EVERY_S, SYSTEM_TENANT, AuditLog
from mesh.bus import Bus
from mesh.identity import TrustFile, require_trust, trust_path
from mesh.records import (
    DeadLetter,
    Decision,
    DlqReason,
    Vote,
    decision_decoder,
    decision_refusal,
    encoder,
    event_principal,
    event_token,
    trusted_signer,
)
from mesh.registry import Registry, RegistryView

log = logging.getLogger(__name__)

LEASE_S = 2.0  # how long a silent owner keeps an event before others may take it over
ACK_WAIT_S = LEASE_S + 1.0  # redelivery comes only after the lease has lapsed
MAX_DELIVER = 20  # bounded: crashes and busy-naks count; the last one is dead-lettered
# While a live coordinator works on an event it says so this often (+WPI), whatever step it is
# at: a redelivery then means the holder stopped (crashed, frozen, lost its NATS server), never
# that a step was slow. Under CPU starvation, each slow step used to cost extra deliveries that
# found the event busy or decided: work that made the starvation worse.
KEEPALIVE_S = ACK_WAIT_S / 3
_LIST_PAGE = 256  # JetStream answers a consumer list in pages of this many


class Coordinator:
    def __init__(self, bus: Bus, policies: Policies, *, name: str | None = None) -> None:
        self.bus = bus
        self.policies = policies
        self.name = name or f"coordinator-{socket.gethostname()}-{os.getpid()}"
        self.client = AgentClient(bus)
        self.view = RegistryView(Registry(bus))
        self.router = Router(self.view)
        # Events wait for room at their voters before they are claimed (coordinator.admission).
        self.admission = admission.Admission(
            lambda agent: self.router.capacity(agent),  # noqa: PLW0108 (a swapped-in router counts)
            stall_s=max((p.deadline_s for p in policies.by_type.values()), default=10.0) + 5,
        )
        # Whose signatures to believe, and the key this coordinator signs with: refused at
        # once (ConfigError) when the trust file would not believe what this one signs.
        self.trust = require_trust(bus.settings, what="the coordinator")
        # Read again when it changes: a publisher issued (or a key revoked) while we run counts
        # from its next event on, without a restart.
        self._trust_file = (
            TrustFile(trust_path(bus.settings), self.trust) if self.trust is not None else None
        )
        self.signer = trusted_signer(
            bus.identity,
            self.trust,
            ("decision", "ledger", "audit", "checkpoint"),
            what="the coordinator",
        )
        self.audit = AuditLog(bus, self.name)
        # Who may publish which event type for which tenant (Cedar, mesh.authz): files that do
        # not check stop the coordinator here, naming file and line.
        self.authz = authz.Authorizer.from_settings(bus.settings)
        self._handlers = EventHandlers(bus)
        self._ledger: Ledger | None = None
        self._decider: Decider | None = None
        self._settler: Settler | None = None
        self._inbox: Inbox | None = None  # decisions waiting for people (coordinator.inbox)
        self._loop: PullLoop[Msg] | None = None
        self._gate: canary.Gate | None = None  # the canary gate (coordinator.canary)
        # Each tenant's events being decided here now, for its `events_at_once` (policies).
        self._deciding: collections.Counter[str] = collections.Counter()

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "run() sets up the ledger"
        return self._ledger

    @property
    def settler(self) -> Settler:
        assert self._settler is not None, "run() sets up the settler"
        return self._settler

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # A broken schema file (MESH_SCHEMA_DIR) stops the coordinator here, with its name,
        # not at the first event of its type.
        contracts.check_all()
        await self.bus.ensure()
        self._ledger = await Ledger.on_bus(self.bus, self.name, LEASE_S)
        gate = self._gate = await canary.Gate.on_bus(self.bus, self.audit, name=self.name)
        self._decider = Decider(
            self._ledger,
            self._ask,
            SYSTEM_CLOCK,
            name=self.name,
            signer=self.signer,
            stopped=lambda: gate.book.stopped,
        )
        self._settler = Settler(self._ledger, self)
        desk = Desk(
            self._ledger,
            SYSTEM_CLOCK,
            name=self.name,
            signer=self.signer,
            trust=self.trust,
            authorize=cedar_authorize(self.bus.settings),  # None until mesh.authz is there
        )
        self._inbox = Inbox(
            self.bus,
            desk,
            self.audit,
            self._settler,
            name=self.name,
            allow_private=self.bus.settings.push_allow_private,
            # A person issued while we run: their first answer is checked against the new file.
            refresh_trust=lambda: self._refresh_trust(force=True),
        )
        inbox = asyncio.create_task(self._inbox.run(stop))
        await self.view.start()
        await self._audit_policies()
        await authz.audit_in_force(self.audit, self.authz)
        telemetry.observe_breakers(self.router.states)
        max_inflight = self.bus.settings.max_inflight
        psub = await self.bus.js.pull_subscribe(
            subjects.events_filter(),
            durable=subjects.COORDINATOR_DURABLE,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_S,
                max_deliver=MAX_DELIVER,
                max_ack_pending=max_inflight * 2,
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
        self._loop = PullLoop(
            JetStreamFetch(psub),
            self._guarded,
            concurrency=max_inflight,
            name=self.name,
            drain_s=longest + 5,  # on stop, finish what was started (each is deadline-bounded)
        )
        checkpoints = asyncio.create_task(self._checkpoint_every(CHECKPOINT_EVERY_S))
        canaries = asyncio.create_task(gate.book.follow())
        try:
            await self._loop.run(stop)
        finally:
            with contextlib.suppress(Exception):
                await inbox  # stops with `stop`; its failure must not hide ours
            checkpoints.cancel()
            canaries.cancel()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
                await status_sub.unsubscribe()
            await self.view.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoints
            # What this coordinator appended since its last checkpoint is anchored on the way
            # out too; a failure here must not hide the reason it stopped.
            try:
                await self.audit.checkpoint_due()
            except Exception as e:  # e.g. NATS already gone: one line, not a traceback
                log.warning(
                    "final audit checkpoint not written (%s): records since the last checkpoint "
                    "stay unanchored until a writer checkpoints their tenant again",
                    str(e) or type(e).__name__,
                )

    async def _checkpoint_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                # A policy file changed while no event came is audited all the same.
                self.authz.refresh(force=True)
                await authz.audit_changes(self.audit, self.authz)
                await self.audit.checkpoint_due()
            except Exception:  # the next round tries again; auditing itself goes on
                log.exception("audit checkpoint failed")

    async def _status(self, msg: Msg) -> None:
        """Every coordinator answers `mesh status` with what it is doing right now."""
        status = {
            "name": self.name,
            "inflight": self._loop.inflight if self._loop else 0,
            "breakers": self.router.states(),
            "tenants": self.tenant_use(),
        }
        with contextlib.suppress(Exception):
            await msg.respond(msgspec.json.encode(status))

    def tenant_use(self) -> dict[str, dict[str, int | None]]:
        """Each tenant's events being decided here now against its `events_at_once` (None: no
        limit): the tenants the policies name (`*` for the rest) and any being decided."""
        use: dict[str, dict[str, int | None]] = {}
        for tenant in sorted({*self.policies.tenants, *self._deciding}):
            limits = self.policies.limits(tenant) if tenant != "*" else self.policies.tenants["*"]
            use[tenant] = {
                "deciding": self._deciding.get(tenant, 0),
                "eventsAtOnce": limits.events_at_once if limits is not None else None,
            }
        return use

    async def _guarded(self, msg: Msg) -> None:
        # A lost claim is left to its new owner; any other failure naks (redelivered later).
        delivery = MsgDelivery(msg)
        keepalive = asyncio.create_task(_keep_in_progress(delivery))
        try:
            await settle.guarded(delivery, self.handle(msg))
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _ask(self, ask: Ask) -> Vote:
        """The decision core's asker: one voter, over A2A on NATS (read at call time, so a
        router swapped in after construction is the one used)."""
        try:
            return await dispatch.ask(self.client, self.router, ask)
        finally:
            admission.release(ask.agent)  # its slot is free as soon as its vote is in

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

    def _refresh_trust(self, *, force: bool = False) -> bool:
        """Believe the trust file as it is now, everywhere this coordinator checks signatures;
        True if it changed. `force`: look now, not only once a second."""
        if self._trust_file is None:
            return False
        trust, changed = self._trust_file.current(force=force)
        if changed:
            self.trust = trust
            self.audit.trust = trust
            if self._ledger is not None:
                self._ledger.trust = trust
            if self._inbox is not None:
                self._inbox.desk.trust = trust
        return changed

    async def _handle(self, msg: Msg) -> None:
        self._refresh_trust()
        started = time.monotonic()
        tenant, subject_type = subjects.parse_event_subject(msg.subject)
        try:
            event = envelope.decode(msg.data, msg.headers)  # structured or binary (ce- headers)
        except envelope.MalformedEventError as e:  # whatever the bytes: the one thing it raises
            await self.dead_letter(msg, "malformed", e.message)
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
            # Decided by nobody: event-driven agents react to it. Its outcome is theirs (handled,
            # or a dead letter when a handler gives up) as long as a handler's durable is bound
            # to it; with none, nothing would ever happen to it, so that is its dead letter.
            handlers = await self._handlers.of(msg.subject)
            if handlers:
                log.debug("event %s on %s left to %s", event.id, msg.subject, handlers)
                await msg.ack()
            else:
                await self.dead_letter(
                    msg,
                    "no_handler",
                    f"event type {event.type!r} is ignored by the policies ({self.policies.source})"
                    f" and no event handler is bound to {msg.subject}; a handler started later "
                    "still gets it from the stream",
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
        # Its type's JSON Schema, if it has one. Here, not before the ignore branch: an ignored
        # type's handlers check the schema themselves, and one outcome per consumer holds.
        breaks = contracts.violation(event.type, event.data)
        if breaks is not None:
            await self.dead_letter(
                msg, "malformed", f"data breaks its schema: {breaks}", event=event
            )
            return

        signature = (msg.headers or {}).get(subjects.H_SIGNATURE)
        signed = envelope.signed_content(msg.headers, msg.data)  # binary mode: ce- headers too
        principal, unverified = event_principal(self.trust, msg.subject, signed, signature)
        if "not trusted" in unverified and self._refresh_trust(force=True):
            # A key we do not know yet may be a publisher issued a moment ago: look once more.
            principal, unverified = event_principal(self.trust, msg.subject, signed, signature)
        if unverified and self.trust is not None:
            log.warning(
                "event %s on %s: publisher not verified (%s); deciding it with no principal",
                event.id,
                msg.subject,
                unverified,
            )
        if not await self._may_publish(msg, event, principal):
            return
        limits = self.policies.limits(tenant)
        cap = limits.events_at_once if limits is not None else None
        if cap is not None and self._deciding[tenant] >= cap and msg.metadata.num_delivered == 1:
            # Refused at the door, before a claim or an agent call: a tenant's runaway costs
            # the others a dead letter per event, not a decision (docs/budgets.md). Only a
            # first delivery: a redelivery may be one this tenant's quota already let in.
            await self.dead_letter(
                msg,
                "over_quota",
                f"tenant {tenant} already has {cap} event(s) being decided by {self.name} "
                f"(its events_at_once, {self.policies.source}); replay it once they are done",
                event=event,
            )
            return
        self._deciding[tenant] += 1
        try:
            await self._decide(
                msg,
                event,
                policy,
                tenant=tenant,
                started=started,
                principal=principal,
                unverified=unverified,
            )
        finally:
            self._deciding[tenant] -= 1
            if not self._deciding[tenant]:
                del self._deciding[tenant]

    async def _decide(
        self,
        msg: Msg,
        event: envelope.Event,
        policy: Policy,
        *,
        tenant: str,
        started: float,
        principal: str,
        unverified: str,
    ) -> None:
        """An admitted event, from its voters' room to its outcome."""
        agents: dict[str, str] = {}
        for skill in policy.skills:
            live = self.view.agents_with_skill(skill)
            if live:
                agents[skill] = live[0]
        job = Job(
            key=state_key(tenant, event.id),
            event=event,
            policy=policy,
            decision_type=self.policies.decision_type(event.type),
            stream_seq=msg.metadata.sequence.stream,
            agents=agents,
            started=started,
            trace_id=telemetry.trace_id_of(),
            principal=principal,
            no_agent_wait_s=self.bus.settings.no_agent_wait_s,
            published_at=msg.metadata.timestamp.timestamp(),
            delivery=msg.metadata.num_delivered,
            max_deliver=MAX_DELIVER,
            registry_stale_s=self.view.stale_for_s,
            registry_current_since=self.view.current_since,
        )
        assert self._decider is not None, "run() sets up the decider"
        delivery = MsgDelivery(msg)
        voters = list(agents.values())
        if msg.metadata.num_delivered > 1:  # it may need nobody: decided, or someone else's
            voters = admission.voters_left(
                await self.ledger.read(job.key), agents, stream_seq=job.stream_seq, now=time.time()
            )
        # Room at the voters is shared fairly between tenants (coordinator.admission).
        async with self.admission.slots(voters, tenant=tenant, keepalive=delivery.in_progress):
            outcome = await self._decider.run(job, on_renew=delivery.in_progress)
        if isinstance(outcome, AwaitingHuman):
            # People are asked: the ledger holds the wait, the inbox takes it from here.
            assert self._inbox is not None
            await self._inbox.asked(outcome.state, outcome.key, fresh=outcome.fresh)
            await delivery.ack()
            return
        await self.settler.settle(delivery, event, outcome, unverified)
        if isinstance(outcome, Decided) and self._gate is not None:
            await self._gate.after(outcome.decision, policy.canary, policy.shadow)

    async def _may_publish(self, msg: Msg, event: envelope.Event, principal: str) -> bool:
        """Cedar: may this publisher publish this event type for this tenant? If not, the
        event is dead-lettered `forbidden`, naming the policy, with a `forbidden` audit record.
        Policy changes seen on the way are audited first (with their hash)."""
        self.authz.refresh()
        await authz.audit_changes(self.audit, self.authz)
        who = authz.publisher(principal, event.tenant)
        resource = authz.event_type(event.tenant, event.type)
        decision = self.authz.is_allowed(who, "publish", resource, {"verified": bool(principal)})
        if decision.allowed:
            return True
        seq = msg.metadata.sequence.stream
        await authz.audit_denial(
            self.audit,
            event.tenant,
            event.id,
            principal=who,
            action="publish",
            resource=resource,
            decision=decision,
            msg_id=subjects.audit_msg_id("forbidden", subjects.EVENTS_STREAM, seq),
        )
        await self.dead_letter(
            msg,
            "forbidden",
            f"{who.id} may not publish {event.type!r} for tenant {event.tenant!r}: "
            f"{decision.explain()}",
            event=event,
        )
        return False

    async def _publish(self, decision: Decision) -> None:
        token = event_token(decision.event_id)
        subject = subjects.decision(decision.tenant, decision.decision_type, token)
        try:
            await self.bus.publish(
                subject,
                encoder.encode(decision),
                msg_id=subjects.decision_msg_id(decision.tenant, token),
                # The server refuses a second message on this event's subject: "decided once"
                # holds even past the dedup window and across every coordinator.
                headers={subjects.H_EXPECTED_LAST_SUBJECT_SEQ: "0"},
            )
        except BadRequestError as e:
            if e.err_code not in subjects.JS_WRONG_LAST_SEQUENCE:
                raise
            await self._check_published(decision, subject)

    async def _check_published(self, decision: Decision, subject: str) -> None:
        """The server refused our decision: the event's subject holds a message already. Ours
        (a crash before the ack) or another trusted coordinator's: fine. Anything else is a
        forgery that readers will see first: say so loudly and put it in the audit trail. The
        real decision stays in the ledger and the audit trail either way."""
        try:
            held = await self.bus.js.get_last_msg(subjects.DECISIONS_STREAM, subject)
        except NotFoundError:
            # Refused, yet nothing there: the stream lost it. Not a forgery we can show.
            log.error("decision for %s refused, but %s is empty", decision.event_id, subject)
            return
        try:
            found: Decision | None = decision_decoder.decode(held.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            found = None
        refusal = (
            "it is not a decision"
            if found is None
            else decision_refusal(self.trust, found, subject=subject)
            if self.trust is not None
            else None
        )
        if refusal is None:
            log.info("decision for %s was already published", decision.event_id)
            return
        seq = int(held.seq or 0)
        log.error(
            "FORGED decision on %s (%s seq %s): %s; the real decision of event %s (%s) is in "
            "the ledger and the audit trail",
            subject,
            subjects.DECISIONS_STREAM,
            seq,
            refusal,
            decision.event_id,
            decision.outcome,
        )
        ref = subjects.decision_key(decision.tenant, event_token(decision.event_id))
        await self.audit.append(
            decision.tenant,
            "forgery",
            decision.event_id,
            {
                "subject": subject,
                "stream": subjects.DECISIONS_STREAM,
                "seq": seq,
                "refusal": refusal,
                "forged_outcome": found.outcome if found is not None else "",
                "outcome": decision.outcome,
            },
            msg_id=subjects.audit_msg_id("decision", ref, "forgery", seq),
        )

    # -- audit ----------------------------------------------------------------------------------
    async def _audit_decision(self, d: Decision, unverified: str = "") -> None:
        ref = subjects.decision_key(d.tenant, event_token(d.event_id))
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
                # Who published the event: the trusted key that signed it, or why nobody is.
                "principal": d.principal,
                "principal_verified": bool(d.principal),
                **({"principal_unverified": unverified} if unverified else {}),
                "signer": d.signer,
                # Every vote inside the one record (records before issue 14 had one "vote"
                # record each after it; both shapes verify alike).
                "votes": [msgspec.to_builtins(v) for v in d.votes],
                **({"shadow_votes": msgspec.to_builtins(d.shadow_votes)} if d.shadow_votes else {}),
            },
            msg_id=subjects.audit_msg_id("decision", ref),
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
                    **({"tenants": sorted(self.policies.tenants)} if self.policies.tenants else {}),
                },
            )

    # -- dead letters ---------------------------------------------------------------------------
    async def dead_letter(
        self,
        msg: Msg,
        reason: DlqReason,
        error: str,
        *,
        event: envelope.Event | None = None,
        claim: Claim | None = None,
    ) -> None:
        """The ledger first, then the record and its audit entry, then the ack (see
        `coordinator.settle.Settler.dead_letter`)."""
        await self.settler.dead_letter(MsgDelivery(msg), reason, error, event=event, claim=claim)

    # -- the outlet (coordinator.settle.Outlet) ----------------------------------------------
    async def publish_decision(self, decision: Decision) -> None:
        await self._publish(decision)

    async def audit_decision(self, decision: Decision, unverified: str) -> None:
        await self._audit_decision(decision, unverified)

    async def publish_dead_letter(self, record: DeadLetter) -> None:
        await self._publish_dead_letter(record)

    async def ask_people(self, state: DecisionState, key: str) -> None:
        """`settle.gave_up` of an event that waits for people: its requests out again."""
        assert self._inbox is not None, "run() sets up the inbox"
        await self._inbox.asked(state, key, fresh=False)

    async def _publish_dead_letter(self, record: DeadLetter) -> None:
        seq = record.stream_seq
        # A body too large for the record is kept by reference (dlq.encode_record).
        data = await dlq.encode_record(self.bus, record)
        body = record.body
        # The record and its audit entry at once (both idempotent by message id, neither needs
        # the other): one round trip's wait, and their writes share a flush.
        await asyncio.gather(
            self.bus.publish(
                subjects.dlq(record.tenant, record.reason),
                data,
                msg_id=subjects.dlq_msg_id(subjects.EVENTS_STREAM, seq),
            ),
            self.audit.append(
                record.tenant,
                "dead_letter",
                record.event_id or f"seq:{seq}",
                {
                    "reason": record.reason,
                    "error": record.error,
                    "subject": record.subject,
                    "stream_seq": seq,
                    # What was received, whether the record holds it or keeps it by reference.
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                    "body_size": len(body),
                },
                msg_id=subjects.audit_msg_id("dlq", subjects.EVENTS_STREAM, seq),
            ),
        )


class EventHandlers:
    """Which durable consumers of the events stream, other than the coordinator's, would
    deliver a subject: the event handlers an ignored event is left to. Listed at most every
    `ttl_s`; an answer of "none" is checked against a fresh list before anyone acts on it (a
    handler bound a moment ago counts)."""

    def __init__(self, bus: Bus, ttl_s: float = 2.0) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self._listed_at = -float("inf")
        self._filters: list[tuple[str, list[str]]] = []  # (durable, its filter subjects)

    async def of(self, subject: str) -> list[str]:
        fresh = time.monotonic() - self._listed_at < self.ttl_s
        if not fresh:
            await self._list()
        found = self._matching(subject)
        if not found and fresh:
            await self._list()
            found = self._matching(subject)
        return found

    def _matching(self, subject: str) -> list[str]:
        return [
            durable
            for durable, filters in self._filters
            if any(subjects.matches(f, subject) for f in filters)
        ]

    async def _list(self) -> None:
        found: list[tuple[str, list[str]]] = []
        while True:
            page = await self.bus.js.consumers_info(subjects.EVENTS_STREAM, offset=len(found))
            for info in page:
                cfg = info.config
                # Durables only: a reader's or a test kit's short-lived consumer handles nothing.
                if not cfg.durable_name or cfg.durable_name == subjects.COORDINATOR_DURABLE:
                    found.append(("", []))
                    continue
                filters = list(cfg.filter_subjects or []) or [
                    cfg.filter_subject or subjects.events_filter()
                ]
                found.append((cfg.durable_name, filters))
            if len(page) < _LIST_PAGE:
                break
        self._filters = [f for f in found if f[0]]
        self._listed_at = time.monotonic()


class MsgDelivery:
    """A JetStream message as a `coordinator.settle.Delivery`."""

    def __init__(self, msg: Msg) -> None:
        self.msg = msg

    @property
    def stream_seq(self) -> int:
        return int(self.msg.metadata.sequence.stream)

    @property
    def num_delivered(self) -> int:
        return int(self.msg.metadata.num_delivered)

    @property
    def subject(self) -> str:
        return self.msg.subject

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay: float) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    def dead_letter_record(
        self, reason: DlqReason, error: str, *, event: envelope.Event | None
    ) -> DeadLetter:
        msg = self.msg
        meta = msg.metadata
        tenant, _ = subjects.parse_event_subject(msg.subject)
        msg_id = (msg.headers or {}).get(subjects.H_MSG_ID)
        return records.dead_letter(
            reason=reason,
            error=error,
            subject=msg.subject,
            body=msg.data,
            headers=msg.headers,
            attempts=meta.num_delivered,
            stream_seq=meta.sequence.stream,
            event=event,
            # A body that is not an event has no id of its own: its producer's message id,
            # without the tenant prefix, is what `mesh publish` printed.
            event_id=subjects.event_id_of_msg_id(tenant, msg_id) if msg_id else None,
        )


async def _keep_in_progress(delivery: MsgDelivery) -> None:
    """Until cancelled: tell JetStream every `KEEPALIVE_S` that the event is still being worked
    on (a failed +WPI is the connection's problem; the next one, or the redelivery, follows)."""
    while True:
        await asyncio.sleep(KEEPALIVE_S)
        with contextlib.suppress(Exception):
            await delivery.in_progress()
