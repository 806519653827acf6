"""Admission: an event starts being decided only once every voter it needs has room for its call.

A burst waits in JetStream, not in agents' queues. The consume loop holds at most
`MESH_MAX_INFLIGHT` events; each of those waits here, before the ledger claim (so its decision
deadline does not run while it waits), until every voter agent it will ask has a free call slot,
and then takes them all at once. An agent's slots are what its usable replicas can serve
(`coordinator.routing.Router.capacity`: each replica's declared capacity, adapted by `AimdLimit`
from how its calls went); the rest of the burst stays in the stream.

Rules this module owns:
- All or nothing: a waiter holds no slot until it gets every one it needs, so no event sits on
  one agent's slot while it waits for another's and waiters cannot deadlock. Waiters that do
  not fit yet are skipped, not blocked on.
- Fair between tenants (issue 16, noisy neighbour): when room comes back, it goes first to the
  waiting tenant that holds the fewest slots of the agents it waits for (max-min fairness), and
  within a tenant in arrival order. So a tenant over its share while another waits is held
  back: one tenant's backlog of slow events cannot make another's next event wait behind all
  of it, only behind the next slot given back. Shares are not reserved: room nobody else waits
  for goes to whoever waits (work-conserving), so a lone tenant uses every slot. Held waiters
  are not nak'ed (a nak would spend a delivery toward MAX_DELIVER and end in a dead letter);
  they stay in progress with `keepalive`, as every waiter does. Fairness covers the events the
  consume loop holds (`MESH_MAX_INFLIGHT`); a backlog deeper than that waits in the stream, in
  stream order. Why here and not a consumer per tenant: docs/budgets.md, "Noisy neighbour".
- A slot is given back as soon as the call it was for ends (`release`, from inside the
  decision), and whatever an event still holds when its decision ends, however it ends
  (outcome, exception, cancel).
- An agent with no usable replica (none registered, or every breaker open) is not waited for:
  its calls fail fast and count as the policy says.
- An event that needs more calls of one agent than it has slots goes when that agent is idle.
- The wait is bounded by progress, not by load: a waiter goes ahead without its slots (logged)
  once an agent it waits for has given back no slot for `stall_s`, longer than any decision can
  hold one. Under load slots keep coming back, so this never fires; it keeps a leaked slot or a
  wedged call from freezing the coordinator.
- A redelivery asks for room only for the voters it will still ask (`voters_left`): an event
  already decided or dead-lettered, or held by a live owner, needs none and does not queue
  behind new work (after a coordinator dies, hundreds of its events come back at once).
- While it waits, `keepalive` runs about every `keepalive_s` (the service passes
  `msg.in_progress`, so JetStream does not redeliver an event that is only waiting).

No NATS here: the clock and the capacity are passed in, so unit tests drive both.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.ledger import DecisionState

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0  # JetStream's ack wait for the coordinator is 3 s
DECREASE = 0.5  # multiplicative decrease of a call limit on overload
_SERVED_KEPT = 1024  # tenants whose last grant is remembered before idle ones are forgotten


@dataclass
class AimdLimit:
    """How many calls at once one replica gets: starts at its declared capacity (`ceiling`),
    halves on a sign of overload (a call slower than the target, a timeout, a busy answer) and
    grows by about one per `value` fast answers, within [1, ceiling].

    One overload episode shrinks it once: a call that started before the last decrease saw the
    old limit, so its slowness is not news (the "window" is one call's lifetime, as in TCP)."""

    ceiling: int
    value: float = 0.0
    decreased_at: float = -math.inf

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        self.value = float(self.ceiling) if self.value <= 0 else self.value

    @property
    def current(self) -> int:
        return max(1, min(self.ceiling, math.floor(self.value)))

    def fast(self) -> None:
        """A call answered within its target."""
        self.value = min(float(self.ceiling), self.value + 1.0 / self.value)

    def overloaded(self, started: float, now: float) -> bool:
        """A sign of overload from a call that started at `started`; True if the limit shrank."""
        if started < self.decreased_at:
            return False
        self.value = max(1.0, self.value * DECREASE)
        self.decreased_at = now
        return True

    def declare(self, ceiling: int) -> None:
        """The replica's declared capacity changed (a new card): the bound follows it."""
        ceiling = max(1, ceiling)
        if ceiling != self.ceiling:
            self.ceiling = ceiling
            self.value = min(self.value, float(ceiling))


@dataclass(eq=False)
class Grant:
    """The slots one event holds: agent → calls. Given back by `release` (one call's) or
    `release_all` (at the end of the decision)."""

    admission: Admission
    held: Counter[str] = field(default_factory=Counter)
    waited_s: float = 0.0
    forced: bool = False  # went ahead without waiting for room (see `stall_s`)
    tenant: str = ""

    def release(self, agent: str) -> None:
        if self.held[agent] > 0:
            self.held[agent] -= 1
            self.admission._give_back({agent: 1}, self.tenant)

    def release_all(self) -> None:
        held = {a: n for a, n in self.held.items() if n > 0}
        self.held.clear()
        if held:
            self.admission._give_back(held, self.tenant)


@dataclass(eq=False)
class _Waiter:
    need: Counter[str]
    granted: asyncio.Future[None]
    tenant: str = ""
    seq: int = 0  # arrival order
    kind: frozenset[tuple[str, int]] = frozenset()  # waiters of one kind fit or not together

    def __post_init__(self) -> None:
        self.kind = frozenset(self.need.items())


def voters_left(
    state: DecisionState | None, agents: Mapping[str, str], *, stream_seq: int, now: float
) -> list[str]:
    """The agents (skill → agent in `agents`) a delivery of an event will still ask, as far as
    its ledger `state` says at wall time `now`: none when it is decided, dead-lettered by this
    very delivery, or held by a live owner (the claim says so, and nobody is asked); after a
    take-over, those whose vote is not in yet. A sketch of the claim's answer, for admission
    only: the claim itself decides."""
    if state is None:
        return list(agents.values())
    if state.state == "decided" or (
        state.state == "dead_lettered" and state.stream_seq == stream_seq
    ):
        return []
    if state.state == "collecting" and state.lease_until > now:
        return []
    if state.state == "dead_lettered":
        return list(agents.values())  # a replay: decided afresh
    return [agent for skill, agent in agents.items() if skill not in state.votes]


# The grant of the event whose decision is running in this task (and the ask tasks it starts,
# which copy the context): how an asker gives its slot back without the decision core knowing.
_current: contextvars.ContextVar[Grant | None] = contextvars.ContextVar(
    "mesh_admission_grant", default=None
)


def release(agent: str) -> None:
    """The current event's call to `agent` has ended: give its slot back (no-op outside an
    admitted decision, or if it was given back already)."""
    grant = _current.get()
    if grant is not None:
        grant.release(agent)


class Admission:
    """`capacity(agent)`: how many calls the agent can take at once now (≤ 0: nothing usable,
    so not waited for). Read at every grant pass, so a replica that registers, a breaker that
    closes and a limit that grows all count from the next pass."""

    def __init__(
        self,
        capacity: Callable[[str], int],
        *,
        clock: Clock = SYSTEM_CLOCK,
        stall_s: float = 30.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.capacity = capacity
        self.clock = clock
        self.stall_s = stall_s
        self.keepalive_s = keepalive_s
        self.held: Counter[str] = Counter()  # agent → calls admitted and not given back
        # tenant → agent → calls admitted and not given back: whose turn it is (fairness)
        self.tenant_held: dict[str, Counter[str]] = {}
        self._waiters: deque[_Waiter] = deque()
        self._arrivals = 0
        # tenant → when it was last granted (a count of grants): among tenants holding as few
        # slots, the one served least recently goes first. Else a tenant that just gave back
        # its last slot would tie with one that waits, and its older backlog would win again.
        self._served: dict[str, int] = {}
        self._grants = 0
        self._given_back_at: dict[str, float] = {}
        self._passed_at = -math.inf

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slots(
        self,
        agents: Iterable[str],
        *,
        tenant: str = "",
        keepalive: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Grant]:
        """Wait for a slot of every agent in `agents` (one per call: an agent named twice needs
        two), hold them while the block runs, give back what is left when it ends. `tenant`:
        whose event it is (room is shared fairly between tenants)."""
        need = Counter(agents)
        grant = await self._acquire(need, keepalive, tenant)
        token = _current.set(grant)
        try:
            yield grant
        finally:
            _current.reset(token)
            grant.release_all()

    async def _acquire(
        self,
        need: Counter[str],
        keepalive: Callable[[], Awaitable[object]] | None,
        tenant: str,
    ) -> Grant:
        started = self.clock.monotonic()
        grant = Grant(self, held=Counter(need), tenant=tenant)
        if not need:
            return grant
        self._arrivals += 1
        waiter = _Waiter(need, asyncio.get_running_loop().create_future(), tenant, self._arrivals)
        self._waiters.append(waiter)
        self._grant_pass()
        try:
            while not waiter.granted.done():
                tick = asyncio.ensure_future(self.clock.sleep(self.keepalive_s))
                try:
                    await asyncio.wait({waiter.granted, tick}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    tick.cancel()
                if waiter.granted.done():
                    break
                if keepalive is not None:
                    with contextlib.suppress(Exception):  # a lost message is JetStream's to redo
                        await keepalive()
                if waiter.granted.done():
                    break
                stuck = self._stuck(need, started)
                if stuck:
                    log.warning(
                        "admission: %s gave back no call slot for %.0f s; an event goes ahead "
                        "without waiting for room (a leaked slot or a wedged call, not load)",
                        ", ".join(stuck),
                        self.stall_s,
                    )
                    self._waiters.remove(waiter)
                    self._take(need, tenant)
                    waiter.granted.set_result(None)
                    grant.forced = True
                    break
                # Capacity may have grown without a slot coming back (a replica registered, a
                # breaker closed): look again, at most once per tick for all waiters.
                if self.clock.monotonic() - self._passed_at >= self.keepalive_s:
                    self._grant_pass()
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.granted.done() and not waiter.granted.cancelled():
                self._give_back(need, tenant)  # granted just as we were cancelled
            raise
        grant.waited_s = self.clock.monotonic() - started
        return grant

    # -- inside: every change happens synchronously, so no lock is needed --------------------------
    def _room(self, agent: str, n: int, caps: dict[str, int]) -> bool:
        cap = caps.get(agent)
        if cap is None:
            cap = caps[agent] = self.capacity(agent)
        held = self.held[agent]
        return cap <= 0 or held == 0 or held + n <= cap

    def _fits(self, need: Counter[str], caps: dict[str, int]) -> bool:
        return all(self._room(a, n, caps) for a, n in need.items())

    def _take(self, need: Counter[str], tenant: str) -> None:
        self.held.update(need)
        self.tenant_held.setdefault(tenant, Counter()).update(need)
        self._grants += 1
        self._served[tenant] = self._grants

    def _give_back(self, held: dict[str, int], tenant: str) -> None:
        now = self.clock.monotonic()
        mine = self.tenant_held.get(tenant)
        for agent, n in held.items():
            self.held[agent] = max(0, self.held[agent] - n)
            self._given_back_at[agent] = now
            if mine is not None:
                mine[agent] = max(0, mine[agent] - n)
        if mine is not None and not +mine:
            del self.tenant_held[tenant]  # tenants come and go: keep only those holding slots
        self._grant_pass()

    def _load(self, waiter: _Waiter) -> int:
        """How many slots of the agents `waiter` waits for its tenant holds now."""
        mine = self.tenant_held.get(waiter.tenant)
        return sum(mine[a] for a in waiter.need) if mine else 0

    def _grant_pass(self) -> None:
        """Grant every waiter that fits now: each time, the first fitting waiter (in arrival
        order) of the tenant that holds the fewest slots of what it waits for (ties: the tenant
        served least recently, then the earlier arrival)."""
        self._passed_at = self.clock.monotonic()
        if not self._waiters:
            return
        caps: dict[str, int] = {}
        queues: dict[str, deque[_Waiter]] = {}
        for waiter in self._waiters:
            if not waiter.granted.done():  # (done: cancelled meanwhile, its task removes it)
                queues.setdefault(waiter.tenant, deque()).append(waiter)
        if len(self._served) > _SERVED_KEPT:  # tenants come and go: forget the idle ones
            self._served = {
                t: n for t, n in self._served.items() if t in queues or t in self.tenant_held
            }
        # A burst is mostly events of one policy: once one of a kind does not fit, the others
        # of that kind further back do not either (granting only takes room away in a pass).
        refused: set[frozenset[tuple[str, int]]] = set()
        granted: list[_Waiter] = []
        while queues:
            heads: list[_Waiter] = []
            for tenant in list(queues):
                queue = queues[tenant]
                while queue and (queue[0].kind in refused or not self._fits(queue[0].need, caps)):
                    refused.add(queue.popleft().kind)
                if queue:
                    heads.append(queue[0])
                else:
                    del queues[tenant]
            if not heads:
                break
            # Every head fits now (found since the last grant): the turn decides which goes.
            best = min(heads, key=lambda w: (self._load(w), self._served.get(w.tenant, 0), w.seq))
            queues[best.tenant].popleft()
            self._take(best.need, best.tenant)
            granted.append(best)
        for waiter in granted:
            self._waiters.remove(waiter)
            waiter.granted.set_result(None)

    def _stuck(self, need: Counter[str], since: float) -> list[str]:
        """Agents this waiter waits for that have given back nothing for `stall_s`."""
        now = self.clock.monotonic()
        caps: dict[str, int] = {}
        return sorted(
            a
            for a, n in need.items()
            if not self._room(a, n, caps)
            and now - max(since, self._given_back_at.get(a, since)) >= self.stall_s
        )
