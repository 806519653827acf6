"""What each `Outcome` of the decision core means for the message: ack, nak, dead letter.

NATS-free, over two small protocols, so the service runs it on JetStream and the simulation
(tests/sim) runs the very same ordering code on its in-memory parts:

- `Delivery`: the message being handled (ack / nak(delay) / in_progress, its stream sequence,
  how often it was delivered, and the dead-letter record it would make);
- `Outlet`: where outcomes go (publish a decision, audit it, publish a dead-letter record with
  its audit entry). Each is idempotent (per-event subject, message ids), so publishing again
  after a crash is safe.

Rules this module owns (the order is the point):
- A decision is published and audited (the two at once: each is idempotent, neither needs
  the other, and whatever a crash leaves undone a redelivery does again), then the message
  acked once both are done.
- A dead letter is marked in the ledger first (compare-and-set: refused if the event was
  decided, LostClaim if someone else holds it), then the record and its audit entry are
  published, then the message acked: decided or dead-lettered, never both.
- A redelivery of an event that already has its outcome publishes that outcome again, then
  acks (`finish_again`).
- An outcome of a new kind is one more branch in `Settler.settle`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

import msgspec

from coordinator.decide import Decided, Outcome, Undecidable, Wait
from coordinator.ledger import (
    UNAVAILABLE,
    Busy,
    Claim,
    DeadLettered,
    DecisionState,
    Done,
    Ledger,
    LostClaim,
    state_key,
)
from mesh import envelope, telemetry
from mesh._internal.retry import RetryPolicy
from mesh.records import DeadLetter, Decision, DlqReason

# The lines operators know (and filter) came from the service before this module existed.
log = logging.getLogger("coordinator.service")

BUSY_SLACK_S = 0.5  # a busy event is looked at again this long after its lease would lapse
RETRY_DELAY_S = 1.0  # a handling that failed (not a lost claim) is redelivered after this
_REASONS: tuple[str, ...] = typing.get_args(DlqReason)
# An outcome published for a give-up advisory: pauses 0.2 s, then 0.4 s (as coordinator.dlq's).
PUBLISH_RETRY = RetryPolicy(attempts=3, base_s=0.2, max_s=0.4, jitter=False)
# How long an advisory waits for a live coordinator that still holds the event to finish it,
# and for the ledger to take its mark while NATS is unhealthy (then it is logged and counted
# as failed: never published unmarked).
SETTLE_WAIT_S = 60.0
# Between tries of that mark while NATS is unhealthy: 0.2 s doubling to 2 s.
MARK_RETRY = RetryPolicy(attempts=1000, base_s=0.2, max_s=2.0, jitter=False)
_MARK_AGAIN_ON: tuple[type[Exception], ...] = (LostClaim, *UNAVAILABLE)


class Delivery(Protocol):
    """One delivery of one message of the events stream."""

    @property
    def stream_seq(self) -> int: ...

    @property
    def num_delivered(self) -> int: ...

    @property
    def subject(self) -> str: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float) -> None: ...

    async def in_progress(self) -> None: ...

    def dead_letter_record(
        self, reason: DlqReason, error: str, *, event: envelope.Event | None
    ) -> DeadLetter:
        """The DLQ record of this message (its body, headers, attempts, sequence)."""
        ...


class Outlet(Protocol):
    """Where outcomes are published. Every call is idempotent."""

    async def publish_decision(self, decision: Decision) -> None: ...

    async def audit_decision(self, decision: Decision, unverified: str) -> None: ...

    async def publish_dead_letter(self, record: DeadLetter) -> None:
        """The record, then its audit entry."""
        ...


class Settler:
    """Turns outcomes into acks, naks and published records, in the order above."""

    def __init__(self, ledger: Ledger, outlet: Outlet) -> None:
        self.ledger = ledger
        self.outlet = outlet
        self._said = LogBudget(DEAD_LETTER_LOG_EVERY_S)

    async def settle(
        self, delivery: Delivery, event: envelope.Event, outcome: Outcome, unverified: str = ""
    ) -> None:
        """What the decision core's `outcome` for this delivery means for the message."""
        if isinstance(outcome, Busy):
            # Someone alive holds it; look again when its lease would have lapsed.
            await delivery.nak(outcome.retry_in_s + BUSY_SLACK_S)
        elif isinstance(outcome, Done):
            await self.finish_again(delivery, event, outcome.state, unverified)
        elif isinstance(outcome, Wait):
            # No live agent for a skill yet, and the event not claimed: look again later.
            log.debug("event %s on %s: %s", event.id, delivery.subject, outcome.reason)
            await delivery.nak(outcome.retry_in_s)
        elif isinstance(outcome, Undecidable):
            await self.dead_letter(
                delivery, outcome.reason, outcome.error, event=event, claim=outcome.claim
            )
        elif isinstance(outcome, Decided):
            await self.record(outcome.decision, unverified)
            await delivery.ack()
        else:
            typing.assert_never(outcome)

    async def record(self, decision: Decision, unverified: str) -> None:
        await self.publish_and_audit(decision, unverified)
        _count(decision)
        log.info(
            "event %s %s: %s (%s)",
            decision.event_id,
            decision.event_type,
            decision.outcome,
            decision.reason,
        )

    async def publish_and_audit(self, decision: Decision, unverified: str) -> None:
        """The decision published and audited, both under way at once (neither reads the
        other, both are idempotent, and the ack waits for both); the first error is raised
        once both have ended (never one left running unawaited)."""
        results = await asyncio.gather(
            self.outlet.publish_decision(decision),
            self.outlet.audit_decision(decision, unverified),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def finish_again(
        self,
        delivery: Delivery,
        event: envelope.Event,
        state: DecisionState,
        unverified: str = "",
    ) -> None:
        """A redelivery of an event that already has its outcome: publish what may not have
        been published before a crash (idempotent: per-event subject, message ids), then ack."""
        if state.decision is not None:
            await self.publish_and_audit(state.decision, unverified)
        elif state.state == "dead_lettered":
            await self.outlet.publish_dead_letter(
                delivery.dead_letter_record(_reason(state), state.dead_letter_error, event=event)
            )
        log.info("event %s already %s; not deciding again", event.id, state.state)
        await delivery.ack()

    async def dead_letter(
        self,
        delivery: Delivery,
        reason: DlqReason,
        error: str,
        *,
        event: envelope.Event | None = None,
        claim: Claim | None = None,
    ) -> None:
        """What the coordinator cannot decide goes to the DLQ, in this order: the ledger first
        (compare-and-set: refused if the event was decided, LostClaim if someone else holds
        it), then the record and its audit entry (idempotent by message id), then the ack.
        A body that is not an event has no ledger entry: it is only recorded."""
        record = delivery.dead_letter_record(reason, error, event=event)
        if event is not None:
            key = state_key(record.tenant, event.id)
            if claim is None and delivery.num_delivered == 1:  # most likely new: one round trip
                marked = await self.ledger.mark_new_dead_lettered(
                    key, stream_seq=record.stream_seq, reason=reason, error=error
                )
            else:
                marked = await self.ledger.mark_dead_lettered(
                    key, stream_seq=record.stream_seq, reason=reason, error=error, claim=claim
                )
            if isinstance(marked, Busy):
                # Its owner may still decide it.
                await delivery.nak(marked.retry_in_s + BUSY_SLACK_S)
                return
            if isinstance(marked, Done):
                log.warning(
                    "event %s is decided; not dead-lettering it (%s: %s)", event.id, reason, error
                )
                await delivery.ack()
                return
            if not marked.fresh:  # a redelivery: publish the record it already has
                await self.finish_again(delivery, event, marked.state)
                return
        await self.outlet.publish_dead_letter(record)
        await delivery.ack()
        telemetry.meters().dead_letters.add(1, {"reason": reason, "tenant": record.tenant})
        # Every dead letter is in the DLQ stream and the audit trail; the log names at most
        # one per tenant and reason every DEAD_LETTER_LOG_EVERY_S, so a flood of them (a
        # runaway tenant's over_quota, a hostile client's garbage) cannot flood the log too.
        unsaid = self._said.take((record.tenant, reason))
        if unsaid is not None:
            log.warning(
                "event seq=%s on %s dead-lettered (%s): %s%s",
                record.stream_seq,
                delivery.subject,
                reason,
                error,
                f" ({unsaid} more of tenant {record.tenant} with this reason not logged since"
                f" the last line: `mesh dlq ls --reason {reason}`)"
                if unsaid
                else "",
            )


DEAD_LETTER_LOG_EVERY_S = 10.0


class LogBudget:
    """At most one log line per key every `every_s`: `take(key)` says how many were held back
    since the last line (0 for none), or None while the key must stay quiet."""

    _KEPT = 4096  # keys remembered (tenant and reason pairs); the oldest are forgotten past it

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}

    def take(self, key: Hashable) -> int | None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last.pop(key, None)
        if len(self._last) >= self._KEPT:
            del self._last[next(iter(self._last))]
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0


