"""Serving the conformance agent: the mesh's pieces put together by hand.

`mesh.Agent` serves one typed `@agent.rules` handler; the TCK needs raw A2A behaviour (messages
instead of tasks, INPUT_REQUIRED, streamed chunks, long-running tasks), so this module builds
the same stack `Agent.serve` builds, around an `AgentExecutor` of its own:

    card (cards/conformance.json) → live interfaces → A2AServer (one handler: JSON-RPC over
    HTTP and NATS, HTTP+JSON, gRPC) → uvicorn on MESH_HTTP_HOST:MESH_HTTP_PORT (JSON-RPC at /,
    REST at /rest), gRPC on MESH_HTTP_HOST:MESH_GRPC_PORT → `mesh.a2a.conformance` (queue
    group) and its own replica subject → the registry, heartbeating.

Run it with `python -m agents.conformance` (MESH_HTTP_PORT=0 picks a free port; the URL is
logged and is in the card at /.well-known/agent-card.json).

Authentication: `serve` authenticates callers as every agent does (bearer tokens, from its
settings). Its launcher, `python -m agents.conformance`, switches A2A authentication off
(`MESH_INSECURE` gains `a2a`, said loudly at start, and the card then declares no security
scheme): the A2A TCK it exists for has no way to send a token. Nothing else in the mesh does so
by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from a2a.types import AgentCard, AgentExtension, AgentSkill

from agents.conformance.executor import ConformanceExecutor
from mesh import subjects
from mesh._internal import http as http_server
from mesh.a2a.auth import Authenticator
from mesh.a2a.server import A2AServer, GrpcListener
from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.errors import ConfigError, MeshError, exit_code
from mesh.registry import Registration, Registry, new_instance_id
from mesh.settings import Settings, get_settings

log = logging.getLogger(__name__)

NAME = "conformance"
# The conformance agent's own switch (like TCK_STREAMING_TIMEOUT), not a mesh setting.
PROFILE_ENV = "TCK_PROFILE"
# Declared `required` in the minimal profile: a message without it gets -32008.
REQUIRED_EXTENSION = "urn:a2a:tck:required-extension"


@dataclass
class RunningConformance:
    server: A2AServer
    card: AgentCard
    http_url: str
    subject: str
    registration: Registration
    grpc_url: str | None = None  # `host:port`; None under MESH_GRPC_PORT=-1


def extended_card(card: AgentCard) -> AgentCard:
    """What GetExtendedAgentCard answers: the public card plus one more skill."""
    extended = AgentCard()
    extended.CopyFrom(card)
    extended.description = card.description + " (extended card)"
    extended.skills.append(
        AgentSkill(
            id="conformance-extended",
            name="Extended conformance skill",
            description="Only listed on the extended agent card.",
            tags=["a2a", "conformance", "extended"],
        )
    )
    return extended


def profile_card(card: AgentCard, profile: str) -> AgentCard:
    """`full` (cards/conformance.json: streaming, push, extended card) or `minimal`: none of
    those, and one extension the caller must declare — the TCK's capability-error checks
    (CORE-CAP-001..004) need an agent that lacks what the full one has."""
    if profile == "full":
        return card
    if profile != "minimal":
        raise ConfigError(f"unknown {PROFILE_ENV} {profile!r}", hint="use full or minimal")
    minimal = AgentCard()
    minimal.CopyFrom(card)
    minimal.capabilities.streaming = False
    minimal.capabilities.push_notifications = False
    minimal.capabilities.extended_agent_card = False
    minimal.capabilities.extensions.append(
        AgentExtension(
            uri=REQUIRED_EXTENSION,
            description="Required by the minimal conformance profile.",
            required=True,
        )
    )
    return minimal


@contextlib.asynccontextmanager
async def serve(
    bus: Bus,
    *,
    settings: Settings | None = None,
    executor: ConformanceExecutor | None = None,
    push_allow_private: bool | None = None,
    profile: str | None = None,
) -> AsyncIterator[RunningConformance]:
    """Serve the conformance agent over HTTP and NATS, registered, until the block exits.

    `profile` defaults to env TCK_PROFILE, else `full` (see `profile_card`).
    """
    settings = settings or bus.settings
    card = profile_card(load_card(NAME), profile or os.environ.get(PROFILE_ENV) or "full")
    subject = subjects.a2a(NAME)
    instance = new_instance_id()
    direct = subjects.a2a_instance(NAME, instance)
    async with contextlib.AsyncExitStack() as stack:
        await bus.ensure()
        sock = http_server.bind(settings)
        stack.callback(sock.close)
        http_url = http_server.advertised_url(settings, sock.getsockname()[1])
        grpc_listener = GrpcListener.bind(settings)
        if grpc_listener is not None:
            stack.push_async_callback(grpc_listener.aclose)
        grpc_url = grpc_listener.url if grpc_listener else None
        auth = Authenticator.from_settings(settings, agent=NAME)
        live = with_interfaces(
            card,
            http_url=http_url,
            nats_subject=subject,
            authenticated=auth.required,
            grpc_url=grpc_url,
        )
        extended = extended_card(live) if live.capabilities.extended_agent_card else None
        server = A2AServer(
            live,
            executor or ConformanceExecutor(),
            auth=auth,
            extended_card=extended,
            push_allow_private=(
                settings.push_allow_private if push_allow_private is None else push_allow_private
            ),
            # The TCK reuses messageIds within a run (tck-input-required-<session> for every
            # new task it needs), which the mesh's retry de-duplication would answer with the
            # first task. Every other path is the production one.
            idempotent=False,
        )
        stack.push_async_callback(server.aclose)
        await stack.enter_async_context(http_server.serving(server, sock))
        await stack.enter_async_context(server.grpc_serving(grpc_listener))
        serve_nats = server.nats_callback(bus.nc)
        shared = await bus.nc.subscribe(subject, queue=NAME, cb=serve_nats)
        own = await bus.nc.subscribe(direct, cb=serve_nats)
        stack.push_async_callback(server.drain)
        stack.push_async_callback(shared.unsubscribe)
        stack.push_async_callback(own.unsubscribe)
        reg = await stack.enter_async_context(
            Registry(bus).registered(live, instance, direct_subject=direct)
        )
        log.info(
            "conformance/%s serving on %s, %s and gRPC %s", instance, subject, http_url, grpc_url
        )
        yield RunningConformance(server, live, http_url, subject, reg, grpc_url)


def without_a2a_auth(settings: Settings) -> Settings:
    """`settings` with A2A authentication switched off (MESH_INSECURE gains `a2a`): what the
    conformance launcher runs with, because the A2A TCK cannot send a bearer token."""
    parts = settings.insecure_parts() | {"a2a"}
    return settings.model_copy(update={"insecure": ",".join(sorted(parts))})


def main() -> None:
    from mesh._internal.logs import configure_process

    configure_process()  # a MESH_* variable that does not parse: one line and 3, no traceback
    try:
        asyncio.run(_run_forever(without_a2a_auth(get_settings())))
    except MeshError as e:
        log.error("%s", e)
        raise SystemExit(exit_code(e)) from None


async def _run_forever(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with (
        await Bus.connect(name=f"agent:{NAME}", settings=settings) as bus,
        serve(bus, settings=settings),
    ):
        await stop.wait()
        log.info("conformance: stopping")
