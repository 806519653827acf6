"""Durable decision state: who works on an event, until when, and what came of it. Every write
to the decision state goes through `Ledger`, by compare-and-set on the key's revision.

One key per event (`<tenant>.<event token>`), so of any number of coordinators exactly one
holds an event at a time:

    (absent) ──create──▶ collecting(owner, lease) ──CAS──▶ decided(decision) | dead_lettered
                          ▲ ▲   │   │ lease expired (owner died)
                          │ └CAS┘   │ another coordinator takes over, same deadline, votes kept
                          │         │ CAS: a voter nobody could ask (no live instance listening)
                          │         ▼
                          └─CAS── waiting(votes, no deadline, waiting_since)
                        re-claimed by any coordinator: a FRESH deadline, the votes kept

    collecting ──CAS──▶ awaiting_human(votes, humans: request ids, roles asked, wall-clock
                         escalation and expiry times; what the decision needs) ──CAS──▶ decided
                         (coordinator.humans: an answer, an escalation, the final silence;
                         no lease: any coordinator moves it on, the CAS picks one)

`decided` and `dead_lettered` exclude each other: each is reached only by a compare-and-set
from a state that is neither (or, for a dead letter, from absent), so whoever writes second
fails its CAS and stands down. A dead-lettered event comes back to `collecting` only when it is
replayed (a new stream sequence).

The storage is a protocol (`Store`: get / create / update-by-revision with JetStream KV's
semantics); `KvStore` is JetStream KV itself, `MemoryStore` the same semantics in memory (the
unit tests drive races on it; an integration test holds the two to the same contract).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec
from nats.errors import ConnectionReconnectingError, NoRespondersError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.policy import Policy
from mesh import subjects
from mesh._internal.retry import RetryPolicy
from mesh.envelope import Event
from mesh.errors import MeshRuntimeError
from mesh.identity import Signer, Trust, require_trust
from mesh.records import Decision, Vote, event_token, trusted_signer

if TYPE_CHECKING:
    from mesh.bus import Bus

log = logging.getLogger(__name__)

State = Literal["collecting", "waiting", "awaiting_human", "decided", "dead_lettered"]

# A lost compare-and-set means someone else's write landed: re-read at once (no pause) and
# look again, a bounded number of times.
CAS_RETRY = RetryPolicy(attempts=5, base_s=0.0, max_s=0.0, jitter=False)
# What a store call raises while NATS is unhealthy (a stream-leader election, a reconnect) and
# a later try may not: who must not give up on an event retries these, bounded.
UNAVAILABLE: tuple[type[Exception], ...] = (
    NatsTimeoutError,
    TimeoutError,
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionReconnectingError,
    StaleConnectionError,
)
# While a live owner holds an event that the dead-letterer wants to settle: how often to look.
_POLL_S = 0.5


class HumanStep(msgspec.Struct, frozen=True):
    """An escalation still to come: `role` may answer too from `at` (wall clock)."""

    role: str
    at: float


class HumanWait(msgspec.Struct, omit_defaults=True):
    """One human voter the decision waits for (all times wall clock, in the ledger)."""

    request_id: str
    roles: list[str]  # who may answer now
    asked_at: float
    expires_at: float  # then its silence counts as the policy says
    next: list[HumanStep] = msgspec.field(default_factory=list)
    round: int = 0


class Pending(msgspec.Struct, omit_defaults=True):
    """What a decision made after people answer needs (the event was acked long ago)."""

    event: Event
    policy: Policy  # the policy it was asked under: a later policy change does not apply
    decision_type: str
    started_at: float  # wall clock: when the event arrived (for the decision's latency)
    trace_id: str = ""
    principal: str = ""


class DecisionState(msgspec.Struct, omit_defaults=True):
    state: State
    owner: str
    lease_until: float  # wall clock; past it, the owner is presumed dead
    deadline_at: float  # wall clock; fixed at the first claim, kept across take-overs
    stream_seq: int  # which delivery of the event this state belongs to (a replay is another)
    votes: dict[str, Vote] = msgspec.field(default_factory=dict)
    decision: Decision | None = None
    dead_letter_reason: str = ""
    dead_letter_error: str = ""  # kept so a redelivery can re-publish the same dead letter
    takeovers: int = 0
    # Wall clock: when the event was first released (`waiting`) for want of a reachable voter;
    # kept across re-claims, so the wait is bounded from then (0: never released).
    waiting_since: float = 0.0
    # `awaiting_human`: the human voters still to answer (voter → its wait), and the event
    humans: dict[str, HumanWait] = msgspec.field(default_factory=dict)
    pending: Pending | None = None
    signer: str = ""  # key id of the coordinator key that wrote this state
    signature: str = ""  # Ed25519 over the state without `signature` (purpose "ledger")


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(DecisionState)


def _payload(state: DecisionState) -> bytes:
    return _enc.encode(msgspec.structs.replace(state, signature=""))


@dataclass(frozen=True)
class Tampered:
    """A stored state nobody trusted wrote (or that does not decode): never acted on."""

    reason: str


def state_key(tenant: str, event_id: str) -> str:
    return subjects.decision_key(tenant, event_token(event_id))


class LostClaim(MeshRuntimeError):
    """Another coordinator (or the dead-letterer) changed the state under us: stop working on
    this event; whoever changed it finishes it."""


class StateConflict(MeshRuntimeError):
    """A compare-and-set found another revision (update), or an existing key (create)."""

    retryable = True


# -- storage ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    value: bytes
    revision: int


class Store(Protocol):
    """Key/value with revisions, exactly as JetStream KV behaves."""

    async def get(self, key: str) -> Entry | None:
        """The current value and its revision; None if the key does not exist."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Write a key that does not exist; StateConflict if it does. Returns the revision."""
        ...

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write if the key's revision is still `last`; StateConflict if not."""
        ...


