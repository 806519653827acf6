"""Looking inside a running mesh: `mesh status` (coordinators), `mesh trace` (one decision)."""

from __future__ import annotations

from typing import Annotated

import typer

from mesh.cli._common import JsonOption, command, out, print_json
from mesh.errors import ConfigError, NoAnswerError, NotFoundError


@command
async def status(
    wait: Annotated[float, typer.Option(help="Seconds to collect answers.")] = 0.5,
    json_out: JsonOption = False,
) -> None:
    """What each running coordinator is doing: events in flight, circuit breakers."""
    from mesh.bus import Bus
    from mesh.console.data import coordinator_status  # the console reads the same

    async with await Bus.connect(name="mesh-cli") as bus:
        answers = await coordinator_status(bus, wait)
    if not answers:
        raise NoAnswerError("no coordinator answered", hint="is one running? see `mesh up`")
    if json_out:
        print_json(answers)  # sorted by name
        return
    for a in answers:
        breakers = a.get("breakers") or {}
        open_ = {k: v for k, v in breakers.items() if v != "closed"}
        out.print(
            f"[bold]{a['name']}[/bold]: {a['inflight']} event(s) in flight; "
            f"{len(breakers)} breaker(s), not closed: {open_ or 'none'}",
            highlight=False,
        )


@command
async def trace(
    event_id: Annotated[str, typer.Argument(help="The event whose decision to show.")],
    tenant: Annotated[str, typer.Option(help="Tenant of the event.")] = "",
    json_out: JsonOption = False,
) -> None:
    """Print the trace of an event's decision: every hop, agent, model call, duration, tokens.

    Needs spans kept in JetStream: run the mesh with MESH_TRACE_STREAM=1 (or send OTLP to
    your collector and look there)."""
    from coordinator.ledger import DecisionState, state_key
    from mesh import subjects, telemetry
    from mesh.bus import Bus
    from mesh.settings import get_settings

    tenant = tenant or get_settings().tenant
    async with await Bus.connect(name="mesh-cli") as bus:
        kv = await bus.kv(subjects.DECISIONS_BUCKET)
        try:
            entry = await kv.get(state_key(tenant, event_id))
        except Exception:
            raise NotFoundError(
                f"no decision state for event {event_id!r} in tenant {tenant!r}",
                hint="check the id with `mesh decisions` (and --tenant)",
            ) from None
        import msgspec

        state = msgspec.json.decode(entry.value or b"{}", type=DecisionState)
        if state.decision is None or not state.decision.trace_id:
            raise ConfigError(
                f"event {event_id!r} has no traced decision ({state.state})",
                hint="tracing may have been off (MESH_TELEMETRY=off)",
            )
        spans = await telemetry.read_trace(bus, state.decision.trace_id)
    if not spans:
        raise NotFoundError(
            f"no spans kept for trace {state.decision.trace_id}",
            hint="start the mesh with MESH_TRACE_STREAM=1 to keep spans in NATS",
        )
    if json_out:
        import msgspec

        print_json(
            {
                "trace_id": state.decision.trace_id,
                "event_id": event_id,
                "outcome": state.decision.outcome,
                "spans": msgspec.to_builtins(spans),
            }
        )
        return
    out.print(
        f"trace {state.decision.trace_id} · event {event_id} · {state.decision.outcome}",
        highlight=False,
    )
    for line in telemetry.render_tree(spans):
        out.print(line, highlight=False)
