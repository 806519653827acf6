"""`mesh schedules`: events the mesh publishes on a clock (NATS message scheduling); list, add,
remove, and run a relay that turns the server's firings into events (`mesh.schedules`)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mesh.cli._common import JsonOption, command, err, out, print_json, read_body
from mesh.errors import ConfigError, NotFoundError

app = typer.Typer(help="Schedules: events published on a clock, durably, once per period.")

TenantOption = Annotated[str, typer.Option(help="Tenant (default: MESH_TENANT).")]


def _tenant(tenant: str) -> str:
    from mesh.settings import get_settings

    return tenant or get_settings().tenant


@app.command("ls")
@command
async def schedules_ls(
    tenant: Annotated[str, typer.Option(help="Only this tenant's.")] = "",
    json_out: JsonOption = False,
) -> None:
    """List the schedules in effect, and how many firings wait for a relay."""
    from mesh import schedules
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        found = await schedules.listing(bus, tenant or None)
        pending = await schedules.pending_firings(bus)
    rows = [
        {
            "tenant": d.schedule.tenant,
            "name": d.schedule.name,
            "when": d.schedule.spec,
            "time_zone": d.schedule.time_zone or "UTC",
            "event_type": d.schedule.event_type,
            "event_id": d.schedule.event_id,
            "data": d.schedule.data,
            "seq": d.seq,
        }
        for d in found
    ]
    if json_out:
        print_json({"schedules": rows, "pending_firings": pending})
        return
    if not rows:
        out.print("no schedules")
    else:
        table = Table("tenant", "name", "when", "event type", "data")
        for r in rows:
            when = r["when"] if r["time_zone"] == "UTC" else f"{r['when']} ({r['time_zone']})"
            table.add_row(
                r["tenant"], r["name"], escape(when), r["event_type"], escape(json.dumps(r["data"]))
            )
        out.print(table)
    if pending is None:
        err.print("no relay has run yet: firings wait in the stream (`mesh schedules run`)")
    elif pending:
        err.print(f"{pending} firing(s) wait for a relay (`mesh schedules run`)")


@app.command("add")
@command
async def schedules_add(
    name: Annotated[str, typer.Argument(help="Schedule name (letters, digits, - and _).")],
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="Event type, e.g. x.sweep")],
    body: Annotated[str, typer.Argument(metavar="JSON|@file", help="The event's data.")] = "null",
    *,
    every: Annotated[str, typer.Option(help="Interval: 30s, 5m, 1h30m.")] = "",
    cron: Annotated[str, typer.Option(help="6-field cron (seconds first) or @daily…")] = "",
    at: Annotated[str, typer.Option(help="Once, at this time (ISO 8601 with zone).")] = "",
    time_zone: Annotated[str, typer.Option("--tz", help="IANA zone of --cron.")] = "",
    event_id: Annotated[str, typer.Option("--id", help="With --at: the event's id.")] = "",
    tenant: TenantOption = "",
    json_out: JsonOption = False,
) -> None:
    """Declare a schedule (idempotent: the same one again changes nothing)."""
    from mesh import schedules
    from mesh.bus import Bus

    try:
        data = json.loads(read_body(body))
    except ValueError as e:
        raise ConfigError(f"the data is not JSON: {e}", hint="quote it: '{\"a\": 1}'") from None
    tenant = _tenant(tenant)
    if at:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise ConfigError(
                f"--at {at!r} is not an ISO 8601 time", hint="e.g. 2026-12-01T09:00:00Z"
            ) from None
        if every or cron:
            raise ConfigError("give one of --every, --cron, --at")
        sched = schedules.one_shot(event_id or name, event_type, data, at=when, tenant=tenant)
    else:
        if event_id:
            raise ConfigError("--id goes with --at (a recurring schedule derives its ids)")
        sched = schedules.schedule(
            name, event_type, data, tenant=tenant, every=every, cron=cron, time_zone=time_zone
        )
    async with await Bus.connect(name="mesh-cli") as bus:
        declared = await schedules.declare(bus, sched)
    if json_out:
        print_json({"tenant": sched.tenant, "name": sched.name, "when": sched.spec})
    else:
        out.print(
            f"schedule {sched.tenant}/{sched.name}: {escape(sched.spec)} (seq {declared.seq})"
        )


@app.command("rm")
@command
async def schedules_rm(
    name: Annotated[str, typer.Argument(help="Schedule name.")],
    tenant: TenantOption = "",
) -> None:
    """Stop a schedule."""
    from mesh import schedules
    from mesh.bus import Bus

    tenant = _tenant(tenant)
    async with await Bus.connect(name="mesh-cli") as bus:
        removed = await schedules.remove(bus, tenant, name)
    if not removed:
        raise NotFoundError(f"no schedule {tenant}/{name}", hint="`mesh schedules ls` lists them")
    out.print(f"schedule {tenant}/{name} removed")


@app.command("run")
def schedules_run() -> None:
    """Run a relay: publish each firing as a signed event (any number may run; they share the
    work). Until Ctrl-C or SIGTERM."""
    from mesh.cli._common import setup_logging
    from mesh.cli.running import _until_signal

    setup_logging(quiet=False)
    _until_signal(_relay())


async def _relay() -> None:
    from mesh import schedules
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-schedules") as bus:
        err.print("relaying schedule firings (Ctrl-C stops)")
        await schedules.Relay(bus).run(asyncio.Event())
