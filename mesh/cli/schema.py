"""`mesh schema [TYPE]`: the JSON Schema of an event type's data, or the types that have one.

Offline: schemas are files (the shipped `mesh/schemas/`, then `MESH_SCHEMA_DIR`), so no NATS is
needed. Registered in `mesh/cli/__init__.py` as `app.command("schema")(schema.schema)`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mesh.cli._common import out, user_errors


def schema(
    event_type: Annotated[
        str | None,
        typer.Argument(
            metavar="TYPE",
            help="An event type (e.g. release.proposed); omitted: list the types with a schema.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="JSON output (a schema is always JSON).")
    ] = False,
) -> None:
    """Print the JSON Schema (2020-12) an event type's data must fit, or list the types."""
    from mesh import contracts
    from mesh.errors import NotFoundError

    with user_errors():
        if event_type is None:
            types = [(t, contracts.schema_path(t)) for t in contracts.event_types()]
            if json_out:
                listing = [{"type": t, "file": str(p)} for t, p in types]
                typer.echo(json.dumps(listing, indent=2))
                return
            table = Table("type", "schema file", box=None, pad_edge=False)
            for t, p in types:
                table.add_row(escape(t), escape(str(p)))
            out.print(table)
            return
        found = contracts.schema_of(event_type)
        if found is None:
            known = ", ".join(contracts.event_types()) or "none"
            raise NotFoundError(
                f"no schema for event type {event_type!r} (types with one: {known})",
                hint="an event type without a schema is not checked; add "
                f"<MESH_SCHEMA_DIR>/{event_type}{contracts.SUFFIX} to give it one",
            )
        # Plain echo, not rich: the output is for `> file.json` and `| jq`, byte for byte JSON.
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
