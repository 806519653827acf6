"""A2A 1.0 Agent Cards: load from `cards/`, validate with a2a-sdk's types, fill live interfaces.

The JSON file is the source of truth for name, description, version and skills. The interfaces
(where the agent listens) and how callers authenticate are only known at start, so the runtime
fills them in (`with_interfaces`): the live card — the one served at
/.well-known/agent-card.json, signed and registered — declares the mesh's bearer scheme
(`securitySchemes`, `securityRequirements`) whenever the agent checks tokens, and not when it
runs with MESH_INSECURE=a2a, so the card never claims what the agent does not do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from a2a.types import (
    AgentCard,
    AgentInterface,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from mesh import subjects
from mesh.errors import CardError
from mesh.settings import get_settings

# The NATS binding of A2A JSON-RPC; the url is `nats:<subject>` (any connection on the same
# NATS account reaches it, so the card names the subject, not a server).
NATS_BINDING = "NATS+JSONRPC"
JSONRPC_BINDING = "JSONRPC"
# HTTP+JSON (REST) is served on the HTTP port under REST_PATH (mesh.a2a.rest); gRPC on a port
# of its own (MESH_GRPC_PORT), its url `host:port` as gRPC clients dial it (mesh.a2a.grpc_server).
REST_BINDING = "HTTP+JSON"
GRPC_BINDING = "GRPC"
REST_PATH = "/rest"
# The name a live card gives the mesh's A2A bearer token in `securitySchemes`: an HTTP bearer
# JWT (EdDSA) signed by the mesh's issuer key, sent as `Authorization: Bearer …` over HTTP and
# over NATS alike (mesh.a2a.auth). No mTLS scheme is declared: agents do not serve TLS.
BEARER_SCHEME = "bearer"
BEARER_DESCRIPTION = (
    "Quorum Mesh A2A token: a JWT (EdDSA) signed by the mesh's issuer key, naming the caller's "
    "principal and tenant (`mesh creds` issues one with every identity). Send it as "
    "`Authorization: Bearer <token>`, over HTTP and in the NATS header of the same name."
)

_REQUIRED = (
    "name",
    "description",
    "version",
    "capabilities",
    "defaultInputModes",
    "defaultOutputModes",
    "skills",
)
_SKILL_REQUIRED = ("id", "name", "description", "tags")


def cards_dir() -> Path:
    """MESH_CARDS_DIR, else ./cards, else the cards/ folder next to the installed packages."""
    configured = get_settings().cards_dir
    if configured is not None:
        return configured
    local = Path("cards")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[1] / "cards"


def load_card(name_or_path: str | Path) -> AgentCard:
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = cards_dir() / f"{name_or_path}.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CardError(str(path), "-", "file not found") from None
    except ValueError as e:
        raise CardError(str(path), "-", f"not valid JSON ({e})") from None
    return parse_card(raw, source=str(path), require_interfaces=False)


def parse_card(raw: Any, *, source: str = "<card>", require_interfaces: bool = True) -> AgentCard:
    """Validate a card dict against A2A 1.0 (a2a-sdk's protobuf types) and return it."""
    if not isinstance(raw, dict):
        raise CardError(source, "-", "a card is a JSON object")
    for field in _REQUIRED:
        if field not in raw or raw[field] in (None, "", []):
            raise CardError(source, field, "required")
    if not isinstance(raw["skills"], list):
        raise CardError(source, "skills", "must be a list")
    for i, skill in enumerate(raw["skills"]):
        for field in _SKILL_REQUIRED:
            if not isinstance(skill, dict) or not skill.get(field):
                raise CardError(source, f"skills[{i}].{field}", "required")
    if require_interfaces:
        interfaces = raw.get("supportedInterfaces") or []
        if not interfaces:
            raise CardError(source, "supportedInterfaces", "required")
        for i, itf in enumerate(interfaces):
            for field in ("url", "protocolBinding", "protocolVersion"):
                if not isinstance(itf, dict) or not itf.get(field):
                    raise CardError(source, f"supportedInterfaces[{i}].{field}", "required")
    if not subjects.valid_token(str(raw["name"])):
        raise CardError(source, "name", "use letters, digits and '-' only (it names a subject)")
    try:
        # Unknown fields are errors here (unlike on the wire): a typo in a card is a bug.
        card: AgentCard = ParseDict(raw, AgentCard())
        return card
    except ParseError as e:
        raise CardError(source, _field_of(str(e)), str(e)) from None


def _field_of(message: str) -> str:
    # protobuf says e.g. 'Message type "a2a.v1.AgentCard" has no field named "skils"'
    # or 'Failed to parse capabilities field: ...'
    if 'field named "' in message:
        return message.split('field named "', 1)[1].split('"', 1)[0]
    if "Failed to parse " in message:
        return message.split("Failed to parse ", 1)[1].split(" field", 1)[0]
    return "-"


def with_interfaces(
    card: AgentCard,
    *,
    http_url: str | None,
    nats_subject: str,
    authenticated: bool | None = None,
    grpc_url: str | None = None,
) -> AgentCard:
    """A copy of `card` whose interfaces say where this instance listens right now, and which
    declares the mesh's bearer scheme as required when `authenticated` (default: unless
    MESH_INSECURE names `a2a`, as `mesh.a2a.auth.Authenticator.from_settings` decides).

    In the order callers should prefer them: JSON-RPC at `http_url` and HTTP+JSON under it
    (`A2AServer.http_app` serves both), gRPC at `grpc_url` (`host:port`), then NATS."""
    if authenticated is None:
        authenticated = "a2a" not in get_settings().insecure_parts()
    live = AgentCard()
    live.CopyFrom(card)
    if authenticated:
        require_bearer(live)
    del live.supported_interfaces[:]
    interfaces: list[tuple[str, str]] = []
    if http_url:
        interfaces.append((http_url, JSONRPC_BINDING))
        interfaces.append((http_url.rstrip("/") + REST_PATH, REST_BINDING))
    if grpc_url:
        interfaces.append((grpc_url, GRPC_BINDING))
    for url, binding in interfaces:
        live.supported_interfaces.append(
            AgentInterface(url=url, protocol_binding=binding, protocol_version=subjects.A2A_VERSION)
        )
    live.supported_interfaces.append(nats_interface(nats_subject))
    return live


def require_bearer(card: AgentCard) -> AgentCard:
    """Declare (in place) the mesh's bearer scheme and a security requirement naming it; what
    the card already declares is kept. Returns the card."""
    if BEARER_SCHEME not in card.security_schemes:
        card.security_schemes[BEARER_SCHEME].CopyFrom(
            SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="Bearer", bearer_format="JWT", description=BEARER_DESCRIPTION
                )
            )
        )
    if not any(BEARER_SCHEME in r.schemes for r in card.security_requirements):
        card.security_requirements.append(
            SecurityRequirement(schemes={BEARER_SCHEME: StringList()})
        )
    return card


def nats_interface(subject: str) -> AgentInterface:
    """A card's interface for A2A over NATS on `subject` (docs/a2a-nats-binding.md)."""
    return AgentInterface(
        url=subjects.a2a_nats_url(subject),
        protocol_binding=NATS_BINDING,
        protocol_version=subjects.A2A_VERSION,
    )


def card_to_dict(card: AgentCard) -> dict[str, Any]:
    result: dict[str, Any] = MessageToDict(card)
    return result


def skill_ids(card: AgentCard) -> list[str]:
    return [s.id for s in card.skills]
