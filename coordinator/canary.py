"""Canary and shadow versions of an agent, and the gate that stops a candidate that disagrees.

A policy may name a candidate version (`mesh.versions`) of one of its voters' agents:

    canary = { agent = "security-review", version = "2.0+3f9a1c0b7d22", share = 0.1,
               sticky = "subject", max_disagreement = 0.2, min_sample = 20 }
    shadow = { agent = "security-review", version = "2.0+3f9a1c0b7d22", share = 1.0 }

Canary: `share` of the events (chosen by a hash of the sticky key, so the same key always goes
the same way) are answered by replicas of the candidate version instead of the stable ones; the
candidate's vote counts. Every other event goes to the stable replicas only (never the
candidate). Shadow: for `share` of the events the candidate is asked too; its vote is recorded in
the decision (`Decision.shadow_votes`, `Vote.shadow`) and never counted; the counted vote comes
from a stable replica.

Sticky keys: `subject` (the event's CloudEvents `subject`, the event id when it has none),
`tenant`, `event_id`. The choice is `sha256(agent, version, key) < share`: deterministic, the
same in every coordinator, and independent across candidates.

The gate (`Book`): after each decision, the candidate's votes are compared, and the counts kept
in the KV bucket `subjects.CANARIES_BUCKET` (one key per agent and version, updated by
compare-and-set, so every coordinator adds to the same counts and reads the same state):
- shadow: the candidate's vote against the stable vote of the same skill on the same event;
- canary: the candidate's vote against the other voters of the same event (the majority of
  their approve/reject votes; no comparison when they have none or tie). The candidate and the
  stable version never answer the same event in a canary, so this compares it with its peers.
Abstentions and non-answers are not compared. Once at least `min_sample` votes were compared and
the share that disagreed is above `max_disagreement`, the candidate is stopped: its state in
the bucket says so (every coordinator routes no more traffic to it, canary or shadow), and the
coordinator whose write stopped it appends a `canary_stopped` audit record and publishes an
alert (`subjects.alert`). Stopped stays stopped until the key is deleted (`mesh canary resume`)
or the policy names another version. Labels (outcomes known afterwards) are not compared here:
`mesh eval` does that offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.records import Decision, Vote

log = logging.getLogger(__name__)

Sticky = Literal["subject", "tenant", "event_id"]
Mode = Literal["canary", "shadow"]
_CAS_ATTEMPTS = 20
ALERT_KIND = "canary_stopped"  # the alert's kind (`subjects.alert`) and the audit record's
SYSTEM_TENANT = "_mesh"  # mesh.audit.SYSTEM_TENANT: a stop belongs to no one tenant


class Rollout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A policy's `canary` or `shadow` table."""

    agent: str
    version: str
    share: float
    sticky: Sticky = "subject"
    max_disagreement: float = 0.2  # stop once the share of compared votes that disagree is above
    min_sample: int = 20  # ...over at least this many compared votes

    def check(self) -> None:
        if not self.agent or not subjects.valid_token(self.agent):
            raise ValueError(f"agent {self.agent!r} is not an agent name")
        if not self.version:
            raise ValueError("version must name the candidate (`mesh agents` shows versions)")
        if not 0 < self.share <= 1:
            raise ValueError("share must be in (0, 1]")
        if not 0 <= self.max_disagreement < 1:
            raise ValueError("max_disagreement must be in [0, 1)")
        if self.min_sample < 1:
            raise ValueError("min_sample must be at least 1")


@dataclass(frozen=True)
class VersionFilter:
    """Which replicas of an agent a call may go to, by composite version (coordinator.canary):
    `only` that version, or `never` those. When none fits: `only` falls back to the versions
    not `never`ed (a canary with no candidate replica goes to stable), while `strict` refuses
    (`coordinator.routing.NoReplica`) rather than reach a version it must not (a stopped
    candidate, or a shadow ask, which must not land on a stable replica)."""

    only: str = ""
    never: frozenset[str] = frozenset()
    strict: bool = False

    def admits(self, version: str) -> bool:
        return (not self.only or version == self.only) and version not in self.never


