"""The `mesh` command. User mistakes print what to do next, never a traceback.

The commands live by group in this package (`running`, `events`, `dlq`, `audit`, `status`,
`creds`, `scaffold`, `schema`, `authz`, `console`, `approvals`, `budgets`, `schedules`,
`evaluate`, `canary`);
this module builds the app from them, in the order `mesh --help` lists them. Heavy modules
(the bus, the coordinator, the agents) are imported inside each command, so `mesh --help`
and a mistyped option stay fast. Conventions every command keeps (docs/cli.md): `-h`/`--help`,
`--json` wherever something is listed or shown, distinct exit codes (`_common`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from mesh.cli import (
    approvals,
    audit,
    authz,
    budgets,
    canary,
    console,
    creds,
    dlq,
    evaluate,
    events,
    running,
    scaffold,
    schedules,
    schema,
    status,
)
from mesh.cli._common import EXIT_CONFIG, err, settings_error

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Quorum Mesh: A2A agents on NATS JetStream, decided by quorum.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"mesh {version('quorum-mesh')}")
        except PackageNotFoundError:  # a source tree that was never installed
            print("mesh (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _root(
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version,
            is_eager=True,
            help="Print the installed version and exit.",
        ),
    ] = False,
) -> None:
    """Quorum Mesh: A2A agents on NATS JetStream, decided by quorum."""


app.add_typer(dlq.app, name="dlq")
app.add_typer(audit.app, name="audit")
app.add_typer(creds.app, name="creds")
app.add_typer(approvals.app, name="approvals")
app.add_typer(scaffold.app, name="new")
app.command("budgets")(budgets.budgets)
app.add_typer(authz.app, name="authz")
app.add_typer(schedules.app, name="schedules")
app.add_typer(canary.app, name="canary")
app.add_typer(console.app, name="console")

# -- running the mesh
app.command()(running.demo)
app.command()(running.up)
app.command("run")(running.run_agent)
app.command("coordinator")(running.run_coordinator)
app.command()(running.ensure)
# -- talking to a running mesh
app.command()(events.publish)
app.command("agents")(events.list_agents)
app.command()(events.call)
app.command()(events.decisions)
app.command("schema")(schema.schema)
# -- looking inside
app.command()(status.status)
app.command()(status.trace)
# -- changing agents safely
app.command("eval")(evaluate.evaluate)
app.command("eval-export")(evaluate.export)


def main() -> None:
    try:
        app()
    except Exception as e:
        # Settings are read where a command first needs them, most inside `user_errors`, which
        # says so itself; this is for the rest (a command that reads them outside it).
        line = settings_error(e)
        if line is None:
            raise
        err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
        sys.exit(EXIT_CONFIG)
