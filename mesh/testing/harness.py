"""`MeshHarness`: a whole mesh inside one test — NATS, your agents and a coordinator, in-process.

    async with MeshHarness(agent, policies={"release.proposed": {...}}) as mesh:
        event_id = await mesh.publish("release.proposed", release)
        decision = await mesh.decision(event_id)           # a mesh.records.Decision
        task = await mesh.call("four-eyes", release)       # an A2A Task (JSON) over NATS
        mesh.faults.inject("four-eyes", drop(), nth=1)     # mesh.testing.faults

Everything is real: a fresh nats-server (unless you pass a connected `bus`), each agent served
by its own runtime (`agent.serve(bus, http=False)`), and the production `Coordinator` with the
policies you give, whose calls to the agents pass through a fault proxy (`mesh.faults`: see
`mesh.testing.faults`; it relays them untouched until a test injects a fault). The harness
subscribes to decisions, dead letters and events before anything starts, so a wait never misses
what already happened; every wait is bounded and fails with what the mesh did instead (a dead
letter where a decision was expected, for instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg

from coordinator import policy as policy_mod
from coordinator.dlq import AdvisoryDeadLetters
from coordinator.policy import Policies
from coordinator.service import Coordinator
from mesh import envelope, subjects
from mesh.a2a.client import AgentClient, task_of, user_message
from mesh.agent import Agent, RunningAgent
from mesh.bus import Bus
from mesh.envelope import Event
from mesh.records import DeadLetter, Decision, dead_letter_decoder, decision_decoder
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings
from mesh.testing.faults import Faults
from mesh.testing.identities import test_identities

log = logging.getLogger(__name__)

PolicySource = Mapping[str, Any] | str | Path | Policies
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
_STOP_GRACE_S = 10.0  # beyond the longest policy deadline, for the coordinator to drain


def load_policies(source: PolicySource) -> Policies:
    """Policies from a dict (the TOML's shape), a TOML file path, or `Policies` as they are."""
    if isinstance(source, Policies):
        return source
    if isinstance(source, str | Path):
        return policy_mod.load(Path(source))
    return policy_mod.parse(dict(source), source="<MeshHarness policies>")


def artifact_data(task: Mapping[str, Any]) -> Any:
    """The data of the first data part of a task's artifacts (what the agent's handler returned).

    Raises AssertionError naming the task's state and status text when there is none.
    """
    for artifact in task.get("artifacts", []):
        for part in artifact.get("parts", []):
            if "data" in part:
                return part["data"]
    status = task.get("status", {})
    text = " ".join(p.get("text", "") for p in (status.get("message") or {}).get("parts", []))
    raise AssertionError(
        f"the task has no data artifact (state {status.get('state')}): {text or 'no status text'}"
    )


class MeshHarness:
    """NATS, agents and (given policies) a coordinator in this process, for one test.

    - `agents`: `Agent`s to serve (pass one twice for two replicas);
    - `policies`: a dict shaped like `coordinator/policies.toml`, a path to such a file, or
      `Policies`; without them no coordinator runs (agents and events only);
    - `bus`: use this connected bus (and its server) instead of starting a fresh nats-server;
    - `settings`: for the bus the harness connects (default: from the environment);
    - `tenant`: what `publish` uses when given none; `timeout`: the default for every wait.
    """

    def __init__(
        self,
        *agents: Agent,
        policies: PolicySource | None = None,
        bus: Bus | None = None,
        settings: Settings | None = None,
        tenant: str = "default",
        http: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._agents = agents
        self.policies = load_policies(policies) if policies is not None else None
        self._given_bus = bus
        self._settings = settings
        self.tenant = tenant
        self.http = http
        self.timeout = timeout
        self.server: EmbeddedServer | None = None
        self.running: list[RunningAgent] = []
        self.coordinator: Coordinator | None = None
        # Rules may be injected before the harness starts; the proxy runs with the coordinator.
        self.faults = Faults()
        self._bus: Bus | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._coordinator_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._decisions: dict[str, Decision] = {}
        self._dead_letters: list[DeadLetter] = []
        self._events: list[Event] = []

    # -- what a test uses -----------------------------------------------------------------------
    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the harness is not running: use `async with MeshHarness(...)`")
        return self._bus

    @property
    def url(self) -> str:
        """The NATS URL of the mesh (for a second connection, or a `mesh` CLI process)."""
        if self.server is not None:
            return self.server.url
        connected = self.bus.nc.connected_url
        return str(connected.geturl()) if connected else ""

    async def publish(
        self,
        event_type: str,
        data: Any,
        *,
        tenant: str | None = None,
        event_id: str | None = None,
        principal: str | None = None,
    ) -> str:
        """Publish a domain event (CloudEvents envelope, `data` may be a struct); its id."""
        event = envelope.new_event(
            event_type,
            msgspec.to_builtins(data),
            source="mesh://testing",
            tenant=tenant or self.tenant,
            principal=principal,
            event_id=event_id,
        )
        await self.bus.publish_event(event)
        return event.id

    async def decision(self, event_id: str, *, timeout: float | None = None) -> Decision:
        """The coordinator's decision on `event_id`, once published (bounded wait).

        Fails at once if the event is dead-lettered instead, with the reason.
        """

        def found() -> Decision | None:
            if event_id in self._decisions:
                return self._decisions[event_id]
            dead = self._dead_letter_of(event_id)
            if dead is not None:
                raise AssertionError(
                    f"event {event_id} was dead-lettered ({dead.reason}), not decided: {dead.error}"
                )
            return None

        return await self._wait(found, f"a decision on event {event_id}", timeout)

    async def dead_letter(self, event_id: str, *, timeout: float | None = None) -> DeadLetter:
        """The dead letter of `event_id` (bounded wait); fails at once if it is decided."""

        def found() -> DeadLetter | None:
            dead = self._dead_letter_of(event_id)
            if dead is not None:
                return dead
            if event_id in self._decisions:
                d = self._decisions[event_id]
                raise AssertionError(
                    f"event {event_id} was decided ({d.outcome}: {d.reason}), not dead-lettered"
                )
            return None

        return await self._wait(found, f"a dead letter of event {event_id}", timeout)

    async def event(
        self,
        event_type: str,
        where: Callable[[Event], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> Event:
        """The first event of `event_type` (matching `where`) published since the harness
        started — by a test or by an agent's `ctx.publish` (bounded wait)."""

        def found() -> Event | None:
            return next(
                (e for e in self._events if e.type == event_type and (where is None or where(e))),
                None,
            )

        return await self._wait(found, f"a {event_type} event", timeout)

    def events(self, event_type: str | None = None) -> list[Event]:
        """Every event seen so far (of `event_type`), in arrival order."""
        return [e for e in self._events if event_type is None or e.type == event_type]

    async def call(self, agent: str, data: Any, *, timeout: float | None = None) -> dict[str, Any]:
        """Send `data` to `agent` as an A2A message over NATS; the Task it answers (JSON).

        `mesh.testing.verdict_of(task)` or `artifact_data(task)` read its answer.
        """
        result = await AgentClient(self.bus).send(
            agent, user_message(data=data), timeout=timeout or self.timeout
        )
        task: dict[str, Any] = MessageToDict(task_of(result))
        return task

    # -- waiting --------------------------------------------------------------------------------
    def _dead_letter_of(self, event_id: str) -> DeadLetter | None:
        for d in self._dead_letters:
            # A body that was no envelope has no id of its own: the record then carries the
            # stream's dedup id, "<tenant>:<id>".
            if d.event_id is not None and event_id in (d.event_id, d.event_id.split(":", 1)[-1]):
                return d
        return None

    async def _wait(self, found: Callable[[], T | None], what: str, timeout: float | None) -> T:
        limit = self.timeout if timeout is None else timeout
        async with self._changed:
            try:
                async with asyncio.timeout(limit):
                    while True:
                        got = found()
                        if got is not None:
                            return got
                        self._check_coordinator()
                        await self._changed.wait()
            except TimeoutError:
                pass
        raise AssertionError(f"no {what} within {limit:g}s; {self._summary()}")

    def _check_coordinator(self) -> None:
        task = self._coordinator_task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            raise AssertionError(f"the coordinator stopped: {exc!r}") from exc

    def _summary(self) -> str:
        decided = ", ".join(f"{k}: {d.outcome}" for k, d in list(self._decisions.items())[-5:])
        dead = ", ".join(f"{d.event_id}: {d.reason}" for d in self._dead_letters[-5:])
        coordinator = "no coordinator (no policies given)" if self.policies is None else ""
        parts = [
            f"decisions seen: {decided or 'none'}",
            f"dead letters seen: {dead or 'none'}",
            coordinator,
        ]
        return "; ".join(p for p in parts if p)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_decision(self, msg: Msg) -> None:
        try:
            d = decision_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("harness: ignoring a message on %s that is no decision", msg.subject)
            return
        self._decisions.setdefault(d.event_id, d)
        await self._notify()

    async def _on_dead_letter(self, msg: Msg) -> None:
        try:
            self._dead_letters.append(dead_letter_decoder.decode(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("harness: ignoring a message on %s that is no dead letter", msg.subject)
            return
        await self._notify()

    async def _on_event(self, msg: Msg) -> None:
        try:
            self._events.append(envelope.decode(msg.data, msg.headers))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not an envelope: the coordinator dead-letters it; dead_letter() sees that
        await self._notify()

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            self._bus = None
            raise
        self._stack = stack
        return self

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        bus = self._given_bus
        if bus is None:
            # Secured like `mesh up`: the server admits one identity folder's identities (a
            # temporary one when none is in effect), and the harness runs as its operator.
            ids = stack.enter_context(test_identities())
            self.server = stack.enter_context(EmbeddedServer(auth=ids))
            settings = (self._settings or get_settings()).model_copy(
                update={"identity": ids.operator_path, "trust": ids.trust_path}
            )
            bus = await Bus.connect(self.server.url, name="mesh-harness", settings=settings)
            stack.push_async_callback(bus.close)
        self._bus = bus
        await bus.ensure()
        # Subscribed before anything runs, so no wait can miss what happened before it began.
        for subject, cb in (
            (f"{subjects.DECISIONS_ROOT}.>", self._on_decision),
            (f"{subjects.DLQ_ROOT}.>", self._on_dead_letter),
            (subjects.events_filter(), self._on_event),
        ):
            sub = await bus.nc.subscribe(subject, cb=cb)
            stack.push_async_callback(sub.unsubscribe)
        # Two round trips: the first PING may overtake SUBs still in the client's buffer.
        await bus.nc.flush()
        await bus.nc.flush()
        # What event handlers give up on (term, max deliveries) becomes a dead letter, as in
        # every coordinator process.
        await stack.enter_async_context(AdvisoryDeadLetters(bus))
        for agent in self._agents:
            running = await stack.enter_async_context(
                agent.serve(bus, http=self.http, settings=bus.settings)
            )
            self.running.append(running)
        if self.policies is not None:
            # Started after the agents registered, so its first look at the registry sees them.
            self.coordinator = Coordinator(bus, self.policies, name="harness-coordinator")
            # Its calls go through the fault proxy (closed after the coordinator has stopped).
            await self.faults.start(bus.nc)
            stack.push_async_callback(self.faults.aclose)
            self.coordinator.client = self.faults.client(bus)
            stop = asyncio.Event()
            task = asyncio.create_task(self.coordinator.run(stop), name="harness-coordinator")
            task.add_done_callback(lambda _: asyncio.ensure_future(self._notify()))
            self._coordinator_task = task
            longest = max((p.deadline_s for p in self.policies.by_type.values()), default=0.0)

            async def stop_coordinator() -> None:
                stop.set()
                await asyncio.wait_for(task, timeout=longest + _STOP_GRACE_S)

            stack.push_async_callback(stop_coordinator)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._bus = None
            self.running = []
            self._coordinator_task = None
