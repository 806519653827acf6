import json
from pathlib import Path

import pytest

from mesh.cards import (
    NATS_BINDING,
    card_to_dict,
    load_card,
    parse_card,
    skill_ids,
    with_interfaces,
)
from mesh.errors import CardError

CARDS = Path(__file__).resolve().parents[2] / "cards"


@pytest.mark.parametrize("path", sorted(CARDS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_cards_are_valid(path: Path) -> None:
    card = load_card(path)
    assert card.name == path.stem
    assert skill_ids(card)


def _good() -> dict[str, object]:
    return json.loads((CARDS / "security-review.json").read_text())


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c.pop("name"), "name"),
        (lambda c: c.__setitem__("skills", []), "skills"),
        (lambda c: c["skills"][0].pop("tags"), "skills[0].tags"),
        (lambda c: c.__setitem__("skils", []), "skils"),
        (lambda c: c.__setitem__("capabilities", {"streaming": "yes"}), "capabilities"),
        (lambda c: c.__setitem__("name", "has space"), "name"),
    ],
)
def test_invalid_card_names_the_bad_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    raw = _good()
    mutate(raw)
    with pytest.raises(CardError) as err:
        parse_card(raw, require_interfaces=False)
    assert err.value.field == field


def test_runtime_card_requires_interfaces() -> None:
    with pytest.raises(CardError) as err:
        parse_card(_good(), require_interfaces=True)
    assert err.value.field == "supportedInterfaces"


def test_live_interfaces_are_filled_and_still_valid() -> None:
    card = with_interfaces(
        load_card(CARDS / "security-review.json"),
        http_url="http://127.0.0.1:9/",
        nats_subject="mesh.a2a.security-review",
    )
    raw = card_to_dict(card)
    bindings = [(i["protocolBinding"], i["url"]) for i in raw["supportedInterfaces"]]
    assert bindings == [
        ("JSONRPC", "http://127.0.0.1:9/"),
        ("HTTP+JSON", "http://127.0.0.1:9/rest"),
        (NATS_BINDING, "nats:mesh.a2a.security-review"),
    ]
    assert all(i["protocolVersion"] == "1.0" for i in raw["supportedInterfaces"])
    parse_card(raw, require_interfaces=True)  # what the registry stores validates again
    with_grpc = with_interfaces(
        load_card(CARDS / "security-review.json"),
        http_url="http://127.0.0.1:9/",
        nats_subject="mesh.a2a.security-review",
        grpc_url="127.0.0.1:10",
    )
    assert [(i.protocol_binding, i.url) for i in with_grpc.supported_interfaces][2] == (
        "GRPC",
        "127.0.0.1:10",
    )


def test_missing_card_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="file not found"):
        load_card(tmp_path / "nope.json")


@pytest.mark.parametrize("path", sorted(CARDS.glob("*.json")), ids=lambda p: p.stem)
async def test_every_live_card_declares_the_bearer_scheme(path: Path) -> None:
    """Each shipped agent's card, as the runtime fills it in, asks for the mesh's bearer token in
    A2A 1.0 terms — and a2a-sdk's own client reads it so: its AuthInterceptor sends the token."""
    from a2a.client.interceptors import BeforeArgs

    from mesh.a2a.transport import bearer_interceptor
    from mesh.cards import BEARER_SCHEME

    live = with_interfaces(
        load_card(path), http_url="http://127.0.0.1:9/", nats_subject="mesh.a2a.x"
    )  # authenticated: the default (no MESH_INSECURE=a2a)
    raw = card_to_dict(live)
    parse_card(raw, require_interfaces=True)
    scheme = raw["securitySchemes"][BEARER_SCHEME]["httpAuthSecurityScheme"]
    assert (scheme["scheme"], scheme["bearerFormat"]) == ("Bearer", "JWT")
    assert raw["securityRequirements"] == [{"schemes": {BEARER_SCHEME: {}}}]
    args = BeforeArgs(input=None, method="send_message", agent_card=live)
    await bearer_interceptor("t0ken").before(args)
    assert args.context is not None and args.context.service_parameters == {
        "Authorization": "Bearer t0ken"
    }
