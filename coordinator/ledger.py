"""Durable decision state in JetStream KV: who works on an event, until when, and what came of it.

One key per event (`<tenant>.<event id>`), updated only by compare-and-set on the revision, so
of any number of coordinators exactly one holds an event at a time:

    (absent) ──create──▶ collecting(owner, lease) ──CAS──▶ decided(decision) | dead_lettered
                              ▲       │ lease expired (owner died)
                              └─CAS───┘ another coordinator takes over, same deadline, votes kept

The lease is renewed while the owner works; a coordinator that finds a live lease held by
someone else leaves the event alone (it will come back if that owner dies).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh.records import Decision, Vote

State = Literal["collecting", "decided", "dead_lettered"]
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class DecisionState(msgspec.Struct, omit_defaults=True):
    state: State
    owner: str
    lease_until: float  # wall clock; past it, the owner is presumed dead
    deadline_at: float  # wall clock; fixed at the first claim, kept across take-overs
    stream_seq: int  # which delivery of the event this state belongs to (a replay is another)
    votes: dict[str, Vote] = msgspec.field(default_factory=dict)
    decision: Decision | None = None
    dead_letter_reason: str = ""
    takeovers: int = 0


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(DecisionState)


def event_token(event_id: str) -> str:
    """A subject/KV-safe token for an event id (other ids are hashed, never truncated)."""
    return event_id if _KEY_OK.match(event_id) else hashlib.sha256(event_id.encode()).hexdigest()


def state_key(tenant: str, event_id: str) -> str:
    return f"{tenant}.{event_token(event_id)}"


class LostClaim(Exception):
    """Another coordinator changed the state under us: stop working on this event."""


@dataclass
class Claim:
    key: str
    revision: int
    state: DecisionState
    # Votes and lease renewals are written by concurrent tasks of the one owner; CAS between
    # them would fail spuriously, so they take turns.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Busy:
    """Another live coordinator holds the event; look again after `retry_in_s`."""

    owner: str
    retry_in_s: float


@dataclass
class Done:
    """The event already has an outcome (for this delivery)."""

    state: DecisionState


class Ledger:
    def __init__(self, kv: KeyValue, owner: str, lease_s: float) -> None:
        self.kv = kv
        self.owner = owner
        self.lease_s = lease_s

    async def claim(self, key: str, *, stream_seq: int, deadline_s: float) -> Claim | Busy | Done:
        """Take the event for this coordinator, or say why not. Bounded: a few CAS rounds."""
        for _ in range(5):
            now = time.time()
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                fresh = DecisionState(
                    "collecting", self.owner, now + self.lease_s, now + deadline_s, stream_seq
                )
                try:
                    rev = await self.kv.create(key, _enc.encode(fresh))
                except KeyWrongLastSequenceError:
                    continue  # someone created it first: look again
                return Claim(key, rev, fresh)
            assert entry.value is not None and entry.revision is not None
            current = _dec.decode(entry.value)
            if current.state == "decided":
                return Done(current)
            if current.state == "dead_lettered" and current.stream_seq == stream_seq:
                return Done(current)  # the same delivery came back (crash before the ack)
            if current.state == "collecting" and current.lease_until > now:
                # Held by a live owner (possibly us, on a concurrent redelivery): leave it.
                return Busy(current.owner, current.lease_until - now)
            # Expired lease (owner died), or a replay of a dead-lettered event: take it over.
            replay = current.state == "dead_lettered"
            taken = DecisionState(
                "collecting",
                self.owner,
                now + self.lease_s,
                now + deadline_s if replay else current.deadline_at,
                stream_seq,
                votes={} if replay else current.votes,
                # A replay is a fresh decision, not a take-over of a dead owner's work.
                takeovers=0 if replay else current.takeovers + 1,
            )
            try:
                rev = await self.kv.update(key, _enc.encode(taken), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return Claim(key, rev, taken)
        raise LostClaim(f"{key}: state kept changing under us")

    async def save(self, claim: Claim, state: DecisionState) -> None:
        """CAS write; renews the lease unless the state is final."""
        async with claim.lock:
            if state.state == "collecting":
                state.lease_until = time.time() + self.lease_s
            try:
                claim.revision = await self.kv.update(
                    claim.key, _enc.encode(state), last=claim.revision
                )
            except KeyWrongLastSequenceError:
                raise LostClaim(f"{claim.key}: taken over by another coordinator") from None
            claim.state = state

    async def mark_dead_lettered(self, key: str, *, stream_seq: int, reason: str) -> None:
        """Record a dead letter for an event nobody decided (no claim needed: last write wins
        only over states that are not `decided`)."""
        for _ in range(5):
            now = time.time()
            state = DecisionState(
                "dead_lettered", self.owner, now, now, stream_seq, dead_letter_reason=reason
            )
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, _enc.encode(state))
                    return
                except KeyWrongLastSequenceError:
                    continue
            assert entry.value is not None
            if _dec.decode(entry.value).state == "decided":
                return  # a decision stands; the dead letter is only a record
            try:
                await self.kv.update(key, _enc.encode(state), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue


async def settle_for_dead_letter(
    kv: KeyValue, key: str, *, stream_seq: int, reason: str, wait_s: float = 60.0
) -> bool:
    """JetStream gave up delivering an event to the coordinator: may it be dead-lettered?

    Not if it was decided after all (a "busy" redelivery can use up the last delivery while
    another coordinator finishes it). While a live owner still holds it, wait (bounded) for
    its outcome. Otherwise mark it dead-lettered by compare-and-set, so an owner that comes
    back late fails its own CAS and never publishes: decided or dead-lettered, never both.
    """
    give_up_waiting = time.monotonic() + wait_s
    while True:
        now = time.time()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            entry = None
        current = _dec.decode(entry.value) if entry is not None and entry.value else None
        if current is not None and current.state == "decided":
            return False
        if (
            current is not None
            and current.state == "collecting"
            and current.lease_until > now
            and time.monotonic() < give_up_waiting
        ):
            await asyncio.sleep(min(0.5, current.lease_until - now + 0.05))
            continue
        marked = DecisionState(
            "dead_lettered", "dlq", now, now, stream_seq, dead_letter_reason=reason
        )
        try:
            if entry is None:
                await kv.create(key, _enc.encode(marked))
            else:
                await kv.update(key, _enc.encode(marked), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue  # it changed under us (maybe decided): look again
        return True
