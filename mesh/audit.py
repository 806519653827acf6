"""An audit trail an auditor can trust: signed records in one hash chain per tenant, signed
checkpoints kept apart from them, and one verifier that works on the live stream and offline.

Records. Each record of `MESH_AUDIT` (`mesh.audit.<tenant>.<kind>`, deny delete and purge)
holds the hash of the previous record of its tenant, its own position (`index`, 1 = first) and
its SHA-256 over its canonical JSON without `hash` and `signature`; the writer signs that hash
(purpose "audit"). Its `actor` is the `role:name` of the identity that signed it, never a name
the writer chose. A record *belongs* to its chain when it is signed by a key the trust file lists
for audits, under that key's own `role:name`, on its own tenant's subject. Anything else on
`mesh.audit.<tenant>.*` (a foreign or forged message) is reported by `verify` and skipped: the
writer chains from the last record that belongs, while appends stay ordered by the server's
expected-last-subject-sequence over the tenant's subjects, foreign messages included.

Checkpoints. Like a transparency log's signed tree heads, a writer periodically signs, per
tenant, (record count, head hash, its stream sequence, the audit stream's creation time) and
publishes it on `mesh.checkpoint.<tenant>` in `MESH_CHECKPOINTS`. Before each checkpoint it
checks that the chain still holds the previous one; if not (truncated, emptied, re-created) the
new checkpoint says so, and so does every later one (`broken` is kept), so the loss stays
evident whoever looks later.

Verification (`verify_bundle`, behind `mesh audit verify`): every record's hash, signature and
chain link; the latest checkpoint of each tenant (signature, still contained in the chain, made
for this very stream); and the stream's configuration (no delete, no purge, no limit that drops
records). `snapshot` reads what that needs into a `Bundle`, which `mesh audit export` writes and
`mesh audit verify --bundle` checks offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError

from mesh import subjects
from mesh._internal.retry import RetryPolicy
from mesh.bus import STREAMS, Bus, StreamSpec
from mesh.errors import AuditContentionError
from mesh.identity import Signer, Trust, require_trust
from mesh.records import trusted_signer

log = logging.getLogger(__name__)

Kind = Literal[
    "decision",
    "vote",
    "dead_letter",
    "replay",
    "policy_change",
    "purge",
    "forgery",
    "authz_policy",  # an authorization policy set taken or refused (mesh.authz)
    "forbidden",  # an act an authorization policy denied (mesh.authz)
    "approval",  # a person asked, escalated, answered, refused or silent (coordinator.humans)
    "canary_stopped",  # a candidate version stopped by the canary gate (coordinator.canary)
]
GENESIS = "0" * 64
SYSTEM_TENANT = "_mesh"  # the chain for acts that belong to no tenant (policy changes, purges)
# A lost race means another record landed (progress), so the loser re-reads the tip and tries
# again at once; bounded all the same.
RACE_RETRY = RetryPolicy(attempts=50, base_s=0.0, max_s=0.0, jitter=False)
# A checkpoint after this many new records of a tenant, whatever the clock says: it bounds how
# far past its checkpoint a restarted writer scans for the chain's tip (when a foreign message
# sits on top), and how much of a burst is anchored only by the chain itself.
CHECKPOINT_EVERY_RECORDS = 1000
# And at least this often while records come (the coordinator's timer, and when it stops): an
# auditor's view is never further behind; a quiet tenant gets none (nothing new to anchor). At
# one small signed message per busy tenant per interval per coordinator, the cost is noise.
CHECKPOINT_EVERY_S = 10.0
# Records may be missing from the start of a chain only if they could have expired (max_age):
# this much leeway for the clocks of writer and server.
AGE_SLACK_S = 3600.0
BUNDLE_FORMAT = "quorum-mesh/audit-bundle/1"


class AuditRecord(msgspec.Struct, omit_defaults=True):
    tenant: str
    kind: Kind
    ref: str  # what it is about: an event id, a DLQ sequence, a policy file
    actor: str  # who did it: `role:name` of the identity whose key signed it
    at: float
    data: dict[str, Any]
    prev: str  # hash of the previous record in this tenant's chain (GENESIS for the first)
    hash: str = ""
    index: int = 0  # position in the tenant's chain (1 = first)
    instance: str = ""  # the writer's own name for itself (a coordinator instance): unverified
    signer: str = ""  # key id of the key that signed the hash (purpose "audit")
    signature: str = ""

    def digest(self) -> str:
        """SHA-256 over the canonical record without `hash` and `signature`."""
        body = msgspec.json.encode(msgspec.structs.replace(self, hash="", signature=""))
        return hashlib.sha256(body).hexdigest()


class Checkpoint(msgspec.Struct, omit_defaults=True):
    """A writer's signed statement of one tenant's chain (purpose "checkpoint")."""

    tenant: str
    count: int  # records in the chain up to `head` (its index)
    head: str  # hash of the chain's last record
    seq: int  # that record's sequence in MESH_AUDIT
    stream_created: str  # MESH_AUDIT's creation time as its server reports it (ISO 8601)
    at: float
    broken: str = ""  # why the chain no longer holds an earlier checkpoint; kept once set
    instance: str = ""
    signer: str = ""
    signature: str = ""

    def payload(self) -> bytes:
        return msgspec.json.encode(msgspec.structs.replace(self, signature=""))


_dec = msgspec.json.Decoder(AuditRecord)
_cp_dec = msgspec.json.Decoder(Checkpoint)


def subject(tenant: str, kind: str) -> str:
    """`mesh.audit.<tenant>.<kind>` (see `subjects.audit`)."""
    return subjects.audit(tenant, kind)


def _subject_tenant(subj: str, root: str) -> str:
    parts = subj.split(".")
    return parts[2] if len(parts) >= 3 and subj.startswith(root + ".") else ""


def _decode(data: bytes) -> AuditRecord | None:
    try:
        return _dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def votes_of(record: AuditRecord) -> list[dict[str, Any]]:
    """The votes an audit record holds: a decision record's `votes` (since issue 14 every
    vote is inside its decision's record), or the one vote of a `vote` record (the older
    shape: one record per vote after its decision's; still written by older coordinators,
    kept and verified like any other record)."""
    if record.kind == "vote":
        return [record.data]
    votes = record.data.get("votes") if record.kind == "decision" else None
    return [v for v in votes if isinstance(v, dict)] if isinstance(votes, list) else []


def _said(vote: dict[str, Any]) -> str:
    verdict = vote.get("verdict")
    said = verdict.get("vote") if isinstance(verdict, dict) else None
    return str(said) if said and vote.get("outcome") == "voted" else str(vote.get("outcome", "?"))


def summary(record: AuditRecord) -> str:
    """One line for people: a decision's outcome and its votes (`skill=what it said`)."""
    votes = ", ".join(f"{v.get('skill', '?')}={_said(v)}" for v in votes_of(record))
    if record.kind == "decision":
        outcome = str(record.data.get("outcome", ""))
        return f"{outcome}; votes: {votes}" if votes else outcome
    if record.kind == "vote":
        return f"vote {votes}"
    if record.kind == "dead_letter":
        return str(record.data.get("reason", ""))
    return ""