async def gave_up(
    ledger: Ledger,
    outlet: Outlet | None,
    record: DeadLetter,
    *,
    key: str,
    patience_s: float,
) -> DeadLetter | None:
    """JetStream stopped delivering an event to the coordinator (max deliveries, terminated):
    nothing will deliver it again, so its one outcome must come out here. The ledger says which,
    by the same transition as `Settler.dead_letter` (waiting up to `patience_s` for a live
    owner to finish):

    - decided: the decision is published again, and no dead letter (its owner may have failed
      between the ledger write and the publish, on the last delivery);
    - dead-lettered (now, or by the coordinator already for this delivery, with the ledger's
      reason): the record goes out under the coordinator's own message id, so whichever of the
      two publishes it, and however often, the DLQ holds one record.

    With `outlet` (the coordinator beside this listener, as `coordinator.run` wires it) every
    publish happens here, retried (`PUBLISH_RETRY`), and None is returned. Without one (a
    listener alone), a decided event is only logged and the record is returned for the caller
    to publish under its own message id."""
    marked = await mark_settled(
        ledger,
        key,
        stream_seq=record.stream_seq,
        reason=record.reason,
        error=record.error,
        patience_s=patience_s,
    )
    if isinstance(marked, Done) and marked.state.state == "awaiting_human":
        # Waiting for people (coordinator.humans decides it): their requests may never have
        # gone out (a failed publish used up the last delivery; found by tests/sim), so out
        # again, idempotently, by an outlet that can (the coordinator's `ask_people`).
        ask = getattr(outlet, "ask_people", None)
        if ask is not None:
            await _retried(ledger, ask, marked.state, key)
        return None
    if isinstance(marked, Done):
        decision = marked.state.decision
        log.info("event %s was decided after all; no dead letter", record.event_id)
        if decision is not None and outlet is not None:
            await _retried(ledger, outlet.publish_decision, decision)
            await _retried(ledger, outlet.audit_decision, decision, "")
        return None
    if isinstance(marked, DeadLettered) and not marked.fresh:
        state = marked.state
        record = msgspec.structs.replace(
            record, reason=_reason(state), error=state.dead_letter_error
        )
    if outlet is None:
        return record
    await _retried(ledger, outlet.publish_dead_letter, record)
    return None


