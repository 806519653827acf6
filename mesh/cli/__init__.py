"""The `mesh` command. User mistakes print what to do next, never a traceback.

The commands live by group in this package (`running`, `events`, `dlq`, `audit`, `status`,
`creds`);
this module builds the app from them, in the order `mesh --help` lists them. Heavy modules
(the bus, the coordinator, the agents) are imported inside each command, so `mesh --help`
and a mistyped option stay fast.
"""

from __future__ import annotations

import typer

from mesh.cli import audit, creds, dlq, events, running, status

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quorum Mesh: A2A agents on NATS JetStream, decided by quorum.",
)
app.add_typer(dlq.app, name="dlq")
app.add_typer(audit.app, name="audit")
app.add_typer(creds.app, name="creds")

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
# -- looking inside
app.command()(status.status)
app.command()(status.trace)


def main() -> None:
    app()
