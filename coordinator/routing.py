"""Which replica of an agent gets a call, how many calls each replica gets at once, and a
circuit breaker per replica.

Replicas advertise their own subject in the registry. The router sends each call to the live
replica whose breaker is not open with the most free room (its call limit minus its calls in
flight; ties at random), avoiding ones that already failed this call, so one hung or broken
replica is stepped around instead of timing out a share of every decision. A replica without
its own subject is reached through the agent's shared queue-group subject, with one breaker
(and one limit) for the agent as a whole.

Call limits: each replica starts at its declared capacity (`Registration.capacity`, or
`DEFAULT_CAPACITY` when it declares none) and adapts it from how its calls go
(`coordinator.admission.AimdLimit`: an answer slower than the call's target, a timeout or a busy
answer halves it, fast answers grow it back). An agent's `capacity` is the sum over its usable
replicas (a half-open replica counts one: its probe); admission waits for it.

Breakers open on failures, never on load the coordinator made itself. What a call's end counts
as, for the replica that got it:
- an answer (a vote): success; an error answer is a failure, except -32603 (internal error):
  that is the replica's backing store failing (e.g. its JetStream task store in a leader
  election), which every replica shares, so stepping around one helps nothing and opening every
  breaker would turn a short election into fail-fast "unavailable" votes; the call is retried
  (`coordinator.dispatch`) instead;
- "busy" (`AgentBusyError`): never a failure; the replica is alive and said so;
- a timeout: a failure only if the replica gave no sign of life while this call waited (no
  other call to it got any answer meanwhile), so a busy-but-alive replica never trips and a
  hung (SIGSTOPped) one still does;
- no responders, a broken connection: a failure;
- cancelled by the coordinator (the decision no longer needs it): not a failure.
What is not a failure ends as a success for the breaker (the consecutive count restarts, a
half-open breaker closes): purgatory has no neutral end. Breakers are purgatory's (closed →
open after `threshold` consecutive failures → half-open after `ttl_s`, where the next call
decides). This module is the only one that talks to purgatory; callers see `Breaker`,
`BreakerOpen` and `Router.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import Context, OpenedState

from coordinator.admission import AimdLimit
from coordinator.canary import VersionFilter
from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.errors import AgentBusyError, AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.registry import Registration, RegistryView

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8  # calls at once for a replica that declares no capacity

# Raised on entering a breaker that is open (purgatory's documented domain model).
BreakerOpen = OpenedState


@runtime_checkable
class Breaker(Protocol):
    """What `AsyncCircuitBreakerFactory.get_breaker` returns, typed by the parts we use: the
    class itself lives in purgatory's private `service._async` package, which we do not import."""

    context: Context

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@dataclass(frozen=True)
class Route:
    agent: str
    subject: str
    breaker_key: str  # `<agent>.<instance>`, or `<agent>` for the shared subject


class NoReplica(AgentCallError):
    """No live replica of the version a call must go to (`VersionFilter`)."""


def is_busy(e: BaseException) -> bool:
    """An agent's "busy, try again" answer (`mesh.errors.AgentBusyError`)."""
    return isinstance(e, AgentBusyError)


def declared_capacity(reg: Registration) -> int:
    """What a replica says it can take at once (0: it does not say)."""
    return max(0, reg.capacity)


@dataclass
class _Replica:
    """What the router knows of one breaker key's calls."""

    limit: AimdLimit
    inflight: int = 0
    answers: int = 0  # calls that got any answer from it, ever: its signs of life


