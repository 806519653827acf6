"""The agent registry: live Agent Cards in a JetStream KV bucket, kept fresh by heartbeats.

Key `<agent>.<instance>`; value a `Registration`. The bucket's TTL lets the server drop a dead
agent's entry; readers also check `seen_at` so an entry is never trusted past its TTL even
between server sweeps. A clean stop deletes the entry at once.

Every card is bound to its instance's key and signed (`mesh.signing`): `registered` binds and
signs it with this process's identity, and re-signs it on a heartbeat when half its lifetime is
gone. Readers believe an entry only if its card verifies under the trust file and its binding
names the agent and instance of the key it is stored under, with the subjects the entry gives;
the wrapper's copies (agent, skills, direct subject) must agree with the signed card. A refused
entry is not listed and not found by skill; it is logged once per key and revision (a heartbeat
is a new revision). With MESH_INSECURE=bus nothing is checked.

The `RegistryView` also answers "which key may sign votes for this instance" (`binding`),
including for instances that left a moment ago, so a vote given just before a stop verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from a2a.types import AgentCard
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from mesh import subjects
from mesh._internal.retry import RetryPolicy
from mesh.bus import Bus
from mesh.cards import card_to_dict, parse_card
from mesh.errors import ConfigError
from mesh.identity import Signer
from mesh.signing import (
    CARD_LIFETIME_S,
    NO_TRUSTED_KEY,
    Binding,
    BoundCard,
    CardCheck,
    CardSigner,
    CardVerifier,
    expiry,
    instance_subjects,
)

log = logging.getLogger(__name__)


class Registration(msgspec.Struct, frozen=True):
    """One instance's registry entry: its signed card plus an unsigned wrapper.

    `capacity`: how many A2A requests the instance works on at once (its server's
    `max_concurrency`; past that and a short queue it answers "busy"), for callers that want to
    limit what they send it; 0 = not declared (entries written before it existed decode so).
    Advisory only: it is not part of the signed card, and readers do not check it against the
    card (`_mismatch`), so nothing may rely on it for safety — only for pacing.
    """

    agent: str
    instance: str
    card: dict[str, Any]
    skills: list[str]
    seen_at: float
    ttl_s: float
    host: str = ""
    pid: int = 0
    direct_subject: str = ""  # this replica's own A2A subject ("" if it has none)
    capacity: int = 0  # requests worked on at once; 0 = not declared (advisory, unsigned)
    # The composite version (mesh.versions): a copy of the signed card's `version`, checked
    # against it by readers (`_mismatch`); "" in entries written before it existed.
    version: str = ""

    @property
    def key(self) -> str:
        return subjects.card_key(self.agent, self.instance)

    def live(self, now: float | None = None) -> bool:
        return (now or time.time()) - self.seen_at < self.ttl_s

    def agent_card(self) -> AgentCard:
        return parse_card(self.card, source=f"registry:{self.key}")


_enc = msgspec.json.Encoder()
_card_enc = msgspec.json.Encoder(order="sorted")
_dec = msgspec.json.Decoder(Registration)
_REMEMBER = 4096  # verification results and logged refusals kept (LRU)
# How often a reader looks at the trust file again, so keys issued, retired or revoked while it
# runs count without a restart (a reload that changes it forgets every cached verification).
TRUST_RELOAD_S = 5.0
# A card signed by a key this reader does not trust yet is most often an agent whose identity
# was issued after the reader read the trust file (`mesh creds agent`, a launcher adding a
# replica): look again at once, at most this often, instead of refusing it for TRUST_RELOAD_S.
TRUST_RECHECK_S = 0.5
# How long the view still knows the key of an instance that left (a clean stop deletes its
# entry before its last answers have drained; a take-over re-reads a task another replica of
# the same agent stored): votes it signed verify this long after it is gone. Bounded in count.
DEPARTED_KEEP_S = 300.0
DEPARTED_MAX = 1024
# The registry view: heard nothing for this many heartbeats, it is stale (see `RegistryView`);
# a silent watcher is replaced after that (not sooner than REWATCH_AFTER_MIN_S, so a loaded
# test machine's short heartbeats do not churn watchers), paced from REWATCH_FIRST_S to
# REWATCH_MAX_S while NATS refuses, each try bounded by REWATCH_TIMEOUT_S.
STALE_HEARTBEATS = 2.0
REWATCH_AFTER_MIN_S = 1.0
REWATCH_FIRST_S = 0.5
REWATCH_MAX_S = 5.0
REWATCH_TIMEOUT_S = 5.0
# How long a new view waits for its watcher's replay, and a stop for its watcher (bounded:
# NATS may be gone).
READY_TIMEOUT_S = 5.0
UNWATCH_TIMEOUT_S = 1.0


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]


class Registry:
    def __init__(self, bus: Bus, *, card_lifetime_s: float = CARD_LIFETIME_S) -> None:
        self.bus = bus
        self.ttl_s = bus.settings.card_ttl_s
        self.heartbeat_s = bus.settings.heartbeat_s
        self.card_lifetime_s = card_lifetime_s
        self._verifier: CardVerifier | None = None  # read side only: built on first read
        self._trust_read_at = 0.0
        self._checked: OrderedDict[bytes, CardCheck] = OrderedDict()  # by card digest
        self._logged: OrderedDict[tuple[str, int], None] = OrderedDict()  # (key, revision)

    @property
    def verifier(self) -> CardVerifier:
        """The card verifier of the current trust file (re-read every `TRUST_RELOAD_S`)."""
        now = time.monotonic()
        if self._verifier is None:
            self._verifier = CardVerifier.from_settings(self.bus.settings)
            self._trust_read_at = now
        elif self._verifier.checks_anything and now - self._trust_read_at >= TRUST_RELOAD_S:
            self._reload_trust(now)
        return self._verifier

    def _reload_trust(self, now: float) -> bool:
        """Re-read the trust file; True if it changed (cached verifications are forgotten)."""
        assert self._verifier is not None
        self._trust_read_at = now
        try:
            fresh = CardVerifier.from_settings(self.bus.settings)
        except ConfigError as e:  # being rewritten, or gone: keep what we had
            log.warning("registry: cannot re-read the trust file (%s); keeping the last", e)
            return False
        if _enc.encode(fresh.trust) == _enc.encode(self._verifier.trust):
            return False
        log.info("registry: the trust file changed; checking cards against it")
        self._verifier = fresh
        self._checked.clear()
        return True

    # -- reading --------------------------------------------------------------------------------
    def check(self, reg: Registration, key: str, revision: int) -> CardCheck:
        """Whether readers may use `reg` (stored at `key`, `revision`), and its verified
        binding; a refusal is logged once per key and revision."""
        checked = self._check(reg, key)
        if checked.refusal is not None and (key, revision) not in self._logged:
            _remember(self._logged, (key, revision), None)
            log.warning(
                "registry: refused the card of agent %s instance %s (%s revision %d): %s",
                reg.agent,
                reg.instance,
                key,
                revision,
                checked.refusal,
            )
        return checked

    def accepts(self, reg: Registration, key: str, revision: int) -> bool:
        return self.check(reg, key, revision).refusal is None

    def _check(self, reg: Registration, key: str) -> CardCheck:
        verifier = self.verifier
        if not verifier.checks_anything:
            return CardCheck(None)
        # Heartbeats repeat the same card: its signature is checked once, the expiry and the
        # wrapper every time.
        digest = hashlib.sha256(_card_enc.encode(reg.card)).digest()
        checked = self._checked.get(digest)
        if checked is None:
            checked = verifier.verify(reg.card)
        now = time.monotonic()
        if (
            checked.refusal is not None
            and checked.refusal.startswith(NO_TRUSTED_KEY)
            and now - self._trust_read_at >= TRUST_RECHECK_S
            and self._reload_trust(now)
        ):
            checked = self.verifier.verify(reg.card)
        _remember(self._checked, digest, checked)
        checked = expiry(checked)
        if checked.refusal is None and checked.binding is not None:
            mismatch = _mismatch(reg, key, checked.binding)
            if mismatch is not None:
                return CardCheck(mismatch)
        return checked

    async def _kv(self) -> KeyValue:
        return await self.bus.kv(subjects.CARDS_BUCKET, ttl_s=self.ttl_s)

    # -- writing --------------------------------------------------------------------------------
    def bind(
        self,
        card: AgentCard,
        instance: str,
        *,
        direct_subject: str = "",
        key: Signer | None = None,
    ) -> BoundCard:
        """`card` bound to `instance` and its key (a fresh one unless given), signed with this
        process's identity (unsigned only with MESH_INSECURE=bus and no identity)."""
        signer = CardSigner.of(self.bus.identity, self.bus.settings, agent=card.name)
        return BoundCard(
            card,
            instance=instance,
            key=key or Signer.generate(),
            signer=signer,
            direct_subject=direct_subject,
            lifetime_s=self.card_lifetime_s,
        )

    @contextlib.asynccontextmanager
    async def registered(
        self,
        card: AgentCard | BoundCard,
        instance: str = "",
        *,
        direct_subject: str = "",
        capacity: int = 0,
    ) -> AsyncIterator[Registration]:
        """Publish the card (bound and signed here unless it already is: `bind`), heartbeat it
        while the block runs, re-signing it when due, and remove it on exit. `capacity` goes
        into the entry as declared (see `Registration`).

        A heartbeat put that fails or hangs (bounded: `heartbeat_s`, at least 1 s, at most half
        the TTL) is retried sooner than the next beat (backoff from an eighth of `heartbeat_s`
        up to half of it, for as long as the block runs); each miss, and a beat that comes late
        because this process was too busy to send it, is a warning that says how long ago the
        last beat landed."""
        bound = (
            card
            if isinstance(card, BoundCard)
            else self.bind(card, instance or new_instance_id(), direct_subject=direct_subject)
        )
        kv = await self._kv()

        def current() -> Registration:
            return Registration(
                agent=bound.agent,
                instance=bound.instance,
                card=card_to_dict(bound.card),
                skills=[s.id for s in bound.card.skills],
                seen_at=time.time(),
                ttl_s=self.ttl_s,
                host=socket.gethostname(),
                pid=os.getpid(),
                direct_subject=bound.direct_subject,
                capacity=capacity,
                version=bound.card.version,
            )

        reg = current()
        await kv.put(reg.key, _enc.encode(reg))
        retry = RetryPolicy(
            attempts=2**31, base_s=self.heartbeat_s / 8, max_s=self.heartbeat_s / 2, jitter=False
        )
        # A put may take a while on a loaded box (short test clocks), but never so long that
        # the entry could expire behind it.
        put_timeout = min(max(self.heartbeat_s, 1.0), self.ttl_s / 2)

        async def beat() -> None:
            landed = time.monotonic()
            wait = self.heartbeat_s
            failed = 0
            while True:
                await asyncio.sleep(wait)
                started = time.monotonic()
                try:
                    if bound.refresh():
                        log.debug("registry: re-signed the card of %s", reg.key)
                    # Bounded: a put stuck behind a slow server must not hold back the next
                    # beat (the entry lives only `ttl_s` without one). `asyncio.timeout`, not
                    # `wait_for`: on Python 3.11 `wait_for` can swallow a cancel that lands as
                    # the put completes, and this loop then outlived its agent's shutdown.
                    async with asyncio.timeout(put_timeout):
                        await kv.put(reg.key, _enc.encode(current()))
                except Exception as e:  # a missed beat is survivable; the retry may land
                    failed += 1
                    wait = retry.delay(failed)
                    log.warning(
                        "registry heartbeat of %s failed (%s); the last landed %.1fs ago "
                        "(entry lives %.1fs); retrying in %.2fs",
                        reg.key,
                        type(e).__name__ if isinstance(e, TimeoutError) else e,
                        time.monotonic() - landed,
                        self.ttl_s,
                        wait,
                    )
                    continue
                now = time.monotonic()
                if failed:
                    log.info("registry heartbeat of %s landed again", reg.key)
                elif now - landed > 2 * self.heartbeat_s:
                    # No put failed, yet beats were skipped: this process was too busy to send.
                    log.warning(
                        "registry heartbeat of %s late: %.1fs since the last (every %.1fs; "
                        "entry lives %.1fs)",
                        reg.key,
                        now - landed,
                        self.heartbeat_s,
                        self.ttl_s,
                    )
                failed = 0
                landed = now
                # Keep the cadence: a slow put shortens the next pause rather than adding to it.
                wait = max(0.0, self.heartbeat_s - (now - started))

        task = asyncio.create_task(beat(), name=f"heartbeat:{reg.key}")
        try:
            yield reg
        finally:
            # Cancelled until it is done: on Python 3.11 a cancel that lands as a put completes
            # can be swallowed (by a timeout or the client), and the beat then sleeps on; one
            # `await task` after one cancel hung an agent's shutdown for good.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            with contextlib.suppress(Exception):
                await kv.delete(reg.key)

    async def live(self) -> list[Registration]:
        """Every live registration whose card is believed, sorted by agent then instance."""
        kv = await self._kv()
        keys = await self.bus.kv_keys(subjects.CARDS_BUCKET)  # the stream leader's own list
        now = time.time()
        out = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                reg = _decode(entry.value)
                if (
                    reg is not None
                    and reg.live(now)
                    and self.accepts(reg, key, entry.revision or 0)
                ):
                    out.append(reg)
        return sorted(out, key=lambda r: (r.agent, r.instance))

    async def by_skill(self, skill: str) -> list[Registration]:
        return [r for r in await self.live() if skill in r.skills]