async def mark_settled(
    ledger: Ledger,
    key: str,
    *,
    stream_seq: int,
    reason: str,
    error: str,
    patience_s: float,
) -> DeadLettered | Done:
    """The ledger mark an advisory's dead letter needs before it is published
    (`Ledger.mark_dead_lettered`, waiting up to `patience_s` for a live owner). The advisory
    comes once, so the mark does not give up at the first NATS error or lost CAS race: both
    are tried again (paced by `MARK_RETRY`) until `patience_s` has passed, then the error is
    raised and nothing is published."""
    clock = ledger.clock
    give_up = clock.monotonic() + patience_s
    for attempt in itertools.count(1):
        try:
            marked = await ledger.mark_dead_lettered(
                key,
                stream_seq=stream_seq,
                reason=reason,
                error=error,
                patience_s=max(0.0, give_up - clock.monotonic()),
            )
        except _MARK_AGAIN_ON as e:
            pause = MARK_RETRY.pause(attempt, deadline=give_up, now=clock.monotonic())
            if pause is None:
                raise
            if attempt == 1:  # once per event: the outage is logged where it is noticed
                log.warning("marking %s dead-lettered failed (%s); retrying", key, e)
            await clock.sleep(pause)
            continue
        if isinstance(marked, (DeadLettered, Done)):
            return marked
        raise AssertionError("with patience, never Busy")
    raise AssertionError("unreachable")  # itertools.count never ends


async def _retried(ledger: Ledger, publish: Callable[..., Awaitable[None]], *args: Any) -> None:
    """The advisory will not come again: a failed publish is retried (bounded)."""
    for attempt in itertools.count(1):
        try:
            await publish(*args)
            return
        except Exception as e:
            pause = PUBLISH_RETRY.pause(attempt)
            if pause is None:
                raise
            log.warning("publishing an outcome failed (%s); retrying", str(e) or type(e).__name__)
            await ledger.clock.sleep(pause)


async def guarded(delivery: Delivery, work: Awaitable[None]) -> None:
    """Handle one delivery: a lost claim leaves it to whoever holds the event now (it acks);
    any other failure naks it, so JetStream redelivers it after a pause (`max_deliver` bounds
    the attempts)."""
    try:
        await work
    except LostClaim as e:
        log.info("%s", e)
    except Exception:
        log.exception("event on %s failed; will be redelivered", delivery.subject)
        try:
            await delivery.nak(RETRY_DELAY_S)
        except Exception:  # the ack wait redelivers it anyway
            log.debug("nak of %s failed", delivery.subject, exc_info=True)


def _reason(state: DecisionState) -> DlqReason:
    reason = state.dead_letter_reason
    # Written by this module from a DlqReason; anything else is a state from elsewhere.
    return typing.cast(DlqReason, reason) if reason in _REASONS else "policy_error"


def _count(d: Decision) -> None:
    m = telemetry.meters()
    m.decisions.add(1, {"outcome": d.outcome, "event_type": d.event_type, "tenant": d.tenant})
    for v in d.votes:
        verdict = v.verdict.vote if v.verdict else "none"
        m.votes.add(1, {"agent": v.agent, "outcome": v.outcome, "verdict": verdict})
