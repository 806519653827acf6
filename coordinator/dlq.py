"""Dead letters that JetStream reports: consumers that gave up on an event, or terminated it.

The coordinator dead-letters what it can judge itself (malformed, unknown type, no agent) and
acks it. What it cannot see is an event some consumer stopped trying: the redeliveries ran out
(`max_deliver`) or a consumer called `term()`. JetStream announces both as advisories on core
NATS; `AdvisoryDeadLetters` turns each into a `DeadLetter` record with the original body, so
nothing leaves the mesh without a trace.

Advisories are core NATS (at most once): one missed while no coordinator is connected is not
sent again. Every coordinator subscribes in one queue group, so each advisory is handled once,
and the record's msg id (`dlq:<stream>:<seq>:<consumer>`) deduplicates it in MESH_DLQ anyway.
An event the coordinator's own consumer gave up on is first marked in the decision ledger (the
same transition the coordinator uses), so it is never both decided and dead-lettered.

The module also holds what the `mesh dlq` commands do: `latest`, `get`, `replay` and `purge`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import getpass
import hashlib
import itertools
import json
import logging
import socket
import time
import typing
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    DigestMismatchError,
    NoStreamResponseError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.object_store import ObjectStore

from coordinator.ledger import UNAVAILABLE, Ledger, state_key
from coordinator.settle import MARK_RETRY, PUBLISH_RETRY, SETTLE_WAIT_S, Outlet, gave_up
from mesh import envelope, records, subjects, telemetry
from mesh._internal.lifecycle import AsyncService
from mesh._internal.tasks import TaskPool
from mesh.audit import SYSTEM_TENANT, AuditLog
from mesh.bus import Bus, tail
from mesh.errors import ConfigError, ForbiddenError, NotConnectedError
from mesh.errors import NotFoundError as MissingError
from mesh.records import BodyRef, DeadLetter, DlqReason, dead_letter_decoder, encoder

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = typing.get_args(DlqReason)


def advisory_subjects(stream: str = subjects.EVENTS_STREAM) -> list[str]:
    """The advisories that mean "a consumer of `stream` stopped trying this message"."""
    return [subjects.max_deliveries_advisory(stream), subjects.terminated_advisory(stream)]


class Advisory(msgspec.Struct, forbid_unknown_fields=False):
    """The fields we use of `io.nats.jetstream.advisory.v1.max_deliver` / `.terminated`.

    Observed from nats-server 2.15: type, id, timestamp, stream, consumer, stream_seq,
    deliveries; `terminated` adds consumer_seq and, when the consumer gave one, reason.
    """

    type: str
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0
    reason: str = ""


_advisory_dec = msgspec.json.Decoder(Advisory)


@dataclass
class Stats:
    received: int = 0  # advisories this instance took (the queue group shares them out)
    recorded: int = 0  # DLQ records stored by this instance
    duplicates: int = 0  # records MESH_DLQ already had (same msg id)
    failed: int = 0  # advisories that could not become a record (logged)


class AdvisoryDeadLetters(AsyncService):
    """Subscribes to the events stream's give-up advisories and writes a DLQ record for each.

    The caller owns the bus and runs `bus.ensure()` first (the coordinator does), so MESH_DLQ
    exists when the first advisory arrives.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str = subjects.EVENTS_STREAM,
        queue: str = subjects.DLQ_QUEUE_GROUP,
        outlet: Outlet | None = None,
    ) -> None:
        self.bus = bus
        # Where an event's outcome goes when its advisory finds it decided, or dead-lettered by
        # the coordinator already (the coordinator running beside this listener); None: logged.
        self.outlet = outlet
        self.stream = stream
        self.queue = queue
        self.stats = Stats()
        self._subs: list[Subscription] = []
        # Each advisory is handled in its own slot: one may wait for a coordinator's lease, and
        # the advisories behind it must not wait in line (up to the pool's size).
        self._pool = TaskPool(bus.settings.max_inflight, name="advisory dead letters")
        self._ledger: Ledger | None = None

    async def start(self) -> None:
        if self._subs:
            return
        for subject in advisory_subjects(self.stream):
            sub = await self.bus.nc.subscribe(subject, queue=self.queue, cb=self._on_advisory)
            self._subs.append(sub)
        # The interest must be known to the server before start() returns, or an advisory
        # caused right after start() is missed. Two round trips, because nats-py writes a
        # flush's PING straight to the socket, possibly ahead of the still-buffered SUBs; by
        # the second PING the flusher task has written them.
        await self.bus.nc.flush()
        await self.bus.nc.flush()
        log.info("dead-lettering advisories of %s (queue group %s)", self.stream, self.queue)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            # Drain, not unsubscribe: an advisory already taken is finished, not dropped.
            with contextlib.suppress(Exception):
                # nats-py leaves drain() unannotated
                await asyncio.wait_for(sub.drain(), timeout=10.0)  # type: ignore[no-untyped-call]
        await self._pool.drain(SETTLE_WAIT_S + 10.0)

    @property
    def idle(self) -> bool:
        """Nothing queued or being handled (after a flush of the connection: nothing in flight)."""
        return len(self._pool) == 0 and all(s.pending_msgs == 0 for s in self._subs)

    async def _on_advisory(self, msg: Msg) -> None:
        self.stats.received += 1
        # With a slot free this starts the task before returning (no await that suspends), so
        # `idle` never sees an advisory that is neither queued nor in the pool.
        await self._pool.spawn(self._handle_one(msg))

    async def _handle_one(self, msg: Msg) -> None:
        # Never raise: the pool would only log it, and the count of failures is the signal.
        try:
            await self.handle(msg.subject, msg.data)
        except Exception:
            self.stats.failed += 1
            log.exception("advisory on %s could not be dead-lettered", msg.subject)

    async def _ledger_for_settling(self) -> Ledger:
        if self._ledger is None:
            # It never claims an event, so it holds no lease of its own; its writes are signed
            # like the coordinator's (a dead-letter mark is a ledger entry like any other).
            self._ledger = await Ledger.on_bus(self.bus, owner="dlq", lease_s=0.0)
        return self._ledger

    async def handle(self, advisory_subject: str, payload: bytes) -> None:
        """One advisory → one DLQ record (deduplicated by stream, sequence and consumer)."""
        adv = _advisory_dec.decode(payload)
        terminated = subjects.is_terminated_advisory(advisory_subject)
        reason: DlqReason = "terminated" if terminated else "max_deliveries"
        record = await build_record(self.bus, adv, reason)
        msg_id = subjects.dlq_msg_id(adv.stream, adv.stream_seq, adv.consumer)
        if adv.consumer == subjects.COORDINATOR_DURABLE and record.event_id:
            # JetStream gave up delivering it to the coordinator. Not if it was decided after
            # all (a "busy" redelivery can use up the last delivery while another coordinator
            # finishes it); while a live owner still holds it, wait (bounded) for its outcome.
            ledger = await self._ledger_for_settling()
            key = state_key(record.tenant, record.event_id)
            settled = await gave_up(ledger, self.outlet, record, key=key, patience_s=SETTLE_WAIT_S)
            if settled is None:
                return
            # Under the coordinator's own message id: if it dead-lettered this delivery itself
            # (and crashed before its record was stored, or its ack was lost), the DLQ still
            # holds one record, not a second under ours.
            record = settled
            msg_id = subjects.dlq_msg_id(subjects.EVENTS_STREAM, adv.stream_seq)
        body = await encode_record(self.bus, record)
        for attempt in itertools.count(1):
            try:
                ack = await self.bus.publish(
                    subjects.dlq(record.tenant, record.reason), body, msg_id=msg_id
                )
                break
            except (NatsTimeoutError, NoStreamResponseError, TimeoutError) as e:
                pause = PUBLISH_RETRY.pause(attempt)
                if pause is None:
                    raise
                log.warning("storing dead letter %s failed (%s); retrying", msg_id, e)
                await asyncio.sleep(pause)
        if ack.duplicate:
            self.stats.duplicates += 1
            return
        self.stats.recorded += 1
        log.warning(
            "event seq=%s on %s dead-lettered (%s): %s",
            adv.stream_seq,
            record.subject or adv.stream,
            record.reason,
            record.error,
        )


