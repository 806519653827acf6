"""`mesh approvals`: the approval inbox: requests waiting for a person; answer them.

    mesh approvals ls                              # open requests of your tenant
    mesh approvals show ID                         # the event, the agents' votes and reasons
    mesh approvals approve ID --reason "dose checked against the formulary"
    mesh approvals deny ID --reason "…"

Run as a person (`mesh creds human NAME --tenant T --role ROLE`, then MESH_IDENTITY=<its file>):
the answer is signed with their key and checked by the coordinator (their role, the request's
round, the evidence shown); the command waits for the coordinator's receipt and says whether
the answer was accepted or refused, and why.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mesh.cli._common import JsonOption, command, out, print_json
from mesh.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from mesh.approvals import ApprovalRequest
    from mesh.bus import Bus

app = typer.Typer(
    help="The approval inbox: decisions waiting for a person; show, approve, deny.",
    no_args_is_help=True,
)

TenantOption = Annotated[
    str, typer.Option("--tenant", metavar="T", help="Tenant (default: your identity's).")
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded and audited).")]
WaitOption = Annotated[
    float, typer.Option("--wait", min=0.0, max=300.0, help="Seconds to wait for the receipt.")
]
IdArgument = Annotated[str, typer.Argument(metavar="ID", help="Request id from `ls`.")]


def _tenant(bus: Bus, given: str) -> str:
    from mesh.settings import get_settings

    identity = bus.identity
    if given:
        return given
    if identity is not None and identity.tenant != "*":
        return identity.tenant
    return get_settings().tenant


async def _requests(bus: Bus, tenant: str) -> dict[str, ApprovalRequest]:
    from mesh import approvals
    from mesh.identity import resolve_trust
    from mesh.settings import get_settings

    return await approvals.inbox(bus, tenant, resolve_trust(get_settings()))


def _when(at: float) -> str:
    if not at:
        return "-"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(r: ApprovalRequest) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(r)  # type: ignore[no-any-return]


@app.command("ls")
@command
async def approvals_ls(
    tenant: TenantOption = "",
    every: Annotated[bool, typer.Option("--all", help="Closed requests too.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Requests waiting for a person (the id is what show/approve/deny take)."""
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        t = _tenant(bus, tenant)
        found = await _requests(bus, t)
    rows = [r for r in found.values() if every or r.status == "open"]
    if json_out:
        print_json([_row(r) for r in rows])
        return
    table = Table(title=f"{len(rows)} approval request(s) of tenant {t}")
    for col in ("id", "event", "who may answer", "round", "expires", "next escalation", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        nxt = (
            f"{', '.join(r.next_roles)} at {_when(r.next_escalation_at)}"
            if r.next_escalation_at
            else "-"
        )
        status = r.status if r.status == "open" else f"closed: {r.outcome}"
        table.add_row(
            r.id,
            f"{r.event_type} {r.event_id}",
            ", ".join(r.roles),
            str(r.round),
            _when(r.expires_at),
            nxt,
            status,
        )
    out.print(table)


async def _one(bus: Bus, tenant: str, request_id: str) -> ApprovalRequest:
    found = await _requests(bus, tenant)
    request = found.get(request_id)
    if request is None:
        raise NotFoundError(
            f"no approval request {request_id!r} for tenant {tenant}",
            hint="list them with `mesh approvals ls --all`",
        )
    return request


@app.command("show")
@command
async def approvals_show(
    request_id: IdArgument, tenant: TenantOption = "", json_out: JsonOption = False
) -> None:
    """One request: the event, the agents' votes and reasons (the evidence), who may answer."""
    import json

    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        request = await _one(bus, _tenant(bus, tenant), request_id)
    if json_out:
        print_json(_row(request))
        return
    out.print(f"[bold]{request.id}[/bold]  {request.status}  {request.outcome}", highlight=False)
    out.print(f"  event:     {request.event_type} {request.event_id} (tenant {request.tenant})")
    out.print(f"  data:      {json.dumps(request.event_data)}", soft_wrap=True, highlight=False)
    out.print(f"  voter:     {request.voter} (round {request.round})")
    out.print(f"  may answer: {', '.join(request.roles)}")
    out.print(f"  asked:     {_when(request.asked_at)}; expires {_when(request.expires_at)}")
    out.print(f"  silence:   counts as {request.silence}")
    out.print("  evidence (the agents' votes):")
    for v in request.evidence:
        said = v.verdict.vote if v.verdict else v.outcome
        reasons = "; ".join(v.verdict.reasons) if v.verdict else v.error
        out.print(f"    {v.skill} ({v.agent}): {said}: {reasons}", soft_wrap=True, highlight=False)


async def _answer(request_id: str, tenant: str, yes: bool, reason: str, wait_s: float) -> None:
    from mesh import approvals
    from mesh.bus import Bus

    if not reason.strip():
        raise ConfigError("an answer needs a reason", hint='--reason "what you checked"')
    async with await Bus.connect(name="mesh-cli") as bus:
        identity = bus.identity
        if identity is None or identity.role != "human":
            raise ConfigError(
                "answering needs a person's identity",
                hint="mesh creds human NAME --tenant T --role ROLE; then MESH_IDENTITY=<file>",
            )
        t = _tenant(bus, tenant)
        request = await _one(bus, t, request_id)
        if request.status != "open":
            raise ConfigError(f"{request_id} is closed ({request.outcome})")
        vote = approvals.answer(
            identity.signer(),
            request,
            by=identity.name,
            answer="approve" if yes else "reject",
            reason=reason,
        )
        await approvals.submit(bus, vote)
        receipt = await approvals.receipt(bus, vote, wait_s=wait_s)
    if receipt is None:
        out.print(f"sent; no receipt within {wait_s:g} s (is a coordinator running?)")
        return
    if not receipt.accepted:
        raise ConfigError(f"refused: {receipt.why}")
    out.print(f"{'approved' if yes else 'denied'} {request_id} as {vote.by}: accepted")


@app.command("approve")
@command
async def approvals_approve(
    request_id: IdArgument, reason: ReasonOption, tenant: TenantOption = "", wait: WaitOption = 10.0
) -> None:
    """Approve, as yourself (signed); waits for the coordinator's receipt."""
    await _answer(request_id, tenant, True, reason, wait)


@app.command("deny")
@command
async def approvals_deny(
    request_id: IdArgument, reason: ReasonOption, tenant: TenantOption = "", wait: WaitOption = 10.0
) -> None:
    """Deny (a reject vote), as yourself (signed); waits for the coordinator's receipt."""
    await _answer(request_id, tenant, False, reason, wait)
