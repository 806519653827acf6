"""Serving A2A 1.0: one handler, every binding — JSON-RPC (over HTTP and over NATS), HTTP+JSON
(REST) and gRPC (docs/bindings.md).

    server = A2AServer(card, executor, task_store)
    app = server.http_app()                                 # HTTP: JSON-RPC at /, REST at /rest
    sub = await server.subscribe(nc, subject, queue=name)   # NATS (JSON-RPC)
    async with server.grpc_serving(GrpcListener.bind(settings)): …   # gRPC, on its own port

Every request, whichever way it came, is authenticated by the same `Authenticator`
(mesh.a2a.auth: a bearer token, on HTTP and NATS alike) and goes through `mesh.a2a.dispatch` to
the same `MeshRequestHandler` (mesh.a2a.handler), so both transports answer byte for byte
alike: same callers, same validation, same error codes, same task store. What sits where:

    auth.py      who the caller is: bearer tokens against the trust file (or MESH_INSECURE=a2a)
    handler.py   a2a-sdk's request handler + required extensions + SendMessage idempotency
    dispatch.py  JSON-RPC: size, Content-Type, parse, validate, route to the handler, encode
    push.py      push notifications and the webhook URL policy (SSRF guard)
    http.py      the HTTP binding: Starlette routes, body limit, SSE, the card route
    nats.py      the NATS binding: admission, progress keep-alives, stream frames, cancel
    lean.py      blocking SendMessage over NATS without a2a-sdk's per-request task machinery
    rest.py      HTTP+JSON: a2a-sdk's REST routes behind the same auth, admission, body limit
    grpc_server.py  gRPC: a2a-sdk's servicer behind the same auth and admission, its own port

JSON-RPC is answered by this package's dispatch; REST and gRPC by a2a-sdk's dispatcher and
servicer (their own wire formats and error mappings), over the same request handler.

Every binding shares one pool (`mesh._internal.tasks.TaskPool`): at most `max_concurrency`
requests are worked on, `max_queue` more wait for a slot, and one past those is answered at
once with `jsonrpc.BUSY` (HTTP, JSON-RPC and REST alike: 429 with Retry-After; gRPC:
RESOURCE_EXHAUSTED), never queued where nobody can see it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from a2a.server.agent_execution import AgentExecutor
from a2a.server.cluster import TaskEventStream, VersionedTaskStore
from a2a.server.tasks import InMemoryTaskStore, TaskStore
from a2a.types import AgentCard
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from starlette.applications import Starlette

from mesh._internal.tasks import TaskPool
from mesh.a2a.auth import Authenticator
from mesh.a2a.dispatch import MAX_BODY
from mesh.a2a.grpc_server import GrpcListener
from mesh.a2a.handler import MeshRequestHandler
from mesh.a2a.http import http_app
from mesh.a2a.lean import Answerer, LeanSend
from mesh.a2a.nats import NatsBinding
from mesh.a2a.push import Push, PushUrlPolicy
from mesh.settings import Settings, get_settings

__all__ = ["MAX_BODY", "A2AServer", "Authenticator", "GrpcListener", "PushUrlPolicy"]


class A2AServer:
    """One agent's A2A endpoint: JSON-RPC over HTTP (`http_app`) and NATS (`nats_callback`),
    HTTP+JSON (in `http_app`, under /rest) and gRPC (`grpc_serving`).

    `extended_card` is what GetExtendedAgentCard answers (the card must also declare
    `capabilities.extendedAgentCard`). Push notifications are on when the card declares
    `capabilities.pushNotifications`; `push_allow_private` (default: the setting
    MESH_PUSH_ALLOW_PRIVATE) lets webhooks target private and loopback addresses.
    A versioned (cluster) `task_store` goes with an `event_stream`, so SubscribeToTask works
    for a task that runs on another replica. `idempotent=False` turns off the messageId
    de-duplication of SendMessage (see `MeshRequestHandler`). `card_cache_control` is the
    Cache-Control of the card served at /.well-known/agent-card.json. At most
    `max_concurrency` requests (HTTP and NATS together; open NATS streams included) are worked
    on at once and `max_queue` (default: eight times as many, what two coordinators at their
    default in-flight limit may send one instance; NATS request bodies held are also bounded in
    bytes) wait for a slot; past that a request is answered "busy" (`jsonrpc.BUSY`, HTTP 429)
    at once.

    `answerer` (the agent runtime's executor) lets blocking SendMessage requests over NATS skip
    a2a-sdk's per-request machinery (mesh.a2a.lean); None: every request through the SDK.

    `auth` decides who may call (every method, on both transports; the public card stays
    public). Default: `Authenticator.from_settings(settings)` — bearer tokens checked against
    the trust file, or nobody checked (and a loud warning) under MESH_INSECURE=a2a. `settings`
    defaults to the process's (`get_settings()`).
    """

    def __init__(
        self,
        card: AgentCard,
        executor: AgentExecutor,
        task_store: TaskStore | VersionedTaskStore | None = None,
        *,
        max_concurrency: int = 64,
        max_queue: int | None = None,
        extended_card: AgentCard | None = None,
        push_allow_private: bool | None = None,
        event_stream: TaskEventStream | None = None,
        card_cache_control: str = "public, max-age=60",
        idempotent: bool = True,
        auth: Authenticator | None = None,
        settings: Settings | None = None,
        answerer: Answerer | None = None,
    ) -> None:
        self.card = card
        settings = settings or get_settings()
        self.auth = auth or Authenticator.from_settings(settings, agent=card.name)
        if push_allow_private is None:
            push_allow_private = settings.push_allow_private
        self.push_policy = PushUrlPolicy(allow_private=push_allow_private)
        self.push = Push(card, self.push_policy)
        self.handler = MeshRequestHandler(
            executor,
            task_store or InMemoryTaskStore(),
            card=card,
            push_config_store=self.push.configs,
            push_sender=self.push.sender,
            push_url_validator=self.push_policy,
            extended_agent_card=extended_card,
            event_stream=event_stream,
            idempotent=idempotent,
        )
        self.card_cache_control = card_cache_control
        self._started = time.time()  # the card served over HTTP is as old as the server
        self._pool = TaskPool(
            max_concurrency,
            backlog=8 * max_concurrency if max_queue is None else max_queue,
            name="a2a requests",
        )
        # The lean SendMessage over NATS (mesh.a2a.lean), when the executor can answer directly.
        lean = LeanSend(self.handler, answerer) if answerer is not None else None
        self._nats = NatsBinding(self.handler, self.auth, pool=self._pool, lean=lean)

    @property
    def max_concurrency(self) -> int:
        """Requests worked on at once, at most (what the agent declares as its capacity)."""
        return self._pool.size

    def http_app(self) -> Starlette:
        """The Starlette app: the card at /.well-known/agent-card.json, JSON-RPC at `/`."""
        return http_app(
            self.handler,
            self.card,
            self.auth,
            self._pool,
            card_cache_control=self.card_cache_control,
            since=self._started,
        )

    @contextlib.asynccontextmanager
    async def grpc_serving(self, listener: GrpcListener | None) -> AsyncIterator[None]:
        """Serve gRPC on `listener` (bound beforehand, so the card could name its port) until
        the block exits; nothing when it is None (MESH_GRPC_PORT=-1)."""
        if listener is None:
            yield
            return
        async with listener.serving(self.handler, self.auth, self._pool):
            yield

    def nats_callback(self, nc: NATS) -> Callable[[Msg], Awaitable[None]]:
        """A subscription callback that serves requests arriving on `nc` (and answers on it).
        Every callback of one server shares its `max_concurrency` slots."""
        return self._nats.callback(nc)

    async def subscribe(self, nc: NATS, subject: str, *, queue: str = "") -> Subscription:
        """Serve A2A on `subject` over `nc` (in queue group `queue`, if given): the callback
        of `nats_callback` with bounded pending limits, the one way an agent should subscribe."""
        return await self._nats.subscribe(nc, subject, queue=queue)

    @property
    def inflight(self) -> int:
        """Requests being worked on (open NATS streams included)."""
        return len(self._pool)

    @property
    def queued(self) -> int:
        """Requests admitted and waiting for a slot."""
        return self._pool.waiting

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for the requests being worked on and those waiting for a slot."""
        await self._pool.drain(timeout)

    async def aclose(self) -> None:
        """Release what the server holds beyond its requests (running tasks, webhook client)."""
        with contextlib.suppress(Exception):
            await self.handler.aclose()
        await self.push.aclose()
