"""What the console shows, read from NATS, always through the viewer's tenant.

Every read here takes the tenant the user may see (`None`: every tenant, the operator) and asks
the server for that tenant's subjects only (a consumer filter `mesh.decision.<T>.>`, not a read
of everything filtered afterwards), then checks the tenant of what came back once more. The
console's own connection may read everything; this module is where it stops doing so on a
user's behalf.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from coordinator import dlq as dlq_mod
from mesh import audit, subjects, telemetry
from mesh.bus import Bus, read_stream, tail
from mesh.identity import Trust
from mesh.records import (
    DeadLetter,
    Decision,
    dead_letter_decoder,
    decision_decoder,
    decision_refusal,
    decision_subject,
    event_token,
)
from mesh.registry import Registration, Registry

log = logging.getLogger(__name__)

ALL = "*"
# Field names whose values a body preview masks (any depth, case-insensitive, substring).
REDACTED_FIELDS = re.compile(
    r"pass(word)?|secret|token|api[_-]?key|private[_-]?key|authorization|credential|ssn|"
    r"card[_-]?number|iban",
    re.IGNORECASE,
)
MASK = "•••••"
PREVIEW_BYTES = 4096
SEARCH_LIMIT = 1000  # decisions searched for one whose ledger entry is gone


def tenant_subject(root: str, tenant: str | None) -> str:
    """`root.<tenant>.>`, or `root.>` for every tenant."""
    return f"{root}.{tenant}.>" if tenant else f"{root}.>"


def _tenant_of(subject: str) -> str:
    parts = subject.split(".")
    return parts[2] if len(parts) > 2 else ""


@dataclass
class DecisionRow:
    seq: int
    subject: str
    decision: Decision | None
    refusal: str  # why its signature is not believed ("" = verified, or nothing to check)
    checked: bool  # False: no trust file (MESH_INSECURE=bus), nothing was checked

    @property
    def tenant(self) -> str:
        return self.decision.tenant if self.decision else _tenant_of(self.subject)


def check_decision(trust: Trust | None, subject: str, body: bytes, seq: int = 0) -> DecisionRow:
    try:
        d: Decision | None = decision_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        d = None
    if d is None:
        refusal = "not a decision"
    elif trust is None:
        refusal = ""
    else:
        refusal = decision_refusal(trust, d, subject=subject) or ""
    return DecisionRow(seq, subject, d, refusal, trust is not None)


async def decisions(
    bus: Bus,
    trust: Trust | None,
    tenant: str | None,
    *,
    limit: int = 200,
    event_type: str = "",
    outcome: str = "",
) -> list[DecisionRow]:
    """The latest decisions of `tenant` (None: all), newest first, each verified."""
    rows = await tail(
        bus,
        subjects.DECISIONS_STREAM,
        limit,
        filter_subject=tenant_subject(subjects.DECISIONS_ROOT, tenant),
    )
    out = []
    for seq, subject, body in reversed(rows):
        row = check_decision(trust, subject, body, seq)
        if tenant and row.tenant != tenant:
            continue  # belt and braces: the filter already said so
        d = row.decision
        if event_type and (d is None or d.event_type != event_type):
            continue
        if outcome and (d is None or d.outcome != outcome):
            continue
        out.append(row)
    return out


async def decision(bus: Bus, trust: Trust | None, tenant: str, event_id: str) -> DecisionRow | None:
    """The published decision of `tenant`'s event `event_id`, verified; None if there is none.

    Its subject carries the decision type, which may have dots (`release.decided`), so no
    filter can name "any type, this event": the decision ledger's entry for the event (by key)
    says the type, then the stream is read on that one subject. What is shown is the published
    record (the one signed), never the ledger's copy. Without a ledger entry (expired), the
    tenant's latest decisions are searched."""
    from coordinator.ledger import DecisionState, state_key

    subject = ""
    with contextlib.suppress(Exception):  # no entry, or one that does not decode: search
        kv = await bus.kv(subjects.DECISIONS_BUCKET)
        entry = await kv.get(state_key(tenant, event_id))
        state = msgspec.json.decode(entry.value or b"{}", type=DecisionState)
        if state.decision is not None and state.decision.tenant == tenant:
            subject = decision_subject(state.decision)
    if subject:
        found = await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=subject)
        candidates = [(m.seq, m.subject, m.data) for m in found]
    else:
        candidates = await tail(
            bus,
            subjects.DECISIONS_STREAM,
            SEARCH_LIMIT,
            filter_subject=tenant_subject(subjects.DECISIONS_ROOT, tenant),
        )
    for seq, subj, body in candidates:
        if not subj.endswith("." + event_token(event_id)):
            continue
        row = check_decision(trust, subj, body, seq)
        if row.decision is not None and row.decision.event_id == event_id:
            return row if row.tenant == tenant else None
    return None


@dataclass
class AuditState:
    tenant: str
    count: int
    ok: bool
    summary: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def audit_states(bus: Bus, trust: Trust | None, tenant: str | None) -> list[AuditState]:
    """The verification of each tenant's audit chain (one tenant's, or every tenant's)."""
    if tenant:
        tenants = [tenant]
    else:
        records = await audit.read(bus)
        tenants = sorted({r.tenant for _, r in records})
    out = []
    for t in tenants:
        v = audit.verify_bundle(await audit.snapshot(bus, t), trust)
        out.append(AuditState(t, v.count, v.ok, str(v), list(v.problems), list(v.notes)))
    return out


async def audit_export(bus: Bus, tenant: str | None) -> bytes:
    """The bundle `mesh audit export` writes, of one tenant (or all)."""
    return audit.bundle_encoder.encode(await audit.snapshot(bus, tenant))