def _dlq_reason(reason: str) -> DlqReason:
    # Written by the coordinator from a DlqReason; anything else is a state from elsewhere.
    return typing.cast(DlqReason, reason) if reason in REASONS else "policy_error"


async def build_record(bus: Bus, adv: Advisory, reason: DlqReason) -> DeadLetter:
    """The DLQ record for an advisory, with the original message fetched from its stream."""
    if reason == "terminated":
        why = adv.reason or "no reason given"
        error = f"consumer {adv.consumer!r} terminated it after {adv.deliveries} deliveries: {why}"
    else:
        error = (
            f"consumer {adv.consumer!r} gave up after {adv.deliveries} deliveries "
            "(max_deliver reached)"
        )
    try:
        raw = await _get_msg(bus, adv.stream, adv.stream_seq)
    except NotFoundError:
        # Still recorded: that a consumer gave up is worth knowing even without the body.
        return records.dead_letter(
            reason=reason,
            error=f"{error}; the original (seq {adv.stream_seq}) is no longer in "
            f"{adv.stream} (deleted or aged out), so the body is empty",
            subject="",
            body=b"",
            attempts=adv.deliveries,
            stream_seq=adv.stream_seq,
        )
    data: bytes = raw.data or b""
    event: envelope.Event | None = None
    with contextlib.suppress(envelope.MalformedEventError):  # the only thing decode raises
        event = envelope.decode(data, raw.headers)
    return records.dead_letter(
        reason=reason,
        error=error,
        subject=raw.subject or "",
        body=data,
        headers={str(k): str(v) for k, v in (raw.headers or {}).items()},
        attempts=adv.deliveries,
        stream_seq=adv.stream_seq,
        event=event,
    )


