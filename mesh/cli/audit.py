"""`mesh audit`: the tamper-evident audit trail (hash-chained per tenant)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli._common import command, err, out

app = typer.Typer(help="The tamper-evident audit trail (hash-chained per tenant).")


@app.command("ls")
@command
async def audit_ls(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the latest audit records."""
    import msgspec

    from mesh.audit import read
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        records = (await read(bus, tenant or None))[-limit:]
    if json_out:
        print(json.dumps([{"seq": s, **msgspec.to_builtins(r)} for s, r in records], indent=2))
        return
    table = Table(title=f"last {len(records)} audit record(s)")
    for col in ("seq", "tenant", "kind", "ref", "actor", "at", "hash"):
        table.add_column(col, overflow="fold")
    for seq, r in records:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.at))
        table.add_row(str(seq), r.tenant, r.kind, r.ref, r.actor, at, r.hash[:12])
    out.print(table)


@app.command("verify")
@command
async def audit_verify(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
) -> None:
    """Recompute every hash link; name the first record that does not chain (exit 1)."""
    from mesh.audit import read, verify
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        result = verify(await read(bus, tenant or None))
    if result.ok:
        out.print(f"[green]{result}[/green]")
    else:
        err.print(f"[red]{result}[/red]")
        raise typer.Exit(1)