def sticky_key(rollout: Rollout, event: envelope.Event) -> str:
    match rollout.sticky:
        case "tenant":
            return event.tenant
        case "event_id":
            return event.id
        case _:
            return event.subject or event.id


def picked(rollout: Rollout, event: envelope.Event) -> bool:
    """Whether `event` goes to the candidate: a deterministic hash of its sticky key."""
    key = f"{rollout.agent}\0{rollout.version}\0{sticky_key(rollout, event)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rollout.share


def steer(
    canary: Rollout | None,
    shadow: Rollout | None,
    agent: str,
    event: envelope.Event,
    stopped: frozenset[tuple[str, str]] = frozenset(),
) -> VersionFilter | None:
    """Which replicas of `agent` a counted vote on `event` may come from (None: any)."""
    never: set[str] = set()
    if shadow is not None and shadow.agent == agent:
        never.add(shadow.version)  # the candidate in shadow never casts a counted vote
    if canary is not None and canary.agent == agent:
        if (agent, canary.version) in stopped:
            # No more traffic to a stopped candidate, even with no stable replica left.
            return VersionFilter(never=frozenset({*never, canary.version}), strict=True)
        if picked(canary, event):
            return VersionFilter(only=canary.version)
        never.add(canary.version)
    return VersionFilter(never=frozenset(never)) if never else None