async def _get_msg(bus: Bus, stream: str, seq: int) -> RawStreamMsg:
    """The original message; a NATS error (a stream-leader election) is tried again, bounded
    by `SETTLE_WAIT_S`: the advisory comes once, and without its body the event is not known."""
    give_up = time.monotonic() + SETTLE_WAIT_S
    for attempt in itertools.count(1):
        try:
            return await bus.js.get_msg(stream, seq)
        except UNAVAILABLE as e:
            if not await MARK_RETRY.sleep(attempt, deadline=give_up):
                raise
            if attempt == 1:
                log.warning("reading %s seq %s failed (%s); retrying", stream, seq, e)
    raise AssertionError("unreachable")  # itertools.count never ends


# -- bodies too large for their record --------------------------------------------------------
# Room left in a message for its headers (message id, trace) and JSON framing around the record.
RECORD_HEADROOM = 8 * 1024


async def encode_record(bus: Bus, record: DeadLetter) -> bytes:
    """The wire form of `record`, fit to publish: a record whose base64 body would pass the
    server's max_payload keeps the body by reference instead (`keep_body`). Used by the
    coordinator and the advisory dead-letterer alike."""
    data = encoder.encode(record)
    if len(data) + RECORD_HEADROOM <= bus.nc.max_payload:
        return data
    ref = await keep_body(bus, record.body)
    return encoder.encode(record.by_reference(ref))


async def keep_body(bus: Bus, body: bytes) -> BodyRef:
    """Store `body` in the dead-letter-body object store under its SHA-256 (once: a body that
    is there already is not written again) and say where it is."""
    digest = hashlib.sha256(body).hexdigest()
    ref = BodyRef(bucket=subjects.DLQ_BODIES_BUCKET, name=digest, sha256=digest, size=len(body))
    store = await _bodies(bus)
    try:
        await store.get_info(digest)
    except ObjectNotFoundError:
        # Only ever a new name: nats-py's put of an existing name purges the old chunks, and
        # stream purges are the operator's alone. The name is the content, so there is no
        # other version to write (a tampered one fails `body_of`'s check).
        await store.put(digest, body)
    return ref


async def body_of(bus: Bus, record: DeadLetter) -> bytes:
    """A dead letter's original body: inline, or fetched from where it was kept and checked
    against the SHA-256 and size the record holds."""
    ref = record.body_ref
    if ref is None:
        return record.body
    where = f"object {ref.name} of bucket {ref.bucket}"
    try:
        store = await bus.js.object_store(ref.bucket)
        got = await store.get(ref.name)
    except (BucketNotFoundError, ObjectNotFoundError, NotFoundError):
        raise ConfigError(
            f"the body of this dead letter ({ref.size} bytes) was kept as {where}, "
            "which is gone (aged out or deleted)",
            hint="the record still says who sent it and why it was dead-lettered",
        ) from None
    except DigestMismatchError:
        got = None
    body = got.data if got is not None else None
    if body is None or len(body) != ref.size or hashlib.sha256(body).hexdigest() != ref.sha256:
        raise ConfigError(
            f"{where} does not match the dead letter's SHA-256 {ref.sha256} ({ref.size} bytes)",
            hint="the kept body was altered; the record and the audit trail hold the original hash",
        )
    return bytes(body)


