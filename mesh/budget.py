"""Budgets that travel: what a call may still spend, checked before every model call.

An event's budget is set by its publisher as CloudEvents extension attributes (`budget`: cost in
micro-USD, `budgettokens`, `budgettoolcalls`, `budgetms`: wall clock from the event's `time`).
It rides to each agent in the A2A message metadata (`meshBudget`, `Budget` as JSON) and on to
every delegation. Spending is shared: every model call of one event, in any agent or replica,
reserves its worst case in the `mesh_budgets` KV bucket (compare-and-set) before it is made and
settles the real figure after, so parallel voters cannot overspend between them. A call whose
worst case does not fit is not made: `BudgetExceededError`, and the agent votes
`budget_exceeded` (mesh.agent).

Per-tenant quotas (models file `[tenants.<t>]`, docs/budgets.md): cost per UTC day (same bucket,
`day.<tenant>.<date>`) and model calls at once in the whole mesh (leased slots
`conc.<tenant>.<i>`, same bucket); a tenant past either is refused at once, so its runaway never
takes the slots or the spend of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from mesh import subjects
from mesh.errors import BudgetExceededError, MeshError, ModelCallError
from mesh.providers import price_of, tenant_quota
from mesh.records import event_token
from mesh.settings import Settings, get_settings

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from mesh.bus import Bus
    from mesh.envelope import Event
    from mesh.verdict import Verdict

log = logging.getLogger(__name__)

# What a vote refused for its budget says (mesh.agent.BUDGET_EXCEEDED): the start of its first
# reason, and the coordinator's CallOutcome for it.
BUDGET_EXCEEDED = "budget_exceeded"
KV_TTL_S = 36 * 3600.0
# A model-call slot's lease: twice the model timeout, at least this (a holder that died gives its
# slot back after the lease at most; a live call ends at its timeout, well inside it).
LEASE_MIN_S = 60.0  # a day's key outlives its day; an event's outlives its decision
_CAS_ATTEMPTS = 50


class Budget(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """What is left; None: no limit of that kind. `deadline` is Unix time."""

    cost_micro_usd: int | None = None
    tokens: int | None = None
    tool_calls: int | None = None
    deadline: float | None = None

    @property
    def limited(self) -> bool:
        return any(v is not None for v in msgspec.structs.astuple(self))

    @classmethod
    def of_event(cls, event: Event) -> Budget:
        deadline = None
        ms = getattr(event, "budgetms", None)
        if ms is not None:
            start = event.time.timestamp() if event.time else time.time()
            deadline = start + ms / 1000
        return cls(
            cost_micro_usd=event.budget,
            tokens=getattr(event, "budgettokens", None),
            tool_calls=getattr(event, "budgettoolcalls", None),
            deadline=deadline,
        )

    def metadata(self) -> dict[str, Any]:
        """The A2A metadata entry that carries it (empty when nothing is limited)."""
        return {subjects.META_BUDGET: msgspec.to_builtins(self)} if self.limited else {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Budget:
        raw = metadata.get(subjects.META_BUDGET)
        if not isinstance(raw, Mapping):
            return cls()
        try:
            # Numbers cross protobuf's Struct as doubles: 1200 arrives as 1200.0.
            return msgspec.convert(dict(raw), cls, strict=False)
        except msgspec.ValidationError:
            log.warning("ignoring a malformed %s entry", subjects.META_BUDGET)
            return cls()

    def remaining_s(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


class Spent(msgspec.Struct, omit_defaults=True):
    cost_micro_usd: int = 0
    tokens: int = 0
    tool_calls: int = 0


@dataclass
class CallScope:
    """Who a call is for and what it may spend: set by the agent runtime for each A2A task,
    read by the brains (before a model call) and by `mesh.delegate`."""

    tenant: str = ""
    event_id: str = ""
    budget: Budget = field(default_factory=Budget)
    hops: int = 0
    agent: str = ""
    ledger: BudgetLedger | None = None
    bus: Bus | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the caller's (traceparent...)


current: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar(
    "mesh_call_scope", default=None
)


def refused_for_budget(verdict: Verdict | None) -> bool:
    """Whether a verdict is an agent's refusal to spend past the budget: an abstention whose
    first reason starts `budget_exceeded:`. Read from the signed verdict, not the artifact's
    unsigned `brain`, so nobody on the path can relabel a vote as one."""
    return (
        verdict is not None
        and verdict.vote == "abstain"
        and bool(verdict.reasons)
        and verdict.reasons[0].startswith(BUDGET_EXCEEDED + ":")
    )


def cost_micro_usd(
    model: str, input_tokens: int, output_tokens: int, settings: Settings | None = None
) -> int:
    price_in, price_out = price_of(model, settings)
    # Rounded up: a budget never lets a fraction of a micro-dollar slip through.
    return math.ceil(input_tokens * price_in + output_tokens * price_out)


def estimate_input_tokens(text: str) -> int:
    """A worst case for the prompt's tokens without asking the API: one per two characters
    (Claude's tokenizer averages 3-4 characters per token in English)."""
    return len(text) // 2 + 16


class BudgetLedger:
    """Reservations against an event's budget and its tenant's daily quota, in the KV bucket
    (or in memory when there is no bus: unit tests, `Agent.override` without a mesh)."""

    def __init__(self, bus: Bus | None = None, *, settings: Settings | None = None) -> None:
        self.bus = bus
        self.settings = settings or (bus.settings if bus else get_settings())
        self._kv: KeyValue | None = None
        self._memory: dict[str, bytes] = {}
        self._lock = asyncio.Lock()
        self._active: dict[str, int] = {}  # slots this process holds, per tenant (_take_slot)
        self._holder = f"{socket.gethostname()}:{os.getpid()}"

    async def _bucket(self) -> KeyValue | None:
        if self.bus is None:
            return None
        if self._kv is None:
            self._kv = await self.bus.kv(subjects.BUDGETS_BUCKET, ttl_s=KV_TTL_S)
        return self._kv

    async def _add(self, key: str, delta: Spent, check: Any = None) -> Spent:
        """CAS-add `delta` to `key`; `check(total)` may raise before anything is written."""
        kv = await self._bucket()
        if kv is None:
            async with self._lock:
                raw = self._memory.get(key)
                total = _plus(msgspec.json.decode(raw, type=Spent) if raw else Spent(), delta)
                if check:
                    check(total)
                self._memory[key] = msgspec.json.encode(total)
                return total
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await kv.get(key)
                current_value = msgspec.json.decode(entry.value or b"{}", type=Spent)
                revision: int | None = entry.revision
            except KeyNotFoundError:
                current_value, revision = Spent(), None
            total = _plus(current_value, delta)
            if check:
                check(total)
            try:
                if revision is None:
                    await kv.create(key, msgspec.json.encode(total))
                else:
                    await kv.update(key, msgspec.json.encode(total), last=revision)
                return total
            except KeyWrongLastSequenceError:
                continue  # another call wrote first: read again
            except Exception as e:  # create() of a key another call just created
                if "wrong last sequence" in str(e).lower() or "key exists" in str(e).lower():
                    continue
                raise
        raise BudgetExceededError(
            f"budget {key}: {_CAS_ATTEMPTS} writers raced; refusing rather than overspend",
            limit="contention",
        )

    async def read(self, key: str) -> Spent:
        kv = await self._bucket()
        if kv is None:
            raw = self._memory.get(key)
            return msgspec.json.decode(raw, type=Spent) if raw else Spent()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return Spent()
        return msgspec.json.decode(entry.value or b"{}", type=Spent)

    async def tool_call(self, scope: CallScope) -> None:
        """Count one tool call (a delegation) against the event's budget, or refuse it."""
        if not (scope.budget.limited and scope.event_id):
            return
        left = scope.budget.remaining_s()
        if left is not None and left <= 0:
            raise BudgetExceededError(
                f"event {scope.event_id}: its wall-clock budget ran out", limit="wall_clock"
            )
        key = subjects.budget_event_key(scope.tenant, event_token(scope.event_id))
        await self._add(key, Spent(tool_calls=1), _event_check(scope, scope.budget))

    @contextlib.asynccontextmanager
    async def model_call(
        self, scope: CallScope, *, model: str, prompt_text: str, max_tokens: int
    ) -> AsyncIterator[Reservation]:
        """Reserve the worst case of one model call (raises BudgetExceededError: not made),
        hold a tenant concurrency slot, then settle what it really cost."""
        worst_in = estimate_input_tokens(prompt_text)
        worst = Spent(
            cost_micro_usd=cost_micro_usd(model, worst_in, max_tokens, self.settings),
            tokens=worst_in + max_tokens,
            tool_calls=1,
        )
        budget = scope.budget
        left = budget.remaining_s()
        if left is not None and left <= 0:
            raise BudgetExceededError(
                f"event {scope.event_id}: its wall-clock budget ran out {-left:.1f}s ago",
                limit="wall_clock",
            )
        quota = tenant_quota(scope.tenant, self.settings)
        slot = await self._take_slot(scope.tenant, quota.concurrent_calls)
        reserved: list[tuple[str, Spent]] = []
        reservation = Reservation(worst=worst, settings=self.settings)
        try:
            try:
                if budget.limited and scope.event_id:
                    key = subjects.budget_event_key(scope.tenant, event_token(scope.event_id))
                    await self._add(key, worst, _event_check(scope, budget))
                    reserved.append((key, worst))
                if quota.cost_per_day_usd is not None:
                    key = subjects.budget_day_key(scope.tenant, today())
                    await self._add(key, worst, _day_check(scope.tenant, quota.cost_per_day_usd))
                    reserved.append((key, worst))
            except (BudgetExceededError, asyncio.CancelledError):
                raise
            except Exception as e:
                # Fail closed: no model call whose spending cannot be recorded. A chain moves
                # on (the rules cost nothing).
                raise ModelCallError(
                    f"budget store unavailable, model call not made: {e!r}", retryable=True
                ) from e
            yield reservation
        finally:
            await self._give_back(slot)
            for key, held in reserved:
                # Give back what was held beyond the real figure (all but the attempt itself
                # when the call failed before saying what it cost).
                spent = reservation.actual or Spent(tool_calls=1)
                back = Spent(
                    cost_micro_usd=spent.cost_micro_usd - held.cost_micro_usd,
                    tokens=spent.tokens - held.tokens,
                    tool_calls=spent.tool_calls - held.tool_calls,
                )
                try:
                    await self._add(key, back)
                except Exception:  # settling is best effort: the reservation errs high
                    log.warning("could not settle budget key %s", key, exc_info=True)

    def refuses_at_once(self, tenant: str) -> bool:
        """Whether this tenant's next model call here would be refused without a round trip:
        this process holds every one of its `concurrent_calls` slots (`_take_slot`). The agent
        answers such a call on the lean path (mesh.agent). A quota that cannot be read says
        False: the call goes the usual way, which reports it."""
        if not self._active.get(tenant):
            return False
        try:
            cap = tenant_quota(tenant, self.settings).concurrent_calls
        except MeshError:
            return False
        return cap is not None and self._active[tenant] >= cap

    async def _take_slot(self, tenant: str, cap: int | None) -> _Slot | None:
        """One of the tenant's `cap` model-call slots, or BudgetExceededError at once (never
        queued: a flood must not hold others' A2A slots while it waits).

        With a bus, the slots are keys `conc.<tenant>.<i>` of the budgets bucket, shared by every
        agent process: a slot is taken by creating its key (atomic), given back by deleting it
        at the revision written. A holder that dies without giving it back holds it for
        `lease_s` at most: an expired lease is taken over with a compare-and-set. Cost: one
        create when a slot is free, up to 2·cap round trips to refuse; none when this process
        holds all `cap` itself (a flood's calls pile up where its slow calls run), so a
        refusal costs the other tenants' calls in this process nothing but a check. No bus:
        counted here only."""
        if cap is None:
            return None
        if self._active.get(tenant, 0) >= cap:  # what this process holds: a lower bound
            raise _over_concurrency(tenant, cap)
        kv = await self._bucket()
        slot = _Slot(tenant) if kv is None else await self._take_bus_slot(kv, tenant, cap)
        self._active[tenant] = self._active.get(tenant, 0) + 1
        return slot

    async def _take_bus_slot(self, kv: KeyValue, tenant: str, cap: int) -> _Slot:
        lease_s = max(LEASE_MIN_S, 2 * self.settings.model_timeout_s)
        try:
            for i in range(cap):
                key = subjects.budget_slot_key(tenant, i)
                now = time.time()
                lease = msgspec.json.encode(Lease(until=now + lease_s, holder=self._holder))
                try:
                    return _Slot(tenant, key, await kv.create(key, lease))
                except Exception as e:
                    if not _taken(e):
                        raise
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    continue  # given back meanwhile: the next caller takes it
                held = msgspec.json.decode(entry.value or b"{}", type=Lease)
                if held.until >= now or entry.revision is None:
                    continue
                try:  # an expired lease (its holder died): taken over
                    return _Slot(tenant, key, await kv.update(key, lease, last=entry.revision))
                except Exception as e:
                    if not _taken(e):
                        raise
        except BudgetExceededError:
            raise
        except Exception as e:
            # Fail closed, as for spending: no call whose slot cannot be recorded.
            raise ModelCallError(
                f"budget store unavailable, model call not made: {e!r}", retryable=True
            ) from e
        raise _over_concurrency(tenant, cap)

    async def _give_back(self, slot: _Slot | None) -> None:
        if slot is None:
            return
        self._active[slot.tenant] -= 1
        if slot.key is None:
            return
        kv = await self._bucket()
        assert kv is not None
        try:
            await kv.delete(slot.key, last=slot.revision)
        except Exception:  # taken over after its lease ran out, or the store is down
            log.warning("could not give back model-call slot %s", slot.key, exc_info=True)


@dataclass
class _Slot:
    """A model-call slot a call holds: a key of the budgets bucket at the revision written, or
    (no bus) only this process's count."""

    tenant: str
    key: str | None = None
    revision: int = 0


class Lease(msgspec.Struct, omit_defaults=True):
    until: float  # Unix time after which another call may take the slot over
    holder: str = ""  # who holds it (a process), for whoever reads the bucket


def _taken(e: Exception) -> bool:
    if isinstance(e, KeyWrongLastSequenceError):
        return True
    text = str(e).lower()
    return "wrong last sequence" in text or "key exists" in text


def _over_concurrency(tenant: str, cap: int) -> BudgetExceededError:
    return BudgetExceededError(
        f"tenant {tenant}: already {cap} model call(s) at once in the mesh (its quota)",
        limit="tenant_concurrent_calls",
    )


@dataclass
class Reservation:
    worst: Spent
    settings: Settings | None = None
    actual: Spent | None = None

    def settle(self, model: str, input_tokens: int, output_tokens: int) -> None:
        self.actual = Spent(
            cost_micro_usd=cost_micro_usd(model, input_tokens, output_tokens, self.settings),
            tokens=input_tokens + output_tokens,
            tool_calls=1,
        )


def _plus(a: Spent, b: Spent) -> Spent:
    return Spent(
        cost_micro_usd=max(0, a.cost_micro_usd + b.cost_micro_usd),
        tokens=max(0, a.tokens + b.tokens),
        tool_calls=max(0, a.tool_calls + b.tool_calls),
    )


def _event_check(scope: CallScope, budget: Budget) -> Any:
    def check(total: Spent) -> None:
        for limit, used, cap in (
            ("cost", total.cost_micro_usd, budget.cost_micro_usd),
            ("tokens", total.tokens, budget.tokens),
            ("tool_calls", total.tool_calls, budget.tool_calls),
        ):
            if cap is not None and used > cap:
                raise BudgetExceededError(
                    f"event {scope.event_id}: this call's worst case would bring its {limit} "
                    f"to {used} of {cap}",
                    limit=limit,
                )

    return check


def _day_check(tenant: str, cap_usd: float) -> Any:
    def check(total: Spent) -> None:
        if total.cost_micro_usd > cap_usd * 1e6:
            raise BudgetExceededError(
                f"tenant {tenant}: this call's worst case would bring today's model cost to "
                f"${total.cost_micro_usd / 1e6:.4f} of its ${cap_usd:.2f} a day",
                limit="tenant_cost_per_day",
            )

    return check


def today() -> str:
    """The UTC date that names a tenant's daily key."""
    return datetime.now(UTC).strftime("%Y-%m-%d")
