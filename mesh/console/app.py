"""The console's web app: Starlette routes over `data`, rendered by Jinja2, live through SSE.

Every page and the live stream start from `_viewer`: the signed-in user (or a redirect to
sign-in) and the one tenant they may see (`None` for the operator, who may narrow it with
`?tenant=`). Every action starts from `_actor`: the same, plus the session's CSRF token and
the request's Origin, and the role the action needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from nats.aio.msg import Msg
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from coordinator import dlq as dlq_mod
from mesh import subjects
from mesh.bus import Bus
from mesh.console import data, svg
from mesh.console.approvals import ApprovalSource, NoApprovals, PendingApproval
from mesh.console.auth import (
    COOKIE,
    INSECURE_USER,
    Sessions,
    SignInError,
    User,
    cookie_attributes,
    csrf_ok,
    same_origin,
    sign_in,
)
from mesh.errors import ConfigError, MeshError
from mesh.identity import Trust, TrustFile
from mesh.records import dead_letter_decoder

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
LIVE_QUEUE = 256  # events buffered per browser; a browser that falls further behind loses some
LIVE_RECHECK_S = 10.0  # an open live stream re-checks its session at least this often
FORM_MAX = 16 * 1024  # bytes of a form body: the console's forms are a few fields


class Console:
    """What every request needs: the bus, whose signatures to believe, sessions, templates."""

    def __init__(
        self,
        *,
        bus: Bus | None,
        trust: Trust | None,
        trust_file: TrustFile | None,
        insecure: bool,
        approvals: ApprovalSource,
        settings: Any = None,
    ) -> None:
        self._bus = bus
        self._owns_bus = bus is None
        self._trust = trust
        self.trust_file = trust_file
        self.insecure = insecure
        self.approvals = approvals
        self.settings = settings
        self.sessions = Sessions()
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            enable_async=False,
        )
        self.env.filters["when"] = _when
        self.env.filters["ms"] = lambda v: f"{v:,.0f} ms"

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "the console is not connected"
        return self._bus

    @property
    def trust(self) -> Trust | None:
        if self.trust_file is not None:
            self._trust, _ = self.trust_file.current()
        return self._trust

    async def start(self) -> None:
        if self._bus is None:
            self._bus = await Bus.connect(name="mesh-console", settings=self.settings)

    async def stop(self) -> None:
        if self._owns_bus and self._bus is not None:
            await self._bus.close()

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        user: User | None = getattr(request.state, "user", None)
        html = self.env.get_template(name).render(
            user=user,
            insecure=self.insecure,
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def fragment(self, name: str, **ctx: Any) -> str:
        return self.env.get_template(name).render(**ctx)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + " UTC" if at else "-"


def _origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


class _Redirect(MeshError):
    """Not signed in: the page answers with a redirect to sign-in (`_page` turns it into one)."""

    def __init__(self, to: str) -> None:
        super().__init__(f"sign in first (then {to})")
        self.to = to


class _Refused(ConfigError):
    """A request refused, with the HTTP status and the message the error page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _viewer(request: Request) -> tuple[User, str | None]:
    """The signed-in user and the tenant they see (None: every tenant); else sign-in."""
    console = _console(request)
    if console.insecure:
        user = INSECURE_USER
    else:
        trust = console.trust
        found = (
            console.sessions.load(request.cookies.get(COOKIE), trust) if trust is not None else None
        )
        if found is None:
            raise _Redirect("/signin?next=" + quote(request.url.path))
        user = found
    request.state.user = user
    if not user.all_tenants:
        return user, user.tenant  # whatever ?tenant= says
    wanted = request.query_params.get("tenant", "")
    return user, wanted if wanted and subjects.valid_token(wanted) else None


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form (python-multipart is not needed for a few fields), size-bounded."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX:
            raise _Refused(413, "form too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


async def _actor(request: Request, *, needs_acting: bool = True) -> tuple[User, dict[str, str]]:
    """The user behind an action, once its CSRF token and Origin check out."""
    user, _ = _viewer(request)
    form = await _form(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not same_origin(headers, _origin(request)):
        raise _Refused(403, "refused: this action did not come from the console's own pages")
    if not csrf_ok(user, form.get("csrf")):
        raise _Refused(403, "refused: the form's CSRF token is missing or wrong (reload the page)")
    if needs_acting and not user.may_act:
        raise _Refused(403, f"a {user.role} may look but not act (ask an operator)")
    return user, form


def _page(fn: Any) -> Any:
    """A route whose _Redirect/_Refused become a redirect or an error page."""

    async def route(request: Request) -> Response:
        try:
            response: Response = await fn(request)
            return response
        except _Redirect as r:
            return RedirectResponse(r.to, status_code=303)
        except _Refused as e:
            return _console(request).render(request, "error.html", e.status, message=e.message)
        except MeshError as e:
            return _console(request).render(
                request, "error.html", 400, message=e.message, hint=e.hint or ""
            )

    route.__name__ = fn.__name__
    return route


# -- sign-in ----------------------------------------------------------------------------------
@_page
async def signin_page(request: Request) -> Response:
    console = _console(request)
    if console.insecure:
        return RedirectResponse("/", status_code=303)
    return console.render(request, "signin.html", next=_safe_next(request), error="")


def _safe_next(request: Request) -> str:
    return _local(request.query_params.get("next", "/"))


def _local(target: str) -> str:
    """`target` if it is a path on this console, else "/" (never an open redirect: browsers
    read `//host` and `/\\host` as another site)."""
    ok = target.startswith("/") and not target.startswith(("//", "/\\"))
    return target if ok else "/"


@_page
async def signin(request: Request) -> Response:
    console = _console(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not same_origin(headers, _origin(request)):
        raise _Refused(403, "refused: sign in from the console's own page")
    form = await _form(request)
    trust = console.trust
    nxt = _local(form.get("next", "/"))
    try:
        if trust is None:
            raise SignInError("this console has no trust file: nobody can sign in")
        user = sign_in(trust, form.get("token", ""))
    except SignInError as e:
        log.info("console sign-in refused: %s", e)
        return console.render(request, "signin.html", 401, next=nxt, error=str(e))
    log.info("console sign-in: %s", user.label)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(
        COOKIE,
        console.sessions.dump(user),
        **cookie_attributes(  # type: ignore[arg-type]
            secure=request.url.scheme == "https", max_age=user.expires - time.time()
        ),
    )
    return response


@_page
async def signout(request: Request) -> Response:
    await _actor(request, needs_acting=False)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- pages --------------------------------------------------------------------------------------
@_page
async def home(request: Request) -> Response:
    _viewer(request)
    return RedirectResponse("/decisions", status_code=303)


@_page
async def agents_page(request: Request) -> Response:
    _user, _ = _viewer(request)
    console = _console(request)
    rows = await data.agents(console.bus)
    status = await data.coordinator_status(console.bus)
    # Keyed `<agent>.<instance>` (or `<agent>`); the worst any coordinator reports wins.
    breakers: dict[str, str] = {}
    for answer in status:
        for name, state in (answer.get("breakers") or {}).items():
            if breakers.get(name, "closed") == "closed":
                breakers[name] = str(state)
    return console.render(
        request,
        "registry.html",
        rows=rows,
        coordinators=status,
        breakers=breakers,
        now=time.time(),
    )


@_page
async def decisions_page(request: Request) -> Response:
    _user, tenant = _viewer(request)
    console = _console(request)
    event_type = request.query_params.get("type", "")
    outcome = request.query_params.get("outcome", "")
    rows = await data.decisions(
        console.bus, console.trust, tenant, event_type=event_type, outcome=outcome
    )
    return console.render(
        request,
        "decisions.html",
        rows=rows,
        tenant=tenant or "",
        event_type=event_type,
        outcome=outcome,
        per_minute=svg.stacked_columns("decisions per minute by outcome", data.per_minute(rows)),
        latency=svg.bars("vote latency per agent (mean)", data.latency_by_agent(rows), unit=" ms"),
        live_query=_live_query(tenant, event_type, outcome),
    )


def _live_query(tenant: str | None, event_type: str, outcome: str) -> str:
    parts = [
        f"{k}={quote(v)}"
        for k, v in (("tenant", tenant or ""), ("type", event_type), ("outcome", outcome))
        if v
    ]
    return "&".join(parts)


@_page
async def decision_page(request: Request) -> Response:
    user, _ = _viewer(request)
    console = _console(request)
    tenant = request.path_params["tenant"]
    event_id = request.path_params["event_id"]
    if not subjects.valid_token(tenant) or not user.sees(tenant):
        raise _Refused(404, "no such decision")  # exactly as a missing one: no oracle
    row = await data.decision(console.bus, console.trust, tenant, event_id)
    if row is None or row.decision is None:
        raise _Refused(404, "no such decision")
    audit_records = await data.audit_of_event(console.bus, tenant, event_id)
    states = await data.audit_states(console.bus, console.trust, tenant)
    trace = await data.trace_lines(console.bus, row.decision.trace_id)
    return console.render(
        request,
        "decision.html",
        row=row,
        d=row.decision,
        audit_records=audit_records,
        audit_state=states[0] if states else None,
        trace=trace,
    )


@_page
async def dlq_page(request: Request) -> Response:
    _user, tenant = _viewer(request)
    console = _console(request)
    reason = request.query_params.get("reason", "")
    if reason and reason not in dlq_mod.REASONS:
        reason = ""
    items = await data.dead_letters(console.bus, tenant, reason=reason)
    return console.render(
        request,
        "dead_letters.html",
        items=items,
        reason=reason,
        reasons=dlq_mod.REASONS,
        tenant=tenant or "",
        plot=svg.bars("dead letters by reason", data.by_reason(items)),
        done=request.query_params.get("done", ""),
        live_query=_live_query(tenant, "", ""),
    )


@_page
async def dlq_item(request: Request) -> Response:
    _user, tenant = _viewer(request)
    console = _console(request)
    seq = _seq(request)
    d = await data.dead_letter(console.bus, tenant, seq)
    if d is None:
        raise _Refused(404, "no such dead letter")
    try:
        body, problem = await dlq_mod.body_of(console.bus, d), ""
    except MeshError as e:
        body, problem = b"", e.message
    return console.render(
        request,
        "dead_letter.html",
        seq=seq,
        d=d,
        preview=data.preview(body) if not problem else "",
        body_problem=problem,
        replayable=bool(subjects.parse_event_subject(d.subject)[0]),
    )


def _seq(request: Request) -> int:
    try:
        return int(request.path_params["seq"])
    except ValueError:
        raise _Refused(404, "no such dead letter") from None


@_page
async def dlq_replay(request: Request) -> Response:
    user, _ = await _actor(request)
    console = _console(request)
    seq = _seq(request)
    scope = None if user.all_tenants else user.tenant
    if await data.dead_letter(console.bus, scope, seq) is None:
        raise _Refused(404, "no such dead letter")
    msg_id = await dlq_mod.replay(console.bus, seq)
    log.info("console: %s replayed dead letter %s as %s", user.label, seq, msg_id)
    return RedirectResponse(f"/dead-letters?done=replayed+{seq}+as+{quote(msg_id)}", 303)


@_page
async def dlq_purge_page(request: Request) -> Response:
    user, _ = _viewer(request)
    console = _console(request)
    if not user.may_act:
        raise _Refused(403, f"a {user.role} may look but not act (ask an operator)")
    _purgeable(console)
    reason = request.query_params.get("reason", "")
    reason = reason if reason in dlq_mod.REASONS else ""
    items = await data.dead_letters(console.bus, None, reason=reason, limit=1000)
    return console.render(request, "purge.html", reason=reason, count=len(items))


def _purgeable(console: Console) -> None:
    """Purging is stream admin, which the bus lets only the operator do: a console running as
    its own identity (beside `mesh up`) says so instead of trying."""
    if not console.bus.is_operator:
        raise _Refused(
            403,
            "purging dead letters is stream admin, which only the operator identity may do: "
            "run `mesh dlq purge` (or a console started with the operator's identity)",
        )


@_page
async def dlq_purge(request: Request) -> Response:
    user, form = await _actor(request)
    console = _console(request)
    if not user.all_tenants:  # purge spans every tenant's dead letters
        raise _Refused(403, "only an operator of every tenant may purge")
    _purgeable(console)
    if form.get("confirm") != "purge":
        raise _Refused(400, "not purged: type purge to confirm")
    reason = form.get("reason") or None
    removed = await dlq_mod.purge(console.bus, reason=reason)
    log.info("console: %s purged %s dead letter(s) (reason %s)", user.label, removed, reason)
    return RedirectResponse(f"/dead-letters?done=purged+{removed}", 303)


@_page
async def audit_page(request: Request) -> Response:
    _user, tenant = _viewer(request)
    console = _console(request)
    states = await data.audit_states(console.bus, console.trust, tenant)
    return console.render(request, "audit.html", states=states, trust_missing=console.trust is None)


@_page
async def audit_export(request: Request) -> Response:
    _user, tenant = _viewer(request)  # a reader's own tenant, whatever ?tenant= says
    console = _console(request)
    body = await data.audit_export(console.bus, tenant)
    name = f"audit-{tenant or 'all'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@_page
async def approvals_page(request: Request) -> Response:
    user, tenant = _viewer(request)
    console = _console(request)
    pending = [p for p in await console.approvals.pending(tenant) if _awaits(user, p)]
    return console.render(
        request,
        "approvals.html",
        available=console.approvals.available,
        pending=pending,
        redact=data.redact,
        done=request.query_params.get("done", ""),
    )


def _awaits(user: User, item: PendingApproval) -> bool:
    """Whether `item` waits for `user`: their tenant's, and (when it names its approvers) they
    are one of them, as `role:name`. Whether that role may approve at all is the approvals
    module's to say (`decide` refuses)."""
    named = not item.approvers or f"{user.role}:{user.name}" in item.approvers
    return user.sees(item.tenant) and named


@_page
async def approval_decide(request: Request) -> Response:
    user, form = await _actor(request, needs_acting=False)
    console = _console(request)
    approval_id = request.path_params["approval_id"]
    scope = None if user.all_tenants else user.tenant
    mine = {p.approval_id: p for p in await console.approvals.pending(scope)}
    item = mine.get(approval_id)
    if item is None or not _awaits(user, item):
        raise _Refused(404, "no such approval waiting for you")
    choice = form.get("decision", "")
    reason = form.get("reason", "").strip()
    if choice not in ("approve", "deny") or not reason:
        raise _Refused(400, "say approve or deny, with a reason")
    await console.approvals.decide(
        approval_id,
        tenant=item.tenant,
        approve=choice == "approve",
        reason=reason,
        approver=f"{user.role}:{user.name}",
    )
    return RedirectResponse(f"/approvals?done={choice}d+{quote(approval_id)}", 303)


# -- live ---------------------------------------------------------------------------------------
class _Live:
    """One browser's live stream: rows of new events, decisions and dead letters of the
    viewer's tenant. The NATS subscriptions name the tenant, so another tenant's messages never
    reach it; each is checked once more before it is sent."""

    def __init__(self, request: Request, user: User, tenant: str | None) -> None:
        self.console = _console(request)
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
                try:
                    kind, html = await asyncio.wait_for(self.queue.get(), LIVE_RECHECK_S)
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
        user, tenant = _viewer(request)
    except _Redirect:
        return Response("sign in first", status_code=401)
    return EventSourceResponse(_Live(request, user, tenant).stream(), ping=15)


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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await console.start()
        try:
            yield
        finally:
            await console.stop()

    routes = [
        Route("/", home),
        Route("/signin", signin_page, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/agents", agents_page),
        Route("/decisions", decisions_page),
        Route("/decisions/{tenant}/{event_id:path}", decision_page),
        Route("/dead-letters", dlq_page),
        Route("/dead-letters/purge", dlq_purge_page, methods=["GET"]),
        Route("/dead-letters/purge", dlq_purge, methods=["POST"]),
        Route("/dead-letters/{seq}", dlq_item),
        Route("/dead-letters/{seq}/replay", dlq_replay, methods=["POST"]),
        Route("/audit", audit_page),
        Route("/audit/export", audit_export),
        Route("/approvals", approvals_page),
        Route("/approvals/{approval_id}", approval_decide, methods=["POST"]),
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