Judgement = Literal["belongs", "altered", "foreign"]


def judge(trust: Trust | None, record: AuditRecord, subj: str) -> tuple[Judgement, str]:
    """Whether `record`, read from `subj`, belongs to its chain; "altered" when its hash or
    its trusted signer's signature does not match its content (it sits in the chain, changed),
    "foreign" when nobody trusted wrote it there. With the reason. Without `trust`
    (MESH_INSECURE=bus) only the hash and the subject are checked."""
    if _subject_tenant(subj, subjects.AUDIT_ROOT) != record.tenant:
        return "foreign", f"it says tenant {record.tenant!r} but sits on {subj}"
    if trust is not None and trust.signer_of(record.signer, "audit") is None:
        refusal = trust.refusal(
            record.signer, "audit", record.hash.encode(), record.signature, at=record.at
        )
        return "foreign", refusal or "unsigned"
    if record.digest() != record.hash:
        return "altered", "its content does not match its hash"
    if trust is None:
        return "belongs", ""
    refusal = trust.refusal(
        record.signer, "audit", record.hash.encode(), record.signature, at=record.at
    )
    if refusal is not None:
        return "altered", f"{refusal} (key {record.signer})"
    entry = trust.keys[record.signer]
    if record.actor != f"{entry.role}:{entry.name}":
        return "altered", f"it names actor {record.actor!r} but {entry.role}:{entry.name} signed it"
    return "belongs", ""


