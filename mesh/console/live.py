"""Live rows over server-sent events: new events, decisions and dead letters of the viewer's
tenant, rendered on the server, pushed to the page's few lines of script (static/console.js)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from mesh import subjects
from mesh.console import data
from mesh.console.auth import COOKIE, User
from mesh.console.web import Redirect, console_of, viewer
from mesh.records import dead_letter_decoder

LIVE_QUEUE = 256  # events buffered per browser; a browser that falls further behind loses some
LIVE_RECHECK_S = 10.0  # an open live stream re-checks its session at least this often


# -- live ---------------------------------------------------------------------------------------
class _Live:
    """One browser's live stream: rows of new events, decisions and dead letters of the
    viewer's tenant. The NATS subscriptions name the tenant, so another tenant's messages never
    reach it; each is checked once more before it is sent."""

    def __init__(self, request: Request, user: User, tenant: str | None) -> None:
        self.console = console_of(request)
        self.user = user
        self.tenant = tenant
        self.event_type = request.query_params.get("type", "")
        self.outcome = request.query_params.get("outcome", "")
        self.cookie = request.cookies.get(COOKIE)
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(LIVE_QUEUE)

    def _shows(self, tenant: str) -> bool:
        return self.user.sees(tenant) and (not self.tenant or tenant == self.tenant)

    def _put(self, kind: str, name: str, **ctx: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a stalled browser misses rows
            self.queue.put_nowait((kind, self.console.fragment(name, **ctx)))

    async def on_event(self, msg: Msg) -> None:
        t, etype = subjects.parse_event_subject(msg.subject)
        if not self._shows(t) or (self.event_type and etype != self.event_type):
            return
        try:
            doc = json.loads(msg.data)
            event_id = str(doc.get("id", "")) if isinstance(doc, dict) else ""
        except ValueError:
            event_id = ""
        row = {"tenant": t, "event_type": etype, "event_id": event_id, "at": time.time()}
        self._put("event", "_event_row.html", **row)

    async def on_decision(self, msg: Msg) -> None:
        row = data.check_decision(self.console.trust, msg.subject, msg.data)
        d = row.decision
        if not self._shows(row.tenant):
            return
        if d is not None and (
            (self.event_type and d.event_type != self.event_type)
            or (self.outcome and d.outcome != self.outcome)
        ):
            return
        self._put("decision", "_decision_row.html", row=row)

    async def on_dead_letter(self, msg: Msg) -> None:
        try:
            d = dead_letter_decoder.decode(msg.data)
        except Exception:
            return  # not a dead letter (someone else published on mesh.dlq.>)
        if self._shows(d.tenant):
            self._put("dead_letter", "_dlq_live.html", d=d)

    def _signed_in(self) -> bool:
        """Still signed in: a session that expired, or whose issuer was revoked, ends too."""
        trust = self.console.trust
        return self.console.insecure or (
            trust is not None and self.console.sessions.load(self.cookie, trust) is not None
        )

    async def stream(self) -> AsyncIterator[dict[str, str]]:
        nc = self.console.bus.nc
        scope = self.tenant or (None if self.user.all_tenants else self.user.tenant)
        subs = [
            await nc.subscribe(data.tenant_subject(root, scope), cb=cb)
            for root, cb in (
                (subjects.EVENTS_ROOT, self.on_event),
                (subjects.DECISIONS_ROOT, self.on_decision),
                (subjects.DLQ_ROOT, self.on_dead_letter),
            )
        ]
        try:
            await nc.flush()
            yield {"event": "ready", "data": "subscribed"}
            while True:
                # asyncio.timeout: 3.11's wait_for can swallow the cancel of a closed stream
                # that lands as an item arrives, and this loop would run on.
                try:
                    async with asyncio.timeout(LIVE_RECHECK_S):
                        kind, html = await self.queue.get()
                except TimeoutError:
                    kind, html = "", ""
                if not self._signed_in():
                    return
                if kind:
                    yield {"event": kind, "data": html}
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


async def live(request: Request) -> Response:
    """Server-sent events for the live rows of a page (see `_Live`); 401 when not signed in."""
    try:
        user, tenant = viewer(request)
    except Redirect:
        return Response("sign in first", status_code=401)
    return EventSourceResponse(_Live(request, user, tenant).stream(), ping=15)
