"""The approvals inbox's seam: what the console needs from human approvals (issue 15), and a
stand-in until an adapter over them is passed to `create_app(approvals=...)`.

The console asks two things, through `ApprovalSource`, always naming the signed-in `User`:

- `pending(user)`: the approvals waiting for that person, with their evidence. Which requests
  wait for whom (tenant, the approver roles a person's key claims, escalations) is the
  approvals module's rule, so the adapter applies it; the console then checks the tenant once
  more and shows only the user's tenant's.
- `decide(approval_id, user=..., approve=..., reason=...)`: that person's answer.

`BusApprovals` is the adapter over mesh/approvals.py that `create_app` wires by default, and
the trust decision it carries (docs/console.md, "Approvals"; docs/humans.md): the console never
holds a person's key, so it answers ON BEHALF of the signed-in person. Only a user signed in
with a `human` token of tenant T may answer, and only requests of T asking a role that person
holds (the trust file's `claims` of their key, not anything the session says). The answer is a
`HumanVote` with `via = "console"`, `by` the person, signed with the console's own key; the
coordinator's desk believes it only if that key is a trusted console's and the person it names
is a trusted human of T holding a role asked, then checks it as any answer (evidence, round,
expiry, Cedar's `approve`). Its receipt (accepted, or refused and why) is shown to the user.

`NoApprovals` is what a console without a signing identity runs with: the inbox page says
approvals are not connected, and deciding raises. Deliberately not a fake that pretends to work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from mesh import approvals
from mesh.errors import ConfigError
from mesh.identity import ALL_TENANTS, Signer, Trust

if TYPE_CHECKING:
    from mesh.bus import Bus
    from mesh.console.auth import User

RECEIPT_WAIT_S = 15.0  # how long an answer waits for the coordinator's receipt before saying so


@dataclass(frozen=True)
class PendingApproval:
    """One approval waiting for a human: what it is about, and the evidence to judge it by."""

    approval_id: str
    tenant: str
    event_id: str
    event_type: str
    requested_at: float
    summary: str  # one line: what the approver is asked
    evidence: dict[str, Any] = field(default_factory=dict)  # shown as it is (masked)
    who: tuple[str, ...] = ()  # who may answer (shown, e.g. the approver roles asked)
    expires_at: float = 0.0  # when silence counts (0: not said)
    may_answer: bool = False  # whether this user may answer it (else they only look)


@dataclass(frozen=True)
class Receipt:
    """What came of an answer: the coordinator's receipt (accepted, or refused and why), or
    none in time (`accepted` None: sent, not yet confirmed)."""

    accepted: bool | None
    why: str = ""


class ApprovalSource(Protocol):
    """What the console needs of human approvals; an adapter over mesh/approvals.py."""

    @property
    def available(self) -> bool: ...  # whether answers can be given here at all

    async def pending(self, user: User) -> list[PendingApproval]: ...

    async def decide(
        self, approval_id: str, *, user: User, approve: bool, reason: str
    ) -> Receipt: ...


class NoApprovals:
    """Human approvals are not wired into this console (yet): nothing pending, no decisions."""

    available = False

    async def pending(self, user: User) -> list[PendingApproval]:
        return []

    async def decide(self, approval_id: str, *, user: User, approve: bool, reason: str) -> Receipt:
        raise ConfigError(
            "human approvals are not available in this console",
            hint="the console needs an approvals adapter (docs/console.md, 'Approvals')",
        )


class BusApprovals:
    """The inbox over the bus (mesh/approvals.py), answering as the console's identity on
    behalf of the signed-in person. `bus` and `trust` are functions: the console connects at
    start-up and re-reads its trust file as it changes."""

    def __init__(self, bus: Callable[[], Bus], trust: Callable[[], Trust | None]) -> None:
        self._bus = bus
        self._trust = trust

    def _signer(self) -> Signer | None:
        identity = self._bus().identity
        if identity is None or not identity.signing_seed:
            return None
        if identity.role not in approvals.ON_BEHALF_SIGNERS:
            return None  # the desk would refuse what it signs: say "not connected" instead
        return identity.signer()

    @property
    def available(self) -> bool:
        try:
            return self._trust() is not None and self._signer() is not None
        except AssertionError:  # not connected yet
            return False

    async def _open(self, user: User) -> list[approvals.ApprovalRequest]:
        trust = self._trust()
        if trust is None:
            return []
        tenant = "*" if user.tenant == ALL_TENANTS else user.tenant
        found = await approvals.inbox(self._bus(), tenant, trust)
        now = time.time()
        return [
            r
            for r in found.values()
            if r.status == "open" and r.expires_at > now and user.sees(r.tenant)
        ]

    def _roles(self, user: User) -> set[str]:
        """The approver roles a signed-in person holds, by the trust file (none for others)."""
        trust = self._trust()
        if user.role != "human" or trust is None:
            return set()
        who = approvals.person(trust, user.name, user.tenant)
        return set(who.claims) if who is not None else set()

    async def pending(self, user: User) -> list[PendingApproval]:
        """A person's: the open requests of their tenant asking a role they hold. Anyone
        else signed in (operator, reader, publisher): their tenants' open requests, to look at."""
        roles = self._roles(user)
        out = []
        for r in sorted(await self._open(user), key=lambda r: r.asked_at):
            mine = bool(roles & set(r.roles))
            if user.role == "human" and not mine:
                continue
            out.append(
                PendingApproval(
                    approval_id=r.id,
                    tenant=r.tenant,
                    event_id=r.event_id,
                    event_type=r.event_type,
                    requested_at=r.asked_at,
                    summary=f"{r.event_type} waits for a {' or '.join(r.roles)}"
                    + (f" (escalated, round {r.round})" if r.round else ""),
                    evidence={
                        "event": r.event_data,
                        "votes": [_vote(v) for v in r.evidence],
                    },
                    who=tuple(r.roles),
                    expires_at=r.expires_at,
                    may_answer=mine,
                )
            )
        return out

    async def decide(self, approval_id: str, *, user: User, approve: bool, reason: str) -> Receipt:
        signer = self._signer()
        if signer is None:
            raise ConfigError("this console has no key to answer with")
        request = next((r for r in await self._open(user) if r.id == approval_id), None)
        if request is None or not (self._roles(user) & set(request.roles)):
            raise ConfigError(f"{approval_id} is not waiting for {user.name}")
        vote = approvals.answer(
            signer,
            request,
            by=user.name,
            answer="approve" if approve else "reject",
            reason=reason,
            via=approvals.VIA_CONSOLE,
        )
        bus = self._bus()
        await approvals.submit(bus, vote)
        got = await approvals.receipt(bus, vote, wait_s=RECEIPT_WAIT_S)
        if got is None:
            return Receipt(None, f"no receipt within {RECEIPT_WAIT_S:.0f} s (the audit has it)")
        return Receipt(got.accepted, got.why)


def _vote(v: Any) -> dict[str, Any]:
    """An agent's vote as the inbox shows it: who, what, why."""
    d = msgspec.to_builtins(v)
    verdict = d.get("verdict") or {}
    return {
        "agent": d.get("agent", ""),
        "skill": d.get("skill", ""),
        "outcome": d.get("outcome", ""),
        "vote": verdict.get("vote"),
        "reasons": verdict.get("reasons", []),
        "confidence": verdict.get("confidence"),
    }