@dataclass(frozen=True)
class _Tip:
    last_seq: int  # the last message on the tenant's subjects, foreign or not: what appends expect
    head: str = GENESIS  # hash of the chain's last record that belongs
    index: int = 0  # its position (0: none yet)
    head_seq: int = 0  # its sequence


class AuditLog:
    """Appends to the audit chains, signed with this process's identity, and checkpoints them.

    `actor` is the writer's own name for itself (a coordinator instance, `cli:user@host`), kept
    as each record's `instance`; the record's `actor` is the identity that signs it. Keeps each
    tenant's tip in memory so a single writer needs no read per record; another writer's append
    (or a foreign message) is detected by the server and re-read.
    """

    def __init__(
        self,
        bus: Bus,
        actor: str = "",
        *,
        every_records: int = CHECKPOINT_EVERY_RECORDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        # The wall clock records and checkpoints are stamped with (the deterministic simulation,
        # tests/sim, gives its own; the chain's logic never reads it).
        self.clock = clock
        self.instance = actor
        self.trust = require_trust(bus.settings, what="the audit trail")
        self.signer: Signer | None = trusted_signer(
            bus.identity, self.trust, ("audit", "checkpoint"), what="writing the audit trail"
        )
        self.actor = bus.identity.principal if bus.identity is not None else actor
        self.every_records = every_records
        self._tips: dict[str, _Tip] = {}
        self._stale: set[str] = set()  # tenants whose tip another writer moved
        self._checkpointed: dict[str, int] = {}  # tenant -> index of its last checkpoint
        self._no_checkpoint_stream = False
        # One append at a time per tenant in this process: concurrent decisions would only
        # race each other for the tip. Races with other processes are the server's to settle.
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

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
        async with self._lock(tenant):
            record = await self._append(tenant, kind, ref, data, msg_id)
            tip = self._tips.get(tenant)
            if tip is not None and tip.index - self._checkpointed.get(tenant, 0) >= (
                self.every_records
            ):
                await self._checkpoint(tenant)
            return record

    async def _append(
        self, tenant: str, kind: Kind, ref: str, data: dict[str, Any], msg_id: str | None
    ) -> AuditRecord:
        for attempt in itertools.count(1):
            tip = self._tips.get(tenant)
            if tip is None or tenant in self._stale:
                tip = await self._tip(tenant, anchor=tip)
                self._tips[tenant] = tip
                self._stale.discard(tenant)
            record = self._sealed(
                AuditRecord(
                    tenant,
                    kind,
                    ref,
                    self.actor,
                    self.clock(),
                    data,
                    tip.head,
                    index=tip.index + 1,
                    instance=self.instance,
                )
            )
            try:
                ack = await self.bus.publish(
                    subject(tenant, kind),
                    msgspec.json.encode(record),
                    msg_id=msg_id,
                    headers={
                        subjects.H_EXPECTED_LAST_SUBJECT_SEQ: str(tip.last_seq),
                        subjects.H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: subject(tenant, "*"),
                    },
                )
            except BadRequestError as e:
                if e.err_code not in subjects.JS_WRONG_LAST_SEQUENCE:
                    raise  # anything but "another message landed first"
                self._stale.add(tenant)  # re-read the tip, from what we knew
                if RACE_RETRY.pause(attempt) is None:
                    raise AuditContentionError(tenant, attempt) from None
                continue
            if ack.duplicate:
                self._stale.add(tenant)  # the ack names the earlier copy, not our tip
            else:
                self._tips[tenant] = _Tip(ack.seq, record.hash, record.index, ack.seq)
            return record
        raise AssertionError("unreachable")  # itertools.count never ends

    def _sealed(self, record: AuditRecord) -> AuditRecord:
        if self.signer is not None:
            record.signer = self.signer.kid
        record.hash = record.digest()
        if self.signer is not None:
            record.signature = self.signer.sign("audit", record.hash.encode())
        return record

    def _belonging(self, subj: str, data: bytes) -> AuditRecord | None:
        record = _decode(data)
        if record is None or judge(self.trust, record, subj)[0] != "belongs":
            return None
        return record

    async def last(self, tenant: str, kind: Kind) -> AuditRecord | None:
        """The last record of `kind` in `tenant`'s chain, if the last message there belongs."""
        try:
            msg = await self.bus.js.get_last_msg(subjects.AUDIT_STREAM, subject(tenant, kind))
        except NotFoundError:
            return None
        return self._belonging(msg.subject or "", msg.data or b"")

    async def _tip(self, tenant: str, *, anchor: _Tip | None = None) -> _Tip:
        """Where `tenant`'s chain ends. The last message on its subjects, when it belongs (one
        read); else the chain is followed from `anchor` (what this writer knew), the latest
        checkpoint, or the start, past the messages that do not belong."""
        chain = subject(tenant, "*")
        try:
            last = await self.bus.js.get_last_msg(subjects.AUDIT_STREAM, chain)
        except NotFoundError:
            return _Tip(0)
        last_seq = int(last.seq or 0)
        record = self._belonging(last.subject or "", last.data or b"")
        if record is not None:
            return _Tip(last_seq, record.hash, record.index, last_seq)
        log.error(
            "%s seq %s on %s is not an audit record of this mesh: skipped; the chain goes on "
            "from its last trusted record",
            subjects.AUDIT_STREAM,
            last_seq,
            last.subject,
        )
        head = anchor or await self._checkpoint_anchor(tenant) or _Tip(0)
        seq = head.head_seq + 1
        while seq <= last_seq:
            try:
                msg = await self.bus.js.get_msg(
                    subjects.AUDIT_STREAM, seq, subject=chain, next=True
                )
            except NotFoundError:
                break
            found = int(msg.seq or seq)
            record = self._belonging(msg.subject or "", msg.data or b"")
            if record is not None and record.prev == head.head:
                head = _Tip(found, record.hash, record.index, found)
            seq = found + 1
        return _Tip(last_seq, head.head, head.index, head.head_seq)

    # -- checkpoints --------------------------------------------------------------------------
    async def checkpoint_due(self) -> None:
        """Checkpoint every tenant this writer appended to since its last checkpoint (the
        coordinator calls it every CHECKPOINT_EVERY_S and when it stops)."""
        for tenant in list(self._tips):
            tip = self._tips[tenant]
            if tip.index > self._checkpointed.get(tenant, 0):
                async with self._lock(tenant):
                    await self._checkpoint(tenant)

    async def checkpoint(self, tenant: str) -> Checkpoint | None:
        """Sign and publish `tenant`'s checkpoint now (None if MESH_CHECKPOINTS is missing)."""
        async with self._lock(tenant):
            return await self._checkpoint(tenant)

    async def _checkpoint(self, tenant: str) -> Checkpoint | None:
        if self._no_checkpoint_stream:
            return None
        tip = self._tips.get(tenant)
        if tip is None or tenant in self._stale:
            # What this writer knows is enough (an older head is still a head the chain holds);
            # it reads only when it knows nothing, or knows it is behind.
            tip = await self._tip(tenant, anchor=tip)
            self._tips[tenant] = tip
            self._stale.discard(tenant)
        try:
            info = await self.bus.js.stream_info(subjects.AUDIT_STREAM)
        except NotFoundError:
            return None
        created = _created(info)
        previous = await self._last_checkpoint(tenant)
        broken = previous.broken if previous is not None else ""
        if previous is not None and not broken:
            broken = await self._lost(previous, tip, created, info)
            if broken:
                log.error("audit chain of %s: %s", tenant, broken)
        cp = Checkpoint(
            tenant,
            tip.index,
            tip.head,
            tip.head_seq,
            created,
            self.clock(),
            broken=broken,
            instance=self.instance,
        )
        if self.signer is not None:
            cp.signer = self.signer.kid
            cp.signature = self.signer.sign("checkpoint", cp.payload())
        try:
            await self.bus.publish(subjects.checkpoint(tenant), msgspec.json.encode(cp))
        except (NoStreamResponseError, NatsTimeoutError, TimeoutError):
            # Auditing goes on without checkpoints; `mesh audit verify` says none was found.
            self._no_checkpoint_stream = True
            log.warning(
                "no stream takes %s: audit checkpoints are off until %s exists",
                subjects.checkpoint(tenant),
                subjects.CHECKPOINTS_STREAM,
            )
            return None
        self._checkpointed[tenant] = tip.index
        return cp

    async def _last_checkpoint(self, tenant: str) -> Checkpoint | None:
        try:
            msg = await self.bus.js.get_last_msg(
                subjects.CHECKPOINTS_STREAM, subjects.checkpoint(tenant)
            )
        except NotFoundError:
            return None
        cp, refusal = checkpoint_of(self.trust, msg.subject or "", msg.data or b"")
        if cp is None:
            log.error(
                "%s seq %s is not a checkpoint of this mesh (%s): ignored",
                subjects.CHECKPOINTS_STREAM,
                msg.seq,
                refusal,
            )
        return cp

    async def _checkpoint_anchor(self, tenant: str) -> _Tip | None:
        cp = await self._last_checkpoint(tenant)
        if cp is None or cp.broken:
            return None
        return _Tip(cp.seq, cp.head, cp.count, cp.seq)

    async def _lost(self, previous: Checkpoint, tip: _Tip, created: str, info: StreamInfo) -> str:
        """Why the chain no longer holds `previous`, or "" when it does."""
        when = _when(previous.at)
        if previous.stream_created != created:
            return (
                f"{subjects.AUDIT_STREAM} was re-created: the checkpoint of {when} was made "
                f"for the stream created {previous.stream_created}, this one was created {created}"
            )
        if _expired(previous.at, info.config.max_age or 0.0):
            return ""  # its records may have aged out; nothing to compare
        if tip.index < previous.count:
            return (
                f"the chain has {tip.index} records; the checkpoint of {when} said {previous.count}"
            )
        try:
            msg = await self.bus.js.get_msg(subjects.AUDIT_STREAM, previous.seq)
        except NotFoundError:
            return (
                f"record #{previous.count} (seq {previous.seq}) of the checkpoint of {when} is gone"
            )
        record = _decode(msg.data or b"")
        if record is None or record.hash != previous.head or record.index != previous.count:
            return (
                f"seq {previous.seq} is not record #{previous.count} "
                f"({previous.head[:12]}…) that the checkpoint of {when} names"
            )
        return ""


def checkpoint_of(trust: Trust | None, subj: str, data: bytes) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") if `data` read from `subj` is a checkpoint this mesh signed; else
    (None, why not)."""
    try:
        cp = _cp_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, "not a checkpoint"
    if _subject_tenant(subj, subjects.CHECKPOINT_ROOT) != cp.tenant:
        return None, f"it says tenant {cp.tenant!r} but sits on {subj}"
    if trust is not None:
        refusal = trust.refusal(cp.signer, "checkpoint", cp.payload(), cp.signature, at=cp.at)
        if refusal is not None:
            return None, refusal
    return cp, ""


def _created(info: StreamInfo) -> str:
    return info.created.isoformat() if info.created is not None else ""


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _audit_spec() -> StreamSpec:
    return next(s for s in STREAMS if s.name == subjects.AUDIT_STREAM)


def _expired(at: float, max_age_s: float, now: float | None = None) -> bool:
    """Could something written at `at` have aged out of a stream with this max_age? Only by
    the retention the mesh set: a shorter max_age is itself the problem, never an excuse."""
    if max_age_s <= 0:
        return False  # kept for ever
    now = time.time() if now is None else now
    return at < now - max(max_age_s, _audit_spec().max_age_s) + AGE_SLACK_S


# -- reading ----------------------------------------------------------------------------------
class Stored(msgspec.Struct):
    """One message as the stream holds it (a bundle keeps exactly these bytes)."""

    seq: int
    subject: str
    data: bytes


class StreamFacts(msgspec.Struct, kw_only=True):
    """What verification needs to know of MESH_AUDIT itself."""

    name: str
    created: str
    subjects: list[str]
    retention: str
    max_age_s: float
    max_msgs: int
    max_bytes: int
    max_msgs_per_subject: int
    discard: str
    deny_delete: bool
    deny_purge: bool
    allow_rollup_hdrs: bool
    first_seq: int
    last_seq: int
    messages: int

    @classmethod
    def of(cls, info: StreamInfo) -> StreamFacts:
        c, s = info.config, info.state
        return cls(
            name=c.name or "",
            created=_created(info),
            subjects=list(c.subjects or []),
            retention=_enum(c.retention, "limits"),
            max_age_s=float(c.max_age or 0.0),
            max_msgs=int(c.max_msgs if c.max_msgs is not None else -1),
            max_bytes=int(c.max_bytes if c.max_bytes is not None else -1),
            max_msgs_per_subject=int(c.max_msgs_per_subject),
            discard=_enum(c.discard, "old"),
            deny_delete=bool(c.deny_delete),
            deny_purge=bool(c.deny_purge),
            allow_rollup_hdrs=bool(c.allow_rollup_hdrs),
            first_seq=int(s.first_seq),
            last_seq=int(s.last_seq),
            messages=int(s.messages),
        )


def _enum(value: object, default: str) -> str:
    # nats-py leaves some enums as the server's strings after decoding a response
    return str(getattr(value, "value", value) or default)


class Bundle(msgspec.Struct, kw_only=True):
    """Everything `verify_bundle` needs, as read from the mesh (`mesh audit export` writes it)."""

    format: str = BUNDLE_FORMAT
    exported_at: float
    tenant: str = ""  # only this tenant's chain ("" = every tenant)
    stream: StreamFacts | None  # None: MESH_AUDIT does not exist
    records: list[Stored]
    checkpoints: list[Stored]  # the latest message of each checkpoint subject


bundle_encoder = msgspec.json.Encoder()
bundle_decoder = msgspec.json.Decoder(Bundle)


async def _scan(
    bus: Bus, stream: str, filter_subject: str, *, last_per_subject: bool = False
) -> list[Stored]:
    """Every message of `stream` on `filter_subject` (or only the last of each subject), in
    stream order, through a short-lived consumer (the server filters; one request per batch)."""
    try:
        psub = await bus.js.pull_subscribe(
            filter_subject,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=(
                    DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL
                ),
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,  # cleans up after a reader that died mid-scan
            ),
        )
    except NotFoundError:
        return []
    out: list[Stored] = []
    name = ""
    try:
        info = await psub.consumer_info()
        name = info.name
        remaining = int(info.num_pending or 0)
        while remaining > 0:
            try:
                msgs = await psub.fetch(min(remaining, 512), timeout=5.0)
            except (TimeoutError, NatsTimeoutError):
                break
            for m in msgs:
                out.append(Stored(m.metadata.sequence.stream, m.subject, m.data or b""))
                remaining = m.metadata.num_pending
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        if name:
            with contextlib.suppress(Exception):
                await bus.js.delete_consumer(stream, name)
    return out


async def snapshot(bus: Bus, tenant: str | None = None) -> Bundle:
    """The audit trail (one tenant's, or all) with its latest checkpoints and stream facts.

    Checkpoints are read first: every head they name was appended before the records are read.
    """
    cp_filter = subjects.checkpoint(tenant) if tenant else f"{subjects.CHECKPOINT_ROOT}.>"
    checkpoints = await _scan(bus, subjects.CHECKPOINTS_STREAM, cp_filter, last_per_subject=True)
    try:
        facts: StreamFacts | None = StreamFacts.of(await bus.js.stream_info(subjects.AUDIT_STREAM))
    except NotFoundError:
        facts = None
    records: list[Stored] = []
    if facts is not None:
        rec_filter = subject(tenant, ">") if tenant else f"{subjects.AUDIT_ROOT}.>"
        records = await _scan(bus, subjects.AUDIT_STREAM, rec_filter)
    return Bundle(
        exported_at=time.time(),
        tenant=tenant or "",
        stream=facts,
        records=records,
        checkpoints=checkpoints,
    )


_UNDECODABLE = AuditRecord("?", "decision", "?", "?", 0, {}, "", hash="undecodable")


async def read(bus: Bus, tenant: str | None = None) -> list[tuple[int, AuditRecord]]:
    """Every audit record (optionally one tenant's), in stream order, as (sequence, record);
    a message that is not a record at all is shown as one with hash "undecodable"."""
    rec_filter = subject(tenant, ">") if tenant else f"{subjects.AUDIT_ROOT}.>"
    return [
        (s.seq, _decode(s.data) or _UNDECODABLE)
        for s in await _scan(bus, subjects.AUDIT_STREAM, rec_filter)
    ]


# -- verification ------------------------------------------------------------------------------
@dataclass
class Verification:
    """What verification found: `count` records that belong and verify; every problem (the
    first one's sequence in `bad_seq`, when a record has it); notes that are not problems."""

    count: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bad_seq: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def problem(self) -> str:
        return self.problems[0] if self.problems else ""

    def fail(self, problem: str, seq: int | None = None) -> None:
        if self.bad_seq is None and not self.problems:
            self.bad_seq = seq
        self.problems.append(problem)

    def __str__(self) -> str:
        if self.ok:
            return f"verified {self.count} records"
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more problem(s))" if more else "")


@dataclass
class _Chain:
    head: str = GENESIS
    index: int = 0
    records: int = 0


def verify(
    records: Iterable[tuple[int, AuditRecord]], *, trust: Trust | None = None
) -> Verification:
    """Check decoded records' hashes, chains and (with `trust`) signatures; see `verify_bundle`
    for the whole check (checkpoints, stream configuration)."""
    stored = [Stored(seq, subject(r.tenant, r.kind), msgspec.json.encode(r)) for seq, r in records]
    result = Verification(0)
    _check_records(stored, trust, result, wanted={}, max_age_s=0.0, now=time.time())
    return result


def verify_bundle(bundle: Bundle, trust: Trust | None, *, now: float | None = None) -> Verification:
    """The whole check of an audit trail, live (`snapshot`) or exported: the stream's
    configuration, every record (hash, signature by a key trusted for audits, chain link), and
    the latest checkpoint of each tenant (signature, made for this very stream, still held by
    the chain, nothing lost since an earlier one). Without `trust`, signatures are not checked
    (and a note says so)."""
    now = time.time() if now is None else now
    result = Verification(0)
    if trust is None:
        result.notes.append("signatures not checked: no trust file (MESH_INSECURE=bus)")
    facts = bundle.stream
    if facts is not None:
        _check_stream(facts, result)
    checkpoints: dict[str, Checkpoint] = {}
    for s in bundle.checkpoints:
        cp, refusal = checkpoint_of(trust, s.subject, s.data)
        if cp is None:
            result.fail(f"checkpoint seq {s.seq} on {s.subject} does not belong: {refusal}")
            continue
        checkpoints[cp.tenant] = cp
    wanted = {t: cp.count for t, cp in checkpoints.items()}
    max_age = facts.max_age_s if facts is not None else 0.0
    found = _check_records(bundle.records, trust, result, wanted=wanted, max_age_s=max_age, now=now)
    for tenant, cp in sorted(checkpoints.items()):
        _check_checkpoint(tenant, cp, facts, found.get(tenant), result, now=now)
    unanchored = sorted({t for t in found} - set(checkpoints))
    if not checkpoints:
        result.notes.append(
            f"no checkpoint in {subjects.CHECKPOINTS_STREAM}: a stream emptied or re-created "
            "from the start could not be told from a new one"
        )
    elif unanchored:
        result.notes.append(f"no checkpoint yet for: {', '.join(unanchored)}")
    return result


def _check_stream(facts: StreamFacts, result: Verification) -> None:
    """Problems with MESH_AUDIT's configuration: anything that lets records go."""
    spec = _audit_spec()
    name = facts.name or subjects.AUDIT_STREAM
    if not facts.deny_delete:
        result.fail(f"{name} allows deleting records (deny_delete is off)")
    if not facts.deny_purge:
        result.fail(f"{name} allows purging records (deny_purge is off)")
    if facts.allow_rollup_hdrs:
        result.fail(f"{name} allows roll-ups (a roll-up message purges a subject)")
    if facts.retention != "limits":
        result.fail(f"{name} has retention {facts.retention!r}: records go once consumed")
    if 0 < facts.max_age_s < spec.max_age_s:
        result.fail(
            f"{name} keeps records {_span(facts.max_age_s)} (max_age); the mesh keeps them "
            f"{_span(spec.max_age_s)}: older records are dropped"
        )
    dropped = "older records are dropped" if facts.discard == "old" else "new records are refused"
    for limit, value in (
        ("max_msgs", facts.max_msgs),
        ("max_bytes", facts.max_bytes),
        ("max_msgs_per_subject", facts.max_msgs_per_subject),
    ):
        if value > 0:
            result.fail(f"{name} has {limit} {value}: past it, {dropped}")
    if sorted(facts.subjects) != sorted(spec.subjects):
        result.fail(f"{name} takes subjects {facts.subjects}; the mesh writes {spec.subjects}")


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    return f"{seconds:g}s"


def _check_records(
    stored: Iterable[Stored],
    trust: Trust | None,
    result: Verification,
    *,
    wanted: dict[str, int],
    max_age_s: float,
    now: float,
) -> dict[str, tuple[_Chain, dict[int, tuple[str, int]]]]:
    """Every record, in stream order, into `result`; returns per tenant its chain and the
    (hash, seq) of the records at the positions `wanted` names (checkpoint counts)."""
    chains: dict[str, _Chain] = {}
    at_index: dict[str, dict[int, tuple[str, int]]] = {}
    for s in stored:
        record = _decode(s.data)
        if record is None:
            result.fail(
                f"record {s.seq} on {s.subject} does not belong: not an audit record", s.seq
            )
            continue
        verdict, why = judge(trust, record, s.subject)
        if verdict == "foreign":
            result.fail(f"record {s.seq} on {s.subject} does not belong: {why}", s.seq)
            continue
        altered = verdict == "altered"
        if altered:
            result.fail(f"record {s.seq} was altered: {why}", s.seq)
        chain = chains.setdefault(record.tenant, _Chain())
        if chain.records == 0 and chain.head == GENESIS and record.prev != GENESIS:
            if max_age_s > 0 and _expired(record.at, max_age_s, now):
                result.notes.append(
                    f"the chain of {record.tenant} starts at record #{record.index} (seq "
                    f"{s.seq}): the ones before it expired (max_age)"
                )
            else:
                result.fail(
                    f"record {s.seq} does not chain: it follows {record.prev[:12]}…, but it is "
                    f"the first record of {record.tenant} here: the records before it are gone",
                    s.seq,
                )
        elif record.prev != chain.head:
            result.fail(
                f"record {s.seq} does not chain: prev is {record.prev[:12]}…, the chain's "
                f"previous record is {chain.head[:12]}…",
                s.seq,
            )
        elif record.index and chain.index and record.index != chain.index + 1:
            result.fail(
                f"record {s.seq} does not chain: it is #{record.index}, the chain's previous "
                f"record is #{chain.index}",
                s.seq,
            )
        chain.head, chain.index = record.hash, record.index or chain.index + 1
        chain.records += 1
        if not altered:
            result.count += 1
        if wanted.get(record.tenant) == record.index:
            at_index.setdefault(record.tenant, {})[record.index] = (record.hash, s.seq)
    return {t: (c, at_index.get(t, {})) for t, c in chains.items()}


def _check_checkpoint(
    tenant: str,
    cp: Checkpoint,
    facts: StreamFacts | None,
    found: tuple[_Chain, dict[int, tuple[str, int]]] | None,
    result: Verification,
    *,
    now: float,
) -> None:
    when = _when(cp.at)
    if cp.broken:
        result.fail(f"the checkpoint of {tenant} of {when} says: {cp.broken}")
    if facts is None:
        result.fail(
            f"{subjects.AUDIT_STREAM} does not exist, but the checkpoint of {tenant} of {when} "
            f"says its chain has {cp.count} records"
        )
        return
    if cp.stream_created != facts.created:
        result.fail(
            f"{subjects.AUDIT_STREAM} was re-created: it was created {facts.created}, the "
            f"checkpoint of {tenant} of {when} was made for the stream created {cp.stream_created}"
        )
    if cp.count == 0:
        return
    chain, at_index = found if found is not None else (_Chain(), {})
    held = at_index.get(cp.count)
    if held is None:
        if _expired(cp.at, facts.max_age_s, now):
            return  # its records may have aged out
        result.fail(
            f"the checkpoint of {tenant} of {when} says its chain has {cp.count} records "
            f"(head {cp.head[:12]}…); the stream holds {chain.records} of them"
            + (f", up to #{chain.index}" if chain.records else "")
        )
    elif held[0] != cp.head:
        result.fail(
            f"the checkpoint of {tenant} of {when} says record #{cp.count} is "
            f"{cp.head[:12]}…; the stream's is {held[0][:12]}… (seq {held[1]})"
        )
    elif held[1] != cp.seq:
        result.fail(
            f"the checkpoint of {tenant} of {when} has record #{cp.count} at seq {cp.seq}; the "
            f"stream has it at seq {held[1]}"
        )
