"""The console as an ASGI app: the routes (mesh.console.pages, mesh.console.live), the Host
check, the security headers, and the lifespan that connects the bus."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mesh.bus import Bus
from mesh.console import pages
from mesh.console.approvals import ApprovalSource, BusApprovals, NoApprovals
from mesh.console.live import live
from mesh.console.web import HERE, Console
from mesh.errors import ConfigError
from mesh.identity import Trust, TrustFile

# -- the app ------------------------------------------------------------------------------------
# On every answer: no other site may frame a page (clickjacking an action button), run or load
# anything but the console's own script and style, or keep a page in a cache.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class _Headers:
    """Adds `headers` to every HTTP answer (a pure ASGI middleware: SSE streams pass through)."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.app = app
        self.raw = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.raw]
            await send(message)

        await self.app(scope, receive, sending)


def create_app(
    *,
    bus: Bus | None = None,
    trust: Trust | None = None,
    trust_path: Path | None = None,
    insecure: bool = False,
    approvals: ApprovalSource | None = None,
    allowed_hosts: list[str] | None = None,
    settings: Any = None,
) -> Starlette:
    """The console as an ASGI app. Without `bus` it connects at start-up (as MESH_IDENTITY);
    `trust`: whose tokens and signatures to believe (re-read from `trust_path` as it changes).
    `insecure`: everyone is the operator, no sign-in (say so loudly: the CLI does)."""
    if trust is None and not insecure:
        raise ConfigError(
            "the console needs the trust file to check who signs in",
            hint="set MESH_TRUST (`mesh up` writes .mesh/identity/trust.json), "
            "or run `mesh console --insecure` (local experiments only)",
        )
    console = Console(
        bus=bus,
        trust=trust,
        trust_file=TrustFile(trust_path, trust) if trust_path is not None and trust else None,
        insecure=insecure,
        approvals=approvals or NoApprovals(),
        settings=settings,
    )
    if approvals is None and not insecure:
        # The inbox over the bus, answering as this console's identity for its signed-in
        # people (mesh.console.approvals); "not connected" when that identity cannot sign.
        console.approvals = BusApprovals(lambda: console.bus, lambda: console.trust)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await console.start()
        try:
            yield
        finally:
            await console.stop()

    routes = [
        Route("/", pages.home),
        Route("/signin", pages.signin_page, methods=["GET"]),
        Route("/signin", pages.signin, methods=["POST"]),
        Route("/signout", pages.signout, methods=["POST"]),
        Route("/agents", pages.agents_page),
        Route("/decisions", pages.decisions_page),
        Route("/decisions/{tenant}/{event_id:path}", pages.decision_page),
        Route("/dead-letters", pages.dlq_page),
        Route("/dead-letters/purge", pages.dlq_purge_page, methods=["GET"]),
        Route("/dead-letters/purge", pages.dlq_purge, methods=["POST"]),
        Route("/dead-letters/{seq}", pages.dlq_item),
        Route("/dead-letters/{seq}/replay", pages.dlq_replay, methods=["POST"]),
        Route("/audit", pages.audit_page),
        Route("/audit/export", pages.audit_export),
        Route("/approvals", pages.approvals_page),
        Route("/approvals/{approval_id}", pages.approval_decide, methods=["POST"]),
        Route("/live", live),
        # check_dir=False: a package built without its data files (pyproject's package-data)
        # fails its pages, not the `mesh up` that serves them.
        Mount("/static", StaticFiles(directory=HERE / "static", check_dir=False), name="static"),
    ]
    hosts = ["127.0.0.1", "localhost", "[::1]", *(allowed_hosts or [])]
    headers = SECURITY_HEADERS
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # A page on another name that resolves here (DNS rebinding) gets nothing.
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
            Middleware(_Headers, headers=headers),
        ],
    )
    app.state.console = console
    return app