async def _bodies(bus: Bus) -> ObjectStore:
    try:
        return await bus.js.object_store(subjects.DLQ_BODIES_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        raise ConfigError(
            f"the object store {subjects.DLQ_BODIES_BUCKET} for large dead-lettered bodies does "
            "not exist",
            hint="the operator creates it: run `mesh up`, or `mesh ensure` as the operator",
        ) from None


def check_reason(reason: str) -> None:
    if reason not in REASONS:
        raise ConfigError(
            f"{reason!r} is not a dead-letter reason",
            hint=f"use one of: {', '.join(REASONS)}",
        )


# -- what `mesh dlq` does ---------------------------------------------------------------------
async def latest(
    bus: Bus, *, limit: int, reason: str | None = None
) -> list[tuple[int, DeadLetter]]:
    """The last `limit` dead letters (optionally of one reason) as (DLQ seq, record)."""
    if reason is None:
        rows = [(seq, body) for seq, _, body in await tail(bus, subjects.DLQ_STREAM, limit)]
    else:
        check_reason(reason)
        rows = await _scan(bus, subjects.dlq("*", reason), limit)
    out: list[tuple[int, DeadLetter]] = []
    for seq, body in rows:
        try:
            out.append((seq, dead_letter_decoder.decode(body)))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            # Someone else published to mesh.dlq.>: one foreign message must not hide the rest.
            log.warning("%s seq %s is not a dead letter, skipped: %s", subjects.DLQ_STREAM, seq, e)
    return out


async def _scan(bus: Bus, subject: str, limit: int) -> list[tuple[int, bytes]]:
    # A short-lived consumer filtered on the subject: the server does the filtering, where a
    # backwards walk by sequence would need one request per message of every other reason.
    name = f"{subjects.DLQ_SCAN_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        info = await bus.js.add_consumer(
            subjects.DLQ_STREAM,
            ConsumerConfig(
                name=name,
                filter_subject=subject,
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,  # cleans up after a CLI that died mid-scan
            ),
        )
    except NotFoundError:
        return []  # no DLQ stream yet
    rows: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=limit)
    psub = None
    try:
        psub = await bus.js.pull_subscribe_bind(name, stream=subjects.DLQ_STREAM)
        remaining = int(info.num_pending or 0)
        while remaining > 0:
            try:
                msgs = await psub.fetch(min(remaining, 256), timeout=2.0)
            except (TimeoutError, NatsTimeoutError):
                break
            for m in msgs:
                rows.append((m.metadata.sequence.stream, m.data))
                remaining = m.metadata.num_pending
    finally:
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        with contextlib.suppress(Exception):
            await bus.js.delete_consumer(subjects.DLQ_STREAM, name)
    return list(rows)


