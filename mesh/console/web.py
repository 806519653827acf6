"""What every request of the console goes through: the `Console` (bus, trust, sessions,
templates), who is looking (`viewer`), who is acting (`actor`), and `page`, which turns a
refusal into an error page and "not signed in" into a redirect.

Every page and the live stream start from `viewer`: the signed-in user (or a redirect to
sign-in) and the one tenant they may see (`None` for the operator, who may narrow it with
`?tenant=`). Every action starts from `actor`: the same, plus the session's CSRF token and
the request's Origin, and the role the action needs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from mesh import subjects
from mesh.bus import Bus
from mesh.console.approvals import ApprovalSource
from mesh.console.auth import COOKIE, INSECURE_USER, Sessions, User, csrf_ok, same_origin
from mesh.errors import ConfigError, MeshError
from mesh.identity import Trust, TrustFile

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
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


def origin_of(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


class Redirect(MeshError):
    """Not signed in: the page answers with a redirect to sign-in (`page` turns it into one)."""

    def __init__(self, to: str) -> None:
        super().__init__(f"sign in first (then {to})")
        self.to = to


class Refused(ConfigError):
    """A request refused, with the HTTP status and the message the error page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def viewer(request: Request) -> tuple[User, str | None]:
    """The signed-in user and the tenant they see (None: every tenant); else sign-in."""
    console = console_of(request)
    if console.insecure:
        user = INSECURE_USER
    else:
        trust = console.trust
        found = (
            console.sessions.load(request.cookies.get(COOKIE), trust) if trust is not None else None
        )
        if found is None:
            raise Redirect("/signin?next=" + quote(request.url.path))
        user = found
    request.state.user = user
    if not user.all_tenants:
        return user, user.tenant  # whatever ?tenant= says
    wanted = request.query_params.get("tenant", "")
    return user, wanted if wanted and subjects.valid_token(wanted) else None


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form (python-multipart is not needed for a few fields), size-bounded."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX:
            raise Refused(413, "form too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


async def actor(request: Request, *, needs_acting: bool = True) -> tuple[User, dict[str, str]]:
    """The user behind an action, once its CSRF token and Origin check out."""
    user, _ = viewer(request)
    form = await read_form(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not same_origin(headers, origin_of(request)):
        raise Refused(403, "refused: this action did not come from the console's own pages")
    if not csrf_ok(user, form.get("csrf")):
        raise Refused(403, "refused: the form's CSRF token is missing or wrong (reload the page)")
    if needs_acting and not user.may_act:
        raise Refused(403, f"a {user.role} may look but not act (ask an operator)")
    return user, form


def page(fn: Any) -> Any:
    """A route whose Redirect/Refused become a redirect or an error page."""

    async def route(request: Request) -> Response:
        try:
            response: Response = await fn(request)
            return response
        except Redirect as r:
            return RedirectResponse(r.to, status_code=303)
        except Refused as e:
            return console_of(request).render(request, "error.html", e.status, message=e.message)
        except MeshError as e:
            return console_of(request).render(
                request, "error.html", 400, message=e.message, hint=e.hint or ""
            )

    route.__name__ = fn.__name__
    return route