class RegistryView:
    """A watched, in-memory copy of the registry for hot paths (the coordinator per event).

    It keeps its last-known entries while it cannot know better. The view is stale while the
    connection is down, after a watch was refused (until it hears again), or when its watcher
    has heard nothing for `stale_after_s` (two heartbeats) although entries it holds were live
    when the silence began (their agents should be beating). While stale, an entry expires by
    its `seen_at` against the time the view was last current, not against the wall clock, so a
    NATS leader election or reconnect does not empty it; for two more heartbeats after NATS
    was unhealthy entries still expire against that time, so agents' heartbeats can land again
    before they count as gone. A watcher that falls silent while live entries exist (an ordered
    consumer lost in a leader election), or whose task ended, is replaced by a fresh
    `watchall()` (paced from `REWATCH_FIRST_S` to `REWATCH_MAX_S`, the outage logged once); its
    replay drops the entries that went while nobody watched. `stale`, `stale_for_s` and
    `current_since` say how current it is.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, Registration] = {}
        # The same entries by agent name: a route asks for one agent's instances per event.
        self._by_agent: dict[str, dict[str, Registration]] = {}
        self._bindings: dict[str, Binding] = {}  # by key: the verified binding of each entry
        self._departed: OrderedDict[str, tuple[Binding, float]] = OrderedDict()  # → forget at
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None  # nats-py's KeyWatcher (untyped)
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Nothing heard for longer than this (agents beat every heartbeat_s): maybe not current.
        self.stale_after_s = STALE_HEARTBEATS * registry.heartbeat_s
        self._heard_mono = time.monotonic()
        self._heard_wall = time.time()
        # Since when (wall clock) the view has been current without a break.
        self.current_since = self._heard_wall
        # Set while NATS is unhealthy (connection down, a watch refused); the first thing heard
        # after it starts a catch-up: until `_catch_up_until` (monotonic) entries expire against
        # `_catch_up_as_of`. Not after a silence that a watch at the first try shows real
        # (nobody beats: the agents are gone).
        self._nats_trouble = False
        self._catch_up_until = 0.0
        self._catch_up_as_of = 0.0
        self.rewatches = 0  # fresh watchers started after the first (a silent or ended one)

    # -- how current it is ----------------------------------------------------------------------
    def _heard(self) -> None:
        if self.stale:
            self.current_since = time.time()  # current again from now
        if self._nats_trouble:
            self._nats_trouble = False
            self._catch_up_as_of = self._frozen_at()
            self._catch_up_until = time.monotonic() + self.stale_after_s
        self._heard_mono = time.monotonic()
        self._heard_wall = time.time()

    def _frozen_at(self) -> float:
        """The wall time a silence became suspect: entries expire against it while stale."""
        return min(time.time(), self._heard_wall + self.stale_after_s)

    def _stale(self, silent: float) -> bool:
        if self._nats_trouble or not self.registry.bus.nc.is_connected:
            return True
        if silent <= self.stale_after_s:
            return False
        # Silence is news only from agents that should be beating: live when it became suspect.
        frozen = self._frozen_at()
        return any(r.live(frozen) for r in self._entries.values())

    @property
    def stale_for_s(self) -> float:
        """Seconds since the watcher last heard anything, while the view is stale (see the
        class); 0.0 while it is current."""
        silent = time.monotonic() - self._heard_mono
        return max(silent, 1e-3) if self._stale(silent) else 0.0

    @property
    def stale(self) -> bool:
        """True while the view may be behind the registry (see the class)."""
        return self._stale(time.monotonic() - self._heard_mono)

    def _as_of(self) -> float:
        """The wall time entries expire against: now, or while stale (and catching up after
        NATS was unhealthy) the time the view was last known current."""
        if time.monotonic() < self._catch_up_until:
            return min(time.time(), self._catch_up_as_of)
        return self._frozen_at() if self.stale else time.time()

    @property
    def checks_votes(self) -> bool:
        """False with MESH_INSECURE=bus: cards are not checked, so votes cannot be either."""
        return self.registry.verifier.checks_anything

    async def start(self) -> None:
        self.registry.verifier  # noqa: B018 -- a missing trust file fails here, not later
        self._heard_mono = time.monotonic()  # not an outage: the view has not started yet
        self.current_since = time.time()
        await self._watch()
        try:
            # `asyncio.timeout`, not `wait_for` (here and below): on Python 3.11 `wait_for` can
            # swallow a cancel that lands as what it waits for completes (commit d7122e0).
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._ready.wait()
        except TimeoutError:
            # An empty bucket may not send the end-of-initial marker on every server version.
            self._ready.set()
        self._supervisor = asyncio.create_task(self._supervise(), name="registry-view-watch")

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._unwatch()

    async def _watch(self) -> None:
        """Follow the bucket with a fresh watcher: its replay of every key, then changes."""
        kv = await self.registry._kv()
        watcher = await kv.watchall()
        self._heard()  # the server answered: the view is as current as its replay
        self._watcher = watcher
        self._task = asyncio.create_task(self._follow(watcher), name="registry-view")

    async def _unwatch(self) -> None:
        task, watcher, self._task, self._watcher = self._task, self._watcher, None, None
        if watcher is not None:
            with contextlib.suppress(Exception):  # NATS may be gone: bounded, best effort
                async with asyncio.timeout(UNWATCH_TIMEOUT_S):
                    await watcher.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _follow(self, watcher: Any) -> None:
        replayed: set[str] | None = set()  # keys in the replay, until its end marker
        async for entry in watcher:
            self._heard()
            if entry is None:  # the initial values have all arrived
                if replayed is not None:
                    # Keys that went while nobody watched (aged out, purged) are not replayed;
                    # one still usable (catching up after an outage) expires by its seen_at.
                    as_of = self._as_of()
                    for key, known in list(self._entries.items()):
                        if key not in replayed and not self._usable(known, as_of):
                            self._forget(key)
                replayed = None
                self._ready.set()
                continue
            if replayed is not None:
                replayed.add(entry.key)
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self._forget(entry.key)
                continue
            reg = _decode(entry.value)
            checked = (
                self.registry.check(reg, entry.key, entry.revision or 0)
                if reg is not None
                else CardCheck("does not decode")
            )
            if reg is not None and checked.refusal is None:
                self._keep(entry.key, reg)
                if checked.binding is not None:
                    self._bindings[entry.key] = checked.binding
                    self._departed.pop(entry.key, None)
            else:  # a refused revision also replaces the one before it
                self._forget(entry.key)

    def _needs_rewatch(self) -> str:
        """Why the watcher must be replaced ("" if it need not)."""
        task = self._task
        if task is None:
            return "not running"
        if task.done():
            error = None if task.cancelled() else task.exception()
            return f"ended ({error!r})" if error is not None else "ended"
        silent = time.monotonic() - self._heard_mono
        if silent > max(self.stale_after_s, REWATCH_AFTER_MIN_S):
            as_of = self._as_of()
            if any(r.live(as_of) for r in self._entries.values()):
                return f"silent for {silent:.1f} s"
        return ""

    async def _supervise(self) -> None:
        """Replace a watcher that ended or fell silent; bounded pauses, one log per outage."""
        check_s = self.stale_after_s / 2
        outage_since: float | None = None
        failures = 0
        while True:
            await asyncio.sleep(
                check_s
                if failures == 0
                else min(REWATCH_MAX_S, REWATCH_FIRST_S * 2 ** (failures - 1))
            )
            if not self.registry.bus.nc.is_connected:
                self._nats_trouble = True
            why = self._needs_rewatch() if failures == 0 else "still not watching"
            if not why:
                continue
            if outage_since is None:
                outage_since = time.monotonic()
                log.warning(
                    "registry view: watcher %s; keeping %d last-known entries and watching again",
                    why,
                    len(self._entries),
                )
            await self._unwatch()
            try:
                async with asyncio.timeout(REWATCH_TIMEOUT_S):
                    await self._watch()
            except Exception as e:  # NATS unhealthy: try again later, entries kept
                self._nats_trouble = True
                failures += 1
                log.debug("registry view: watching again failed: %r", e)
                continue
            self.rewatches += 1
            log.info(
                "registry view: watching again, %.1f s after it stopped hearing",
                time.monotonic() - outage_since + self.stale_after_s,
            )
            outage_since, failures = None, 0

    def _keep(self, key: str, reg: Registration) -> None:
        old = self._entries.get(key)
        if old is not None and old.agent != reg.agent:
            self._unindex(key, old.agent)
        self._entries[key] = reg
        self._by_agent.setdefault(reg.agent, {})[key] = reg

    def _unindex(self, key: str, agent: str) -> None:
        entries = self._by_agent.get(agent)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._by_agent[agent]

    def _forget(self, key: str) -> None:
        """The entry at `key` is gone (or refused): its binding is kept a while (`binding`)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._unindex(key, old.agent)
        binding = self._bindings.pop(key, None)
        if binding is not None:
            _remember(self._departed, key, (binding, time.time() + DEPARTED_KEEP_S))
            while len(self._departed) > DEPARTED_MAX:
                self._departed.popitem(last=False)

    def _usable(self, r: Registration, as_of: float) -> bool:
        if not r.live(as_of):
            return False
        binding = self._bindings.get(r.key)
        # A card's signed lifetime runs on the wall clock, outage or not.
        return binding is None or not binding.expired(time.time())

    def instances(self, agent: str) -> list[Registration]:
        now = self._as_of()
        entries = self._by_agent.get(agent)
        if not entries:
            return []
        return [r for r in entries.values() if self._usable(r, now)]

    def agents_with_skill(self, skill: str) -> list[str]:
        """Names of agents with at least one live instance that has `skill` (sorted)."""
        now = self._as_of()
        return sorted(
            {r.agent for r in self._entries.values() if skill in r.skills and self._usable(r, now)}
        )

    def version(self, agent: str, instance: str) -> str:
        """The version `agent`'s instance `instance` runs, as its verified card says ("" when
        this view holds no entry for it: it left, or was never believed)."""
        if not subjects.valid_token(instance):
            return ""
        reg = self._entries.get(subjects.card_key(agent, instance))
        if reg is None or subjects.card_key(agent, instance) not in self._bindings:
            # Not checked (MESH_INSECURE=bus) or not believed: the wrapper's word only.
            return reg.version if reg is not None and not self.checks_votes else ""
        return str(reg.card.get("version", ""))

    def binding(self, agent: str, instance: str) -> Binding | None:
        """The verified binding of `agent`'s instance `instance` (the key its votes verify
        with), while it is registered and for `DEPARTED_KEEP_S` after it left; None if this
        view never believed a card for it, or forgot it."""
        if not subjects.valid_token(instance):
            return None
        key = subjects.card_key(agent, instance)
        now = time.time()
        reg = self._entries.get(key)
        binding = self._bindings.get(key)
        if reg is not None and binding is not None:
            # An entry whose heartbeats stopped without a delete: it left at its last beat.
            if now - reg.seen_at < reg.ttl_s + DEPARTED_KEEP_S:
                return binding
            return None
        gone = self._departed.get(key)
        if gone is not None and now < gone[1]:
            return gone[0]
        return None


