"""Agents that react to domain events: at-least-once handlers on shared durable pull consumers.

    @agent.on_event("ticket.created")
    async def triage(ticket: TicketCreated, ctx: EventContext) -> None:
        await ctx.publish("ticket.triaged", TicketTriaged(...))

Each handler owns one durable pull consumer on MESH_EVENTS, `agent-<agent>-<handler>`, filtered
on `mesh.evt.*.<type>` and shared by every replica of the agent: JetStream hands each event to one
replica at a time. Per delivery:

- the handler returns → `ack`;
- it raises `Retry(delay_s)` → `nak(delay_s)`;
- it raises `Reject(reason)` → `term` (JetStream publishes MSG_TERMINATED; the DLQ listener
  records it);
- it raises anything else → logged with the traceback, `nak(backoff[attempt - 1])` (the last
  pause repeats); after `max_deliver` deliveries JetStream stops and publishes MAX_DELIVERIES
  (the DLQ listener again);
- the event is not a CloudEvent (structured mode, or binary mode with `ce-` headers), its data
  breaks its type's JSON Schema (`mesh.contracts`), or does not decode into the handler's type →
  `term` at once: the bytes will not change, so retrying cannot help.

`ctx.publish` gives every output a deterministic id (incoming event, handler, output type, call
index), so a redelivered event that publishes again is dropped by the stream's duplicate window.

Why the backoff is not JetStream's `ConsumerConfig.backoff`: JetStream uses that list as the ack
deadline of each delivery, so a first attempt would get only `backoff[0]` (0.5 s) before being
redelivered to another replica. Here `ack_wait` is how long a silent worker is presumed alive
(running handlers refresh it with `in_progress` every `ack_wait / 3`) and `backoff` is only the
pause after a failure, sent with the nak. The pauses are a `RetryPolicy` (`Redelivery`) whose
schedule is that explicit list rather than exponential: `backoff=` is the public contract.

Fetching is the mesh's one pull loop (`mesh._internal.consume.PullLoop`): no more events than
free handler slots, so none waits locally while its ack deadline runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from mesh import contracts, envelope, subjects
from mesh._internal.consume import JetStreamFetch, PullLoop
from mesh._internal.retry import RetryPolicy
from mesh.bus import Bus
from mesh.errors import ConfigError, MeshRuntimeError

log = logging.getLogger(__name__)

DEFAULT_MAX_DELIVER = 5
DEFAULT_BACKOFF: tuple[float, ...] = (0.5, 2.0, 5.0, 10.0)
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_CONCURRENCY = 16
DRAIN_S = 10.0  # how long shutdown waits for in-flight handlers before handing them back

_ID_NAMESPACE = uuid.UUID(subjects.OUTPUT_EVENT_NAMESPACE)


@dataclass(frozen=True)
class Redelivery(RetryPolicy):
    """The retry policy of an event handler: `attempts` = max_deliver, and the pause after the
    n-th failed delivery is `pauses[n - 1]`, the last one repeating (no pauses: redeliver at
    once). `pause(n)` is None after the last delivery: there is no next one to wait for."""

    pauses: tuple[float, ...] = ()

    def delay(self, failed_attempt: int) -> float:
        if not self.pauses:
            return 0.0
        return self.pauses[min(max(failed_attempt, 1), len(self.pauses)) - 1]


class Retry(MeshRuntimeError):
    """Raise from an event handler to have the event redelivered after `delay_s`."""

    retryable = True

    def __init__(self, delay_s: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay_s:g}s")
        self.delay_s = max(0.0, delay_s)


class Reject(MeshRuntimeError):
    """Raise from an event handler to stop delivery at once (`term`: the event is dead-lettered)."""

    retryable = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class EventContext:
    """What a handler knows about the delivery, and how it publishes what follows from it."""

    event: envelope.Event
    attempt: int  # 1 on the first delivery
    max_deliver: int
    source: str
    _bus: Bus = field(repr=False)
    _handler_key: str = field(repr=False)
    _published: int = field(default=0, repr=False)

    @property
    def tenant(self) -> str:
        return self.event.tenant

    @property
    def last_attempt(self) -> bool:
        return self.attempt >= self.max_deliver

    def output_id(self, event_type: str, index: int) -> str:
        """The id of this handling's `index`-th publish of `event_type` (same on redelivery)."""
        key = subjects.output_event_key(
            self.event.tenant, self.event.id, self._handler_key, event_type, index
        )
        return str(uuid.uuid5(_ID_NAMESPACE, key))

    async def publish(self, event_type: str, data: Any) -> envelope.Event:
        """Publish `data` as a new event in this tenant; a redelivery's re-publish is a no-op.

        Ids are numbered by publish call within this handling, so a handler must publish the
        same things in the same order on every attempt for deduplication to hold.
        """
        index = self._published
        self._published += 1
        out = envelope.new_event(
            event_type,
            msgspec.to_builtins(data),
            source=self.source,
            tenant=self.event.tenant,
            principal=self.event.principal,
            event_id=self.output_id(event_type, index),
        )
        out.traceparent = self.event.traceparent  # the output belongs to the same trace
        await self._bus.publish_event(out)  # checked against its type's schema there
        return out


HandlerFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class EventHandler:
    """One registered `@agent.on_event` handler and the consumer settings it runs under."""

    agent: str
    fn: HandlerFn
    event_type: str
    data_type: Any
    takes_ctx: bool
    max_deliver: int = DEFAULT_MAX_DELIVER
    backoff: tuple[float, ...] = DEFAULT_BACKOFF
    ack_wait_s: float = DEFAULT_ACK_WAIT_S
    concurrency: int = DEFAULT_CONCURRENCY

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def durable(self) -> str:
        return subjects.agent_event_durable(self.agent, self.name)

    @property
    def filter_subject(self) -> str:
        return subjects.event("*", self.event_type)

    @property
    def redelivery(self) -> Redelivery:
        return Redelivery(attempts=self.max_deliver, pauses=self.backoff)

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            description=f"{self.agent}: {self.name} on {self.event_type}",
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            # A new agent also handles what was published before it first started: the stream
            # is the buffer, and every event of the type is owed one handling.
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
        )


def event_handler(
    agent: str,
    fn: HandlerFn,
    event_type: str,
    *,
    max_deliver: int = DEFAULT_MAX_DELIVER,
    backoff: Sequence[float] = DEFAULT_BACKOFF,
    ack_wait_s: float = DEFAULT_ACK_WAIT_S,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> EventHandler:
    """Validate a handler's shape and settings; the first parameter's annotation is the data."""
    where = f"{agent}: @on_event({event_type!r}) {getattr(fn, '__name__', fn)}"
    if not subjects.valid_event_type(event_type):
        raise ConfigError(f"{where}: not a dotted event type", hint="e.g. ticket.created")
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"{where}: the handler must be `async def`")
    params = list(inspect.signature(fn).parameters.values())
    try:
        hints = get_type_hints(fn)
    except NameError as e:
        raise ConfigError(
            f"{where}: cannot resolve its annotations ({e})",
            hint="define the data type at module level and import EventContext at run time",
        ) from None
    if not params or params[0].name not in hints or len(params) > 2:
        raise ConfigError(
            f"{where}: the handler takes the annotated event data and, optionally, the context",
            hint="e.g. async def triage(ticket: TicketCreated, ctx: EventContext) -> None",
        )
    if not subjects.valid_token(subjects.agent_event_durable(agent, fn.__name__)):
        raise ConfigError(f"{where}: the handler's name cannot be part of a consumer name")
    if max_deliver < 1 or ack_wait_s <= 0 or concurrency < 1 or any(b < 0 for b in backoff):
        raise ConfigError(
            f"{where}: max_deliver and concurrency must be ≥ 1, ack_wait_s > 0, backoff ≥ 0"
        )
    return EventHandler(
        agent=agent,
        fn=fn,
        event_type=event_type,
        data_type=hints[params[0].name],
        takes_ctx=len(params) == 2,
        max_deliver=max_deliver,
        backoff=tuple(float(b) for b in backoff),
        ack_wait_s=ack_wait_s,
        concurrency=concurrency,
    )


class _Poison(MeshRuntimeError):
    """The delivery can never be handled as it is (bad envelope or data)."""

    retryable = False


