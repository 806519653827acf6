"""Who is looking: sign-in with a mesh bearer token, a signed session cookie, CSRF checks.

The smallest design that holds (docs/console.md, "Sign-in"):

- A user signs in once with the bearer token of their mesh identity (the `token` of the file
  `mesh creds` wrote; `mesh console token FILE` prints it). The console checks it exactly as an
  agent does (`mesh.identity.verify_token`: signed by a trusted issuer, not expired, a role) and
  keeps nothing of it: the session names the principal, the issuer key and an expiry.
- The session is a cookie signed (HMAC-SHA256) with a key this console process makes at start
  and never writes anywhere: a restart signs everyone out. HttpOnly, SameSite=Strict, Secure
  when the console is served over https, Path=/.
- Every request looks at the trust file again (at most once a second): a user whose token's
  issuer key was revoked since is signed out at their next click.
- Every action (a POST) needs the session's CSRF token in its form and an Origin (or Referer)
  that is the console's own; sign-in needs the Origin.

Who may sign in: the operator (every tenant, every action), a tenant's reader, publisher or
human approver (that tenant only; they look, and a human answers their approvals). Coordinators,
agents and the console itself are machines: refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from mesh.errors import ConfigError
from mesh.identity import ALL_TENANTS, Principal, TokenError, Trust, verify_token

COOKIE = "mesh_console"
SESSION_MAX_S = 8 * 3600.0  # a session ends after this, or when its token would have
# `human`: a person who answers approval requests (issue 15), where that role exists.
SIGN_IN_ROLES = ("operator", "reader", "publisher", "human")
ACTING_ROLES = ("operator",)  # replay and purge (the bus lets no other role do them either)


@dataclass(frozen=True)
class User:
    """A signed-in user: the principal their token named, and this session's CSRF token."""

    name: str
    role: str
    tenant: str  # ALL_TENANTS for the operator
    issuer: str  # key id of the key that signed their token (re-checked on every request)
    csrf: str
    expires: float

    @property
    def all_tenants(self) -> bool:
        return self.tenant == ALL_TENANTS

    @property
    def may_act(self) -> bool:
        return self.role in ACTING_ROLES

    def sees(self, tenant: str) -> bool:
        """Whether this user may see data of `tenant` (the one check every view applies)."""
        return self.all_tenants or tenant == self.tenant

    @property
    def label(self) -> str:
        where = "all tenants" if self.all_tenants else f"tenant {self.tenant}"
        return f"{self.role}:{self.name} ({where})"


INSECURE_USER = User("insecure", "operator", ALL_TENANTS, "", "insecure", float("inf"))


class SignInError(ConfigError):
    """A sign-in refused; the message is safe to show (it never repeats the token)."""


def sign_in(trust: Trust, token: str, *, now: float | None = None) -> User:
    """The user a bearer token authenticates, with a fresh CSRF token; SignInError if none."""
    import jwt

    token = token.strip()
    if not token:
        raise SignInError("paste the token of your mesh identity")
    try:
        principal: Principal = verify_token(trust, token)
    except TokenError as e:
        raise SignInError(e.message) from None
    if principal.role not in SIGN_IN_ROLES:
        raise SignInError(
            f"a {principal.role} identity cannot sign in to the console "
            "(use an operator, reader, publisher or human identity)"
        )
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})  # verified just above
    now = time.time() if now is None else now
    return User(
        name=principal.name,
        role=principal.role,
        tenant=principal.tenant,
        issuer=str(header.get("kid", "")),
        csrf=secrets.token_urlsafe(32),
        expires=min(float(claims["exp"]), now + SESSION_MAX_S),
    )


class Sessions:
    """Signs and reads session cookies with a key that lives only in this process."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def dump(self, user: User) -> str:
        doc = {
            "n": user.name,
            "r": user.role,
            "t": user.tenant,
            "k": user.issuer,
            "c": user.csrf,
            "e": user.expires,
        }
        payload = _b64(json.dumps(doc, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload.encode())}"

    def load(self, cookie: str | None, trust: Trust, *, now: float | None = None) -> User | None:
        """The user of a cookie this process signed, still valid and still trusted; else None."""
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload.encode())):
            return None
        try:
            doc = json.loads(_unb64(payload))
            user = User(doc["n"], doc["r"], doc["t"], doc["k"], doc["c"], float(doc["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if (time.time() if now is None else now) >= user.expires:
            return None
        # Revoked since sign-in (or no longer in the trust file): nothing it signed counts.
        if trust.signer_of(user.issuer, "token") is None:
            return None
        return user


def cookie_attributes(*, secure: bool, max_age: float) -> dict[str, object]:
    """The attributes of the session cookie (Starlette's `set_cookie` keywords)."""
    return {
        "httponly": True,
        "samesite": "strict",
        "secure": secure,
        "path": "/",
        "max_age": max(0, int(max_age)),
    }


def same_origin(headers: dict[str, str], base: str) -> bool:
    """Whether a request's Origin (or, without one, its Referer) is the console's own `base`
    (scheme://host:port). Neither header: refused (every browser sends Origin on a POST)."""
    origin = headers.get("origin") or ""
    if not origin or origin == "null":
        referer = headers.get("referer") or ""
        if not referer:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.rstrip("/") == base.rstrip("/")


def csrf_ok(user: User, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(user.csrf, submitted or "")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
