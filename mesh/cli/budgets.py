"""`mesh budgets`: model spend by tenant today and by event, against the configured limits;
and each coordinator's events being decided per tenant, against the policies' `events_at_once`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from mesh.cli._common import JsonOption, command, out, print_json


@command
async def budgets(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    events: Annotated[bool, typer.Option("--events", help="Also each event's spend.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Model spend: each tenant's cost today (UTC) against its quota; --events: each event's.
    Then what each running coordinator is deciding per tenant against `events_at_once`."""
    import msgspec
    from nats.js.errors import KeyNotFoundError

    from mesh import subjects
    from mesh.budget import Spent, today
    from mesh.bus import Bus
    from mesh.console.data import coordinator_status  # `mesh status` reads the same
    from mesh.providers import tenant_quota

    day = today()
    rows: list[dict[str, object]] = []
    async with await Bus.connect(name="mesh-cli") as bus:
        kv = await bus.kv(subjects.BUDGETS_BUCKET)
        for key in await bus.kv_keys(subjects.BUDGETS_BUCKET):
            kind, _, rest = key.partition(".")
            who, _, what = rest.partition(".")
            if kind not in ("day", "evt"):
                continue  # `conc.`: model-call slots in flight (leases), not spend
            if tenant is not None and who != tenant:
                continue
            if kind == "day" and what != day:
                continue
            if kind == "evt" and not events:
                continue
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            spent = msgspec.json.decode(entry.value or b"{}", type=Spent)
            quota = tenant_quota(who, bus.settings)
            rows.append(
                {
                    "kind": "tenant-day" if kind == "day" else "event",
                    "tenant": who,
                    "scope": what,
                    "costUsd": spent.cost_micro_usd / 1e6,
                    "tokens": spent.tokens,
                    "toolCalls": spent.tool_calls,
                    "costPerDayUsd": quota.cost_per_day_usd if kind == "day" else None,
                    "concurrentCalls": quota.concurrent_calls,
                }
            )
        deciding = quota_rows(await coordinator_status(bus), tenant)
    if json_out:
        print_json(rows + deciding)
        return
    table = Table(title=f"model spend (UTC day {day})")
    for col in ("kind", "tenant", "day/event", "cost USD", "limit USD/day", "tokens", "calls"):
        table.add_column(col, overflow="fold")
    for r in rows:
        limit = r["costPerDayUsd"]
        table.add_row(
            str(r["kind"]),
            str(r["tenant"]),
            str(r["scope"]),
            f"{r['costUsd']:.6f}",
            "-" if limit is None else f"{limit:.2f}",
            str(r["tokens"]),
            str(r["toolCalls"]),
        )
    out.print(table)
    if deciding:
        table = Table(title="events being decided now, per coordinator (policies' events_at_once)")
        for col in ("tenant", "coordinator", "deciding", "events_at_once"):
            table.add_column(col, overflow="fold")
        for r in deciding:
            limit = r["eventsAtOnce"]
            shown = "-" if limit is None else str(limit)
            table.add_row(str(r["tenant"]), str(r["scope"]), str(r["deciding"]), shown)
        out.print(table)


def quota_rows(answers: list[dict[str, Any]], tenant: str | None) -> list[dict[str, Any]]:
    """The coordinators' `mesh.status.coordinator` answers as rows: per coordinator, each tenant
    it is deciding events of or whose `events_at_once` its policies set (`*`: every tenant
    without its own). The count is each coordinator's own: N coordinators admit up to N times
    the limit. With `tenant`, that tenant's rows and the `*` ones (their limit may be its)."""
    rows = []
    for answer in answers:
        for who, use in sorted((answer.get("tenants") or {}).items()):
            if tenant is not None and who not in (tenant, "*"):
                continue
            rows.append(
                {
                    "kind": "events-at-once",
                    "tenant": who,
                    "scope": str(answer.get("name", "")),
                    "deciding": int(use.get("deciding") or 0),
                    "eventsAtOnce": use.get("eventsAtOnce"),
                }
            )
    return rows
