"""`mesh dlq`: dead letters, what the mesh could not decide and why; show, replay, purge."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli._common import JsonOption, command, err, out, print_json
from mesh.errors import ConfigError

app = typer.Typer(help="Dead letters: what the mesh could not decide, and why.")


@app.callback(invoke_without_command=True)
def dlq_default(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """List dead letters (same as `mesh dlq ls`)."""
    if ctx.invoked_subcommand is None:
        dlq_ls(limit=20, json_out=json_out, reason=None)


@app.command("ls")
@command
async def dlq_ls(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    json_out: JsonOption = False,
    reason: Annotated[
        str | None, typer.Option(help="Only this reason (e.g. max_deliveries).")
    ] = None,
) -> None:
    """List the latest dead letters with their reason; the id is what show/replay take."""
    import msgspec

    from coordinator import dlq
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        items = await dlq.latest(bus, limit=limit, reason=reason)
    if json_out:
        print_json([{"seq": s, **msgspec.to_builtins(d)} for s, d in items])
        return
    table = Table(title=f"last {len(items)} dead letter(s)")
    for col in ("id", "reason", "subject", "error", "body"):
        table.add_column(col, overflow="fold")
    for seq, d in items:
        preview = (
            f"({d.body_ref.size:,} bytes, kept by reference: `mesh dlq show {seq}`)"
            if d.body_ref is not None
            else d.body[:60].decode("utf-8", errors="backslashreplace")
        )
        table.add_row(str(seq), d.reason, d.subject, d.error, preview)
    out.print(table)


@app.command("show")
@command
async def dlq_show(
    dlq_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id from `mesh dlq ls`.")],
    json_out: JsonOption = False,
) -> None:
    """Show one dead letter in full: why, where from, and the original body."""
    import msgspec
    from rich.markup import escape

    from coordinator import dlq
    from mesh import envelope, subjects
    from mesh.bus import Bus
    from mesh.identity import resolve_trust
    from mesh.records import event_principal
    from mesh.settings import get_settings

    async with await Bus.connect(name="mesh-cli") as bus:
        d = await dlq.get(bus, dlq_id)
        # Showing it hands out the original body: an authorization policy may forbid that.
        await dlq.authorize(bus, "export", d, ref=f"dlq:{dlq_id}")
        # A body too large for the record was kept by reference: fetched and checked against
        # the record's SHA-256; what is wrong with it is shown, not raised (the record stands).
        try:
            body, body_problem = await dlq.body_of(bus, d), ""
        except ConfigError as e:
            body, body_problem = b"", e.message
    # Who published it: the trusted key that signed it as it arrived (headers are kept).
    principal, unverified = (
        event_principal(
            resolve_trust(get_settings()),
            d.subject,
            envelope.signed_content(d.headers, body),  # binary mode: the ce- headers too
            d.headers.get(subjects.H_SIGNATURE),
        )
        if not body_problem
        else ("", "body unavailable")
    )
    if json_out:
        publisher = {"publisher": principal, "publisher_unverified": unverified}
        kept = {"body_problem": body_problem} if body_problem else {}
        print_json({"seq": dlq_id, **msgspec.to_builtins(d), **publisher, **kept})
        return
    at = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(d.at)) if d.at else "-"
    fields = [
        ("id", str(dlq_id)),
        ("reason", d.reason),
        ("error", d.error),
        ("subject", d.subject or "-"),
        ("tenant", d.tenant),
        ("event id", d.event_id or "-"),
        ("event type", d.event_type or "-"),
        ("publisher", principal or f"not verified: {unverified}"),
        ("attempts", str(d.attempts)),
        ("stream seq", str(d.stream_seq or "-")),
        ("trace id", d.trace_id or "-"),
        ("time", at),
    ]
    ref = d.body_ref
    if ref is not None:
        fields.append(
            (
                "body kept",
                f"by reference: object {ref.name} of object store {ref.bucket} "
                f"({ref.size:,} bytes, sha256 {ref.sha256})",
            )
        )
    for name, value in fields:
        # soft_wrap: long errors and ids stay on one line, whole when copied.
        out.print(f"[bold]{name:>10}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)
    out.print(f"[bold]{'headers':>10}[/bold]", highlight=False)
    for k, v in sorted(d.headers.items()):
        out.print(f"            {k}: {v}", highlight=False, markup=False, soft_wrap=True)
    if body_problem:
        err.print(f"[red]body unavailable:[/red] {escape(body_problem)}", soft_wrap=True)
        return
    out.print(f"[bold]{'body':>10}[/bold]  ({len(body)} bytes)", highlight=False)
    try:
        # Pretty JSON when it is JSON; otherwise the bytes as text, undecodable ones escaped.
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        text = body.decode("utf-8", errors="backslashreplace")
    print(text)


@app.command("replay")
@command
async def dlq_replay(
    dlq_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id from `mesh dlq ls`.")],
) -> None:
    """Publish a dead letter's original event again, to its original subject."""
    from coordinator import dlq
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        msg_id = await dlq.replay(bus, dlq_id)
    print(msg_id)  # alone on stdout, for scripts
    err.print(
        f"replayed dead letter {dlq_id} as a new message: "
        "the coordinator will decide it if it never was",
        highlight=False,
        soft_wrap=True,
    )


@app.command("purge")
@command
async def dlq_purge(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete them.")] = False,
) -> None:
    """Delete dead letters (all, or one reason's) for good."""
    from coordinator import dlq
    from mesh.bus import Bus

    if not yes:
        what = f"every {reason} dead letter" if reason else "every dead letter"
        raise ConfigError(
            f"this deletes {what} for good", hint="add --yes to go ahead (see `mesh dlq ls` first)"
        )
    async with await Bus.connect(name="mesh-cli") as bus:
        removed = await dlq.purge(bus, reason=reason)
    out.print(f"removed {removed} dead letter(s)", highlight=False)
