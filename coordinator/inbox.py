"""The approval inbox on the bus: the wiring of `coordinator.humans` (the desk) to NATS.

Stream MESH_APPROVALS (`mesh.approvals`), one durable consumer shared by every coordinator
(`coordinator-approvals`), over each tenant's requests and answers:

- a request message (`mesh.approval.T.req.<id>`) is also the request's timer: when it comes
  round the desk applies what is due (`Desk.wake`) and the message is nak'd with a delay until
  the next due time (at most `WAKE_MAX_S`, so a lost nak costs little), acked once its request
  is closed, superseded (an escalation published the next round) or decided. JetStream keeps
  the message and its redelivery across coordinator restarts and NATS failover; the times
  themselves are in the ledger, so whoever gets the message computes the same thing.
- an answer (`mesh.approval.T.vote.<id>`) goes to `Desk.answer`; the person gets a receipt
  (`mesh.approval.T.receipt.<id>`), accepted or refused with why.

Every act is audited (kind `approval`: asked, escalated, answered, refused, silence), with the
whole signed answer and the evidence the person was shown; a decision made here is published
and audited like any other (`Settler.record`), the person's vote among its votes.
Notifications: each request published is also POSTed to its human voter's `notify` URL, if
the policy names one, through the push notifications' SSRF guard (`PushUrlPolicy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from coordinator.humans import Desk, DeskOutcome, Gone, Refused, Settled, Still, republish
from coordinator.ledger import DecisionState
from mesh import approvals, subjects, telemetry
from mesh._internal.consume import JetStreamFetch, PullLoop
from mesh.a2a.push import PushUrlPolicy, webhook_client
from mesh.approvals import ApprovalReceipt, ApprovalRequest, HumanVote
from mesh.audit import AuditLog
from mesh.bus import Bus
from mesh.records import Vote, event_token

if TYPE_CHECKING:
    from coordinator.approval_tasks import ApprovalsAgent
    from coordinator.settle import Settler

log = logging.getLogger(__name__)

WAKE_MAX_S = 60.0  # a request's timer comes round at least this often
ACK_WAIT_S = 30.0  # a coordinator that dies holding a message: redelivered after this
_MIN_DELAY_S = 0.05


@contextlib.contextmanager
def _span(name: str, trace_id: str, attributes: dict[str, Any]) -> Iterator[None]:
    """A span of the event's own trace (the decision's `trace_id`), so `mesh trace` of the
    event shows what people did: the trace's first part ended hours ago, so its parent is a
    placeholder in that trace (`render_tree` shows such a span at the top)."""
    parent = otel_context.Context()
    if trace_id:
        with contextlib.suppress(ValueError):
            ctx = trace.SpanContext(
                trace_id=int(trace_id, 16),
                span_id=random.getrandbits(64) or 1,
                is_remote=True,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            parent = trace.set_span_in_context(trace.NonRecordingSpan(ctx))
    with telemetry.tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ):
        yield


def _audit_id(tenant: str, request_id: str, what: str) -> str:
    """An approval audit record's message id: a repeat after a crash is dropped."""
    return "audit:" + subjects.approval_msg_id(tenant, request_id, what)


def _evidence(votes: list[Vote]) -> list[dict[str, Any]]:
    return [
        {
            "skill": v.skill,
            "agent": v.agent,
            "outcome": v.outcome,
            "vote": v.verdict.vote if v.verdict else None,
            "reasons": list(v.verdict.reasons) if v.verdict else [],
            "confidence": v.verdict.confidence if v.verdict else None,
        }
        for v in votes
    ]