async def get(bus: Bus, seq: int) -> DeadLetter:
    """The dead letter with DLQ sequence `seq` (the id `mesh dlq ls` shows)."""
    hint = "the ids are the numbers `mesh dlq ls` shows"
    if seq < 1:
        raise ConfigError(f"{seq} is not a dead-letter id", hint=hint)
    try:
        raw = await bus.js.get_msg(subjects.DLQ_STREAM, seq)
    except NotFoundError:
        raise MissingError(f"no dead letter with id {seq}", hint=hint) from None
    try:
        return dead_letter_decoder.decode(raw.data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(
            f"message {seq} in {subjects.DLQ_STREAM} is not a dead letter: {e}",
            hint="something other than the mesh published to mesh.dlq.>",
        ) from None


async def replay(bus: Bus, seq: int) -> str:
    """Republish dead letter `seq`'s original to its subject; returns the new Nats-Msg-Id.

    The msg id is new on purpose: the original's would be swallowed by the stream's duplicate
    window. Body and every other header are the original's, but the traceparent: the replay's
    send span continues the original's trace (same trace id, its own span id), so the replay
    shows up in the event's trace.
    """
    record = await get(bus, seq)
    tenant, _ = subjects.parse_event_subject(record.subject)
    if not tenant:
        raise ConfigError(
            f"dead letter {seq} cannot be replayed: "
            + (
                f"its subject {record.subject!r} is not an events subject"
                if record.subject
                else "its original message was gone when it was dead-lettered"
            ),
            hint=f"only events ({subjects.events_filter()}) are replayed; "
            f"see `mesh dlq show {seq}`",
        )
    await authorize(bus, "replay", record, ref=f"dlq:{seq}")
    headers = {
        k: v
        for k, v in record.headers.items()
        if not k.lower().startswith(subjects.JS_PUBLISH_HEADER_PREFIXES)
    }
    msg_id = subjects.replay_msg_id(seq, uuid.uuid4().hex)
    body = await body_of(bus, record)
    try:
        await bus.publish(
            record.subject,
            body,
            msg_id=msg_id,
            headers=headers,
            parent=telemetry.extract(headers) if subjects.H_TRACEPARENT in headers else None,
        )
    except NoStreamResponseError:
        raise NotConnectedError(
            f"no stream takes {record.subject}",
            hint="start the mesh (`mesh up`) so the events stream exists",
        ) from None
    await AuditLog(bus, actor=_operator()).append(
        tenant,
        "replay",
        record.event_id or f"dlq:{seq}",
        {"dlq_seq": seq, "reason": record.reason, "subject": record.subject, "msg_id": msg_id},
    )
    return msg_id


async def purge(bus: Bus, *, reason: str | None) -> int:
    """Remove dead letters (all, or one reason's) from MESH_DLQ; returns how many went."""
    req: dict[str, Any] = {}
    if reason is not None:
        check_reason(reason)
        req["filter"] = subjects.dlq("*", reason)
    await authorize(bus, "purge", None, ref=subjects.DLQ_STREAM, reason=reason)
    # The raw API: nats-py's purge_stream returns only a bool, and the count is the answer.
    try:
        resp = await bus.nc.request(
            subjects.stream_purge_api(subjects.DLQ_STREAM), json.dumps(req).encode(), timeout=5
        )
    except NoRespondersError:
        raise NotConnectedError(
            "JetStream did not answer", hint="is JetStream enabled on this server (-js)?"
        ) from None
    doc = json.loads(resp.data)
    if "error" in doc:
        try:
            APIError.from_error(doc["error"])  # raises the matching nats error
        except NotFoundError:
            return 0  # no DLQ stream yet: nothing to purge
    purged = int(doc.get("purged", 0))
    await AuditLog(bus, actor=_operator()).append(
        SYSTEM_TENANT, "purge", subjects.DLQ_STREAM, {"reason_filter": reason, "purged": purged}
    )
    return purged


async def authorize(
    bus: Bus,
    action: typing.Literal["replay", "purge", "export"],
    record: DeadLetter | None,
    *,
    ref: str,
    reason: str | None = None,
) -> None:
    """Cedar (mesh.authz): may this process's identity `action` this dead letter (`record`),
    or every dead letter of `reason` (None: all)? Denied: a `forbidden` audit record when this
    identity may write the audit trail, and ForbiddenError naming the policy."""
    from mesh import authz

    authorizer = authz.Authorizer.from_settings(bus.settings)
    who = (
        authz.identity_of(bus.identity)
        if bus.identity is not None
        else authz.identity(authz.ANONYMOUS, authz.ANONYMOUS, tenant="")
    )
    if record is not None:
        resource = authz.dead_letters(record.tenant, record.reason, record.event_type or "*")
        tenant, what = record.tenant, f"dead letter {ref.removeprefix('dlq:')}"
    else:
        resource = authz.dead_letters("*", reason or "*")
        tenant, what = SYSTEM_TENANT, f"every {reason} dead letter" if reason else "dead letters"
    decision = authorizer.is_allowed(who, action, resource)
    if decision.allowed:
        return
    audited = ""
    try:
        audit = AuditLog(bus, actor=_operator())
        await authz.audit_denial(
            audit, tenant, ref, principal=who, action=action, resource=resource, decision=decision
        )
    except Exception as e:  # the deny stands whatever the audit trail says
        # A reader's identity cannot sign audit records; the refusal is still the answer.
        audited = f" (not audited: {getattr(e, 'message', None) or type(e).__name__})"
        log.warning("deny of %s %s by %s not audited: %s", action, ref, who.id, e)
    raise ForbiddenError(
        f"{who.id} may not {action} {what}: {decision.explain()}{audited}",
        hint="an authorization policy decides this (MESH_PROFILE, MESH_AUTHZ_DIR; "
        "docs/authorization.md)",
    )


def _operator() -> str:
    """Who did it, as far as this process can tell (the audit trail's actor)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"
