"""A tamper-evident audit trail: one hash chain per tenant in a stream that refuses delete and
purge.

Each record carries the SHA-256 of the previous record of its tenant and its own hash over its
canonical JSON. Appends are serialised per tenant by the server itself: a record is published
with "expected last sequence" over `mesh.audit.<tenant>.*`, so two writers can never fork the
chain — the loser re-reads the tip and tries again. `verify` recomputes every link and names
the first record that does not chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from nats.js.errors import BadRequestError, NotFoundError

from mesh import subjects
from mesh._internal.retry import RetryPolicy
from mesh.bus import Bus
from mesh.errors import AuditContentionError

log = logging.getLogger(__name__)

Kind = Literal["decision", "vote", "dead_letter", "replay", "policy_change", "purge"]
GENESIS = "0" * 64
SYSTEM_TENANT = "_mesh"  # the chain for acts that belong to no tenant (policy changes, purges)
# A lost race means another record landed (progress), so the loser re-reads the tip and tries
# again at once; bounded all the same.
RACE_RETRY = RetryPolicy(attempts=50, base_s=0.0, max_s=0.0, jitter=False)


class AuditRecord(msgspec.Struct, omit_defaults=True):
    tenant: str
    kind: Kind
    ref: str  # what it is about: an event id, a DLQ sequence, a policy file
    actor: str  # who did it: a coordinator, a CLI user
    at: float
    data: dict[str, Any]
    prev: str  # hash of the previous record in this tenant's chain (GENESIS for the first)
    hash: str = ""

    def digest(self) -> str:
        body = msgspec.json.encode(msgspec.structs.replace(self, hash=""))
        return hashlib.sha256(body).hexdigest()


_dec = msgspec.json.Decoder(AuditRecord)


def subject(tenant: str, kind: str) -> str:
    """`mesh.audit.<tenant>.<kind>` (see `subjects.audit`)."""
    return subjects.audit(tenant, kind)


class AuditLog:
    """Appends to the audit chains. Keeps each tenant's tip in memory so a single writer needs
    no read per record; any other writer's append is detected by the server and re-read."""

    def __init__(self, bus: Bus, actor: str) -> None:
        self.bus = bus
        self.actor = actor
        self._tips: dict[str, tuple[int, str]] = {}  # tenant -> (stream seq, hash)
        # One append at a time per tenant in this process: concurrent decisions would only
        # race each other for the tip. Races with other processes are the server's to settle.
        self._locks: dict[str, asyncio.Lock] = {}

    async def append(
        self,
        tenant: str,
        kind: Kind,
        ref: str,
        data: dict[str, Any],
        *,
        msg_id: str | None = None,
    ) -> AuditRecord:
        """Append one record. With `msg_id`, a repeat (say, after a crash and redelivery) within
        the stream's dedup window is dropped by the server instead of recorded twice."""
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            return await self._append(tenant, kind, ref, data, msg_id)

    async def _append(
        self, tenant: str, kind: Kind, ref: str, data: dict[str, Any], msg_id: str | None
    ) -> AuditRecord:
        for attempt in itertools.count(1):
            seq, prev = self._tips.get(tenant) or await self._tip(tenant)
            record = AuditRecord(tenant, kind, ref, self.actor, time.time(), data, prev)
            record.hash = record.digest()
            try:
                ack = await self.bus.publish(
                    subject(tenant, kind),
                    msgspec.json.encode(record),
                    msg_id=msg_id,
                    headers={
                        subjects.H_EXPECTED_LAST_SUBJECT_SEQ: str(seq),
                        subjects.H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: subject(tenant, "*"),
                    },
                )
            except BadRequestError as e:
                if e.err_code not in subjects.JS_WRONG_LAST_SEQUENCE:
                    raise  # anything but "another record won the race"
                self._tips.pop(tenant, None)  # someone else appended: re-read the tip
                if RACE_RETRY.pause(attempt) is None:
                    raise AuditContentionError(tenant, attempt) from None
                continue
            if ack.duplicate:
                self._tips.pop(tenant, None)  # the ack names the earlier copy, not our tip
            else:
                self._tips[tenant] = (ack.seq, record.hash)
            return record
        raise AssertionError("unreachable")  # itertools.count never ends

    async def last(self, tenant: str, kind: Kind) -> AuditRecord | None:
        try:
            msg = await self.bus.js.get_last_msg(subjects.AUDIT_STREAM, subject(tenant, kind))
        except NotFoundError:
            return None
        return _dec.decode(msg.data or b"")

    async def _tip(self, tenant: str) -> tuple[int, str]:
        try:
            last = await self.bus.js.get_last_msg(subjects.AUDIT_STREAM, subject(tenant, "*"))
        except NotFoundError:
            return 0, GENESIS
        return int(last.seq or 0), _dec.decode(last.data or b"").hash


async def read(bus: Bus, tenant: str | None = None) -> list[tuple[int, AuditRecord]]:
    """Every audit record (optionally one tenant's), in stream order, as (sequence, record)."""
    try:
        info = await bus.js.stream_info(subjects.AUDIT_STREAM)
    except NotFoundError:
        return []
    out: list[tuple[int, AuditRecord]] = []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            raw = await bus.js.get_msg(subjects.AUDIT_STREAM, seq)
        except NotFoundError:
            continue  # cannot happen on a deny-delete stream; verify would flag the gap's link
        try:
            record = _dec.decode(raw.data or b"")
        except msgspec.DecodeError:
            record = AuditRecord("?", "decision", "?", "?", 0, {}, "", hash="undecodable")
        if tenant is None or record.tenant == tenant:
            out.append((seq, record))
    return out


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    bad_seq: int | None = None
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"verified {self.count} records"
        return f"record {self.bad_seq} does not chain: {self.problem}"


def verify(records: Iterable[tuple[int, AuditRecord]]) -> Verification:
    """Check every tenant's chain; the first record (in stream order) that breaks one is named."""
    tips: dict[str, str] = {}
    count = 0
    for seq, record in records:
        if record.digest() != record.hash:
            return Verification(False, count, seq, "its content does not match its hash")
        expected = tips.get(record.tenant, GENESIS)
        if record.prev != expected:
            return Verification(
                False,
                count,
                seq,
                f"prev is {record.prev[:12]}…, the chain's previous record is {expected[:12]}…",
            )
        tips[record.tenant] = record.hash
        count += 1
    return Verification(True, count)