class Router:
    def __init__(
        self,
        view: RegistryView,
        *,
        threshold: int = 3,
        ttl_s: float = 10.0,
        default_capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.default_capacity = default_capacity
        self.clock = clock
        self._factory = AsyncCircuitBreakerFactory(default_threshold=threshold, default_ttl=ttl_s)
        self._factory.add_listener(self._on_change)
        self._breakers: dict[str, Breaker] = {}
        self._replicas: dict[str, _Replica] = {}

    def route(
        self,
        agent: str,
        *,
        avoid: frozenset[str] = frozenset(),
        versions: VersionFilter | None = None,
    ) -> Route:
        direct = [r for r in self.view.instances(agent) if r.direct_subject]
        if versions is not None:
            direct = self._of_versions(agent, direct, versions)
        usable = [r for r in direct if not self.is_open(r.key)]
        fresh = [r for r in usable if r.key not in avoid]
        candidates = fresh or usable
        if not candidates:
            # No replica of its own to pick (or all breakers open): the shared subject lets
            # NATS choose among whoever is listening; a wholly dead agent yields "unavailable".
            return Route(agent, subjects.a2a(agent), agent)
        pick = max(candidates, key=lambda r: (self._room(r.key, self._ceiling(r)), random.random()))
        return Route(agent, pick.direct_subject, pick.key)

    def _of_versions(
        self, agent: str, regs: list[Registration], versions: VersionFilter
    ) -> list[Registration]:
        """The replicas `versions` admits. The shared subject reaches any version, so a
        filtered call never falls back to it: no replica that may answer is `NoReplica`."""
        fits = [r for r in regs if versions.admits(r.version)]
        if not fits and versions.only and not versions.strict:
            fits = [r for r in regs if r.version not in versions.never | {versions.only}]
        if not fits and (versions.strict or versions.only or regs):
            what = f"version {versions.only}" if versions.only else "a version it may ask"
            raise NoReplica(agent, f"no live replica of {agent} runs {what}")
        return fits

    def capacity(self, agent: str) -> int:
        """Calls `agent` can take at once now: the sum of its usable replicas' limits (a
        half-open one counts one); 0 when none is usable (nothing to wait for)."""
        regs = self.view.instances(agent)
        direct = [r for r in regs if r.direct_subject]
        if direct:
            # Every breaker open: 0, though `route` still tries the shared subject (behind its
            # own breaker) as a last resort; such calls are not worth waiting for.
            return sum(
                self._limit(r.key, self._ceiling(r)) for r in direct if not self.is_open(r.key)
            )
        if not regs or self.is_open(agent):
            return 0
        # Reached through the shared subject only: one limit for all of them.
        return self._limit(agent, sum(self._ceiling(r) for r in regs))

    def inflight(self, key: str) -> int:
        rep = self._replicas.get(key)
        return rep.inflight if rep is not None else 0

    def limit(self, key: str) -> int:
        rep = self._replicas.get(key)
        return rep.limit.current if rep is not None else self.default_capacity

    @contextlib.asynccontextmanager
    async def call(self, route: Route, *, slow_s: float) -> AsyncIterator[None]:
        """One call to `route`'s replica, under its breaker (BreakerOpen on entry if open),
        counted in its calls in flight, and told to its limit (an answer slower than `slow_s`
        is a sign of overload). What the call's end counts as: see the module docstring."""
        brk = await self.breaker(route)
        rep = self._replica(route.breaker_key)
        answers_before = rep.answers
        spared: BaseException | None = None
        async with brk:
            started = self.clock()
            rep.inflight += 1
            try:
                yield
            except BaseException as e:
                if not self._failure(rep, e, started, answers_before):
                    spared = e  # leaves the breaker as a success, raised again below
                else:
                    raise
            else:
                rep.answers += 1
                if self.clock() - started > slow_s:
                    self._overloaded(route.breaker_key, rep, started)
                else:
                    rep.limit.fast()
            finally:
                rep.inflight -= 1
        if spared is not None:
            raise spared

    def _failure(self, rep: _Replica, e: BaseException, started: float, before: int) -> bool:
        """Whether a call that ended with `e` is a failure of its replica (and, on the way,
        what it says about the replica's limit and liveness)."""
        if isinstance(e, asyncio.CancelledError):
            return False  # we stopped it: says nothing about the replica
        if is_busy(e):
            rep.answers += 1
            self._overloaded("", rep, started)
            return False
        if isinstance(e, AgentTimeoutError):
            self._overloaded("", rep, started)
            return rep.answers == before  # no sign of life while it waited
        if isinstance(e, AgentCallError) and not isinstance(e, AgentUnavailableError):
            rep.answers += 1  # it answered, with an error: alive
            return e.code != jsonrpc.INTERNAL_ERROR  # shared infrastructure, not this replica
        return True

    def _overloaded(self, key: str, rep: _Replica, started: float) -> None:
        if rep.limit.overloaded(started, self.clock()):
            log.debug("call limit of %s now %d", key or "a replica", rep.limit.current)

    def _ceiling(self, reg: Registration) -> int:
        return declared_capacity(reg) or self.default_capacity

    def _replica(self, key: str, ceiling: int | None = None) -> _Replica:
        rep = self._replicas.get(key)
        if rep is None:
            rep = self._replicas[key] = _Replica(AimdLimit(ceiling or self.default_capacity))
        elif ceiling is not None:
            rep.limit.declare(ceiling)
        return rep

    def _limit(self, key: str, ceiling: int) -> int:
        if self.is_half_open(key):
            return 1  # its probe decides whether it gets more
        return self._replica(key, ceiling).limit.current

    def _room(self, key: str, ceiling: int) -> int:
        rep = self._replica(key, ceiling)
        return rep.limit.current - rep.inflight

    async def breaker(self, route: Route) -> Breaker:
        brk = self._breakers.get(route.breaker_key)
        if brk is None:
            brk = await self._factory.get_breaker(route.breaker_key)
            self._breakers[route.breaker_key] = brk
        return brk

    def is_open(self, key: str) -> bool:
        brk = self._breakers.get(key)
        if brk is None or brk.context.state != "opened":
            return False
        opened_at = brk.context.opened_at or 0.0
        return time.time() < opened_at + brk.context.ttl  # past the TTL it is half-open

    def is_half_open(self, key: str) -> bool:
        brk = self._breakers.get(key)
        if brk is None:
            return False
        state = brk.context.state
        return state == "half-opened" or (state == "opened" and not self.is_open(key))

    def states(self) -> dict[str, str]:
        """Breaker state per replica (or agent): closed | opened | half-opened."""
        out: dict[str, str] = {}
        for key, brk in sorted(self._breakers.items()):
            state = brk.context.state
            if state == "opened" and not self.is_open(key):
                state = "half-opened"
            out[key] = state
        return out

    def _on_change(self, name: str, kind: str, event: Any) -> None:
        if kind == "state_changed":
            log.warning("circuit breaker %s is now %s", name, getattr(event, "state", "?"))
