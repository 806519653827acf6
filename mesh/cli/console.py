"""`mesh console`: the web console on 127.0.0.1 (docs/console.md); `mesh console token FILE`."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mesh.cli._common import err, out, setup_logging
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.dev.topology import Plan
    from mesh.identity import IdentityDir
    from mesh.settings import Settings

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
    from mesh.bus import Bus
    from mesh.console import create_app, serving
    from mesh.identity import resolve_trust, trust_path
    from mesh.settings import get_settings

    settings = get_settings()
    if settings.identity is None:
        # Next to `mesh up`: its console identity (reads every tenant, acts only as its users
        # may), not the folder's operator, when it has one.
        from mesh.identity import IdentityDir, identity_dir

        own = identity_dir(settings.home) / IdentityDir.file_name("console", CONSOLE_IDENTITY)
        if own.is_file():
            settings = settings.model_copy(update={"identity": own})
    trust = resolve_trust(settings)
    # Connected first: no server, or a refused identity, is the command's one-line error.
    bus = await Bus.connect(name="mesh-console", settings=settings)
    app = create_app(
        bus=bus,
        trust=trust,
        trust_path=trust_path(settings) if trust is not None else None,
        insecure=insecure,
        allowed_hosts=allow_host,
        settings=settings,
    )
    try:
        async with bus, serving(app, host=host, port=port) as url:
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


# -- beside `mesh up` ---------------------------------------------------------------------------
CONSOLE_IDENTITY = "console"  # the name of the identity `mesh up` runs its console as


@dataclass(frozen=True)
class BesideUp:
    """The console `mesh up` will start: as which identity, on which port."""

    identity: Path
    port: int


def issue_identities(
    ids: IdentityDir, plan: Plan, port: int | None, settings: Settings
) -> BesideUp | None:
    """What `mesh up` issues before its NATS server starts (so the server admits them from
    the first moment): every identity of the plan, and the console's. None: no console
    (`--console-port -1`, or MESH_CONSOLE_PORT=-1)."""
    from mesh import natsauth
    from mesh.dev.launcher import issue_identities

    issue_identities(ids, plan)
    port = settings.console_port if port is None else port
    if port < 0:
        return None
    return BesideUp(natsauth.ensure_identity(ids, "console", CONSOLE_IDENTITY), port)


async def start_beside_up(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    url: str,
    plan: BesideUp | None,
) -> None:
    """The console `mesh up` serves on 127.0.0.1 for as long as it runs, as the folder's
    console identity (never as the operator); says where. A port in use: any free one, said.
    No `plan`: no console (`--console-port -1`)."""
    from mesh.bus import Bus
    from mesh.console import create_app, serving
    from mesh.identity import load_trust

    if plan is None:
        return
    identity, port = plan.identity, plan.port
    settings = settings.model_copy(update={"identity": identity, "nats_url": url})
    assert settings.trust is not None  # `mesh up` set it to the folder's trust file
    bus = await Bus.connect(name="mesh-console", settings=settings)
    stack.push_async_callback(bus.close)
    app = create_app(bus=bus, trust=load_trust(settings.trust), trust_path=settings.trust)
    try:
        where = await stack.enter_async_context(serving(app, port=port))
    except OSError as e:
        if port == 0:
            raise
        err.print(
            f"[yellow]warning:[/yellow] console port {port} is taken ({e.strerror}); "
            "using a free one (`mesh up --console-port` or MESH_CONSOLE_PORT chooses)",
            soft_wrap=True,
        )
        where = await stack.enter_async_context(serving(app, port=0))
    from mesh.identity import IdentityDir

    operator = identity.parent / IdentityDir.OPERATOR
    out.print(
        f"console: {where} (sign in with the token `mesh console token {operator}` prints)",
        soft_wrap=True,
        highlight=False,
    )
