"""The console's pages and actions: sign-in, agents, decisions, dead letters, audit,
approvals. Each is a Starlette endpoint wrapped in `page` (mesh.console.web)."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from coordinator import dlq as dlq_mod
from mesh import subjects
from mesh.console import data, svg
from mesh.console.auth import COOKIE, SignInError, cookie_attributes, same_origin, sign_in
from mesh.console.web import (
    Console,
    Refused,
    actor,
    console_of,
    origin_of,
    page,
    read_form,
    viewer,
)
from mesh.errors import MeshError

log = logging.getLogger(__name__)


# -- sign-in ----------------------------------------------------------------------------------
@page
async def signin_page(request: Request) -> Response:
    console = console_of(request)
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


@page
async def signin(request: Request) -> Response:
    console = console_of(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not same_origin(headers, origin_of(request)):
        raise Refused(403, "refused: sign in from the console's own page")
    form = await read_form(request)
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


@page
async def signout(request: Request) -> Response:
    await actor(request, needs_acting=False)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- pages --------------------------------------------------------------------------------------
@page
async def home(request: Request) -> Response:
    viewer(request)
    return RedirectResponse("/decisions", status_code=303)


@page
async def agents_page(request: Request) -> Response:
    _user, _ = viewer(request)
    console = console_of(request)
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


@page
async def decisions_page(request: Request) -> Response:
    _user, tenant = viewer(request)
    console = console_of(request)
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


@page
async def decision_page(request: Request) -> Response:
    user, _ = viewer(request)
    console = console_of(request)
    tenant = request.path_params["tenant"]
    event_id = request.path_params["event_id"]
    if not subjects.valid_token(tenant) or not user.sees(tenant):
        raise Refused(404, "no such decision")  # exactly as a missing one: no oracle
    row = await data.decision(console.bus, console.trust, tenant, event_id)
    if row is None or row.decision is None:
        raise Refused(404, "no such decision")
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


@page
async def dlq_page(request: Request) -> Response:
    _user, tenant = viewer(request)
    console = console_of(request)
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


@page
async def dlq_item(request: Request) -> Response:
    _user, tenant = viewer(request)
    console = console_of(request)
    seq = _seq(request)
    d = await data.dead_letter(console.bus, tenant, seq)
    if d is None:
        raise Refused(404, "no such dead letter")
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
        raise Refused(404, "no such dead letter") from None


@page
async def dlq_replay(request: Request) -> Response:
    user, _ = await actor(request)
    console = console_of(request)
    seq = _seq(request)
    scope = None if user.all_tenants else user.tenant
    if await data.dead_letter(console.bus, scope, seq) is None:
        raise Refused(404, "no such dead letter")
    msg_id = await dlq_mod.replay(console.bus, seq)
    log.info("console: %s replayed dead letter %s as %s", user.label, seq, msg_id)
    return RedirectResponse(f"/dead-letters?done=replayed+{seq}+as+{quote(msg_id)}", 303)


@page
async def dlq_purge_page(request: Request) -> Response:
    user, _ = viewer(request)
    console = console_of(request)
    if not user.may_act:
        raise Refused(403, f"a {user.role} may look but not act (ask an operator)")
    _purgeable(console)
    reason = request.query_params.get("reason", "")
    reason = reason if reason in dlq_mod.REASONS else ""
    items = await data.dead_letters(console.bus, None, reason=reason, limit=1000)
    return console.render(request, "purge.html", reason=reason, count=len(items))


def _purgeable(console: Console) -> None:
    """Purging is stream admin, which the bus lets only the operator do: a console running as
    its own identity (beside `mesh up`) says so instead of trying."""
    if not console.bus.is_operator:
        raise Refused(
            403,
            "purging dead letters is stream admin, which only the operator identity may do: "
            "run `mesh dlq purge` (or a console started with the operator's identity)",
        )


@page
async def dlq_purge(request: Request) -> Response:
    user, form = await actor(request)
    console = console_of(request)
    if not user.all_tenants:  # purge spans every tenant's dead letters
        raise Refused(403, "only an operator of every tenant may purge")
    _purgeable(console)
    if form.get("confirm") != "purge":
        raise Refused(400, "not purged: type purge to confirm")
    reason = form.get("reason") or None
    removed = await dlq_mod.purge(console.bus, reason=reason)
    log.info("console: %s purged %s dead letter(s) (reason %s)", user.label, removed, reason)
    return RedirectResponse(f"/dead-letters?done=purged+{removed}", 303)


@page
async def audit_page(request: Request) -> Response:
    _user, tenant = viewer(request)
    console = console_of(request)
    states = await data.audit_states(console.bus, console.trust, tenant)
    return console.render(request, "audit.html", states=states, trust_missing=console.trust is None)


@page
async def audit_export(request: Request) -> Response:
    _user, tenant = viewer(request)  # a reader's own tenant, whatever ?tenant= says
    console = console_of(request)
    body = await data.audit_export(console.bus, tenant)
    name = f"audit-{tenant or 'all'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@page
async def approvals_page(request: Request) -> Response:
    user, tenant = viewer(request)
    console = console_of(request)
    pending = [
        p
        for p in await console.approvals.pending(user)
        if user.sees(p.tenant) and (not tenant or p.tenant == tenant)
    ]
    return console.render(
        request,
        "approvals.html",
        available=console.approvals.available,
        pending=pending,
        redact=data.redact,
        done=request.query_params.get("done", ""),
        receipt=request.query_params.get("receipt", ""),
    )


@page
async def approval_decide(request: Request) -> Response:
    user, form = await actor(request, needs_acting=False)
    console = console_of(request)
    approval_id = request.path_params["approval_id"]
    # Only what waits for this user (the adapter's rule), of their tenant (the console's).
    mine = {p.approval_id: p for p in await console.approvals.pending(user)}
    item = mine.get(approval_id)
    if item is None or not user.sees(item.tenant):
        raise Refused(404, "no such approval waiting for you")
    if not item.may_answer:
        raise Refused(403, f"a {user.role} may look but not answer (a person of the role asked)")
    choice = form.get("decision", "")
    reason = form.get("reason", "").strip()
    if choice not in ("approve", "deny") or not reason:
        raise Refused(400, "say approve or deny, with a reason")
    receipt = await console.approvals.decide(
        approval_id, user=user, approve=choice == "approve", reason=reason
    )
    log.info(
        "console: %s answered %s (%s): %s",
        user.label,
        approval_id,
        choice,
        {True: "accepted", False: "refused", None: "no receipt yet"}[receipt.accepted],
    )
    said = {True: "accepted", False: "REFUSED", None: "sent"}[receipt.accepted]
    done = f"{choice} {approval_id}: {said}" + (f" ({receipt.why})" if receipt.why else "")
    state = {True: "accepted", False: "refused", None: "sent"}[receipt.accepted]
    return RedirectResponse(f"/approvals?done={quote(done)}&receipt={state}", 303)