class KvStore:
    """`Store` over a JetStream KV bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> Entry | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # deleted and purged keys too (subclasses)
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Entry(entry.value, entry.revision)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return int(await self.kv.create(key, value))
        except KeyWrongLastSequenceError:
            raise StateConflict(f"{key}: already exists") from None

    async def update(self, key: str, value: bytes, last: int) -> int:
        try:
            return int(await self.kv.update(key, value, last=last))
        except KeyWrongLastSequenceError:
            raise StateConflict(f"{key}: revision {last} is no longer the latest") from None


class MemoryStore:
    """`Store` in memory with JetStream KV's semantics, for tests and single-process use.

    Revisions are one sequence for the whole store (as a bucket's stream sequence is); an update
    expecting revision 0 succeeds only on a key that does not exist (as nats-py's `create`
    does); every call yields to the event loop first, so concurrent callers interleave the way
    they would over the network.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._revision = 0

    async def get(self, key: str) -> Entry | None:
        await asyncio.sleep(0)
        return self._entries.get(key)

    async def create(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0)
        if key in self._entries:
            raise StateConflict(f"{key}: already exists")
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await asyncio.sleep(0)
        current = self._entries.get(key)
        if (current.revision if current else 0) != last:
            raise StateConflict(f"{key}: revision {last} is no longer the latest")
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self._revision += 1
        self._entries[key] = Entry(value, self._revision)
        return self._revision


# -- what a transition returns ----------------------------------------------------------------
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


@dataclass
class DeadLettered:
    """The event is dead-lettered; `fresh` if this call made it so, False if it already was
    (a redelivery of the same message: re-publish its record, idempotently)."""

    state: DecisionState
    fresh: bool


class Ledger:
    """Every write to the decision state, by compare-and-set.

    With `signer`, each state written is signed (purpose "ledger"). With `trust`, each state read
    is verified before anything is done with it: one that is unsigned, signed by a key the trust
    file does not list for the ledger, or that does not verify (or decode) is `Tampered`. It is
    logged at ERROR and never acted on (its decision is not published, its votes are not kept,
    its lease holds nobody off): the event is claimed afresh over it, by CAS on its revision, and
    decided by real votes. Without either (unit tests, MESH_INSECURE=bus), nothing is signed or
    checked.
    """

    def __init__(
        self,
        store: Store,
        owner: str,
        lease_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
        signer: Signer | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self.signer = signer
        self.trust = trust

    @classmethod
    async def on_bus(
        cls, bus: Bus, owner: str, lease_s: float, *, clock: Clock = SYSTEM_CLOCK
    ) -> Ledger:
        """The ledger in JetStream KV, signed with this process's identity and checked against
        the trust file (both resolved from `bus`; a ConfigError says what is missing)."""
        trust = require_trust(bus.settings, what="the decision ledger")
        signer = trusted_signer(bus.identity, trust, ("ledger",), what="the decision ledger")
        kv = await bus.kv(subjects.DECISIONS_BUCKET)
        return cls(KvStore(kv), owner, lease_s, clock=clock, signer=signer, trust=trust)

    def _seal(self, state: DecisionState) -> DecisionState:
        """`state` as written: signed when this ledger has a signer."""
        if self.signer is None:
            return state
        unsigned = msgspec.structs.replace(state, signer=self.signer.kid, signature="")
        return msgspec.structs.replace(
            unsigned, signature=self.signer.sign("ledger", _payload(unsigned))
        )

    def _load(self, key: str, entry: Entry) -> DecisionState | Tampered:
        """The stored state, if it may be acted on."""
        try:
            state = _dec.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return self._tampered(key, entry, f"not a decision state: {e}")
        if self.trust is not None:
            refusal = self.trust.refusal(state.signer, "ledger", _payload(state), state.signature)
            if refusal is not None:
                return self._tampered(key, entry, refusal)
        return state

    @staticmethod
    def _tampered(key: str, entry: Entry, reason: str) -> Tampered:
        log.error(
            "decision ledger entry %s (revision %s) was not written by a trusted coordinator "
            "(%s): ignored; the event is claimed afresh and decided by its voters",
            key,
            entry.revision,
            reason,
        )
        return Tampered(reason)

    async def read(self, key: str) -> DecisionState | None:
        """The event's state; None if there is none, or none to believe (see `Tampered`)."""
        entry = await self.store.get(key)
        if entry is None:
            return None
        state = self._load(key, entry)
        return None if isinstance(state, Tampered) else state

    async def claim_new(
        self, key: str, *, stream_seq: int, deadline_s: float
    ) -> Claim | Busy | Done:
        """`claim` for an event that is most likely new (its first delivery): the key is written
        without reading it first (one round trip; the store refuses it if the key exists), and
        only if it exists is it read and judged as `claim` does."""
        now = self.clock.time()
        lease, deadline = now + self.lease_s, now + deadline_s
        fresh = self._seal(DecisionState("collecting", self.owner, lease, deadline, stream_seq))
        try:
            return Claim(key, await self.store.create(key, _enc.encode(fresh)), fresh)
        except StateConflict:
            return await self.claim(key, stream_seq=stream_seq, deadline_s=deadline_s)

    async def claim(self, key: str, *, stream_seq: int, deadline_s: float) -> Claim | Busy | Done:
        """Take the event for this coordinator, or say why not. Bounded: CAS_RETRY rounds."""
        for attempt in itertools.count(1):
            entry = await self.store.get(key)
            # After the read: a claimer stalled in it (GC, SIGSTOP) must not start a deadline
            # or judge a lease by the time before the stall (found by tests/sim).
            now = self.clock.time()
            try:
                current = self._load(key, entry) if entry is not None else None
                if entry is None or isinstance(current, Tampered):
                    # Nothing there, or nothing to believe: a first claim (over a tampered
                    # entry by CAS on its revision, so a real owner's write in between wins).
                    fresh = self._seal(
                        DecisionState(
                            "collecting",
                            self.owner,
                            now + self.lease_s,
                            now + deadline_s,
                            stream_seq,
                        )
                    )
                    encoded = _enc.encode(fresh)
                    revision = (
                        await self.store.create(key, encoded)
                        if entry is None
                        else await self.store.update(key, encoded, entry.revision)
                    )
                    return Claim(key, revision, fresh)
                assert current is not None
                if current.state in ("decided", "awaiting_human"):
                    # Waiting for people: the agents' part is over (coordinator.humans).
                    return Done(current)
                if current.state == "dead_lettered" and current.stream_seq == stream_seq:
                    return Done(current)  # the same delivery came back (crash before the ack)
                if current.state == "collecting" and current.lease_until > now:
                    # Held by a live owner (possibly us, on a concurrent redelivery): leave it.
                    return Busy(current.owner, current.lease_until - now)
                if current.state == "waiting":
                    # Released for want of a reachable voter: its deadline was dropped, so this
                    # claim starts a fresh one (a voter who answered is not asked again).
                    again = self._seal(self._reclaimed(current, now, deadline_s, stream_seq))
                    revision = await self.store.update(key, _enc.encode(again), entry.revision)
                    return Claim(key, revision, again)
                # Expired lease (owner died), or a replay of a dead-lettered event: take it over.
                replay = current.state == "dead_lettered"
                taken = self._seal(
                    DecisionState(
                        "collecting",
                        self.owner,
                        now + self.lease_s,
                        now + deadline_s if replay else current.deadline_at,
                        stream_seq,
                        votes={} if replay else current.votes,
                        # A replay is a fresh decision, not a take-over of a dead owner's work.
                        takeovers=0 if replay else current.takeovers + 1,
                    )
                )
                revision = await self.store.update(key, _enc.encode(taken), entry.revision)
                return Claim(key, revision, taken)
            except StateConflict:
                if CAS_RETRY.pause(attempt) is None:
                    raise LostClaim(f"{key}: state kept changing under us") from None
        raise AssertionError("unreachable")  # itertools.count never ends

    async def save(self, claim: Claim, state: DecisionState) -> None:
        """CAS write of the claimed event's state; renews the lease unless the state is final.
        LostClaim if someone else wrote in between."""
        async with claim.lock:
            await self._write(claim, state)

    async def _write(self, claim: Claim, state: DecisionState) -> None:
        """`save`'s write; the caller holds `claim.lock`."""
        if state.state == "collecting":
            state = msgspec.structs.replace(state, lease_until=self.clock.time() + self.lease_s)
        sealed = self._seal(state)
        try:
            claim.revision = await self.store.update(claim.key, _enc.encode(sealed), claim.revision)
        except StateConflict:
            raise LostClaim(f"{claim.key}: taken over by another coordinator") from None
        claim.state = sealed

    async def renew(self, claim: Claim) -> None:
        """Renew the lease of the claimed event, writing its state as it is when the write goes
        out (a vote saved while this waited its turn is kept). LostClaim as `save`."""
        async with claim.lock:
            state = claim.state
            await self._write(claim, state)

    def _reclaimed(
        self, waiting: DecisionState, now: float, deadline_s: float, stream_seq: int
    ) -> DecisionState:
        """A released event claimed again: collecting under a fresh deadline, votes kept."""
        return msgspec.structs.replace(
            waiting,
            state="collecting",
            owner=self.owner,
            lease_until=now + self.lease_s,
            deadline_at=now + deadline_s,
            stream_seq=stream_seq,
            signer="",
            signature="",
        )

    async def release(self, claim: Claim, votes: dict[str, Vote], *, since: float) -> None:
        """Give the claimed event back as `waiting` (CAS on the claim; LostClaim if someone else
        wrote since): `votes` kept, the deadline and the lease dropped, waiting since `since`.
        Whoever claims it next starts a fresh deadline."""
        state = msgspec.structs.replace(
            claim.state,
            state="waiting",
            lease_until=0.0,
            deadline_at=0.0,
            votes=dict(votes),
            waiting_since=since,
        )
        await self.save(claim, state)

    async def change(
        self,
        key: str,
        step: Callable[[DecisionState], DecisionState | None],
    ) -> tuple[DecisionState | None, bool]:
        """One compare-and-set move of an event that waits for people (`awaiting_human`):
        `step` gets the current state and returns the next (None: nothing to do). Any number of
        coordinators may call this for one event at once: each write is a CAS on the revision
        read, a loser reads again and re-applies `step` to what the winner wrote (bounded).
        Returns (the state now, whether this call changed it); (None, False) if there is none
        to believe. A state that is not `awaiting_human` is returned untouched."""
        for attempt in itertools.count(1):
            entry = await self.store.get(key)
            current = self._load(key, entry) if entry is not None else None
            if entry is None or not isinstance(current, DecisionState):
                return None, False
            if current.state != "awaiting_human":
                return current, False
            after = step(current)
            if after is None:
                return current, False
            sealed = self._seal(msgspec.structs.replace(after, signer="", signature=""))
            try:
                await self.store.update(key, _enc.encode(sealed), entry.revision)
            except StateConflict:
                if CAS_RETRY.pause(attempt) is None:
                    raise LostClaim(f"{key}: state kept changing under us") from None
                continue
            return sealed, True
        raise AssertionError("unreachable")  # itertools.count never ends

    async def mark_new_dead_lettered(
        self, key: str, *, stream_seq: int, reason: str, error: str = ""
    ) -> DeadLettered | Busy | Done:
        """`mark_dead_lettered` (unclaimed) for an event that is most likely new (its first
        delivery, say refused at the door): the mark is written without reading the key first
        (one round trip; the store refuses it if the key exists), and only if it exists is it
        read and judged as `mark_dead_lettered` does."""
        marked = self._dead_letter_state(stream_seq, reason, error)
        try:
            await self.store.create(key, _enc.encode(marked))
        except StateConflict:
            return await self.mark_dead_lettered(
                key, stream_seq=stream_seq, reason=reason, error=error
            )
        return DeadLettered(marked, fresh=True)

    async def mark_dead_lettered(
        self,
        key: str,
        *,
        stream_seq: int,
        reason: str,
        error: str = "",
        claim: Claim | None = None,
        patience_s: float | None = None,
    ) -> DeadLettered | Busy | Done:
        """The one transition to `dead_lettered`; a dead letter is published only after it.

        With `claim` (the caller holds the event): one CAS from the claimed revision, LostClaim
        if someone else wrote since. Without: refused (`Done`) if the event is decided; `Busy`
        if a live owner holds it, unless `patience_s` is given, then wait that long (bounded)
        for its outcome and take it over if there is none, so an owner that comes back late
        fails its own CAS and never publishes: decided or dead-lettered, never both. A state
        nobody trusted wrote (`Tampered`) counts as none.
        """
        if claim is not None:
            marked = self._dead_letter_state(stream_seq, reason, error)
            async with claim.lock:
                try:
                    claim.revision = await self.store.update(
                        claim.key, _enc.encode(marked), claim.revision
                    )
                except StateConflict:
                    raise LostClaim(
                        f"{claim.key}: taken over before it was dead-lettered"
                    ) from None
                claim.state = marked
            return DeadLettered(marked, fresh=True)
        give_up_waiting = (
            self.clock.monotonic() + patience_s if patience_s is not None else float("-inf")
        )
        attempt = 0
        while True:
            entry = await self.store.get(key)
            current = self._load(key, entry) if entry is not None else None
            if isinstance(current, DecisionState):
                if current.state in ("decided", "awaiting_human"):
                    return Done(current)
                if current.state == "dead_lettered" and current.stream_seq == stream_seq:
                    return DeadLettered(current, fresh=False)
                now = self.clock.time()
                if current.state == "collecting" and current.lease_until > now:
                    if self.clock.monotonic() >= give_up_waiting:
                        if patience_s is None:
                            return Busy(current.owner, current.lease_until - now)
                    else:
                        await self.clock.sleep(min(_POLL_S, current.lease_until - now + 0.05))
                        continue
            marked = self._dead_letter_state(stream_seq, reason, error)
            try:
                if entry is None:
                    await self.store.create(key, _enc.encode(marked))
                else:
                    await self.store.update(key, _enc.encode(marked), entry.revision)
            except StateConflict:  # it changed under us (maybe decided): look again
                attempt += 1
                if CAS_RETRY.pause(attempt) is None:
                    raise LostClaim(f"{key}: state kept changing under us") from None
                continue
            return DeadLettered(marked, fresh=True)

    def _dead_letter_state(self, stream_seq: int, reason: str, error: str) -> DecisionState:
        now = self.clock.time()
        return self._seal(
            DecisionState(
                "dead_lettered",
                self.owner,
                now,
                now,
                stream_seq,
                dead_letter_reason=reason,
                dead_letter_error=error,
            )
        )
