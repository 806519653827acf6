"""Reading what the mesh decided, and publishing paced load.

`Outcomes` reads every message of MESH_DECISIONS and MESH_DLQ by stream sequence (`get_msg`)
and records each exactly once, keyed by (stream, sequence): a pass that times out, fails or is
cancelled part-way resumes where it stopped, and a sequence the server answers "not found" for
(a leader in transition, or a real gap) is asked again on later passes instead of being
skipped. While `watching()`, a core-NATS subscription to the decision and dead-letter subjects
wakes the reader as soon as something is stored (a poll every `every` seconds covers a missed
notification, e.g. across a failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from nats.js.errors import KeyNotFoundError, NotFoundError

from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.records import DeadLetter, Decision, dead_letter_decoder, decision_decoder
from tests.support.waits import eventually

STREAMS = (subjects.DECISIONS_STREAM, subjects.DLQ_STREAM)
PASS_TIMEOUT_S = 30.0  # one pass of the reader (a failover can stall a request this long)


@dataclass
class Tally:
    """Event ids by what became of them (see `Outcomes.tally`)."""

    lost: list[str]  # neither decided nor dead-lettered
    doubled: list[str]  # decided more than once
    dead_only: list[str]  # dead-lettered, never decided
    both: list[str]  # decided and dead-lettered
    wrong: list[str]  # "<id>: <outcome> (<reason>)" where the outcome is not the expected one


class _StreamReader(Protocol):
    """What `Outcomes` needs of a JetStream context (`Bus.js`)."""

    async def stream_info(self, name: str) -> Any: ...

    async def get_msg(self, stream_name: str, seq: int) -> Any: ...


class Outcomes:
    """Every decision and dead letter, each with the monotonic time this reader first saw it."""

    def __init__(self, bus: Bus, *, pass_timeout: float = PASS_TIMEOUT_S) -> None:
        self.bus = bus
        self.pass_timeout = pass_timeout
        self.decisions: list[tuple[float, Decision]] = []
        self.dead: list[tuple[float, DeadLetter]] = []
        self.dead_by_seq: dict[int, DeadLetter] = {}  # by MESH_DLQ sequence
        self.errors: Counter[str] = Counter()  # passes that failed, by exception type
        self.complete = False  # the last pass read every stream to its end without error
        self.gaps: dict[str, set[int]] = {s: set() for s in STREAMS}  # "not found" so far
        self._seen: dict[str, set[int]] = {s: set() for s in STREAMS}
        self._next: dict[str, int] = dict.fromkeys(STREAMS, 1)
        self._lock = asyncio.Lock()
        self._arrived = asyncio.Event()

    @property
    def js(self) -> _StreamReader:
        return self.bus.js

    # -- reading ----------------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """One pass over both streams (bounded by `pass_timeout`). A pass that fails does not
        raise: it is counted in `errors` and the next one resumes. Returns `complete`."""
        async with self._lock:  # the background watcher and a waiter may both refresh
            try:
                await asyncio.wait_for(self._pass(), self.pass_timeout)
            except Exception as e:
                self.errors[type(e).__name__] += 1
                self.complete = False
            else:
                self.complete = True
        return self.complete

    async def _pass(self) -> None:
        for stream in STREAMS:
            try:
                info = await self.js.stream_info(stream)
            except NotFoundError:
                continue
            first = info.state.first_seq or 1
            self.gaps[stream] = {s for s in self.gaps[stream] if s >= first}
            for seq in sorted(self.gaps[stream]):
                await self._read(stream, seq)
            self._next[stream] = max(self._next[stream], first)
            while self._next[stream] <= info.state.last_seq:
                await self._read(stream, self._next[stream])
                self._next[stream] += 1  # only once that sequence is recorded or a known gap

    async def _read(self, stream: str, seq: int) -> None:
        if seq in self._seen[stream]:
            return
        try:
            raw = await self.js.get_msg(stream, seq)
        except NotFoundError:
            self.gaps[stream].add(seq)
            return
        self._record(stream, seq, raw.data or b"")

    def _record(self, stream: str, seq: int, data: bytes) -> None:
        if seq in self._seen[stream]:  # a sequence is recorded once, however often it is read
            return
        now = time.monotonic()
        if stream == subjects.DECISIONS_STREAM:
            self.decisions.append((now, decision_decoder.decode(data)))
        else:
            record = dead_letter_decoder.decode(data)
            self.dead.append((now, record))
            self.dead_by_seq[seq] = record
        self._seen[stream].add(seq)
        self.gaps[stream].discard(seq)

    # -- what was read ----------------------------------------------------------------------------
    def decided_ids(self) -> Counter[str]:
        return Counter(d.event_id for _, d in self.decisions)

    def dead_ids(self) -> Counter[str]:
        return Counter(d.event_id for _, d in self.dead if d.event_id)

    def decision(self, event_id: str) -> Decision | None:
        return next((d for _, d in self.decisions if d.event_id == event_id), None)

    def dead_letters(self, event_id: str) -> list[DeadLetter]:
        return [d for _, d in self.dead if d.event_id == event_id]

    def missing(self, ids: Iterable[str]) -> set[str]:
        have = set(self.decided_ids()) | set(self.dead_ids())
        return set(ids) - have

    def tally(self, expected: Mapping[str, str] | Iterable[str]) -> Tally:
        """What happened to these events (ids, or ids → the outcome each should get)."""
        want = dict(expected) if isinstance(expected, Mapping) else dict.fromkeys(expected, "")
        decided, dead = self.decided_ids(), self.dead_ids()
        return Tally(
            lost=sorted(i for i in want if not decided[i] and not dead[i]),
            doubled=sorted(i for i in want if decided[i] > 1),
            dead_only=sorted(i for i in want if dead[i] and not decided[i]),
            both=sorted(i for i in want if decided[i] and dead[i]),
            wrong=sorted(
                f"{i}: {d.outcome} ({d.reason})"
                for i, outcome in want.items()
                if outcome and (d := self.decision(i)) is not None and d.outcome != outcome
            ),
        )

    def first_arrival(self) -> dict[str, float]:
        """Event id → when this reader first saw an outcome for it."""
        first: dict[str, float] = {}
        for t, d in self.decisions:
            first[d.event_id] = min(t, first.get(d.event_id, t))
        for t, dl in self.dead:
            if dl.event_id:
                first[dl.event_id] = min(t, first.get(dl.event_id, t))
        return first

    def max_stall(self, ids: Iterable[str], started: float) -> float:
        """The longest stretch with no outcome: from `started` to the first outcome, then
        between consecutive outcomes; while some event still has none, up to now."""
        ids = set(ids)
        points = [started, *sorted(t for i, t in self.first_arrival().items() if i in ids)]
        if self.missing(ids):
            points.append(time.monotonic())
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    # -- waiting ----------------------------------------------------------------------------------
    async def wait_all(
        self, ids: Iterable[str], *, timeout: float, alive: Callable[[], None] | None = None
    ) -> set[str]:
        """Until every id has a decision or a dead letter; returns the ids still missing."""
        ids = set(ids)

        async def all_in() -> bool:
            await self.refresh()
            return not self.missing(ids)

        with contextlib.suppress(AssertionError):  # the bound: report what is missing instead
            await eventually(all_in, timeout=timeout, every=0.25, alive=alive, wake=self._arrived)
        return self.missing(ids)

    async def wait_for(
        self, what: str, found: Callable[[Outcomes], Any], *, timeout: float = 30.0
    ) -> Any:
        """Until `found(self)` returns something truthy after a refresh (returned); bounded."""

        async def check() -> Any:
            await self.refresh()
            return found(self)

        return await eventually(check, what, timeout=timeout, every=0.25, wake=self._arrived)

    @contextlib.asynccontextmanager
    async def watching(self, every: float = 0.25) -> AsyncIterator[Outcomes]:
        """Read in the background while the block runs (woken by the subscription), so arrival
        times are close to when each outcome was stored."""
        notified = asyncio.Event()

        async def on_stored(_msg: Any) -> None:
            notified.set()

        subs = [
            await self.bus.nc.subscribe(f"{root}.>", cb=on_stored)
            for root in (subjects.DECISIONS_ROOT, subjects.DLQ_ROOT)
        ]

        # Stopped by a flag, not by cancel alone: on Python 3.11 an `asyncio.wait_for` deep in
        # nats-py's request can swallow a cancel whose reply already arrived, and a loop that
        # never sees it would keep the test waiting for ever.
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                await self.refresh()
                self._arrived.set()  # a waiter looks again at what this pass read
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notified.wait(), every)
                notified.clear()

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            stop.set()
            notified.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
            except TimeoutError:
                task.cancel()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


async def read_all(bus: Bus, timeout: float = 60.0) -> Outcomes:
    """Every decision and dead letter, read once more from the start: bounded, and complete
    (every stream read to its end) or an AssertionError saying what got in the way."""
    final = Outcomes(bus)
    try:
        await eventually(final.refresh, timeout=timeout, every=0.5)
    except AssertionError:
        raise AssertionError(
            f"could not read MESH_DECISIONS and MESH_DLQ to the end within {timeout:.0f}s "
            f"(errors: {dict(final.errors)}; read {len(final.decisions)} decisions, "
            f"{len(final.dead)} dead letters)"
        ) from None
    return final


async def settled(bus: Bus, timeout: float = 60.0) -> str:
    """Until the coordinators' durable has nothing pending and nothing unacknowledged, so no
    redelivery can still add an outcome (a failed request is asked again). "" once settled,
    else what is still open."""
    last = ""

    async def quiet() -> bool:
        nonlocal last
        try:
            info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
        except Exception as e:
            last = f"no answer ({type(e).__name__})"
            return False
        last = f"{info.num_pending} pending and {info.num_ack_pending} unacknowledged events"
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    try:
        await eventually(quiet, timeout=timeout, every=0.2)
    except AssertionError:
        return f"after {timeout:.0f}s the coordinator durable still has {last}"
    return ""


async def kv_state(bus: Bus, tenant: str, event_id: str) -> dict[str, Any] | None:
    """The decision ledger's entry for an event (None if it has none)."""
    from coordinator.ledger import state_key

    kv = await bus.kv(subjects.DECISIONS_BUCKET)
    try:
        entry = await kv.get(state_key(tenant, event_id))
    except KeyNotFoundError:
        return None
    doc: dict[str, Any] = msgspec.json.decode(entry.value or b"{}")
    return doc


