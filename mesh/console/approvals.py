"""The approvals inbox's seam: what the console needs from human approvals (issue 15), and a
stand-in until an adapter over them is passed to `create_app(approvals=...)`.

The console asks two things, through `ApprovalSource`, always naming the signed-in `User`:

- `pending(user)`: the approvals waiting for that person, with their evidence. Which requests
  wait for whom (tenant, the approver roles a person's key claims, escalations) is the
  approvals module's rule, so the adapter applies it; the console then checks the tenant once
  more and shows only the user's tenant's.
- `decide(approval_id, user=..., approve=..., reason=...)`: that person's answer.

`NoApprovals` is what the console runs with until then: the inbox page says approvals are not
connected, and deciding raises. Deliberately not a fake that pretends to work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.console.auth import User


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


class ApprovalSource(Protocol):
    """What the console needs of human approvals; an adapter over mesh/approvals.py."""

    available: bool

    async def pending(self, user: User) -> list[PendingApproval]: ...

    async def decide(self, approval_id: str, *, user: User, approve: bool, reason: str) -> None: ...


class NoApprovals:
    """Human approvals are not wired into this console (yet): nothing pending, no decisions."""

    available = False

    async def pending(self, user: User) -> list[PendingApproval]:
        return []

    async def decide(self, approval_id: str, *, user: User, approve: bool, reason: str) -> None:
        raise ConfigError(
            "human approvals are not available in this console",
            hint="the console needs an approvals adapter (docs/console.md, 'Approvals')",
        )
