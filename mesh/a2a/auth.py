"""Who is calling an agent: every A2A request is authenticated, over HTTP and over NATS alike.

A caller sends `Authorization: Bearer <token>` (an HTTP header, or the NATS header of the same
name): a JWT the mesh's issuer (the operator key in the trust file) signed, naming a principal
(`mesh.identity.mint_token`; every identity file carries one). NATS headers are not identity by
themselves: the token's signature is. A request without a token that verifies never reaches the
request handler; the transport answers it (HTTP 401 with `WWW-Authenticate`, NATS a JSON-RPC
error, `jsonrpc.UNAUTHENTICATED`).

The caller becomes the call context's `user` (`PrincipalUser`), whose `user_name` is the
principal's `owner` (`<tenant>/<role>:<name>`): a2a-sdk's owner resolver — and so every task
store and push-config store — scopes tasks by it, so a caller sees only its own tasks.

`MESH_INSECURE=a2a` switches authentication off (everyone is the same anonymous caller, as
before tokens): for local experiments and the A2A conformance kit, which cannot send tokens.
Every agent that runs so says it loudly, by name, at start.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict

from a2a.auth.user import UnauthenticatedUser, User

from mesh.errors import ConfigError, MeshRuntimeError
from mesh.identity import (
    Principal,
    TokenError,
    Trust,
    TrustFile,
    resolve_trust,
    trust_path,
    verify_token,
)
from mesh.settings import Settings

__all__ = [
    "REALM",
    "Authenticator",
    "PrincipalUser",
    "Unauthenticated",
    "bearer",
]

log = logging.getLogger(__name__)

REALM = "quorum-mesh"  # the realm of the HTTP challenge (RFC 6750 §3)
_CACHE_SIZE = 4096  # verified tokens remembered (a token is verified once, not per request)
_RELOAD_EVERY_S = 1.0  # how often, at most, the trust file is looked at for changes
# What an RFC 6750 error_description may hold (a quoted-string without quotes or backslashes).
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def bearer(token: str) -> str:
    """The `Authorization` value that carries `token`."""
    return f"Bearer {token}"


class Unauthenticated(MeshRuntimeError):
    """A request that does not authenticate anyone; `reason` says why (never the token). The
    transports answer it (it never leaves the agent); the same request again fails again.

    `missing`: the request carried no bearer token at all — its HTTP challenge then names no
    error (RFC 6750 §3.1); a token that does not verify is `invalid_token`."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing

    @property
    def challenge(self) -> str:
        """The `WWW-Authenticate` value of the HTTP 401 answer."""
        if self.missing:
            return f'Bearer realm="{REALM}"'
        description = _UNSAFE.sub("", self.reason)
        return f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'


class PrincipalUser(User):  # type: ignore[misc]
    """An authenticated caller, as a2a-sdk's request handler sees it: its tasks are owned by
    `principal.owner`."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self.principal.owner

    def __repr__(self) -> str:
        return f"PrincipalUser({self.principal.owner})"


_ANONYMOUS = UnauthenticatedUser()


class Authenticator:
    """Turns a request's `Authorization` value into the a2a-sdk `User` it makes the call as.

        auth = Authenticator(trust, agent="security-review")
        user = auth.authenticate("Bearer eyJ…")    # PrincipalUser, or raises Unauthenticated

    `trust` None means authentication is off (`Authenticator.off`): every request is the
    anonymous user. Verified tokens are remembered (bounded, until they expire or the trust
    changes), so a caller's token costs one signature check, not one per request.
    """

    def __init__(self, trust: Trust | TrustFile | None, *, agent: str = "") -> None:
        self.agent = agent
        self._trust = trust
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    @classmethod
    def off(cls, agent: str) -> Authenticator:
        """No authentication, said loudly: anyone who reaches the agent is served."""
        log.warning(
            "agent %s answers A2A calls WITHOUT AUTHENTICATION (MESH_INSECURE=a2a): anyone who "
            "reaches its HTTP port or its NATS subject can call it and read every task it holds. "
            "For local experiments and the A2A conformance kit only.",
            agent or "(unnamed)",
        )
        return cls(None, agent=agent)

    @classmethod
    def from_settings(cls, settings: Settings, *, agent: str) -> Authenticator:
        """On unless MESH_INSECURE names `a2a`; tokens are checked against the trust file
        (MESH_TRUST, else the one a `mesh up` here wrote), which must then exist."""
        if "a2a" in settings.insecure_parts():
            return cls.off(agent)
        # Not `require_trust`: its way out is MESH_INSECURE=bus, which leaves A2A checked.
        trust = resolve_trust(settings)
        if trust is None:
            raise ConfigError(
                f"agent {agent or '(unnamed)'} needs the trust file to authenticate A2A callers "
                "(which issuer signs bearer tokens)",
                hint="set MESH_TRUST (`mesh up` writes .mesh/identity/trust.json), or run with "
                "MESH_INSECURE=a2a to answer A2A calls from anyone (local experiments only)",
            )
        return cls(TrustFile(trust_path(settings), trust, every_s=_RELOAD_EVERY_S), agent=agent)

    @property
    def required(self) -> bool:
        """Whether requests must carry a token (False: MESH_INSECURE=a2a)."""
        return self._trust is not None

    def authenticate(self, authorization: str | None) -> User:
        """The user a request with this `Authorization` value calls as; `Unauthenticated` when
        it has no bearer token, or one that does not verify."""
        if self._trust is None:
            return _ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("this agent needs a bearer token", missing=True)
        return PrincipalUser(self._principal(token))

    def _principal(self, token: str) -> Principal:
        trust = self._trust
        if isinstance(trust, TrustFile):
            trust, changed = trust.current()
            if changed:
                self._verified.clear()  # a revoked issuer's tokens must be checked again
        assert trust is not None
        now = time.time()
        known = self._verified.get(token)
        if known is not None:
            principal, expires = known
            if now < expires:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        try:
            principal = verify_token(trust, token)
        except TokenError as e:
            raise Unauthenticated(e.message) from None
        self._verified[token] = (principal, _expiry(token))
        while len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal


def _expiry(token: str) -> float:
    """The `exp` of a token that has just verified (so it has one)."""
    import jwt

    claims = jwt.decode(token, options={"verify_signature": False})
    return float(claims["exp"])
