"""The `mesh` command. User mistakes print what to do next, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mesh.errors import ConfigError, MeshError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quorum Mesh: A2A agents on NATS JetStream, decided by quorum.",
)
dlq_app = typer.Typer(help="Dead letters: what the mesh could not decide, and why.")
app.add_typer(dlq_app, name="dlq")
audit_app = typer.Typer(help="The tamper-evident audit trail (hash-chained per tenant).")
app.add_typer(audit_app, name="audit")
out = Console()
err = Console(stderr=True)

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; mesh errors become a message and exit code 2."""
    try:
        return asyncio.run(coro)
    except MeshError as e:
        err.print(f"[red]error:[/red] {e.message}")
        if e.hint:
            err.print(f"  → {e.hint}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run(fn(*args, **kwargs))

    return wrapper


def _setup_logging(quiet: bool = True) -> None:
    from mesh._internal.logs import configure

    configure(level="WARNING" if quiet else None)


# -- running the mesh -------------------------------------------------------------------------
@app.command()
def demo(
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Start NATS, a coordinator and three reviewer agents as processes; decide sample events."""
    from mesh.dev import demo as scenario

    _setup_logging()
    if not json_out:
        out.print(
            "[bold]Quorum Mesh demo[/bold]: starting nats-server, coordinator and 3 agents "
            "as separate processes…"
        )
    started = time.monotonic()
    results, log_dir = _run(scenario.demo())
    took = time.monotonic() - started
    if json_out:
        print(json.dumps(scenario.as_json(results), indent=2))
    else:
        for i, r in enumerate(results, 1):
            mark = "[green]✓[/green]" if r.ok else "[red]✗ expected " + r.case.expect + "[/red]"
            out.print(
                f"\n[bold]{i}. {r.case.title}[/bold] → [bold]{r.outcome}[/bold] {mark} "
                f"[dim]({r.seconds * 1000:.0f} ms, event {r.event_id})[/dim]"
            )
            if r.decision:
                for line in scenario.votes_summary(r.decision):
                    out.print(f"   {line}", highlight=False)
                out.print(f"   [dim]rule {r.decision.rule}: {r.decision.reason}[/dim]")
            elif r.dead_letter:
                out.print(
                    f"   dead letter on {r.dead_letter.subject}: {r.dead_letter.error}",
                    highlight=False,
                )
        good = sum(r.ok for r in results)
        out.print(
            f"\n{good}/{len(results)} outcomes as expected · {took:.1f}s · "
            f"process logs in {log_dir}/logs"
        )
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def up(
    coordinators: Annotated[
        int | None,
        typer.Option(min=1, max=8, help="Coordinator processes (default: 1; 2 with --cluster)."),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, max=8, help="Instances per agent (default: 1; 2 with --cluster)."),
    ] = None,
    cluster: Annotated[
        int | None,
        typer.Option(
            min=3,
            max=5,
            metavar="N",
            help="Run a local N-node NATS JetStream cluster (streams replicated on 3) "
            "instead of one embedded server.",
        ),
    ] = None,
) -> None:
    """Run NATS (embedded unless MESH_NATS_URL is set), the coordinator and the agents until
    Ctrl-C."""
    _setup_logging(quiet=False)
    default = 2 if cluster else 1
    _run(_up(coordinators or default, replicas or default, cluster))


async def _up(coordinators: int, replicas: int, cluster: int | None = None) -> None:
    from mesh.bus import Bus, clear_state, write_state
    from mesh.dev.launcher import EVENT_AGENTS, REVIEWERS, Topology
    from mesh.server import EmbeddedServer, LocalCluster
    from mesh.settings import get_settings

    settings = get_settings()
    extra_env: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        url = settings.nats_url
        where = f"NATS {url}"
        if cluster:
            if url:
                raise ConfigError(
                    "--cluster starts a NATS cluster of its own, but MESH_NATS_URL is set",
                    hint="unset MESH_NATS_URL, or drop --cluster to use that server",
                )
            nodes = await stack.enter_async_context(
                LocalCluster(cluster, settings.home / "cluster")
            )
            url = nodes.url
            # Streams and buckets on 3 servers, unless MESH_STREAM_REPLICAS says otherwise.
            if "MESH_STREAM_REPLICAS" not in os.environ:
                settings = settings.model_copy(update={"stream_replicas": min(cluster, 3)})
            extra_env["MESH_STREAM_REPLICAS"] = str(settings.stream_replicas)
            write_state(settings.home, url, os.getpid())
            stack.callback(clear_state, settings.home, os.getpid())
            where = (
                f"NATS cluster of {cluster} ({url}), streams R{settings.stream_replicas}, "
                f"stores in {settings.home / 'cluster'}"
            )
        elif not url:
            server = stack.enter_context(EmbeddedServer(settings.home / "jetstream"))
            url = server.url
            where = f"NATS {url}"
            write_state(settings.home, url, os.getpid())
            stack.callback(clear_state, settings.home, os.getpid())
        topo = Topology(url, settings.home / "logs", extra_env=extra_env)
        stack.callback(topo.stop)
        modules = REVIEWERS + EVENT_AGENTS
        topo.start_default(coordinators=coordinators, replicas=replicas, modules=modules)
        bus = await Bus.connect(url, name="mesh-up", settings=settings)
        stack.push_async_callback(bus.close)
        await bus.ensure()
        await topo.wait_ready(bus, agents=len(modules) * replicas)
        out.print(
            f"[green]mesh is up[/green] · {where} · "
            f"{len(topo.children)} processes · logs in {settings.home / 'logs'}",
            soft_wrap=True,
        )
        out.print(
            "try: mesh agents · mesh publish release.proposed @agents/samples/"
            "release_clean.json · mesh decisions · Ctrl-C to stop"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reported: set[str] = set()
        while not stop.is_set():
            for c in topo.children:
                if not c.alive and c.name not in reported:
                    reported.add(c.name)
                    err.print(
                        f"[yellow]{c.name} exited ({c.proc.returncode}); log: {c.log_path}[/yellow]"
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        out.print("stopping…")


@app.command("run")
def run_agent(module: Annotated[str, typer.Argument(help="e.g. agents.security_review")]) -> None:
    """Run one agent process (its module defines `agent = Agent(...)`)."""
    import importlib

    try:
        mod = importlib.import_module(module if module.endswith(".agent") else f"{module}.agent")
    except ModuleNotFoundError as e:
        err.print(f"[red]error:[/red] cannot import {module}: {e}")
        err.print("  → give a package with an agent.py, e.g. `mesh run agents.security_review`")
        raise typer.Exit(2) from None
    agent = getattr(mod, "agent", None)
    if agent is None:
        err.print(f"[red]error:[/red] {mod.__name__} defines no `agent`")
        raise typer.Exit(2)
    agent.main()


@app.command("coordinator")
def run_coordinator() -> None:
    """Run a coordinator process (several may run at once: they share the durable consumer)."""
    from coordinator.run import main

    main()


# -- talking to a running mesh ----------------------------------------------------------------
def _read_body(body: str) -> str:
    if body.startswith("@"):
        path = Path(body[1:])
        try:
            return path.read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read {path}: {e.strerror}", hint="give JSON inline or @path/to/file.json"
            ) from None
    return body


@app.command()
@command
async def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="e.g. release.proposed")],
    body: Annotated[
        str, typer.Argument(metavar="JSON|@file", help="The event data (or a whole CloudEvent).")
    ],
    tenant: Annotated[str, typer.Option(help="Tenant of the event.")] = "",
    event_id: Annotated[str, typer.Option("--id", help="Event id (default: new uuid).")] = "",
) -> None:
    """Publish a domain event; the coordinator decides it (or dead-letters it, with a reason)."""
    import msgspec

    from mesh import envelope, subjects
    from mesh.bus import Bus
    from mesh.settings import get_settings

    tenant = tenant or get_settings().tenant
    if not subjects.valid_event_type(event_type):
        raise ConfigError(
            f"{event_type!r} is not an event type",
            hint="use a dotted name such as release.proposed",
        )
    if not subjects.valid_token(tenant):
        raise ConfigError(
            f"{tenant!r} is not a tenant name", hint="use letters, digits, '-' and '_'"
        )
    text = _read_body(body)
    event_id = event_id or str(uuid.uuid4())
    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        try:
            data = json.loads(text)
        except ValueError as e:
            # Published as-is on purpose: the coordinator dead-letters it with the reason, so
            # what a producer sent is never lost, even when it is not JSON.
            await bus.publish(
                subjects.event(tenant, event_type), text.encode(), msg_id=f"{tenant}:{event_id}"
            )
            err.print(
                f"[yellow]warning:[/yellow] body is not valid JSON ({e}); published as-is "
                f"— it will be in `mesh dlq` with the reason"
            )
            out.print(event_id)
            return
        if isinstance(data, dict) and data.get("specversion"):
            try:
                event = envelope.decode(text.encode())
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise ConfigError(
                    f"not a valid CloudEvent: {e}", hint="fix the envelope, or pass only the data"
                ) from None
        else:
            event = envelope.new_event(event_type, data, tenant=tenant, event_id=event_id)
        ack = await bus.publish_event(event)
        note = " (duplicate: already published)" if ack.duplicate else ""
        out.print(f"{event.id}{note}")


@app.command("agents")
@command
async def list_agents() -> None:
    """List live agents (registered and heartbeating)."""
    from mesh.bus import Bus
    from mesh.registry import Registry

    async with await Bus.connect(name="mesh-cli") as bus:
        await bus.ensure()
        regs = await Registry(bus).live()
    table = Table(title=f"{len(regs)} live agent instance(s)")
    for col in ("agent", "instance", "skills", "http", "seen", "pid"):
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
            ", ".join(r.skills),
            http,
            f"{now - r.seen_at:.1f}s ago",
            str(r.pid),
        )
    out.print(table)


@app.command()
@command
async def call(
    agent: Annotated[str, typer.Argument(help="Agent name, e.g. security-review")],
    text: Annotated[str, typer.Argument(metavar="TEXT|@file", help="Message text or JSON.")],
    http: Annotated[bool, typer.Option("--http", help="Call over HTTP instead of NATS.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
) -> None:
    """Send an A2A message to an agent and print the task it returns."""
    from mesh.a2a.client import A2AClient, call_http, user_message
    from mesh.bus import Bus
    from mesh.registry import Registry

    content = _read_body(text)
    try:
        message = user_message(data=json.loads(content))
    except ValueError:
        message = user_message(text=content)
    async with await Bus.connect(name="mesh-cli") as bus:
        if http:
            regs = [r for r in await Registry(bus).live() if r.agent == agent]
            urls = [
                i["url"]
                for r in regs
                for i in r.card.get("supportedInterfaces", [])
                if i.get("protocolBinding") == "JSONRPC"
            ]
            if not urls:
                raise ConfigError(
                    f"no live agent {agent!r} serves HTTP",
                    hint="see `mesh agents` for what is running",
                )
            result = await call_http(urls[0], "SendMessage", {"message": message}, timeout=timeout)
        else:
            result = await A2AClient(bus).send_message(agent, message, timeout=timeout)
    print(json.dumps(result, indent=2))


@app.command()
@command
async def decisions(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the latest decisions."""
    import msgspec

    from mesh import subjects
    from mesh.bus import Bus, tail
    from mesh.records import decision_decoder

    async with await Bus.connect(name="mesh-cli") as bus:
        rows = await tail(bus, subjects.DECISIONS_STREAM, limit)
    ds = [decision_decoder.decode(body) for _, _, body in rows]
    if json_out:
        print(json.dumps([msgspec.to_builtins(d) for d in ds], indent=2))
        return
    table = Table(title=f"last {len(ds)} decision(s)")
    for col in ("event", "type", "tenant", "outcome", "votes", "reason", "latency"):
        table.add_column(col, overflow="fold")
    for d in ds:
        votes = ", ".join(
            f"{v.agent}:{v.verdict.vote if v.verdict else v.outcome}" for v in d.votes
        )
        table.add_row(
            d.event_id, d.event_type, d.tenant, d.outcome, votes, d.reason, f"{d.latency_ms:.0f}ms"
        )
    out.print(table)


@dlq_app.callback(invoke_without_command=True)
def dlq_default(ctx: typer.Context) -> None:
    """List dead letters (same as `mesh dlq ls`)."""
    if ctx.invoked_subcommand is None:
        dlq_ls(limit=20, json_out=False, reason=None)


@dlq_app.command("ls")
@command
async def dlq_ls(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    reason: Annotated[
        str | None, typer.Option(help="Only this reason (e.g. max_deliveries).")
    ] = None,
) -> None:
    """List the latest dead letters with their reason; the id is what show/replay take."""
    import msgspec

    from coordinator import dlq
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        items = await dlq.latest(bus, limit=limit, reason=reason)
    if json_out:
        print(json.dumps([{"seq": s, **msgspec.to_builtins(d)} for s, d in items], indent=2))
        return
    table = Table(title=f"last {len(items)} dead letter(s)")
    for col in ("id", "reason", "subject", "error", "body"):
        table.add_column(col, overflow="fold")
    for seq, d in items:
        preview = d.body[:60].decode("utf-8", errors="backslashreplace")
        table.add_row(str(seq), d.reason, d.subject, d.error, preview)
    out.print(table)


@dlq_app.command("show")
@command
async def dlq_show(
    dlq_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id from `mesh dlq ls`.")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one dead letter in full: why, where from, and the original body."""
    import msgspec
    from rich.markup import escape

    from coordinator import dlq
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        d = await dlq.get(bus, dlq_id)
    if json_out:
        print(json.dumps({"seq": dlq_id, **msgspec.to_builtins(d)}, indent=2))
        return
    at = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(d.at)) if d.at else "-"
    fields = [
        ("id", str(dlq_id)),
        ("reason", d.reason),
        ("error", d.error),
        ("subject", d.subject or "-"),
        ("tenant", d.tenant),
        ("event id", d.event_id or "-"),
        ("event type", d.event_type or "-"),
        ("attempts", str(d.attempts)),
        ("stream seq", str(d.stream_seq or "-")),
        ("trace id", d.trace_id or "-"),
        ("time", at),
    ]
    for name, value in fields:
        # soft_wrap: long errors and ids stay on one line, whole when copied.
        out.print(f"[bold]{name:>10}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)
    out.print(f"[bold]{'headers':>10}[/bold]", highlight=False)
    for k, v in sorted(d.headers.items()):
        out.print(f"            {k}: {v}", highlight=False, markup=False, soft_wrap=True)
    body = d.body
    out.print(f"[bold]{'body':>10}[/bold]  ({len(body)} bytes)", highlight=False)
    try:
        # Pretty JSON when it is JSON; otherwise the bytes as text, undecodable ones escaped.
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        text = body.decode("utf-8", errors="backslashreplace")
    print(text)


@dlq_app.command("replay")
@command
async def dlq_replay(
    dlq_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id from `mesh dlq ls`.")],
) -> None:
    """Publish a dead letter's original event again, to its original subject."""
    from coordinator import dlq
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        msg_id = await dlq.replay(bus, dlq_id)
    print(msg_id)  # alone on stdout, for scripts
    err.print(
        f"replayed dead letter {dlq_id} as a new message: "
        "the coordinator will decide it if it never was",
        highlight=False,
        soft_wrap=True,
    )


@dlq_app.command("purge")
@command
async def dlq_purge(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete them.")] = False,
) -> None:
    """Delete dead letters (all, or one reason's) for good."""
    from coordinator import dlq
    from mesh.bus import Bus

    if not yes:
        what = f"every {reason} dead letter" if reason else "every dead letter"
        raise ConfigError(
            f"this deletes {what} for good", hint="add --yes to go ahead (see `mesh dlq ls` first)"
        )
    async with await Bus.connect(name="mesh-cli") as bus:
        removed = await dlq.purge(bus, reason=reason)
    out.print(f"removed {removed} dead letter(s)", highlight=False)


@audit_app.command("ls")
@command
async def audit_ls(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the latest audit records."""
    import msgspec

    from mesh.audit import read
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        records = (await read(bus, tenant or None))[-limit:]
    if json_out:
        print(json.dumps([{"seq": s, **msgspec.to_builtins(r)} for s, r in records], indent=2))
        return
    table = Table(title=f"last {len(records)} audit record(s)")
    for col in ("seq", "tenant", "kind", "ref", "actor", "at", "hash"):
        table.add_column(col, overflow="fold")
    for seq, r in records:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.at))
        table.add_row(str(seq), r.tenant, r.kind, r.ref, r.actor, at, r.hash[:12])
    out.print(table)


@audit_app.command("verify")
@command
async def audit_verify(
    tenant: Annotated[str, typer.Option(help="Only this tenant's chain.")] = "",
) -> None:
    """Recompute every hash link; name the first record that does not chain (exit 1)."""
    from mesh.audit import read, verify
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-cli") as bus:
        result = verify(await read(bus, tenant or None))
    if result.ok:
        out.print(f"[green]{result}[/green]")
    else:
        err.print(f"[red]{result}[/red]")
        raise typer.Exit(1)


@app.command()
@command
async def status(
    wait: Annotated[float, typer.Option(help="Seconds to collect answers.")] = 0.5,
) -> None:
    """What each running coordinator is doing: events in flight, circuit breakers."""
    import msgspec

    from mesh import subjects
    from mesh.bus import Bus

    answers: list[dict[str, Any]] = []
    async with await Bus.connect(name="mesh-cli") as bus:
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.nc.publish(subjects.COORDINATOR_STATUS, b"", reply=inbox)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats' TimeoutError: no more answers
                break
            if msg.data:  # an empty one is the server's "no responders" notice
                answers.append(msgspec.json.decode(msg.data))
    if not answers:
        raise ConfigError("no coordinator answered", hint="is one running? see `mesh up`")
    for a in sorted(answers, key=lambda a: a["name"]):
        breakers = a.get("breakers") or {}
        open_ = {k: v for k, v in breakers.items() if v != "closed"}
        out.print(
            f"[bold]{a['name']}[/bold]: {a['inflight']} event(s) in flight; "
            f"{len(breakers)} breaker(s), not closed: {open_ or 'none'}",
            highlight=False,
        )


@app.command()
@command
async def trace(
    event_id: Annotated[str, typer.Argument(help="The event whose decision to show.")],
    tenant: Annotated[str, typer.Option(help="Tenant of the event.")] = "",
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
            raise ConfigError(
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
        raise ConfigError(
            f"no spans kept for trace {state.decision.trace_id}",
            hint="start the mesh with MESH_TRACE_STREAM=1 to keep spans in NATS",
        )
    out.print(
        f"trace {state.decision.trace_id} · event {event_id} · {state.decision.outcome}",
        highlight=False,
    )
    for line in telemetry.render_tree(spans):
        out.print(line, highlight=False)


def main() -> None:
    app()
