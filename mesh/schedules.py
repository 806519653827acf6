"""Schedules: events the mesh puts on the bus by itself, on a clock, durably (issue 18).

NATS does the clock (message scheduling, ADR-51, nats-server >= 2.12; `@every` and 6-field cron
with time zones since 2.14). A schedule is one message, its *definition*, on
`mesh.sched.def.<tenant>.<name>` in the MESH_SCHEDULES stream, carrying `Nats-Schedule`
(`@every 1m`, `0 0 6 * * mon-fri`, `@at 2026-12-01T09:00:00Z`) and `Nats-Schedule-Target`
(`mesh.sched.fire.<tenant>.<name>`). The server stores a copy of the definition's body on the
target at each due time. Because the server fires, not the processes that declared the schedule,
several replicas declaring one schedule make one definition (one per subject: the last message
on it is the schedule) and fire it once per period, and a server restart loses nothing: the
definition and every unrelayed firing are in the stream.

A firing is not yet an event. The server copies the definition's bytes unchanged, so firing 2
would carry firing 1's event id and the coordinator's ledger, which decides an event id once
ever, would take it for a repeat. And the target must be in the schedule's own stream, so a
firing cannot land on `mesh.evt.…` (MESH_EVENTS) directly. So a *relay* (`Relay`; `mesh
schedules run`, or in any agent process) consumes the firings through one durable shared by
every relay and publishes each as an ordinary domain event:

- its id is derived from the firing: `uuid5(tenant/name/<firing's stream sequence>/<its stored
  time, whole seconds>)` for a recurring schedule (distinct per firing, the same on every
  redelivery of that firing), or the id the declarer gave for a one-shot (`follow_up`:
  idempotent by id);
- it is signed by the relay's own identity, like any event it publishes (`Bus.publish`): the
  event's content changed (its id, its time), so no signature made at declaration could cover
  it, and a signature over the fixed definition would, copied by the server, be valid for every
  replay of any firing. The relay vouches for the firing; who may declare is the server's
  permissions (operator and agents: `mesh.natsauth`), and the event's `source` names the
  schedule (`mesh://schedule/<tenant>/<name>`).

Its message id is the event's (tenant and id, tagged with the relay's key), so a relay that
dies between publishing and acking adds nothing; past the duplicate window the ledger still
decides an id once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from mesh import envelope, subjects
from mesh._internal.consume import JetStreamFetch, PullLoop
from mesh.errors import ConfigError, StreamConflictError

if TYPE_CHECKING:
    from mesh.bus import Bus

log = logging.getLogger(__name__)

# Firings carry a per-message TTL (`Nats-Schedule-TTL`): one a relay never took is dropped after
# this long, as MESH_EVENTS drops events (7 days). Definitions have none: a schedule lasts until
# it is removed, so the stream itself never ages messages out (max_age 0).
FIRING_TTL = "168h"
# Ids of firings: uuid5 in this namespace, from what the server stored (see the docstring).
FIRING_NAMESPACE = uuid.UUID("0b5c4f4e-7d0a-4f0c-9a53-5d1c2b9e7a31")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")  # Go's time.ParseDuration
_JS_SCHEDULE_PATTERN_INVALID = 10189
_JS_SCHEDULE_TARGET_INVALID = 10190
RELAY_ACK_WAIT_S = 10.0
RELAY_MAX_DELIVER = 50  # bounded; a firing that never publishes is dropped with an error log
_CAS_TRIES = 5


class Schedule(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One schedule: what to publish (`event_type`, `data`, `tenant`) and when (exactly one of
    `every` (a Go duration: `30s`, `1h30m`), `cron` (6 fields, seconds first, or `@hourly`,
    `@daily`…; `time_zone` an IANA name, default UTC) or `at` (one shot; `event_id` its
    event's id))."""

    name: str
    event_type: str
    tenant: str = "default"
    data: Any = None
    every: str = ""
    cron: str = ""
    at: datetime | None = None
    time_zone: str = ""
    event_id: str = ""  # one-shot only: the id of the event it publishes (idempotent by id)

    def __post_init__(self) -> None:
        problems = []
        if not subjects.valid_token(self.name):
            problems.append(f"name {self.name!r} may hold only letters, digits, '-' and '_'")
        if not subjects.valid_token(self.tenant):
            problems.append(f"tenant {self.tenant!r} may hold only letters, digits, '-' and '_'")
        if not subjects.valid_event_type(self.event_type):
            problems.append(f"event type {self.event_type!r} is not a dotted name")
        given = [k for k in ("every", "cron", "at") if getattr(self, k)]
        if len(given) != 1:
            problems.append(f"give exactly one of every, cron, at (got {given or 'none'})")
        if self.every and not _DURATION.match(self.every):
            problems.append(f"every {self.every!r} is not a duration like 30s, 5m, 1h30m")
        if self.time_zone and not self.cron:
            problems.append("time_zone goes with cron only")
        if self.event_id and self.at is None:
            problems.append("event_id is for one-shot (at) schedules; recurring ones derive theirs")
        if self.at is not None and self.at.tzinfo is None:
            problems.append("at must carry a time zone (e.g. 2026-12-01T09:00:00Z)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def spec(self) -> str:
        """The `Nats-Schedule` header."""
        if self.every:
            return f"@every {self.every}"
        if self.at is not None:
            return f"@at {self.at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        return self.cron

    def headers(self) -> dict[str, str]:
        h = {
            subjects.H_SCHEDULE: self.spec,
            subjects.H_SCHEDULE_TARGET: subjects.schedule_fire(self.tenant, self.name),
            "Nats-Schedule-TTL": FIRING_TTL,
        }
        if self.time_zone:
            h[subjects.H_SCHEDULE_TIME_ZONE] = self.time_zone
        return h


# Sorted keys: replicas that build the same data in another key order write the same bytes, so
# their declarations are the same definition (and the schedule's clock is not reset).
_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Schedule)


