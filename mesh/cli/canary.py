"""`mesh canary`: the canary gate's state (coordinator.canary): every candidate version the
coordinators have counted, stopped or not; stop one by hand; let a stopped one run again."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli._common import JsonOption, command, out, print_json
from mesh.errors import NotFoundError

app = typer.Typer(help="Canary and shadow versions: their gate's counts, stop, resume.")

AgentArg = Annotated[str, typer.Argument(help="Agent name, e.g. security-review")]
VersionArg = Annotated[str, typer.Argument(help="Its composite version (`mesh agents`)")]


@app.command("status")
@command
async def canary_status(json_out: JsonOption = False) -> None:
    """Every candidate the gate has counted: compared votes, disagreement, state."""
    from coordinator.canary import Book
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        states = await (await Book.on_bus(bus, name="mesh-cli")).states()
    rows = [
        {
            "agent": s.agent,
            "version": s.version,
            "mode": s.mode,
            "compared": s.compared,
            "disagreed": s.disagreed,
            "disagreement": round(s.disagreement, 4),
            "state": s.state,
            "reason": s.reason,
            "stopped_at": s.stopped_at,
            "stopped_by": s.stopped_by,
        }
        for s in sorted(states, key=lambda s: (s.agent, s.version))
    ]
    if json_out:
        print_json(rows)
        return
    if not rows:
        out.print("no canary or shadow candidate counted yet")
        return
    table = Table("agent", "version", "mode", "compared", "disagreement", "state")
    for r in rows:
        state = str(r["state"])
        if r["stopped_at"]:
            ago = time.time() - float(r["stopped_at"])  # type: ignore[arg-type]
            state = f"stopped {ago:.0f}s ago by {r['stopped_by']}: {r['reason']}"
        table.add_row(
            str(r["agent"]),
            str(r["version"]),
            str(r["mode"]),
            str(r["compared"]),
            f"{float(r['disagreement']):.0%}",  # type: ignore[arg-type]
            state,
        )
    out.print(table)


@app.command("stop")
@command
async def canary_stop(
    agent: AgentArg,
    version: VersionArg,
    reason: Annotated[str, typer.Option(help="Why (kept in the state and the audit record).")] = (
        "stopped by hand"
    ),
    json_out: JsonOption = False,
) -> None:
    """Stop a candidate now: no more traffic to it, audited and alerted like a gate stop."""
    from coordinator.canary import Book, Gate
    from mesh.audit import AuditLog
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        book = await Book.on_bus(bus, name="mesh-cli")
        state = await book.stop(agent, version, reason, mode="canary")
        await Gate(book, AuditLog(bus, "mesh-cli"), bus.nc.publish).stopped(state)
        await bus.nc.flush()
    if json_out:
        print_json({"agent": agent, "version": version, "state": state.state})
    else:
        out.print(f"{agent} {version}: stopped ({reason})")


@app.command("resume")
@command
async def canary_resume(agent: AgentArg, version: VersionArg, json_out: JsonOption = False) -> None:
    """Forget a candidate's counts and stop: it takes traffic again, counted from zero."""
    from coordinator.canary import Book
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        book = await Book.on_bus(bus, name="mesh-cli")
        if not await book.resume(agent, version):
            raise NotFoundError(
                f"no gate state for {agent} {version}",
                hint="`mesh canary status` lists what the gate counted",
            )
    if json_out:
        print_json({"agent": agent, "version": version, "state": "running"})
    else:
        out.print(f"{agent} {version}: resumed (counted from zero)")


@app.command("version")
@command
async def canary_version(
    module: Annotated[str, typer.Argument(help="e.g. agents.security_review")],
    json_out: JsonOption = False,
) -> None:
    """The composite version MODULE's agent would run with here (this environment: its
    MESH_MODEL, MESH_AGENT_VERSION, ...), without starting it: what a policy's canary names."""
    import importlib

    from mesh.errors import ConfigError

    name = module if module.endswith(".agent") else f"{module}.agent"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise NotFoundError(
            f"cannot import {module}: {e}",
            hint="give a package with an agent.py, e.g. agents.security_review",
        ) from None
    agent = getattr(mod, "agent", None)
    if agent is None:
        raise ConfigError(f"{mod.__name__} defines no `agent`")
    brain = agent.brain() if agent.output_type is not None else None
    version = agent.version(brain, card_version=agent.card().version)
    if json_out:
        print_json({"agent": agent.name, "version": version})
    else:
        out.print(version)
