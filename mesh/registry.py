"""The agent registry: live Agent Cards in a JetStream KV bucket, kept fresh by heartbeats.

Key `<agent>.<instance>`; value a `Registration`. The bucket's TTL lets the server drop a dead
agent's entry; readers also check `seen_at` so an entry is never trusted past its TTL even
between server sweeps. A clean stop deletes the entry at once.

Signed cards (`mesh.signing`): readers check each entry's card against MESH_CARD_TRUSTED_KEYS
and MESH_REQUIRE_SIGNED_CARDS (the rule is in `mesh.signing`'s docstring). A refused entry is not
listed and not found by skill; it is logged once per key and revision (a heartbeat is a new
revision). The signature covers the card, not the wrapper, so for a verified card the wrapper
must agree with it: same agent name, same skills, the direct subject of its own instance.
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
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from mesh import subjects
from mesh._internal.retry import RetryPolicy
from mesh.bus import Bus
from mesh.cards import card_to_dict, parse_card
from mesh.signing import CardCheck, CardVerifier

log = logging.getLogger(__name__)

_KEYS_RETRY = RetryPolicy(attempts=4, base_s=0.1, max_s=0.4, jitter=False)


class Registration(msgspec.Struct, frozen=True):
    agent: str
    instance: str
    card: dict[str, Any]
    skills: list[str]
    seen_at: float
    ttl_s: float
    host: str = ""
    pid: int = 0
    direct_subject: str = ""  # this replica's own A2A subject ("" if it has none)

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


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]


class Registry:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.ttl_s = bus.settings.card_ttl_s
        self.heartbeat_s = bus.settings.heartbeat_s
        self._verifier: CardVerifier | None = None  # read side only: built on first read
        self._checked: OrderedDict[bytes, CardCheck] = OrderedDict()  # by card digest
        self._logged: OrderedDict[tuple[str, int], None] = OrderedDict()  # (key, revision)

    @property
    def verifier(self) -> CardVerifier:
        if self._verifier is None:
            self._verifier = CardVerifier.from_settings(self.bus.settings)
        return self._verifier

    def accepts(self, reg: Registration, key: str, revision: int) -> bool:
        """Whether readers may use `reg` (stored at `key`, `revision`); logs a refusal once."""
        reason = self._refusal(reg, key)
        if reason is None:
            return True
        if (key, revision) not in self._logged:
            _remember(self._logged, (key, revision), None)
            log.warning(
                "registry: refused the card of agent %s instance %s (%s revision %d): %s",
                reg.agent,
                reg.instance,
                key,
                revision,
                reason,
            )
        return False

    def _refusal(self, reg: Registration, key: str) -> str | None:
        verifier = self.verifier
        if not verifier.checks_anything:
            return None
        # Heartbeats repeat the same card: its signature is checked once (the wrapper each time).
        digest = hashlib.sha256(_card_enc.encode(reg.card)).digest()
        check = self._checked.get(digest)
        if check is None:
            check = verifier.check(reg.card)
        _remember(self._checked, digest, check)
        if check.refusal is None and check.verified:
            return _mismatch(reg, key)
        return check.refusal

    async def _keys(self, kv: KeyValue) -> list[str]:
        """The bucket's keys. nats-py lists them through an ephemeral consumer, and on a
        clustered bucket under load that consumer can report nothing pending although cards
        are there (seen as "0 live agents" in the cluster tests). "No keys" is believed only
        when the stream's leader also holds no message; otherwise the listing is tried again
        (bounded: a bucket of only deleted cards still ends as no keys)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                keys: list[str] = await kv.keys()
                return keys
            except NoKeysError:
                info = await self.bus.js.stream_info(subjects.kv_stream(subjects.CARDS_BUCKET))
                if not info.state.messages or not await _KEYS_RETRY.sleep(attempt):
                    return []

    async def _kv(self) -> KeyValue:
        return await self.bus.kv(subjects.CARDS_BUCKET, ttl_s=self.ttl_s)

    @contextlib.asynccontextmanager
    async def registered(
        self, card: AgentCard, instance: str, *, direct_subject: str = ""
    ) -> AsyncIterator[Registration]:
        """Publish the card, heartbeat it while the block runs, remove it on exit."""
        kv = await self._kv()

        def current() -> Registration:
            return Registration(
                agent=card.name,
                instance=instance,
                card=card_to_dict(card),
                skills=[s.id for s in card.skills],
                seen_at=time.time(),
                ttl_s=self.ttl_s,
                host=socket.gethostname(),
                pid=os.getpid(),
                direct_subject=direct_subject,
            )

        reg = current()
        await kv.put(reg.key, _enc.encode(reg))

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                try:
                    await kv.put(reg.key, _enc.encode(current()))
                except Exception as e:  # a missed beat is survivable; the next one may land
                    log.warning("registry heartbeat failed: %s", e)

        task = asyncio.create_task(beat(), name=f"heartbeat:{reg.key}")
        try:
            yield reg
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await kv.delete(reg.key)

    async def live(self) -> list[Registration]:
        """Every live registration, sorted by agent then instance."""
        kv = await self._kv()
        keys = await self._keys(kv)
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
    """A watched, in-memory copy of the registry for hot paths (the coordinator per event)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, Registration] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self.registry.verifier  # noqa: B018 -- a signing misconfiguration fails here, not later
        kv = await self.registry._kv()
        watcher = await kv.watchall()

        async def run() -> None:
            async for entry in watcher:
                if entry is None:  # the initial values have all arrived
                    self._ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._entries.pop(entry.key, None)
                    continue
                reg = _decode(entry.value)
                if reg is not None and self.registry.accepts(reg, entry.key, entry.revision or 0):
                    self._entries[entry.key] = reg
                else:  # a refused revision also replaces the one before it
                    self._entries.pop(entry.key, None)

        self._task = asyncio.create_task(run(), name="registry-view")
        self._watcher = watcher
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=5)
        except TimeoutError:
            # An empty bucket may not send the end-of-initial marker on every server version.
            self._ready.set()

    async def stop(self) -> None:
        if self._task:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def instances(self, agent: str) -> list[Registration]:
        now = time.time()
        return [r for r in self._entries.values() if r.agent == agent and r.live(now)]

    def agents_with_skill(self, skill: str) -> list[str]:
        """Names of agents with at least one live instance that has `skill` (sorted)."""
        now = time.time()
        return sorted(
            {r.agent for r in self._entries.values() if skill in r.skills and r.live(now)}
        )


def _decode(value: bytes) -> Registration | None:
    try:
        return _dec.decode(value)
    except msgspec.DecodeError:
        log.warning("ignoring a registry entry that does not decode")
        return None


def _mismatch(reg: Registration, key: str) -> str | None:
    """For a card whose signature verified: the unsigned wrapper must say what the card says."""
    card = reg.card
    if reg.agent != card.get("name") or key != reg.key:
        return f"registration does not match its signed card (agent {reg.agent!r}, key {key})"
    if reg.skills != [s.get("id") for s in card.get("skills", [])]:
        return "registration does not match its signed card (skills)"
    if reg.direct_subject not in ("", subjects.a2a_instance(reg.agent, reg.instance)):
        return "registration does not match its signed card (direct subject)"
    return None


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _REMEMBER:
        cache.popitem(last=False)
