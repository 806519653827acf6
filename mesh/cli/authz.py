"""`mesh authz`: the Cedar authorization policies (docs/authorization.md); check a file or a
folder before it goes live, see the set in force, ask one question.

Offline: policies are files (`MESH_PROFILE`, `MESH_AUTHZ_DIR`), so no NATS is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mesh.cli._common import JsonOption, out, print_json, user_errors

app = typer.Typer(help="Authorization policies (Cedar): check, show, ask.")


@app.command("check")
def check(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="FILE...", help=".cedar files, or folders of them."),
    ],
    schema: Annotated[
        Path | None,
        typer.Option(
            help="The Cedar schema (default: a folder's own *.cedarschema, else the shipped one)."
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Check policy files as the mesh would load them: parsed, and type-checked against the
    schema; the first problem is printed as `file:line: message` (exit code 3)."""
    from mesh.authz import _source
    from mesh.authz._engine import SHIPPED_SCHEMA
    from mesh.errors import ConfigError

    with user_errors():
        files: list[Path] = []
        entities: Path | None = None
        found_schema = schema
        for path in paths:
            if path.is_dir():
                files += sorted(path.glob(f"*{_source.POLICY_SUFFIX}"))
                if found_schema is None:
                    found_schema = next(iter(sorted(path.glob(f"*{_source.SCHEMA_SUFFIX}"))), None)
                if (path / _source.ENTITIES_FILE).exists():
                    entities = path / _source.ENTITIES_FILE
            elif path.exists():
                files.append(path)
            else:
                raise ConfigError(f"{path}: no such file or folder")
        if not files:
            raise ConfigError("no .cedar files to check", hint="give .cedar files or folders")
        loaded = _source.load(files, found_schema or SHIPPED_SCHEMA, entities)
        if json_out:  # a problem is an error line on stderr and exit code 3, as without --json
            print_json(
                {
                    "ok": True,
                    "files": [str(f) for f in files],
                    "schema": str(found_schema or SHIPPED_SCHEMA),
                    "policies": list(loaded.ids),
                    "sha256": loaded.sha256,
                }
            )
            return
        out.print(
            f"ok: {len(loaded.ids)} policies in {len(files)} file(s), sha256 {loaded.sha256}",
            highlight=False,
        )


@app.command("show")
def show(json_out: JsonOption = False) -> None:
    """The policies in force here (MESH_PROFILE, MESH_AUTHZ_DIR): files, hash, policy ids."""
    from mesh.authz import Authorizer
    from mesh.settings import get_settings

    with user_errors():
        authorizer = Authorizer.from_settings(get_settings())
        doc = {
            "profile": authorizer.profile,
            "sha256": authorizer.sha256,
            "files": list(authorizer.files),
            "policies": list(authorizer.policy_ids),
        }
        if json_out:
            print_json(doc)
            return
        out.print(f"profile {authorizer.profile}, sha256 {authorizer.sha256}", highlight=False)
        for f in authorizer.files:
            out.print(f"  file    {escape(f)}", highlight=False)
        for pid in authorizer.policy_ids:
            out.print(f"  policy  {escape(pid)}", highlight=False)


@app.command("ask")
def ask(
    principal: Annotated[str, typer.Argument(help="role:name, e.g. publisher:billing.")],
    action: Annotated[
        str, typer.Argument(help="publish, approve, replay, purge, export, call_tool.")
    ],
    resource: Annotated[
        str,
        typer.Argument(
            help='Type::"id" of the Mesh namespace, e.g. '
            'EventType::"acme/release.proposed" (attributes are taken from the id).'
        ),
    ],
    *,
    tenant: Annotated[str, typer.Option(help="The principal's tenant (* for all).")] = "*",
    context: Annotated[str, typer.Option(help="The request's context, JSON.")] = "{}",
    groups: Annotated[list[str] | None, typer.Option("--group", help="A group it is in.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Ask the policies in force one question; exit code 0 allowed, 3 denied."""
    from mesh import authz
    from mesh.errors import ConfigError, ForbiddenError
    from mesh.settings import get_settings

    with user_errors():
        role, _, name = principal.partition(":")
        kind, _, rid = resource.partition("::")
        rid = rid.strip('"')
        parts = rid.split("/")
        makers = {
            "EventType": lambda: authz.event_type(parts[0], "/".join(parts[1:])),
            "DecisionType": lambda: authz.decision_type(parts[0], "/".join(parts[1:])),
            "DeadLetter": lambda: authz.dead_letters(*[*parts, "*", "*", "*"][:3]),
            "Tool": lambda: authz.tool(parts[0], "/".join(parts[1:])),
        }
        if not name or kind not in makers or len(parts) < 2 - (kind == "DeadLetter"):
            raise ConfigError(
                f"cannot read {principal!r} / {resource!r}",
                hint='e.g. mesh authz ask publisher:billing publish EventType::"acme/t"',
            )
        try:
            ctx = json.loads(context)
        except ValueError as e:
            raise ConfigError(f"--context is not JSON: {e}") from None
        decision = authz.Authorizer.from_settings(get_settings()).is_allowed(
            authz.identity(role, name, tenant=tenant, groups=groups or ()),
            action,
            makers[kind](),
            ctx,
        )
        if json_out:
            print_json(
                {
                    "allowed": decision.allowed,
                    "policies": list(decision.policy_ids),
                    "reasons": list(decision.reasons),
                }
            )
        if not decision.allowed:
            raise ForbiddenError(f"denied: {decision.explain()}")
        if not json_out:
            out.print(f"allowed: {decision.explain()}", highlight=False)
