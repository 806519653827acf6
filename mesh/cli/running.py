"""Running the mesh: `mesh demo`, `mesh up`, `mesh run`, `mesh coordinator`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mesh.cli import console
from mesh.cli._common import (
    EXIT_FAILED,
    JsonOption,
    command,
    err,
    out,
    run,
    setup_logging,
    user_errors,
)
from mesh.errors import ConfigError

T = TypeVar("T")

TopologyOption = Annotated[
    Path | None,
    typer.Option(
        "--topology",
        metavar="PATH",
        help="The mesh.toml to run (default: MESH_TOPOLOGY, else mesh.toml here or above).",
    ),
]


def _shown(path: Path) -> str:
    """A path as short as it is unambiguous: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def demo(
    json_out: JsonOption = False,
    topology: TopologyOption = None,
) -> None:
    """Start NATS, a coordinator and the reviewer agents (demo = true in mesh.toml) as
    processes; decide sample events."""
    from mesh.dev import demo as scenario
    from mesh.dev import topology as topo

    setup_logging()
    with user_errors():
        plan = topo.load(topo.find(topology)).demo_plan()
        scenario.check(plan)
    if not json_out:
        out.print(
            "[bold]Quorum Mesh demo[/bold]: starting nats-server, coordinator and "
            f"{len(plan.agents)} agents as separate processes…"
        )
    started = time.monotonic()
    results, log_dir = _until_signal(scenario.demo(plan))
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
        raise typer.Exit(EXIT_FAILED)


def _count(help_text: str) -> Any:
    """A process-count option of `mesh up` (bounded: this is one machine)."""
    return typer.Option(min=1, max=8, help=help_text)


