"""The approvals inbox's seam: what the console needs from human approvals (issue 15), and a
stand-in until they exist.

Human approvals (mesh/approvals.py, subjects `mesh.approval...`) are built apart from the
console. The console asks two things of them, through `ApprovalSource`:

- `pending(tenant)`: the approvals waiting, each with its evidence, for one tenant (or every
  tenant when `tenant` is None: the operator);
- `decide(approval_id, tenant=..., approve=..., reason=..., approver=...)`: submit one
  approver's decision.

`NoApprovals` is the stand-in the console runs with until an adapter over mesh/approvals.py is
passed to `create_app(approvals=...)`: the inbox page then says approvals are not available
here, and its tests skip saying why. This is deliberately not a fake that pretends to work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class PendingApproval:
    """One approval waiting for a human: what it is about, and the evidence to judge it by."""

    approval_id: str
    tenant: str
    event_id: str
    event_type: str
    requested_at: float
    summary: str  # one line: what the approver is asked
    evidence: dict[str, Any] = field(default_factory=dict)  # shown as it is (redacted)
    # Who may answer, as `role:name`; empty: anyone of the tenant the approvals module lets.
    approvers: tuple[str, ...] = ()


class ApprovalSource(Protocol):
    """What the console needs of human approvals; an adapter over mesh/approvals.py."""

    available: bool

    async def pending(self, tenant: str | None) -> list[PendingApproval]: ...

    async def decide(
        self, approval_id: str, *, tenant: str, approve: bool, reason: str, approver: str
    ) -> None: ...


class NoApprovals:
    """Human approvals are not wired into this console (yet): nothing pending, no decisions."""

    available = False

    async def pending(self, tenant: str | None) -> list[PendingApproval]:
        return []

    async def decide(
        self, approval_id: str, *, tenant: str, approve: bool, reason: str, approver: str
    ) -> None:
        from mesh.errors import ConfigError

        raise ConfigError(
            "human approvals are not available in this console",
            hint="the console needs an approvals adapter (docs/console.md, 'Approvals')",
        )
