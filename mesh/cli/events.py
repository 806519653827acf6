"""Talking to a running mesh: `mesh publish`, `mesh agents`, `mesh call`, `mesh decisions`."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mesh.cli._common import (
    EXIT_FAILED,
    EXIT_VERIFY,
    JsonOption,
    command,
    err,
    out,
    print_json,
    read_body,
    read_body_bytes,
)
from mesh.errors import ConfigError, NoAnswerError

if TYPE_CHECKING:
    from mesh import envelope

# Room a published event leaves under max_payload for its headers (message id, signature, trace).
HEADER_ROOM = 1024


@command
async def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="e.g. release.proposed")],
    body: Annotated[
        str, typer.Argument(metavar="JSON|@file", help="The event data (or a whole CloudEvent).")
    ],
    tenant: Annotated[str, typer.Option(help="Tenant of the event.")] = "",
    event_id: Annotated[str, typer.Option("--id", help="Event id (default: new uuid).")] = "",
) -> None:
    """Publish a domain event; the coordinator decides it (or dead-letters it, with a reason).

    A body that is not JSON is published as it is (the coordinator dead-letters it, so what a
    producer sent is never lost); one the mesh could never carry is refused here, naming the
    limit: larger than the server's max_payload, or data nested deeper than the mesh carries."""
    import msgspec
    from nats.errors import MaxPayloadError

    from mesh import envelope, subjects
    from mesh.bus import Bus
    from mesh.settings import get_settings

    tenant_given, id_given = tenant, event_id
    tenant = _checked(event_type, tenant or get_settings().tenant)
    raw = read_body_bytes(body)
    event_id = event_id or str(uuid.uuid4())
    event: envelope.Event | None = None
    not_json = ""
    try:
        data = msgspec.json.decode(raw)
    except RecursionError:
        raise _too_deep(None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        not_json = str(e)
    else:
        if isinstance(data, dict) and data.get("specversion"):
            event = envelope.decode(raw)  # MalformedEventError: a ConfigError saying why
            event = _agreed(
                event,
                data,
                event_type=event_type,
                tenant=tenant_given,
                event_id=id_given,
                default_tenant=tenant,
            )
        else:
            depth = envelope.nesting(data)
            if depth > envelope.MAX_DATA_DEPTH:
                raise _too_deep(depth)
            event = envelope.new_event(event_type, data, tenant=tenant, event_id=event_id)
    payload = raw if event is None else envelope.encode(event)
    async with await Bus.connect(name="mesh-cli") as bus:
        limit = bus.nc.max_payload
        if len(payload) + HEADER_ROOM > limit:
            raise ConfigError(
                f"the event is {len(payload):,} bytes; this NATS server takes messages of at "
                f"most {limit:,} bytes (max_payload), {HEADER_ROOM:,} of them kept for headers",
                hint="send a reference to the data (a URL, an object store key) instead of "
                "the data, or raise max_payload in the server's config",
            )
        await bus.ensure()
        try:
            if event is None:
                await bus.publish(
                    subjects.event(tenant, event_type),
                    raw,
                    msg_id=bus.event_msg_id(tenant, event_id),
                )
            else:
                ack = await bus.publish_event(event)
        except MaxPayloadError:
            raise ConfigError(
                f"the event ({len(payload):,} bytes with its headers) is larger than this NATS "
                f"server's max_payload ({limit:,} bytes)",
                hint="send a reference to the data instead of the data",
            ) from None
    if event is None:
        err.print(
            f"[yellow]warning:[/yellow] body is not valid JSON ({escape(not_json)}); "
            "published as-is — it will be in `mesh dlq` with the reason",
            soft_wrap=True,
        )
        out.print(event_id)
        return
    note = " (duplicate: already published)" if ack.duplicate else ""
    out.print(f"{event.id}{note}")


def _checked(event_type: str, tenant: str) -> str:
    """The tenant, once TYPE and it are names the mesh's subjects can carry."""
    from mesh import subjects

    if not subjects.valid_event_type(event_type):
        raise ConfigError(
            f"{event_type!r} is not an event type",
            hint="use a dotted name such as release.proposed",
        )
    if not subjects.valid_token(tenant):
        raise ConfigError(
            f"{tenant!r} is not a tenant name", hint="use letters, digits, '-' and '_'"
        )
    return tenant


def _agreed(
    event: envelope.Event,
    fields: dict[str, object],
    *,
    event_type: str,
    tenant: str,
    event_id: str,
    default_tenant: str,
) -> envelope.Event:
    """A whole CloudEvent given as the body: the arguments must say what it says (a body of
    another type would be decided under that type's policy; another tenant's, in its chain).
    A tenant the body leaves out is the option's, else MESH_TENANT."""
    import msgspec

    def conflict(what: str, body_value: str, argument: str, given: str) -> ConfigError:
        return ConfigError(
            f"the CloudEvent's {what} is {body_value!r} but {argument} says {given!r}",
            hint=f"make them agree, or leave {argument} out"
            if argument != "TYPE"
            else "make them agree, or give the event's data alone as the body",
        )

    if event.type != event_type:
        raise conflict("type", event.type, "TYPE", event_type)
    if "tenant" in fields:
        if tenant and event.tenant != tenant:
            raise conflict("tenant", event.tenant, "--tenant", tenant)
    else:
        event = msgspec.structs.replace(event, tenant=tenant or default_tenant)
    if event_id and event.id != event_id:
        raise conflict("id", event.id, "--id", event_id)
    return event


def _too_deep(depth: int | None) -> ConfigError:
    """`depth`: how deep the data nests; None when too deep to even parse."""
    from mesh import envelope

    how = f"nests {depth} levels deep" if depth is not None else "nests too deep to parse"
    return ConfigError(
        f"the event {how}; the mesh carries data at most {envelope.MAX_DATA_DEPTH} levels deep "
        "(what an A2A data part can hold)",
        hint="flatten the data",
    )


@command
async def list_agents(json_out: JsonOption = False) -> None:
    """List live agents (registered and heartbeating)."""
    from mesh.bus import Bus
    from mesh.registry import Registry

    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        regs = await Registry(bus).live()
    if json_out:
        print_json(
            [
                {
                    "agent": r.agent,
                    "instance": r.instance,
                    "skills": list(r.skills),
                    # The composite version (mesh.versions): what a canary or shadow names.
                    "version": r.version or r.card.get("version", ""),
                    "interfaces": r.card.get("supportedInterfaces", []),
                    "seen_at": r.seen_at,
                    "pid": r.pid,
                }
                for r in regs
            ]
        )
        return
    table = Table(title=f"{len(regs)} live agent instance(s)")
    for col in ("agent", "instance", "version", "skills", "http", "seen", "pid"):
        table.add_column(col)
    now = time.time()
    for r in regs:
        http = next(
            (
                i["url"]
                for i in r.card.get("supportedInterfaces", [])
                if i.get("protocolBinding") == "JSONRPC"
            ),
            "-",
        )
        table.add_row(
            r.agent,
            r.instance,
            r.version or str(r.card.get("version", "")),
            ", ".join(r.skills),
            http,
            f"{now - r.seen_at:.1f}s ago",
            str(r.pid),
        )
    out.print(table)


@command
async def call(
    agent: Annotated[str, typer.Argument(help="Agent name, e.g. security-review")],
    text: Annotated[str, typer.Argument(metavar="TEXT|@file", help="Message text or JSON.")],
    http: Annotated[bool, typer.Option("--http", help="Call over HTTP instead of NATS.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
) -> None:
    """Send an A2A message to an agent and print the task it returns."""
    from a2a.client import ClientCallContext, ClientConfig, create_client
    from a2a.types import SendMessageRequest, SendMessageResponse, Task
    from a2a.utils.errors import A2AError
    from google.protobuf.json_format import MessageToDict

    from mesh.a2a.client import AgentClient, agent_error, user_message
    from mesh.a2a.transport import bearer_interceptor
    from mesh.bus import Bus
    from mesh.cards import parse_card
    from mesh.registry import Registry

    content = read_body(text)
    try:
        message = user_message(data=json.loads(content))
    except ValueError:
        message = user_message(text=content)
    async with await Bus.connect(name="mesh-cli") as bus:
        if http:
            # Any A2A client would do the same: a2a-sdk's own, from the card the agent serves.
            serving = [
                r
                for r in await Registry(bus).live()
                if r.agent == agent
                and any(
                    i.get("protocolBinding") == "JSONRPC"
                    for i in r.card.get("supportedInterfaces", [])
                )
            ]
            if not serving:
                raise NoAnswerError(
                    f"no live agent {agent!r} serves HTTP",
                    hint="see `mesh agents` for what is running",
                )
            card = parse_card(serving[0].card, source=f"registry:{serving[0].key}")
            # The token of the identity this command runs as (the operator's next to `mesh up`),
            # as the card's bearer scheme asks; none only when A2A checks are off by name.
            token = bus.identity.token if bus.identity is not None else ""
            client = await create_client(
                card,
                client_config=ClientConfig(streaming=False),
                interceptors=[bearer_interceptor(token)] if token else None,
            )
            try:
                request = SendMessageRequest(message=message)
                events = [
                    e
                    async for e in client.send_message(
                        request, context=ClientCallContext(timeout=timeout)
                    )
                ]
            except A2AError as e:
                raise agent_error(agent, e, timeout=timeout) from None
            finally:
                await client.close()
            result = MessageToDict(events[-1])
        else:
            sent = await AgentClient(bus).send(agent, message, timeout=timeout)
            response = (
                SendMessageResponse(task=sent)
                if isinstance(sent, Task)
                else SendMessageResponse(message=sent)
            )
            result = MessageToDict(response)
    print(json.dumps(result, indent=2))
    state = _task_state(result)
    if state in _FAILED_STATES:
        err.print(f"error: the task ended {state}")
        raise typer.Exit(EXIT_FAILED)


# A task that ended so did not do what was asked: `mesh call` exits 1 (docs/cli.md).
_FAILED_STATES = frozenset({"TASK_STATE_FAILED", "TASK_STATE_REJECTED", "TASK_STATE_CANCELED"})


def _task_state(result: dict[str, object]) -> str:
    """The state of the task in a SendMessage response or stream event (JSON), or ''."""
    for key in ("task", "statusUpdate"):
        inner = result.get(key)
        if isinstance(inner, dict):
            status = inner.get("status")
            if isinstance(status, dict):
                return str(status.get("state", ""))
    return ""


@command
async def decisions(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    json_out: JsonOption = False,
    trust_file: Annotated[
        Path | None,
        typer.Option(
            "--trust",
            help="Trust file whose keys to believe (default: MESH_TRUST).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Show the latest decisions, each checked: signed by a trusted coordinator, on its own
    event's subject. Any that is not is marked FORGED, and the exit code is 6."""
    import msgspec
    from rich.markup import escape

    from mesh import subjects
    from mesh.bus import Bus, tail
    from mesh.console.data import check_decision
    from mesh.identity import load_trust, require_trust
    from mesh.records import Decision
    from mesh.settings import get_settings

    async with await Bus.connect(name="mesh-cli") as bus:  # no server: say that first
        trust = (
            load_trust(trust_file)
            if trust_file is not None
            else require_trust(get_settings(), what="`mesh decisions`")
        )
        rows = await tail(bus, subjects.DECISIONS_STREAM, limit)
    # seq, subject, decision, refusal ("" with no trust file, MESH_INSECURE=bus: said below);
    # checked as the console checks them.
    checked: list[tuple[int, str, Decision | None, str]] = [
        (r.seq, r.subject, r.decision, r.refusal)
        for r in (check_decision(trust, subject, body, seq) for seq, subject, body in rows)
    ]
    forged = [c for c in checked if c[3]]
    if json_out:
        print(
            json.dumps(
                [
                    {
                        "seq": seq,
                        "subject": subject,
                        "valid": not refusal and trust is not None,
                        "refusal": refusal,
                        **(msgspec.to_builtins(d) if d is not None else {}),
                    }
                    for seq, subject, d, refusal in checked
                ],
                indent=2,
            )
        )
    else:
        table = Table(title=f"last {len(checked)} decision(s)")
        for col in (
            "signature",
            "event",
            "type",
            "tenant",
            "outcome",
            "votes",
            "reason",
            "latency",
        ):
            table.add_column(col, overflow="fold")
        for seq, subject, d, refusal in checked:
            mark = (
                f"[red]FORGED[/red]: {escape(refusal)}"
                if refusal
                else "[yellow]UNCHECKED[/yellow]"
                if trust is None
                else "[green]ok[/green]"
            )
            if d is None:
                table.add_row(mark, f"seq {seq}", subject, "", "", "", "", "")
                continue
            votes = ", ".join(
                f"{v.agent}:{v.verdict.vote if v.verdict else v.outcome}" for v in d.votes
            )
            table.add_row(
                mark,
                d.event_id,
                d.event_type,
                d.tenant,
                d.outcome,
                votes,
                d.reason,
                f"{d.latency_ms:.0f}ms",
            )
        out.print(table)
    if trust is None:
        err.print(
            "[yellow]warning:[/yellow] signatures not checked (MESH_INSECURE=bus): "
            "anyone on the bus could have published these"
        )
    if forged:
        err.print(
            f"[red]warning: {len(forged)} decision(s) FORGED[/red] (not signed by a trusted "
            "coordinator for their event): do not act on them",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_VERIFY)