def up(
    coordinators: Annotated[
        int | None,
        _count("Coordinator processes (default: from mesh.toml, 1; 2 with --cluster)."),
    ] = None,
    replicas: Annotated[
        int | None,
        _count("Instances of every agent (default: from mesh.toml, 1; 2 with --cluster)."),
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
    topology: TopologyOption = None,
    console_port: Annotated[
        int | None,
        typer.Option(
            min=-1,
            max=65535,
            help="Port of the web console on 127.0.0.1 (0: any free one; -1: no console; "
            "default: MESH_CONSOLE_PORT, 8780).",
        ),
    ] = None,
) -> None:
    """Run NATS (embedded unless MESH_NATS_URL is set), the coordinators and the agents that
    mesh.toml lists, and the web console, until Ctrl-C."""
    setup_logging(quiet=False)
    _until_signal(_up(coordinators, replicas, cluster, topology, console_port))


RECANCEL_S = 2.0  # a lost cancel is repeated this much later (see `_until_signal`)


def _until_signal(coro: Coroutine[Any, Any, T]) -> T:
    """Run a long-running command's coroutine (`run`, with mesh errors as one message) until
    it ends or SIGINT/SIGTERM cancels it: its `async with` blocks then stop what it started,
    and the command says "stopping…" and exits 130, never with a traceback. Ctrl-C while it
    starts stops it too; a second signal only repeats the cancel (each cleanup step that is
    a child process still runs).

    A cancel can be lost: Python 3.11's `asyncio.wait_for`, which nats-py's requests use,
    drops one that lands as its future completes (CI saw `mesh demo` say "stopping…", run
    every case and exit 0). So the cancel is repeated once, `RECANCEL_S` later, if the command
    is still running and has not taken the stop as its own end (`_until_stopped` uncancels:
    `mesh up` stopped by a signal ends cleanly, 0), as a second Ctrl-C would; and a command
    whose cancel was lost exits 130 all the same."""
    signalled = False

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def again() -> None:
            if not task.done() and task.cancelling():
                task.cancel()

        def on_signal() -> None:
            nonlocal signalled
            if not signalled:
                err.print("stopping…")
                loop.call_later(RECANCEL_S, again)
            signalled = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            result = await coro
        except asyncio.CancelledError:
            raise typer.Exit(130) from None
        if signalled and task.cancelling():  # the cancel was lost, not taken as the end
            raise typer.Exit(130)
        return result

    return run(main())


async def _up(
    coordinators: int | None,
    replicas: int | None,
    cluster: int | None,
    topology: Path | None,
    console_port: int | None = None,
) -> None:
    from mesh import natsauth
    from mesh.bus import Bus, clear_state, redact, write_state
    from mesh.dev import topology as topo
    from mesh.dev.launcher import HomeLock, Topology
    from mesh.identity import IdentityDir, identity_dir
    from mesh.server import LocalCluster
    from mesh.settings import get_settings

    # Checked before anything starts: a mistake in mesh.toml leaves nothing running.
    plan = topo.load(topo.find(topology)).plan(
        cluster=cluster is not None, coordinators=coordinators, replicas=replicas
    )
    settings = get_settings()
    extra_env: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        # One `mesh up` per folder (its store, identities, nats.json, logs): a second one
        # refuses before it writes anything there.
        lock = stack.enter_context(HomeLock(settings.home, "mesh up"))
        # Every process gets its own identity from this folder; the servers admit exactly
        # them, and `mesh up` itself (creating the streams) is the folder's operator.
        ids = natsauth.resolve_identity_dir(settings) or IdentityDir.init(
            identity_dir(settings.home)
        )
        # Before the server starts: it admits them from the start (the console's too).
        console_id = console.issue_identities(ids, plan, console_port, settings)
        settings = settings.model_copy(
            update={"identity": ids.operator_path, "trust": ids.trust_path}
        )
        url = settings.nats_url
        where = f"NATS {redact(url)}"
        if cluster:
            if url:
                raise ConfigError(
                    "--cluster starts a NATS cluster of its own, but MESH_NATS_URL is set",
                    hint="unset MESH_NATS_URL, or drop --cluster to use that server",
                )
            lock.wait_previous_servers()
            nodes = await stack.enter_async_context(
                LocalCluster(
                    cluster,
                    settings.home / "cluster",
                    auth=ids,
                    client_ports=lock.previous_ports(),
                )
            )
            url = nodes.url
            lock.record(url=url, nats_pids=nodes.pids)
            # Streams and buckets on 3 servers, unless MESH_STREAM_REPLICAS says otherwise.
            if "stream_replicas" not in settings.model_fields_set:
                settings = settings.model_copy(update={"stream_replicas": min(cluster, 3)})
            extra_env["MESH_STREAM_REPLICAS"] = str(settings.stream_replicas)
            write_state(settings.home, url, os.getpid(), servers=[s.state() for s in nodes.servers])
            stack.callback(clear_state, settings.home, os.getpid())
            where = (
                f"NATS cluster of {cluster} ({url}), streams R{settings.stream_replicas}, "
                f"stores in {settings.home / 'cluster'}"
            )
        elif not url:
            lock.wait_previous_servers()
            server = _embedded(settings.home / "jetstream", ids, lock)
            stack.callback(server.stop)
            url = server.url
            lock.record(url=url, nats_pids=[server.pid] if server.pid else [])
            where = f"NATS {url}"
            write_state(settings.home, url, os.getpid(), servers=[server.state()])
            stack.callback(clear_state, settings.home, os.getpid())
        # The streams and buckets first, as the operator: no other process may create them.
        bus = await Bus.connect(url, name="mesh-up", settings=settings)
        stack.push_async_callback(bus.close)
        await _ensure(bus)
        processes = Topology(url, settings.home / "logs", extra_env=extra_env, identities=ids)
        stack.callback(processes.stop)
        processes.start(plan)
        await processes.wait_ready(bus, agents=plan.instances)
        # Before "mesh is up": once that is printed, a stop signal finds nothing half-started.
        await console.start_beside_up(stack, settings, url, console_id)
        out.print(
            f"[green]mesh is up[/green] · {where} · "
            f"{len(plan.processes())} process{'' if len(plan.processes()) == 1 else 'es'} "
            f"from {_shown(plan.source)} "
            "(and a schedule relay) · "
            f"logs in {settings.home / 'logs'} · identities in {_shown(ids.path)}",
            soft_wrap=True,
        )
        out.print(
            "try: mesh agents · mesh publish release.proposed @agents/samples/"
            "release_clean.json · mesh decisions · Ctrl-C to stop"
        )
        await _until_stopped(processes)


_ENSURE_TIMEOUT_S = 60.0


async def _ensure(bus: Any) -> None:
    """`bus.ensure()`, asked again while JetStream does not answer yet: a restarted cluster
    elects a leader for every stream it recovers before it answers for it (bounded)."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    from mesh.errors import NatsServerError

    deadline = time.monotonic() + _ENSURE_TIMEOUT_S
    while True:
        try:
            await bus.ensure()
            return
        except (NatsTimeoutError, NoRespondersError) as e:
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"JetStream did not answer within {_ENSURE_TIMEOUT_S:.0f}s ({e})",
                    hint=f"see the nats-server logs under {bus.settings.home}",
                ) from None
            await asyncio.sleep(0.5)


def _embedded(store: Path, ids: Any, lock: Any) -> Any:
    """The embedded server of `mesh up`, on the port the last one used when it is free: agents
    started by hand (`mesh run`) keep dialling that address, and reconnect."""
    from mesh.errors import NatsServerError
    from mesh.server import EmbeddedServer

    ports = lock.previous_ports()
    port = ports[0] if len(ports) == 1 else -1
    if port > 0:
        try:
            return EmbeddedServer(store, auth=ids, port=port).start()
        except NatsServerError:
            pass  # taken by someone else meanwhile: any free port, as on a first start
    return EmbeddedServer(store, auth=ids).start()


async def _until_stopped(processes: Any) -> None:
    """Until Ctrl-C or SIGTERM (which cancel us: see `_until_signal`), saying once of each
    child that it exited. Stopped here, `mesh up` did what it should: a clean exit (0)."""
    reported: set[str] = set()
    try:
        while True:
            for c in processes.children:
                if not c.alive and c.name not in reported:
                    reported.add(c.name)
                    err.print(
                        f"[yellow]{c.name} exited ({c.proc.returncode}); log: {c.log_path}[/yellow]"
                    )
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the stop we waited for, not a failure: shut down as usual


@command
async def ensure() -> None:
    """Create the mesh's streams and buckets on the NATS server (as the operator identity; any
    other identity only checks they exist). `mesh up` does this itself."""
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-ensure") as bus:
        await bus.ensure()
        who = bus.identity.principal if bus.identity else "anonymous"
    out.print(f"streams and buckets in place (as {who})")


def run_agent(module: Annotated[str, typer.Argument(help="e.g. agents.security_review")]) -> None:
    """Run one agent process (its module defines `agent = Agent(...)`)."""
    import importlib

    from mesh.errors import NotFoundError

    with user_errors():
        try:
            name = module if module.endswith(".agent") else f"{module}.agent"
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise NotFoundError(
                f"cannot import {module}: {e}",
                hint="give a package with an agent.py, e.g. `mesh run agents.security_review`",
            ) from None
        agent = getattr(mod, "agent", None)
        if agent is None:
            raise ConfigError(f"{mod.__name__} defines no `agent`")
    agent.main()


def run_coordinator() -> None:
    """Run a coordinator process (several may run at once: they share the durable consumer)."""
    from coordinator.run import main

    main()
