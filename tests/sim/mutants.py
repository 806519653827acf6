"""Historical bugs, put back on demand (monkeypatched for the duration of a `with`), so that
the simulation can show it catches each of them: `python -m tests.sim --bug NAME`.

KNOWN: violation kinds the simulation finds that are not fixed yet; a sweep counts them apart
instead of failing on them (none today).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from coordinator import decide, humans, settle
from mesh import audit, subjects
from coordinator.ledger import Busy, Claim, Done, Ledger, state_key
from mesh import envelope
from mesh.records import DlqReason
from tests.sim import world

KNOWN: tuple[str, ...] = ()


async def _dead_letter_published_first(
    self: settle.Settler,
    delivery: settle.Delivery,
    reason: DlqReason,
    error: str,
    *,
    event: envelope.Event | None = None,
    claim: Claim | None = None,
) -> None:
    """The order before issue 12: the record went out, then the ledger was marked."""
    record = delivery.dead_letter_record(reason, error, event=event)
    await self.outlet.publish_dead_letter(record)
    if event is not None:
        marked = await self.ledger.mark_dead_lettered(
            state_key(record.tenant, event.id),
            stream_seq=record.stream_seq,
            reason=reason,
            error=error,
            claim=claim,
        )
        if isinstance(marked, Busy):
            await delivery.nak(marked.retry_in_s + settle.BUSY_SLACK_S)
            return
        if isinstance(marked, Done):
            await delivery.ack()
            return
    await delivery.ack()


def _takeover_resets_deadline(original: Callable[..., Any]) -> Callable[..., Any]:
    async def claim(self: Ledger, key: str, *, stream_seq: int, deadline_s: float) -> Any:
        got = await original(self, key, stream_seq=stream_seq, deadline_s=deadline_s)
        if isinstance(got, Claim) and got.state.takeovers:
            got.state = msgspec.structs.replace(
                got.state, deadline_at=self.clock.time() + deadline_s
            )
        return got

    return claim


def _ack_first(original: Callable[..., Any]) -> Callable[..., Any]:
    async def settle_(
        self: settle.Settler, delivery: settle.Delivery, event: Any, outcome: Any, u: str = ""
    ) -> None:
        if isinstance(outcome, decide.Decided):
            await delivery.ack()  # acked before the decision is out: a crash here loses it
            await self.record(outcome.decision, u)
            return
        await original(self, delivery, event, outcome, u)

    return settle_


def _listener_alone(original: Callable[..., Any]) -> Callable[..., Any]:
    """The advisory path before coordinator.settle.gave_up had the coordinator's outlet: a
    decided event was left alone (never published if its owner failed after the ledger
    write), and the advisory's record had a message id of its own (two records)."""

    async def gave_up(ledger: Ledger, outlet: Any, record: Any, **kw: Any) -> Any:
        return await original(ledger, None, record, **kw)

    return gave_up


async def _release_keeping_deadline(
    self: Ledger, claim: Claim, votes: dict[str, Any], *, since: float
) -> None:
    state = msgspec.structs.replace(
        claim.state, state="waiting", lease_until=0.0, votes=dict(votes), waiting_since=since
    )
    await self.save(claim, state)


def _reclaim_with_old_deadline(
    self: Ledger, waiting: Any, now: float, deadline_s: float, stream_seq: int
) -> Any:
    return msgspec.structs.replace(
        waiting,
        state="collecting",
        owner=self.owner,
        lease_until=now + self.lease_s,
        stream_seq=stream_seq,
        signer="",
        signature="",
    )


class _UnguardedSubjects:
    """`mesh.subjects` as `mesh.audit` sees it with the bug put back: appends without
    `Nats-Expected-Last-Subject-Sequence` (headers the server does not know are ignored), so
    two writers chaining from the same tip both land: a fork."""

    H_EXPECTED_LAST_SUBJECT_SEQ = "X-Sim-Unchecked"
    H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "X-Sim-Unchecked-Subject"

    def __getattr__(self, name: str) -> Any:
        return getattr(subjects, name)


