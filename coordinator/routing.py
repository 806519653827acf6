"""Which replica of an agent gets a call, and a circuit breaker per replica.

Replicas advertise their own subject in the registry. The router picks a live replica whose
breaker is not open (at random, avoiding ones that already failed this call), so one hung or
broken replica is stepped around instead of timing out a share of every decision. A replica
without its own subject is reached through the agent's shared queue-group subject, with one
breaker for the agent as a whole. Breakers: purgatory (closed → open after `threshold`
consecutive failures → half-open after `ttl_s`, where the next call decides). This module is the
only one that talks to purgatory; callers see `Breaker` and `BreakerOpen`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import Context, OpenedState

from mesh import subjects
from mesh.registry import RegistryView

log = logging.getLogger(__name__)

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


class Router:
    def __init__(self, view: RegistryView, *, threshold: int = 3, ttl_s: float = 10.0) -> None:
        self.view = view
        self._factory = AsyncCircuitBreakerFactory(default_threshold=threshold, default_ttl=ttl_s)
        self._factory.add_listener(self._on_change)
        self._breakers: dict[str, Breaker] = {}

    def route(self, agent: str, *, avoid: frozenset[str] = frozenset()) -> Route:
        direct = [r for r in self.view.instances(agent) if r.direct_subject]
        usable = [r for r in direct if not self.is_open(r.key)]
        fresh = [r for r in usable if r.key not in avoid]
        pick = random.choice(fresh or usable) if (fresh or usable) else None
        if pick is None:
            # No replica of its own to pick (or all breakers open): the shared subject lets
            # NATS choose among whoever is listening; a wholly dead agent yields "unavailable".
            return Route(agent, subjects.a2a(agent), agent)
        return Route(agent, pick.direct_subject, pick.key)

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