class Inbox:
    def __init__(
        self,
        bus: Bus,
        desk: Desk,
        audit: AuditLog,
        settler: Settler,
        *,
        name: str,
        allow_private: bool = False,
        refresh_trust: Callable[[], object] | None = None,
    ) -> None:
        self.bus = bus
        self.desk = desk
        self.audit = audit
        self.settler = settler
        self.name = name
        self.refresh_trust = refresh_trust
        self.url_policy = PushUrlPolicy(allow_private=allow_private)
        self._http: httpx.AsyncClient | None = None
        # The inbox as an A2A agent (coordinator.approval_tasks), made in `run` (serve_a2a).
        self.a2a: ApprovalsAgent | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(
        self, stop: asyncio.Event, *, concurrency: int = 16, serve_a2a: bool = True
    ) -> None:
        """Work on the approvals stream until `stop`; with `serve_a2a`, also answer A2A over
        NATS as the `approvals` agent (coordinator.approval_tasks)."""
        sub = None
        if serve_a2a:
            from coordinator.approval_tasks import ApprovalsAgent

            self.a2a = ApprovalsAgent.from_bus(self.bus, self.desk.signer)
            if self.a2a is not None:
                sub = await self.a2a.subscribe(self.bus.nc)
        try:
            await self._run(stop, concurrency)
        except Exception:
            # Said loudly: decisions waiting for people would wait for ever (the events go on).
            log.exception("the approval inbox stopped; decisions waiting for people are stuck")
            raise
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self.a2a is not None:
                await self.a2a.aclose()

    async def _run(self, stop: asyncio.Event, concurrency: int) -> None:
        psub = await self.bus.js.pull_subscribe_bind(
            durable=await self._durable(), stream=subjects.APPROVALS_STREAM
        )
        loop: PullLoop[Msg] = PullLoop(
            JetStreamFetch(psub),
            self._guarded,
            concurrency=concurrency,
            name=f"{self.name}-approvals",
            drain_s=5.0,
        )
        try:
            await loop.run(stop)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            if self._http is not None:
                await self._http.aclose()

    async def _durable(self) -> str:
        config = ConsumerConfig(
            name=subjects.APPROVALS_DURABLE,
            durable_name=subjects.APPROVALS_DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,  # a request waits as long as its policy says: its timer never ends
            filter_subjects=[
                subjects.approvals_filter(kind="req"),
                subjects.approvals_filter(kind="vote"),
            ],
        )
        await self.bus.js.add_consumer(subjects.APPROVALS_STREAM, config)
        return subjects.APPROVALS_DURABLE

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            log.exception("approvals message on %s failed; will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    # -- the decision core said: wait for people --------------------------------------------------
    async def asked(self, state: DecisionState, key: str, *, fresh: bool) -> None:
        """Audit that people are asked, then publish the requests of a decision that now waits
        for them. Again on a redelivery of the event (`fresh` False: a crash may have come
        between the ledger and these), idempotent by message ids."""
        from coordinator.humans import requests

        for request in requests(state):
            await self._audit(request.tenant, key, request.event_id, "asked", request)
            await self.publish_request(request)

    # -- one message ------------------------------------------------------------------------------
    async def handle(self, msg: Msg) -> None:
        try:
            tenant, kind, request_id = subjects.parse_approval_subject(msg.subject)
        except ValueError:
            await msg.ack()
            return
        token = request_id.split(".", 1)[0]
        key = subjects.decision_key(tenant, token)
        if kind == "req":
            await self._timer(msg, key)
        elif kind == "vote":
            await self._answer(msg, tenant, key, request_id)
        else:
            await msg.ack()

    async def _timer(self, msg: Msg, key: str) -> None:
        try:
            request = approvals.request_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            await msg.ack()  # not ours: only coordinators may publish here
            return
        if request.status == "closed":
            await msg.ack()
            return
        outcome = await self.desk.wake(key)
        if isinstance(outcome, Settled | Still) and (
            isinstance(outcome, Settled) or outcome.changed
        ):
            what = "decided" if isinstance(outcome, Settled) else "escalated"
            with _span(
                f"approval {what} {msg.subject}",
                await self._trace_id(key),
                {"mesh.approval.request_id": request.id, "mesh.approval.act": what},
            ):
                await self._publish(outcome, key)
        if isinstance(outcome, Gone) and (
            again := republish(outcome.decided, self.desk.clock.time())
        ):
            # Decided (by the desk) while this timer waited: published again, idempotently, in
            # case whoever decided failed before publishing (found by tests/sim).
            await self.settler.record(again, "")
        if isinstance(outcome, Still):
            current = next((r for r in outcome.requests if r.id == request.id), None)
            if current is not None and current.round == request.round and outcome.next_due:
                # The desk's clock (the wall clock in the service; simulated in tests/sim).
                now = self.desk.clock.time()
                delay = min(WAKE_MAX_S, max(_MIN_DELAY_S, outcome.next_due - now))
                await msg.nak(delay=delay)
                return
            if current is not None and current.round > request.round and not outcome.changed:
                # Superseded: but the next round's message (this request's timer from now on)
                # may never have gone out, its publish failed after the ledger moved (found by
                # tests/sim: nothing woke the request again). Out again, idempotently.
                await self._publish(Still(outcome.requests, outcome.next_due, True, []), key)
        await msg.ack()  # closed, superseded by the next round's message, or decided

    async def _answer(self, msg: Msg, tenant: str, key: str, request_id: str) -> None:
        try:
            vote = approvals.vote_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            await self._refuse(tenant, key, request_id, None, f"not an answer: {e}")
            await msg.ack()
            return
        if vote.tenant != tenant or vote.request_id != request_id:
            why = "the answer names another tenant or request than its subject"
            await self._refuse(tenant, key, request_id, vote, why)
            await msg.ack()
            return
        trust = self.desk.trust
        unknown = trust is not None and (
            vote.signer not in trust.keys or (vote.via and approvals.person_of(trust, vote) is None)
        )
        if unknown and self.refresh_trust is not None:
            self.refresh_trust()  # a key we do not know yet may be a person issued a moment ago
        with _span(
            f"approval answer {msg.subject}",
            await self._trace_id(key),
            {
                "mesh.approval.request_id": request_id,
                "mesh.approval.by": vote.by,
                "mesh.approval.answer": vote.answer,
            },
        ):
            await self._answered(tenant, key, request_id, vote)
        await msg.ack()

    async def _trace_id(self, key: str) -> str:
        state = await self.desk.ledger.read(key)
        if state is None:
            return ""
        if state.decision is not None:
            return state.decision.trace_id
        return state.pending.trace_id if state.pending is not None else ""

    async def _answered(self, tenant: str, key: str, request_id: str, vote: HumanVote) -> None:
        outcome = await self.desk.answer(key, vote)
        if isinstance(outcome, Refused):
            await self._refuse(tenant, key, request_id, vote, outcome.why)
            if outcome.then is not None:
                await self._publish(outcome.then, key)
            elif (again := republish(outcome.decided, self.desk.clock.time())) is not None:
                # The answer that decided it may be this one, redelivered after a failure
                # between the ledger and the publish: published again, idempotently.
                await self.settler.record(again, "")
        else:
            closed = outcome.closed if isinstance(outcome, Settled | Still) else []
            shown = next((r.evidence for r in closed if r.id == request_id), [])
            await self._audit_answer(tenant, vote, shown)
            await self._publish(outcome, key)
            await self._receipt(tenant, request_id, vote, accepted=True)

    # -- publishing --------------------------------------------------------------------------------
    async def _publish(self, outcome: DeskOutcome, key: str) -> None:
        if isinstance(outcome, Settled):
            for request in outcome.closed:
                await self._closed(request, key)
            await self.settler.record(outcome.decision, "")
        elif isinstance(outcome, Still) and outcome.changed:
            for request in outcome.closed:
                await self._closed(request, key)
            for request in outcome.requests:
                await self.publish_request(request)
                if request.round:
                    await self._audit(request.tenant, key, request.event_id, "escalated", request)

    async def _closed(self, request: ApprovalRequest, key: str) -> None:
        await self.publish_request(request)
        if "silence" in request.outcome:
            await self._audit(request.tenant, key, request.event_id, "silence", request)

    async def publish_request(self, request: ApprovalRequest) -> None:
        signer = self.desk.signer
        signed = approvals.sign_request(signer, request) if signer is not None else request
        what = "closed" if request.status == "closed" else f"round{request.round}"
        # Tagged with the coordinator's key, so nobody else can take the id first and have the
        # server drop the request as a duplicate (`subjects.approval_msg_id`). Deterministic:
        # a retry, or another coordinator re-publishing the same round, is still dropped, as
        # the coordinators of a mesh share the coordinator identity (`mesh.dev.launcher`).
        # Coordinators issued keys of their own (or across a key rotation) tag differently:
        # their re-publish of a round lands as a second copy of the same signed state, which
        # is harmless (a request's state is the last message on its subject, and each round's
        # message is the same whoever publishes it).
        tag = (
            signer.tag(subjects.approval_msg_tag_payload(request.tenant, request.id, what))
            if signer is not None
            else ""
        )
        await self.bus.publish(
            approvals.request_subject(signed),
            approvals.encode(signed),
            msg_id=subjects.approval_msg_id(request.tenant, request.id, what, tag),
        )
        if request.status == "open":
            await self._notify(signed)
        if self.a2a is not None:
            await self.a2a.changed(signed)  # the A2A tasks of its people (push configs)

    async def _receipt(
        self, tenant: str, request_id: str, vote: HumanVote | None, *, accepted: bool, why: str = ""
    ) -> None:
        receipt = ApprovalReceipt(
            request_id=request_id,
            by=vote.by if vote else "",
            at=vote.at if vote else 0.0,
            accepted=accepted,
            why=why,
            # What the person's client matches on (`approvals.receipt`): by/at are the vote's
            # claim, anyone's to copy; a forgery naming them has another digest.
            vote_sha256=approvals.vote_digest(vote) if vote else "",
        )
        with contextlib.suppress(Exception):  # a receipt is a courtesy: the audit has it all
            await self.bus.publish(
                subjects.approval(tenant, "receipt", request_id), approvals.encode(receipt)
            )

    async def _refuse(
        self, tenant: str, key: str, request_id: str, vote: HumanVote | None, why: str
    ) -> None:
        log.warning("approval %s refused: %s", request_id, why)
        data: dict[str, Any] = {"act": "refused", "request_id": request_id, "why": why}
        if vote is not None:
            data |= {"by": vote.by, "signer": vote.signer, "answer": vote.answer, "at": vote.at}
            if vote.via:
                data["via"] = vote.via
        event_id = vote.event_id if vote is not None else request_id
        # By the vote's digest: a forged vote naming the same signer and time is another
        # record (a redelivery of the same vote is still dropped).
        what = f"refused:{approvals.vote_digest(vote)}" if vote is not None else "refused"
        await self.audit.append(
            tenant,
            "approval",
            event_id,
            data,
            msg_id=_audit_id(tenant, request_id, what),
        )
        await self._receipt(tenant, request_id, vote, accepted=False, why=why)

    async def _audit_answer(self, tenant: str, vote: HumanVote, shown: list[Vote]) -> None:
        await self.audit.append(
            tenant,
            "approval",
            vote.event_id,
            {
                "act": "answered",
                "request_id": vote.request_id,
                "by": vote.by,
                "answer": vote.answer,
                "reason": vote.reason,
                "round": vote.round,
                "at": vote.at,
                "evidence_sha256": vote.evidence_sha256,
                "evidence": _evidence(shown),
                **(
                    {"via": vote.via, "note": f"answered via {vote.via} by {vote.by}"}
                    if vote.via
                    else {}
                ),
                # The whole signed answer: verifiable offline against the trust file.
                "signed": msgspec.to_builtins(vote),
            },
            msg_id="audit:"
            + subjects.approval_msg_id(tenant, vote.request_id, f"answer:{vote.at}"),
        )

    async def _audit(
        self, tenant: str, key: str, event_id: str, act: str, request: ApprovalRequest
    ) -> None:
        await self.audit.append(
            tenant,
            "approval",
            event_id,
            {
                "act": act,
                "request_id": request.id,
                "voter": request.voter,
                "roles": request.roles,
                "round": request.round,
                "asked_at": request.asked_at,
                "expires_at": request.expires_at,
                "outcome": request.outcome,
                "evidence": _evidence(request.evidence),
            },
            msg_id="audit:"
            + subjects.approval_msg_id(tenant, request.id, f"{act}:{request.round}"),
        )

    async def _notify(self, request: ApprovalRequest) -> None:
        """POST the request to its voter's `notify` URL (if any), through the SSRF guard."""
        state = await self.desk.ledger.read(
            subjects.decision_key(request.tenant, event_token(request.event_id))
        )
        pending = state.pending if state is not None else None
        human = pending.policy.human(request.voter) if pending is not None else None
        url = human.notify if human is not None else ""
        if not url:
            return
        if not await self.url_policy(url):
            log.warning("approval %s: notify URL refused by the SSRF guard", request.id)
            return
        if self._http is None:
            # Connects only to the address the guard checked (DNS rebinding), no redirects.
            self._http = webhook_client(self.url_policy)
        try:
            await self._http.post(
                url, content=approvals.encode(request), headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as e:
            log.warning("approval %s: notify failed (%s)", request.id, type(e).__name__)