async def ledger_mismatches(bus: Bus, outcomes: Outcomes, ids: Iterable[str]) -> list[str]:
    """Events whose durable state (KV ledger) disagrees with what was published: a decided
    event must hold exactly the decision on its subject (same coordinator, same moment)."""
    bad = []
    for event_id in ids:
        published = outcomes.decision(event_id)
        if published is None:
            continue
        state = await kv_state(bus, published.tenant, event_id) or {}
        stored = state.get("decision") or {}
        if state.get("state") != "decided" or (
            stored.get("coordinator"),
            stored.get("decided_at"),
            stored.get("outcome"),
        ) != (published.coordinator, published.decided_at, published.outcome):
            bad.append(f"{event_id}: ledger {state.get('state')} {stored.get('outcome')}")
    return bad


@dataclass
class Publisher:
    """Publishes at a steady pace (`per_s` events a second); a publish that fails is retried
    with the same event id (the stream's duplicate window makes a retry of a stored event a
    no-op). An event still not acknowledged after `budget_s` counts as not published."""

    bus: Bus
    events: list[envelope.Event]
    per_s: float
    budget_s: float = 60.0
    first_try: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    not_published: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0  # retries the server recognised as already stored
    retried: int = 0  # events that needed more than one attempt
    errors: Counter[str] = field(default_factory=Counter)
    finished_at: float = 0.0

    async def run(self) -> None:
        start = time.monotonic()
        try:
            for i, event in enumerate(self.events):
                pause = start + i / self.per_s - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                await self._one(event)
        finally:
            self.finished_at = time.monotonic()

    async def _one(self, event: envelope.Event) -> None:
        now = time.monotonic()
        self.first_try[event.id] = now
        give_up = now + self.budget_s
        for attempt in itertools.count(1):
            try:
                ack = await self.bus.publish_event(event)
            except Exception as e:  # timeout, no responders, reconnecting, leader change...
                self.errors[type(e).__name__] += 1
                if time.monotonic() >= give_up:
                    self.not_published[event.id] = f"{type(e).__name__}: {e}"
                    return
                await asyncio.sleep(0.25)
                continue
            self.acked[event.id] = time.monotonic()
            self.retried += attempt > 1
            self.duplicates += bool(ack.duplicate)
            return

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.Task[None]]:
        """Publish in the background while the block runs; cancelled if the block fails."""
        task = asyncio.create_task(self.run())
        try:
            yield task
            await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