class EventConsumer:
    """One handler's fetch loop in one replica: bounded concurrency, drained on stop."""

    def __init__(self, bus: Bus, handler: EventHandler) -> None:
        self.bus = bus
        self.handler = handler
        self._stop = asyncio.Event()
        self._loop: asyncio.Task[set[asyncio.Task[Any]]] | None = None
        self._pull: PullLoop[Msg] | None = None
        self._psub: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        h = self.handler
        try:
            # Create-or-update: replicas agree on one config, and a changed max_deliver or
            # ack_wait in code reaches the shared durable on the next start.
            await self.bus.js.add_consumer(subjects.EVENTS_STREAM, config=h.consumer_config())
        except APIError as e:
            raise ConfigError(
                f"consumer {h.durable} on {subjects.EVENTS_STREAM}: {e.description}",
                hint=f"a setting that cannot change was changed; remove the durable "
                f"(nats consumer rm {subjects.EVENTS_STREAM} {h.durable}) to recreate it",
            ) from None
        psub = await self.bus.js.pull_subscribe_bind(
            durable=h.durable, stream=subjects.EVENTS_STREAM
        )
        self._psub = psub
        self._pull = PullLoop(
            JetStreamFetch(psub),
            self._deliver,
            concurrency=h.concurrency,
            name=self.name,
            drain_s=DRAIN_S,
        )
        self._loop = asyncio.create_task(self._pull.run(self._stop), name=f"events:{h.durable}")
        log.info("agent %s: %s consuming %s as %s", h.agent, h.name, h.filter_subject, h.durable)

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Stop fetching, let in-flight handlers finish (bounded), hand back the rest."""
        if self._pull is not None:
            self._pull.drain_s = drain_s
        self._stop.set()
        if self._loop is not None:
            late = await self._loop
            for task in late:  # each naks its event on cancel, so another replica takes it now
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()  # the durable stays: other replicas share it

    @property
    def name(self) -> str:
        return self.handler.durable

    async def _deliver(self, msg: Msg) -> None:
        h = self.handler
        attempt = msg.metadata.num_delivered
        try:
            event, data = self._decode(msg)
        except _Poison as e:
            log.error("%s: poison event on %s, terminated: %s", self.name, msg.subject, e)
            await _settle(msg.term())
            return
        extra = {"event_id": event.id, "tenant": event.tenant, "agent": h.agent}
        ctx = EventContext(
            event=event,
            attempt=attempt,
            max_deliver=h.max_deliver,
            source=f"mesh://agent/{h.agent}",
            _bus=self.bus,
            _handler_key=f"{h.agent}.{h.name}",
        )
        keepalive = asyncio.create_task(self._keepalive(msg))
        try:
            await (h.fn(data, ctx) if h.takes_ctx else h.fn(data))
        except Retry as r:
            log.info(
                "%s: event %s retry in %gs: %s", self.name, event.id, r.delay_s, r, extra=extra
            )
            await _settle(msg.nak(delay=r.delay_s))
        except Reject as r:
            log.warning("%s: event %s rejected: %s", self.name, event.id, r.reason, extra=extra)
            await _settle(msg.term())
        except asyncio.CancelledError:
            # Shutdown ran out of patience: give the event back now rather than after ack_wait.
            await _settle(msg.nak())
            raise
        except Exception:
            delay = h.redelivery.pause(attempt)
            if delay is None:
                # No delay: there is no next delivery, and JetStream should declare it now.
                log.exception(
                    "%s: event %s failed on its last attempt (%d/%d); giving up",
                    self.name,
                    event.id,
                    attempt,
                    h.max_deliver,
                    extra=extra,
                )
                await _settle(msg.nak())
            else:
                log.exception(
                    "%s: event %s failed (attempt %d/%d); redelivery in %gs",
                    self.name,
                    event.id,
                    attempt,
                    h.max_deliver,
                    delay,
                    extra=extra,
                )
                await _settle(msg.nak(delay=delay))
        else:
            await _settle(msg.ack())
        finally:
            keepalive.cancel()

    def _decode(self, msg: Msg) -> tuple[envelope.Event, Any]:
        h = self.handler
        try:
            # Structured or binary mode (`ce-` headers): the same Event, the same checks.
            event = envelope.decode(msg.data, msg.headers)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise _Poison(f"not a valid CloudEvent: {e}") from None
        tenant, event_type = subjects.parse_event_subject(msg.subject)
        if (event.tenant, event.type) != (tenant, event_type):
            raise _Poison(f"envelope says tenant={event.tenant!r} type={event.type!r}")
        why = contracts.violation(event.type, event.data)
        if why is not None:
            raise _Poison(f"event {event.id}: breaks the {event.type} schema: {why}")
        try:
            data = msgspec.convert(event.data, h.data_type, strict=False)
        except msgspec.ValidationError as e:
            # msgspec names the field (`... - at $.title`), which is what the log must say.
            raise _Poison(
                f"event {event.id}: data is not a {_type_name(h.data_type)}: {e}"
            ) from None
        return event, data

    async def _keepalive(self, msg: Msg) -> None:
        # Tells JetStream the handler is alive, so a long handler is not redelivered elsewhere.
        while True:
            await asyncio.sleep(self.handler.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()


async def _settle(ack: Awaitable[None]) -> None:
    """Send an ack/nak/term; if the connection is gone, JetStream redelivers after ack_wait."""
    try:
        await ack
    except Exception as e:
        log.warning("could not acknowledge an event: %s", e)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


@contextlib.asynccontextmanager
async def consuming(
    bus: Bus, handlers: Sequence[EventHandler], *, drain_s: float = DRAIN_S
) -> AsyncIterator[list[EventConsumer]]:
    """Run one consumer per handler until the block exits, then drain them all."""
    consumers: list[EventConsumer] = []
    try:
        for handler in handlers:
            consumer = EventConsumer(bus, handler)
            await consumer.start()
            consumers.append(consumer)
        yield consumers
    finally:
        await asyncio.gather(*(c.stop(drain_s) for c in consumers))