def _decode(value: bytes) -> Registration | None:
    try:
        return _dec.decode(value)
    except msgspec.DecodeError:
        log.warning("ignoring a registry entry that does not decode")
        return None


def _mismatch(reg: Registration, key: str, binding: Binding) -> str | None:
    """For a card whose signature verified: the key it is stored under and the unsigned
    wrapper must say what its binding and card say."""
    card = reg.card
    if binding.agent != reg.agent or binding.instance != reg.instance or key != reg.key:
        return (
            f"the card is bound to {binding.agent}/{binding.instance}, not stored as such "
            f"(key {key}, agent {reg.agent!r}, instance {reg.instance!r})"
        )
    if reg.agent != card.get("name"):
        return f"registration does not match its signed card (agent {reg.agent!r})"
    if reg.skills != [s.get("id") for s in card.get("skills", [])]:
        return "registration does not match its signed card (skills)"
    if reg.direct_subject not in ("", subjects.a2a_instance(reg.agent, reg.instance)):
        return "registration does not match its signed card (direct subject)"
    if binding.subjects != instance_subjects(reg.agent, reg.direct_subject):
        return "registration does not match its signed card (subjects)"
    if reg.version and reg.version != card.get("version"):
        return "registration does not match its signed card (version)"
    return None


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _REMEMBER:
        cache.popitem(last=False)