async def audit_of_event(bus: Bus, tenant: str, event_id: str) -> list[dict[str, Any]]:
    return [
        {"seq": seq, **msgspec.to_builtins(r)}
        for seq, r in await audit.read(bus, tenant)
        if r.ref == event_id
    ]


async def trace_lines(bus: Bus, trace_id: str) -> list[str]:
    """The decision's trace tree when spans are kept in NATS (MESH_TRACE_STREAM=1), else []."""
    if not trace_id:
        return []
    try:
        spans = await telemetry.read_trace(bus, trace_id, wait_s=0.3)
    except Exception as e:  # no trace stream: the page says so, it does not fail
        log.debug("no trace for %s: %s", trace_id, e)
        return []
    return telemetry.render_tree(spans) if spans else []


# -- dead letters -------------------------------------------------------------------------------
async def dead_letters(
    bus: Bus, tenant: str | None, *, limit: int = 200, reason: str = ""
) -> list[tuple[int, DeadLetter]]:
    root = f"{subjects.DLQ_ROOT}.{tenant or '*'}.{reason}" if reason else None
    filt = root or tenant_subject(subjects.DLQ_ROOT, tenant)
    out = []
    for seq, subject, body in reversed(
        await tail(bus, subjects.DLQ_STREAM, limit, filter_subject=filt)
    ):
        try:
            d = dead_letter_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not a dead letter (someone else published on mesh.dlq.>)
        if tenant and (d.tenant != tenant or _tenant_of(subject) != tenant):
            continue
        out.append((seq, d))
    return out


async def dead_letter(bus: Bus, tenant: str | None, seq: int) -> DeadLetter | None:
    """Dead letter `seq` if it is `tenant`'s (None: anyone's); else None (as if missing)."""
    try:
        d = await dlq_mod.get(bus, seq)
    except Exception:
        return None
    if tenant and d.tenant != tenant:
        return None
    return d


def redact(value: Any) -> Any:
    """`value` with the values of sensitive-looking fields masked, at any depth."""
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and REDACTED_FIELDS.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def preview(body: bytes) -> str:
    """A body as a person reads it: JSON pretty and redacted; else text, cut at PREVIEW_BYTES
    (a body that is not JSON cannot be redacted by field: it is shown only in part)."""
    try:
        doc = json.loads(body)
    except ValueError:
        text = body[:PREVIEW_BYTES].decode("utf-8", errors="backslashreplace")
        return text + (" …" if len(body) > PREVIEW_BYTES else "")
    text = json.dumps(redact(doc), indent=2, ensure_ascii=False)
    return text if len(text) <= PREVIEW_BYTES * 2 else text[: PREVIEW_BYTES * 2] + " …"


# -- agents ---------------------------------------------------------------------------------------
@dataclass
class AgentRow:
    reg: Registration
    signed: bool
    refusal: str
    version: str
    seen_ago_s: float


async def agents(bus: Bus) -> list[AgentRow]:
    """Every registry entry (live or not yet expired), with whether its signed card is believed."""
    registry = Registry(bus)
    kv = await bus.kv(subjects.CARDS_BUCKET)
    now = time.time()
    out = []
    for key in await bus.kv_keys(subjects.CARDS_BUCKET):
        with contextlib.suppress(Exception):
            entry = await kv.get(key)
            if not entry.value:
                continue
            reg = msgspec.json.decode(entry.value, type=Registration)
            check = registry.check(reg, key, entry.revision or 0)
            out.append(
                AgentRow(
                    reg,
                    check.refusal is None,
                    check.refusal or "",
                    str(reg.card.get("version", "")),
                    now - reg.seen_at,
                )
            )
    return sorted(out, key=lambda r: (r.reg.agent, r.reg.instance))


async def coordinator_status(bus: Bus, wait_s: float = 0.3) -> list[dict[str, Any]]:
    """What each coordinator answers on `mesh.status.coordinator` (breaker states, in flight)."""
    answers: list[dict[str, Any]] = []
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    try:
        await bus.nc.publish(subjects.COORDINATOR_STATUS, b"", reply=inbox)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats' TimeoutError: no more answers
                break
            if msg.data:
                with contextlib.suppress(msgspec.DecodeError):
                    answers.append(msgspec.json.decode(msg.data))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return sorted(answers, key=lambda a: str(a.get("name", "")))


# -- what the plots count ---------------------------------------------------------------------
def per_minute(rows: list[DecisionRow], minutes: int = 30) -> list[tuple[str, dict[str, int]]]:
    """Decisions per minute by outcome, one column per minute of the `minutes` up to the
    latest decision shown (oldest first; empty minutes too, so the axis is time)."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for r in rows:
        if r.decision is not None:
            counts[int(r.decision.decided_at // 60)][r.decision.outcome] += 1
    if not counts:
        return []
    last = max(counts)
    return [
        (time.strftime("%H:%M", time.gmtime(m * 60)), dict(counts.get(m, Counter())))
        for m in range(last - minutes + 1, last + 1)
    ]


def latency_by_agent(rows: list[DecisionRow]) -> list[tuple[str, float, str]]:
    """(agent, mean vote latency in ms, "n votes, max X ms") over the decisions shown."""
    seen: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for v in r.decision.votes if r.decision else []:
            seen[v.agent].append(v.latency_ms)
    return [
        (agent, statistics.fmean(ms), f"{len(ms)} votes, max {max(ms):.0f} ms")
        for agent, ms in sorted(seen.items())
    ]


def by_reason(items: list[tuple[int, DeadLetter]]) -> list[tuple[str, float, str]]:
    counts = Counter(d.reason for _, d in items)
    return [(reason, float(n), "") for reason, n in counts.most_common()]
