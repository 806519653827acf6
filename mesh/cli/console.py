"""`mesh console`: the web console on 127.0.0.1 (docs/console.md); `mesh console token FILE`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from mesh.cli._common import err, out, setup_logging
from mesh.errors import ConfigError

app = typer.Typer(help="The web console: agents, decisions, approvals, dead letters, audit.")


@app.callback(invoke_without_command=True)
def console(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (another than loopback: put TLS in front).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8780,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="No sign-in: whoever reaches the port is the operator. Local experiments only.",
        ),
    ] = False,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(help="Another Host name the console answers to (behind a proxy)."),
    ] = None,
) -> None:
    """Serve the web console until Ctrl-C, as this folder's identity (MESH_IDENTITY)."""
    if ctx.invoked_subcommand is not None:
        return
    from mesh.cli.running import _until_signal

    setup_logging(quiet=False)
    if insecure:
        err.print(
            "[bold red]INSECURE:[/bold red] the console asks nobody to sign in; anyone who "
            f"reaches {host}:{port} acts as the operator (local experiments only)",
            soft_wrap=True,
        )
    _until_signal(_serve(host, port, insecure, allow_host or []))


async def _serve(host: str, port: int, insecure: bool, allow_host: list[str]) -> None:
    from mesh.console import create_app, serving
    from mesh.identity import resolve_trust, trust_path
    from mesh.settings import get_settings

    settings = get_settings()
    trust = resolve_trust(settings)
    app = create_app(
        trust=trust,
        trust_path=trust_path(settings) if trust is not None else None,
        insecure=insecure,
        allowed_hosts=allow_host,
        settings=settings,
    )
    try:
        async with serving(app, host=host, port=port) as url:
            out.print(f"[green]console[/green] at {url} · Ctrl-C to stop", soft_wrap=True)
            await asyncio.Event().wait()
    except OSError as e:
        raise ConfigError(
            f"the console cannot listen on {host}:{port}: {e.strerror}",
            hint="choose another --port (0: any free one)",
        ) from None


@app.command("token")
def token(
    identity_file: Annotated[
        Path, typer.Argument(metavar="FILE", help="An identity file `mesh creds` wrote.")
    ],
) -> None:
    """Print the bearer token of an identity file, to paste into the console's sign-in.

    Only who may read the file (mode 0600) can print it; the token signs you in as that
    identity until it expires."""
    from mesh.cli._common import user_errors
    from mesh.identity import load_identity

    with user_errors():
        identity = load_identity(identity_file)
        if not identity.token:
            raise ConfigError(
                f"{identity_file} holds no bearer token",
                hint="issue one with `mesh creds reader NAME --tenant T` (or publisher)",
            )
        print(identity.token)