_LATE_S = 5.0


def _window_late(original_due: Callable[..., Any], original_refusal: Callable[..., Any]) -> Any:
    """The desk's window checks 5 s behind (an expiry compared in the wrong place): an answer
    given after its request expired is counted, and the silence comes 5 s late."""

    def due(state: Any, now: float) -> Any:
        return original_due(state, now - _LATE_S)

    def refusal(self: Any, state: Any, vote: Any, who: Any, now: float) -> Any:
        return original_refusal(self, state, vote, who, now - _LATE_S)

    return due, refusal


async def _change_without_cas(self: Ledger, key: str, step: Callable[..., Any]) -> Any:
    """`Ledger.change` as a read-modify-write with no compare-and-set: a lost race overwrites
    the winner (two coordinators each decide a waiting event)."""
    from coordinator import ledger as ledger_mod

    entry = await self.store.get(key)
    current = self._load(key, entry) if entry is not None else None
    if entry is None or not isinstance(current, ledger_mod.DecisionState):
        return None, False
    if current.state != "awaiting_human":
        return current, False
    after = step(current)
    if after is None:
        return current, False
    sealed = self._seal(msgspec.structs.replace(after, signer="", signature=""))
    value = ledger_mod._enc.encode(sealed)
    try:
        await self.store.update(key, value, entry.revision)
    except ledger_mod.StateConflict:
        latest = await self.store.get(key)
        await self.store.update(key, value, latest.revision if latest else 0)
    return sealed, True


def _any_role_of_the_tenant(
    principal: Any, *, tenant: str, roles: list[str], request_id: str
) -> str | None:
    ok = principal.role == "human" and principal.tenant == tenant
    return None if ok else f"{principal.name} is not a person of tenant {tenant!r}"


def _patches(name: str) -> list[tuple[Any, str, Any]]:
    if name == "human-window-late":
        due, refusal = _window_late(humans._due, humans.Desk._refusal)
        return [(humans, "_due", due), (humans.Desk, "_refusal", refusal)]
    if name == "desk-without-cas":
        return [(Ledger, "change", _change_without_cas)]
    if name == "human-role-early":
        # Any role of the chain may answer from the start (not only the roles asked so far).
        return [(humans, "_may_approve", _any_role_of_the_tenant)]
    if name == "audit-append-unguarded":
        return [(audit, "subjects", _UnguardedSubjects())]
    if name == "reclaim-keeps-old-deadline":
        # A released event claimed again under the deadline it had (long gone by then): the
        # voter it waited for gets no time, and its silence decides.
        return [
            (Ledger, "release", _release_keeping_deadline),
            (Ledger, "_reclaimed", _reclaim_with_old_deadline),
        ]
    if name == "unreachable-is-silence":
        # The behaviour before: a voter nobody could ask counted as the policy counts silence
        # (the wrong rejections of `make chaos` leader-pause).
        return [(decide, "unreachable", lambda vote: False)]
    if name == "advisory-alone":
        return [
            (settle, "gave_up", _listener_alone(settle.gave_up)),
            (world, "ADVISORY_OWN_MSG_ID", True),
        ]
    if name == "dlq-before-mark":
        return [(settle.Settler, "dead_letter", _dead_letter_published_first)]
    if name == "takeover-resets-deadline":
        return [(Ledger, "claim", _takeover_resets_deadline(Ledger.claim))]
    if name == "late-vote-counted":
        return [(decide, "_late", lambda vote, policy: vote)]
    if name == "ack-before-publish":
        return [(settle.Settler, "settle", _ack_first(settle.Settler.settle))]
    raise KeyError(name)


BUGS = (
    "dlq-before-mark",
    "takeover-resets-deadline",
    "late-vote-counted",
    "ack-before-publish",
    "advisory-alone",
    "reclaim-keeps-old-deadline",
    "unreachable-is-silence",
    "audit-append-unguarded",
    "human-window-late",
    "desk-without-cas",
    "human-role-early",
)


@contextlib.contextmanager
def applied(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    saved = []
    for owner, attr, value in _patches(name):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
