"""`mesh audit`: the audit trail (signed records, one hash chain per tenant, signed checkpoints)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mesh.cli._common import EXIT_VERIFY, JsonOption, command, err, out, print_json
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.audit import Bundle
    from mesh.identity import Trust

app = typer.Typer(help="The audit trail: signed records, hash-chained per tenant, checkpointed.")

TrustOption = Annotated[
    Path | None,
    typer.Option(
        "--trust", help="Trust file whose keys to believe (default: MESH_TRUST).", dir_okay=False
    ),
]


def _trust(path: Path | None, what: str) -> Trust | None:
    from mesh.identity import load_trust, require_trust
    from mesh.settings import get_settings

    return load_trust(path) if path is not None else require_trust(get_settings(), what=what)


@app.command("ls")
@command
async def audit_ls(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    json_out: JsonOption = False,
    trust_file: TrustOption = None,
) -> None:
    """List the latest audit records; `trust` says whether each is one this mesh signed."""
    import msgspec

    from mesh.audit import judge, read, subject, summary
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:  # no server: say that first
        trust = _trust(trust_file, "`mesh audit ls`")
        records = (await read(bus, tenant or None))[-limit:]
    if json_out:
        print_json([{"seq": s, **msgspec.to_builtins(r)} for s, r in records])
        return
    table = Table(title=f"last {len(records)} audit record(s)")
    for col in ("seq", "tenant", "kind", "ref", "what", "actor", "at", "hash", "trust"):
        table.add_column(col, overflow="fold")
    for seq, r in records:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.at))
        verdict, why = judge(trust, r, subject(r.tenant, r.kind))
        mark = "ok" if verdict == "belongs" else f"[red]{verdict.upper()}[/red]: {escape(why)}"
        what = escape(summary(r))  # a decision's outcome and votes, whichever record shape
        table.add_row(str(seq), r.tenant, r.kind, r.ref, what, r.actor, at, r.hash[:12], mark)
    out.print(table)


@app.command("verify")
@command
async def audit_verify(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
    bundle_file: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            help="Check a bundle `mesh audit export` wrote, offline (no NATS).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    trust_file: TrustOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check every record (hash, signature by a trusted key, chain link), the latest checkpoint
    of each tenant, and the stream's configuration. Exit 6 and every problem if any."""
    from mesh.audit import snapshot, verify_bundle

    if bundle_file is not None:
        trust = _trust(trust_file, "`mesh audit verify`")
        bundle = _load_bundle(bundle_file, tenant)
        where = f"bundle {bundle_file}"
    else:
        from mesh.bus import Bus

        async with await Bus.connect(name="mesh-cli") as bus:  # no server: say that first
            trust = _trust(trust_file, "`mesh audit verify`")
            bundle = await snapshot(bus, tenant or None)
        where = "the mesh"
    result = verify_bundle(bundle, trust)
    if json_out:
        print_json(
            {
                "ok": result.ok,
                "where": where,
                "verified": result.count,
                "problems": result.problems,
                "notes": result.notes,
                "bad_seq": result.bad_seq,
            }
        )
        if not result.ok:
            raise typer.Exit(EXIT_VERIFY)
        return
    for note in result.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if result.ok:
        out.print(f"[green]{result}[/green] ({where})", soft_wrap=True)
        return
    for problem in result.problems:
        err.print(f"[red]✗[/red] {escape(problem)}", soft_wrap=True)
    err.print(
        f"[red]the audit trail does NOT verify[/red] ({where}): {len(result.problems)} "
        f"problem(s); {result.count} records verified",
        soft_wrap=True,
    )
    raise typer.Exit(EXIT_VERIFY)


def _load_bundle(path: Path, tenant: str) -> Bundle:
    import msgspec

    from mesh import subjects
    from mesh.audit import BUNDLE_FORMAT, bundle_decoder

    try:
        bundle = bundle_decoder.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(
            f"{path} is not an audit bundle: {e}", hint="write one with `mesh audit export FILE`"
        ) from None
    if bundle.format != BUNDLE_FORMAT:
        raise ConfigError(f"{path} is a {bundle.format!r} bundle; this mesh reads {BUNDLE_FORMAT}")
    if tenant:
        if bundle.tenant and bundle.tenant != tenant:
            raise ConfigError(f"{path} holds the chain of {bundle.tenant}, not {tenant}")
        bundle.records = [
            s for s in bundle.records if s.subject.startswith(subjects.audit(tenant, ""))
        ]
        bundle.checkpoints = [
            s for s in bundle.checkpoints if s.subject == subjects.checkpoint(tenant)
        ]
        bundle.tenant = tenant
    return bundle


@app.command("export")
@command
async def audit_export(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the bundle.")],
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
) -> None:
    """Write the audit records as stored, the latest checkpoints and the stream's facts to FILE,
    for `mesh audit verify --bundle FILE` (offline, anywhere)."""
    from mesh.audit import bundle_encoder, snapshot
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        bundle = await snapshot(bus, tenant or None)
    try:
        file.write_bytes(bundle_encoder.encode(bundle))
    except OSError as e:
        raise ConfigError(f"cannot write {file}: {e.strerror}") from None
    out.print(
        f"exported {len(bundle.records)} record(s) and {len(bundle.checkpoints)} checkpoint(s) "
        f"to {file}",
        highlight=False,
        soft_wrap=True,
    )