def shadow_of(
    shadow: Rollout | None,
    agents: Iterable[tuple[str, str]],
    event: envelope.Event,
    stopped: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """The skills (of `agents`: skill, agent) whose candidate is asked in shadow on `event`."""
    if shadow is None or (shadow.agent, shadow.version) in stopped:
        return []
    if not picked(shadow, event):
        return []
    return [skill for skill, agent in agents if agent == shadow.agent]


# -- the gate ------------------------------------------------------------------------------
def _said(vote: Vote) -> str:
    """approve / reject, or "" when the vote is nothing to compare (abstain, no answer)."""
    if vote.outcome != "voted" or vote.verdict is None:
        return ""
    return vote.verdict.vote if vote.verdict.vote in ("approve", "reject") else ""


def comparisons(decision: Decision, rollout: Rollout, mode: Mode) -> list[bool]:
    """For each vote of the candidate in `decision` that can be compared: whether it agreed."""
    out = []
    if mode == "shadow":
        stable = {v.skill: _said(v) for v in decision.votes}
        for v in decision.shadow_votes:
            mine = _said(v)
            theirs = stable.get(v.skill, "")
            if v.agent == rollout.agent and v.version == rollout.version and mine and theirs:
                out.append(mine == theirs)
        return out
    for v in decision.votes:
        mine = _said(v)
        if v.agent != rollout.agent or v.version != rollout.version or not mine:
            continue
        others = [_said(o) for o in decision.votes if o is not v]
        approve, reject = others.count("approve"), others.count("reject")
        if approve != reject:
            out.append(mine == ("approve" if approve > reject else "reject"))
    return out


class CanaryState(msgspec.Struct, omit_defaults=True):
    """One candidate's counts and state, as the canaries bucket keeps it."""

    agent: str
    version: str
    mode: Mode
    compared: int = 0
    disagreed: int = 0
    state: Literal["running", "stopped"] = "running"
    reason: str = ""
    stopped_at: float = 0.0
    stopped_by: str = ""  # the coordinator (or `mesh canary stop`) that stopped it

    @property
    def disagreement(self) -> float:
        return self.disagreed / self.compared if self.compared else 0.0


_dec = msgspec.json.Decoder(CanaryState)


def key_of(agent: str, version: str) -> str:
    """The bucket key of a candidate: `<agent>.<sha256(version)[:16]>` (versions hold `+`)."""
    return f"{agent}.{hashlib.sha256(version.encode()).hexdigest()[:16]}"


def judge(state: CanaryState, rollout: Rollout, agreed: list[bool], *, by: str) -> CanaryState:
    """`state` with `agreed` counted in, stopped if it now passes the rollout's threshold."""
    if state.state == "stopped":
        return state
    compared = state.compared + len(agreed)
    disagreed = state.disagreed + agreed.count(False)
    new = msgspec.structs.replace(state, compared=compared, disagreed=disagreed)
    if compared >= rollout.min_sample and disagreed / compared > rollout.max_disagreement:
        reason = (
            f"disagreed on {disagreed} of {compared} compared votes "
            f"({disagreed / compared:.0%} > {rollout.max_disagreement:.0%})"
        )
        new = msgspec.structs.replace(
            new, state="stopped", reason=reason, stopped_at=time.time(), stopped_by=by
        )
    return new


class Book:
    """The canaries bucket as a coordinator sees it: which candidates are stopped (refreshed in
    the background and on every write), and the counts it adds to after each decision."""

    def __init__(
        self,
        kv: KeyValue,
        *,
        name: str,
        keys: Callable[[], Awaitable[list[str]]],
        refresh_s: float = 1.0,
    ) -> None:
        self.kv = kv
        self.name = name
        self._keys = keys  # the bucket's keys (`Bus.kv_keys`)
        self.refresh_s = refresh_s
        self._stopped: frozenset[tuple[str, str]] = frozenset()
        # The bucket's (first, last) stream sequence when it was last read in full.
        self._read_at: tuple[int, int] | None = None

    @classmethod
    async def on_bus(cls, bus: Bus, *, name: str) -> Book:
        kv = await bus.kv(subjects.CANARIES_BUCKET)
        return cls(kv, name=name, keys=functools.partial(bus.kv_keys, subjects.CANARIES_BUCKET))

    @property
    def stopped(self) -> frozenset[tuple[str, str]]:
        return self._stopped

    async def states(self) -> list[CanaryState]:
        out = []
        for key in await self._keys():
            with contextlib.suppress(KeyNotFoundError):
                entry = await self.kv.get(key)
                if entry.value:
                    with contextlib.suppress(msgspec.DecodeError):
                        out.append(_dec.decode(entry.value))
        return out

    async def refresh(self) -> None:
        """Read the bucket again if it changed since the last read (one stream-info request
        says; reading it is a request per key)."""
        state = (await self.kv.status()).stream_info.state
        seen = (state.first_seq, state.last_seq)  # before the read: a write after it reads again
        if seen == self._read_at:
            return
        self._stopped = frozenset(
            (s.agent, s.version) for s in await self.states() if s.state == "stopped"
        )
        self._read_at = seen

    async def follow(self) -> None:
        """Refresh every `refresh_s` until cancelled (a failed read is tried again)."""
        while True:
            try:
                await self.refresh()
            except Exception as e:  # the bus may be in an election: keep the last view
                log.debug("canaries: refresh failed (%s)", e)
            await asyncio.sleep(self.refresh_s)

    async def observe(
        self, decision: Decision, canary: Rollout | None, shadow: Rollout | None
    ) -> list[CanaryState]:
        """Count `decision`'s comparisons for the policy's candidates; the states this call
        stopped (the caller audits and alerts them: exactly one coordinator does, per stop)."""
        stopped = []
        for rollout, mode in ((canary, "canary"), (shadow, "shadow")):
            if rollout is None:
                continue
            agreed = comparisons(decision, rollout, mode)  # type: ignore[arg-type]
            if not agreed:
                continue
            new = await self._add(rollout, mode, agreed)  # type: ignore[arg-type]
            if new is not None:
                stopped.append(new)
        return stopped

    async def _add(self, rollout: Rollout, mode: Mode, agreed: list[bool]) -> CanaryState | None:
        key = key_of(rollout.agent, rollout.version)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
                old = _dec.decode(entry.value) if entry.value else None
                revision = entry.revision
            except KeyNotFoundError:
                old, revision = None, None
            state = old or CanaryState(agent=rollout.agent, version=rollout.version, mode=mode)
            new = judge(state, rollout, agreed, by=self.name)
            if new is state:
                return None  # already stopped: nothing to count
            body = msgspec.json.encode(new)
            try:
                if revision is None:
                    await self.kv.create(key, body)
                else:
                    await self.kv.update(key, body, last=revision)
            except KeyWrongLastSequenceError:
                continue  # another coordinator counted first: read again
            except Exception as e:
                if "wrong last sequence" in str(e) or "key exists" in str(e):
                    continue
                raise
            if new.state == "stopped":
                self._stopped = self._stopped | {(new.agent, new.version)}
                return new
            return None
        log.warning("canaries: %s not counted (%d lost races)", key, _CAS_ATTEMPTS)
        return None

    async def stop(self, agent: str, version: str, reason: str, *, mode: Mode) -> CanaryState:
        """Stop a candidate by hand (`mesh canary stop`): counts kept, state stopped."""
        key = key_of(agent, version)
        try:
            entry = await self.kv.get(key)
            state = _dec.decode(entry.value) if entry.value else None
        except KeyNotFoundError:
            state = None
        state = state or CanaryState(agent=agent, version=version, mode=mode)
        state = msgspec.structs.replace(
            state, state="stopped", reason=reason, stopped_at=time.time(), stopped_by=self.name
        )
        await self.kv.put(key, msgspec.json.encode(state))
        self._stopped = self._stopped | {(agent, version)}
        return state

    async def resume(self, agent: str, version: str) -> bool:
        """Forget a candidate's counts and state (it runs again from zero)."""
        try:
            await self.kv.get(key_of(agent, version))
        except KeyNotFoundError:
            return False
        # A delete marker, not a purge: the bucket refuses rollups (`Bus._harden`).
        await self.kv.delete(key_of(agent, version))
        self._stopped = self._stopped - {(agent, version)}
        return True


class Audit(Protocol):
    async def append(
        self, tenant: str, kind: Any, ref: str, data: dict[str, Any], *, msg_id: str | None = None
    ) -> Any: ...


class Gate:
    """The coordinator's side of the gate: a `Book` on the bus, and what a stop does (one
    `canary_stopped` audit record in the system chain, one alert on `subjects.alert`)."""

    def __init__(
        self,
        book: Book,
        audit: Audit,
        publish: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self.book = book
        self.audit = audit
        self.publish = publish

    @classmethod
    async def on_bus(cls, bus: Bus, audit: Audit, *, name: str) -> Gate:
        book = await Book.on_bus(bus, name=name)
        with contextlib.suppress(Exception):  # the first look; `follow` keeps trying
            await book.refresh()
        return cls(book, audit, bus.nc.publish)

    async def after(
        self, decision: Decision, canary: Rollout | None, shadow: Rollout | None
    ) -> None:
        """Count `decision` for the policy's candidates and act on a stop. Never raises: the
        decision is published already, and a count lost to an outage is only a count."""
        if canary is None and shadow is None:
            return
        try:
            for state in await self.book.observe(decision, canary, shadow):
                await self.stopped(state)
        except Exception:
            log.exception("canary gate: decision %s not counted", decision.event_id)

    async def stopped(self, state: CanaryState) -> None:
        log.warning(
            "canary gate: %s %s of %s stopped: %s",
            state.mode,
            state.version,
            state.agent,
            state.reason,
        )
        key = key_of(state.agent, state.version)
        data = msgspec.to_builtins(state)
        await self.audit.append(
            SYSTEM_TENANT,
            "canary_stopped",
            state.version,
            data,
            msg_id=f"canary_stopped.{key}.{state.stopped_at:.3f}",
        )
        await self.publish(subjects.alert(SYSTEM_TENANT, ALERT_KIND), msgspec.json.encode(data))