def encode(schedule: Schedule) -> bytes:
    return _encoder.encode(schedule)


def decode(body: bytes) -> Schedule:
    """A definition's body; raises ValueError (with msgspec's reason) on anything else."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, ValueError) as e:
        raise ValueError(f"not a schedule definition: {e}") from None


def schedule(
    name: str,
    event_type: str,
    data: Any = None,
    *,
    tenant: str = "default",
    every: str | timedelta = "",
    cron: str = "",
    time_zone: str = "",
) -> Schedule:
    """A recurring schedule (`every` or `cron`), checked; `declare` puts it on the bus."""
    if isinstance(every, timedelta):
        every = f"{int(every.total_seconds())}s"
    return _checked(
        f"schedule {name!r}",
        name=name,
        event_type=event_type,
        tenant=tenant,
        data=data,
        every=every,
        cron=cron,
        time_zone=time_zone,
    )


def one_shot(
    event_id: str,
    event_type: str,
    data: Any = None,
    *,
    at: datetime | timedelta,
    tenant: str = "default",
    now: datetime | None = None,
) -> Schedule:
    """A follow-up event `event_id` at `at` (a time, or a delay from now). Its schedule's name
    comes from the id, so declaring it again (a replica, a retry) replaces it, and the event it
    publishes has that id, so the mesh decides it once however often it is declared."""
    if not event_id:
        raise ConfigError("a follow-up needs its event id (the id makes it idempotent)")
    when = (now or datetime.now(UTC)) + at if isinstance(at, timedelta) else at
    name = "at-" + uuid.uuid5(FIRING_NAMESPACE, f"{tenant}/{event_id}").hex
    return _checked(
        f"follow-up {event_id!r}",
        name=name,
        event_type=event_type,
        tenant=tenant,
        data=data,
        at=when,
        event_id=event_id,
    )


def _checked(what: str, **fields: Any) -> Schedule:
    """A `Schedule` from `fields`, or one `ConfigError` line naming `what` was wrong."""
    try:
        return Schedule(**fields)
    except ValueError as e:
        raise ConfigError(f"bad {what}: {e}") from None


def firing_event(sched: Schedule, *, seq: int, stored: datetime) -> envelope.Event:
    """The domain event one firing becomes: the same for every redelivery of that firing (its
    stream sequence and stored time), a different one for every firing."""
    event_id = sched.event_id or str(
        uuid.uuid5(
            FIRING_NAMESPACE,
            # Whole seconds: the stream sequence alone would repeat if the stream were ever
            # made anew (and the ledger remembers ids); both together never do.
            f"{sched.tenant}/{sched.name}/{seq}/{int(stored.timestamp())}",
        )
    )
    return envelope.Event(
        specversion="1.0",
        id=event_id,
        source=f"mesh://schedule/{sched.tenant}/{sched.name}",
        type=sched.event_type,
        time=stored,
        data=sched.data,
        tenant=sched.tenant,
    )


# -- the stream -----------------------------------------------------------------------------------
def stream_config(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=subjects.SCHEDULES_STREAM,
        description="schedule definitions (mesh.sched.def) and the server's firings of them",
        subjects=[f"{subjects.SCHEDULE_ROOT}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=0,  # a definition lasts until removed; firings expire by their own TTL
        duplicate_window=120.0,
        num_replicas=replicas,
        allow_msg_schedules=True,
        allow_msg_ttl=True,
    )


async def ensure_stream(bus: Bus) -> None:
    """MESH_SCHEDULES, created by the operator (from `Bus.ensure`). One that exists without
    message schedules is an error that says what to do: schedules can only be switched on for
    an empty stream (ADR-51)."""
    try:
        info = await bus.js.stream_info(subjects.SCHEDULES_STREAM)
    except NotFoundError:
        await bus.js.add_stream(stream_config(bus.settings.stream_replicas))
        log.debug("created stream %s", subjects.SCHEDULES_STREAM)
        return
    cfg = info.config
    if not cfg.allow_msg_schedules or cfg.subjects != [f"{subjects.SCHEDULE_ROOT}.>"]:
        raise StreamConflictError(
            f"stream {subjects.SCHEDULES_STREAM} exists without message schedules or with "
            f"other subjects ({cfg.subjects})",
            hint=f"remove it (nats stream rm {subjects.SCHEDULES_STREAM}) and run `mesh ensure`",
        )


# -- declaring ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Declared:
    schedule: Schedule
    seq: int  # its definition's stream sequence


async def _last(bus: Bus, subject: str) -> tuple[int, bytes, dict[str, str]] | None:
    try:
        msg = await bus.js.get_last_msg(subjects.SCHEDULES_STREAM, subject)
    except NotFoundError:
        return None
    return (
        int(msg.seq or 0),
        msg.data or b"",
        {str(k): str(v) for k, v in (msg.headers or {}).items()},
    )


async def _put(bus: Bus, subject: str, body: bytes, headers: dict[str, str], last: int) -> int:
    """Publish `body` on `subject` if its last sequence is still `last`; 0: someone else wrote."""
    try:
        ack = await bus.js.publish(
            subject,
            body,
            timeout=5.0,
            headers={**headers, subjects.H_EXPECTED_LAST_SUBJECT_SEQ: str(last)},
        )
    except BadRequestError as e:
        if e.err_code in subjects.JS_WRONG_LAST_SEQUENCE:
            return 0
        if e.err_code in (_JS_SCHEDULE_PATTERN_INVALID, _JS_SCHEDULE_TARGET_INVALID):
            raise ConfigError(
                f"the server refused the schedule: {e.description}",
                hint="cron takes 6 fields, seconds first (`0 30 6 * * *`), or @hourly, "
                "@daily…; every takes a duration like 30s or 1h30m",
            ) from None
        raise
    except NatsTimeoutError:
        denied = bus.refused(subject)
        if denied is not None:
            raise denied from None
        raise
    return int(ack.seq)


async def declare(bus: Bus, sched: Schedule) -> Declared:
    """Put `sched` on the bus, idempotently: the definition already there is kept when it says
    the same (replicas that declare one schedule at start leave one definition, and its clock
    is not reset), replaced otherwise. Concurrent declarations are serialized by the subject's
    last sequence (compare-and-set), so one wins and the rest see it."""
    subject = subjects.schedule_def(sched.tenant, sched.name)
    body, headers = encode(sched), sched.headers()
    for _ in range(_CAS_TRIES):
        current = await _last(bus, subject)
        if current is not None and current[1] == body and _same(current[2], headers):
            return Declared(sched, current[0])
        seq = await _put(bus, subject, body, headers, current[0] if current else 0)
        if seq:
            log.info("schedule %s/%s declared: %s", sched.tenant, sched.name, sched.spec)
            return Declared(sched, seq)
    raise ConfigError(f"schedule {sched.tenant}/{sched.name} kept changing while declared")


def _same(have: dict[str, str], want: dict[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items()) and (
        subjects.H_SCHEDULE_TIME_ZONE in want or subjects.H_SCHEDULE_TIME_ZONE not in have
    )


async def remove(bus: Bus, tenant: str, name: str) -> bool:
    """Stop a schedule: an empty message without `Nats-Schedule` becomes the last one on its
    subject, which the server takes as "no schedule" (checked against the real server in
    tests). False when there was none."""
    subject = subjects.schedule_def(tenant, name)
    for _ in range(_CAS_TRIES):
        current = await _last(bus, subject)
        if current is None or subjects.H_SCHEDULE not in current[2]:
            return False
        if await _put(bus, subject, b"", {}, current[0]):
            log.info("schedule %s/%s removed", tenant, name)
            return True
    raise ConfigError(f"schedule {tenant}/{name} kept changing while removed")


async def follow_up(
    bus: Bus,
    event_id: str,
    event_type: str,
    data: Any = None,
    *,
    at: datetime | timedelta,
    tenant: str = "default",
) -> Declared:
    """Schedule the follow-up event `event_id` (`one_shot`) — what an agent calls to check back
    on something later. Idempotent by id."""
    return await declare(bus, one_shot(event_id, event_type, data, at=at, tenant=tenant))


async def listing(bus: Bus, tenant: str | None = None) -> list[Declared]:
    """The schedules in effect (removed and already fired one-shots are not), by tenant, name."""
    from mesh.bus import read_stream

    filt = (
        f"{subjects.SCHEDULE_DEF_ROOT}.{tenant}.*" if tenant else f"{subjects.SCHEDULE_DEF_ROOT}.>"
    )
    last: dict[str, Declared | None] = {}
    for m in await read_stream(bus, subjects.SCHEDULES_STREAM, filter_subject=filt):
        if subjects.H_SCHEDULE not in m.headers:
            last[m.subject] = None  # removed
            continue
        try:
            last[m.subject] = Declared(decode(m.data), m.seq)
        except ValueError:
            log.warning("ignoring a definition on %s that is not a schedule", m.subject)
    found = [d for d in last.values() if d is not None]
    return sorted(found, key=lambda d: (d.schedule.tenant, d.schedule.name))


async def pending_firings(bus: Bus) -> int | None:
    """Firings no relay has published yet (None: no relay ever ran)."""
    try:
        info = await bus.js.consumer_info(
            subjects.SCHEDULES_STREAM, subjects.SCHEDULE_RELAY_DURABLE
        )
    except NotFoundError:
        return None
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


# -- relaying firings into events -----------------------------------------------------------------
class Relay:
    """Turns firings into domain events (see the module docstring). Any number may run: they
    share one durable, so each firing is published by one of them (and at worst re-published
    with the same id after a crash, which the stream's duplicate window and the ledger absorb)."""

    def __init__(self, bus: Bus, *, concurrency: int = 8) -> None:
        self.bus = bus
        self.concurrency = concurrency
        self.relayed = 0

    async def run(self, stop: asyncio.Event) -> None:
        psub = await self.bus.js.pull_subscribe(
            f"{subjects.SCHEDULE_FIRE_ROOT}.>",
            durable=subjects.SCHEDULE_RELAY_DURABLE,
            stream=subjects.SCHEDULES_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=RELAY_ACK_WAIT_S,
                max_deliver=RELAY_MAX_DELIVER,
            ),
        )
        loop: PullLoop[Msg] = PullLoop(
            JetStreamFetch(psub),
            self.relay,
            concurrency=self.concurrency,
            name="schedule-relay",
            drain_s=10.0,
        )
        try:
            await loop.run(stop)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def relay(self, msg: Msg) -> None:
        """One firing → one event, then ack. A firing that is not a schedule's is dropped
        (term) with an error; one that cannot be published now is retried (nak)."""
        try:
            sched = decode(msg.data)
        except ValueError as e:
            log.error("dropping a firing on %s: %s", msg.subject, e)
            await msg.term()
            return
        meta = msg.metadata
        event = firing_event(sched, seq=meta.sequence.stream, stored=meta.timestamp)
        try:
            await self.bus.publish_event(event)
        except Exception as e:  # the bus is down, a leader election: try again shortly
            log.warning(
                "schedule %s/%s: firing not published yet (%s)", sched.tenant, sched.name, e
            )
            await msg.nak(delay=1.0)
            return
        self.relayed += 1
        await msg.ack()


@contextlib.asynccontextmanager
async def relaying(bus: Bus, *, stop_s: float = 15.0) -> AsyncIterator[Relay]:
    """A `Relay` running in this process for the block (an agent that declares schedules can
    relay their firings itself); stopped, draining what it started, on the way out."""
    relay = Relay(bus)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_s)


def main() -> None:
    """`python -m mesh.schedules`: one relay process, until SIGINT/SIGTERM (what `mesh up`
    starts, as the `scheduler` agent identity; `mesh schedules run` is the same from a shell)."""
    import signal

    from mesh._internal.logs import configure_process
    from mesh.bus import Bus
    from mesh.errors import MeshError, exit_code

    configure_process()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with await Bus.connect(name="mesh-schedules") as bus:
            log.info("relaying schedule firings")
            await Relay(bus).run(stop)

    try:
        asyncio.run(_main())
    except MeshError as e:
        log.error("%s", e)
        raise SystemExit(exit_code(e)) from None  # as the `mesh` command's (docs/cli.md)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
