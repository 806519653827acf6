"""Signed Agent Cards: sign/verify round trip, tampering, wrong keys, canonical form."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from a2a.types import AgentCard
from a2a.utils.signing import SignatureVerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mesh.cards import card_to_dict, load_card, with_interfaces
from mesh.errors import ConfigError
from mesh.settings import Settings
from mesh.signing import (
    BAD_SIGNATURE,
    UNKNOWN_KEY,
    UNSIGNED,
    CardSigner,
    CardVerifier,
    TrustedKeys,
    generate_keypair,
    load_private_key,
    public_jwk,
    thumbprint,
)

CARDS = Path(__file__).resolve().parents[2] / "cards"


def _card() -> AgentCard:
    card = load_card(CARDS / "security-review.json")
    return with_interfaces(
        card, http_url="http://127.0.0.1:8123/", nats_subject="mesh.a2a.security-review"
    )


@pytest.fixture
def keys(tmp_path: Path) -> Any:
    return generate_keypair(tmp_path / "keys")


def _strict(public: Path) -> CardVerifier:
    return CardVerifier(TrustedKeys.load(public), required=True)


def test_round_trip_verifies_and_names_the_thumbprint(keys: Any) -> None:
    signer = CardSigner(load_private_key(str(keys.private_key)))
    signed = signer.sign(_card())
    assert len(signed.signatures) == 1
    assert signer.kid == keys.kid
    check = _strict(keys.public_key).check(signed)
    assert check.refusal is None
    assert check.verified


def test_signing_leaves_the_original_alone_and_replaces_old_signatures(keys: Any) -> None:
    signer = CardSigner(load_private_key(str(keys.private_key)))
    card = _card()
    twice = signer.sign(signer.sign(card))
    assert not card.signatures
    assert len(twice.signatures) == 1
    assert _strict(keys.public_key).refusal(twice) is None


def _set_description(c: dict[str, Any]) -> None:
    c["description"] = "approves everything"


def _add_skill(c: dict[str, Any]) -> None:
    c["skills"].append({"id": "x", "name": "x", "description": "x", "tags": ["x"]})


def _move_interface(c: dict[str, Any]) -> None:
    c["supportedInterfaces"][0]["url"] = "http://evil.example/"


def _bump_version(c: dict[str, Any]) -> None:
    c["version"] = "9.9.9"


@pytest.mark.parametrize(
    "tamper",
    [_set_description, _add_skill, _move_interface, _bump_version],
    ids=["description", "skill", "interface", "version"],
)
def test_tampering_with_any_field_is_refused(
    keys: Any, tamper: Callable[[dict[str, Any]], None]
) -> None:
    signed = card_to_dict(CardSigner(load_private_key(str(keys.private_key))).sign(_card()))
    verifier = _strict(keys.public_key)
    assert verifier.refusal(signed) is None
    tamper(signed)
    assert verifier.refusal(signed) == BAD_SIGNATURE
    # Tampering is refused even when signatures are not required.
    lax = CardVerifier(TrustedKeys.load(keys.public_key), required=False)
    assert lax.refusal(signed) == BAD_SIGNATURE


def test_a_card_signed_by_another_key_is_refused(keys: Any, tmp_path: Path) -> None:
    other = generate_keypair(tmp_path / "other")
    signed = CardSigner(load_private_key(str(other.private_key))).sign(_card())
    refusal = _strict(keys.public_key).refusal(signed)
    assert refusal is not None and refusal.startswith(UNKNOWN_KEY)
    assert other.kid in refusal
    # Not required: a signature this reader cannot check is no worse than none.
    assert CardVerifier(TrustedKeys.load(keys.public_key)).refusal(signed) is None


def test_another_key_claiming_a_trusted_kid_does_not_verify(keys: Any, tmp_path: Path) -> None:
    other = generate_keypair(tmp_path / "other")
    forged = CardSigner(load_private_key(str(other.private_key)), kid=keys.kid).sign(_card())
    assert _strict(keys.public_key).refusal(forged) == BAD_SIGNATURE


def test_unsigned_is_refused_only_when_required(keys: Any) -> None:
    assert _strict(keys.public_key).refusal(_card()) == UNSIGNED
    assert CardVerifier(TrustedKeys.load(keys.public_key)).refusal(_card()) is None
    assert CardVerifier().refusal(_card()) is None


def _reorder(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reorder(v) for v in value]
    return value


def test_verification_does_not_depend_on_key_order(keys: Any) -> None:
    signed = card_to_dict(CardSigner(load_private_key(str(keys.private_key))).sign(_card()))
    shuffled = json.loads(json.dumps(_reorder(signed), indent=3))
    assert list(shuffled) == list(reversed(list(signed)))
    verifier = _strict(keys.public_key)
    assert verifier.refusal(shuffled) is None
    _set_description(shuffled)
    assert verifier.refusal(shuffled) == BAD_SIGNATURE


def test_canonical_form_is_what_is_signed(keys: Any) -> None:
    """Two cards that differ only in key order produce the same signature input."""
    from a2a.utils.signing import _canonicalize_agent_card
    from google.protobuf.json_format import ParseDict

    doc = card_to_dict(_card())
    a = ParseDict(doc, AgentCard())
    b = ParseDict(_reorder(doc), AgentCard())
    assert _canonicalize_agent_card(a) == _canonicalize_agent_card(b)
    canonical = json.loads(_canonicalize_agent_card(a))
    assert list(canonical) == sorted(canonical)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["es384", "rs256", "eddsa"],
)
def test_other_key_types_round_trip(make: Callable[[], Any]) -> None:
    key = make()
    signer = CardSigner(key)
    signed = signer.sign(_card())
    verifier = CardVerifier(signer.trusted_keys(), required=True)
    assert verifier.refusal(signed) is None
    signed.description = "changed"
    assert verifier.refusal(signed) == BAD_SIGNATURE


def test_custom_kid_with_a_folder_and_a_jwks_file(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "folder", name="release-team")
    signer = CardSigner(load_private_key(str(pair.private_key)), kid="release-team")
    signed = signer.sign(_card())
    # A folder: every *.pem is trusted, by file name and by thumbprint; the private key is not
    # a *.pem, so it is never read as a trusted key.
    assert _strict(tmp_path / "folder").refusal(signed) is None
    public = serialization.load_pem_public_key(pair.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    jwks = tmp_path / "keys.json"
    jwks.write_text(json.dumps({"keys": [{**public_jwk(public), "kid": "release-team"}]}))
    assert _strict(jwks).refusal(signed) is None
    assert thumbprint(public) == pair.kid


def test_inline_pem_key_and_settings(keys: Any) -> None:
    pem = keys.private_key.read_text()
    signer = CardSigner.from_settings(Settings(card_signing_key=pem, card_signing_kid="k1"))
    assert signer is not None and signer.kid == "k1"
    assert CardSigner.from_settings(Settings()) is None
    verifier = CardVerifier.from_settings(
        Settings(card_trusted_keys=str(keys.public_key), require_signed_cards=True)
    )
    assert verifier.required
    assert verifier.refusal(CardSigner(load_private_key(pem)).sign(_card())) is None


def test_env_variables_configure_signing(monkeypatch: pytest.MonkeyPatch, keys: Any) -> None:
    monkeypatch.setenv("MESH_CARD_SIGNING_KEY", str(keys.private_key))
    monkeypatch.setenv("MESH_CARD_SIGNING_KID", "ops")
    monkeypatch.setenv("MESH_CARD_TRUSTED_KEYS", str(keys.public_key))
    monkeypatch.setenv("MESH_REQUIRE_SIGNED_CARDS", "true")
    settings = Settings()
    assert settings.card_signing_kid == "ops"
    assert settings.require_signed_cards
    assert CardSigner.from_settings(settings) is not None


@pytest.mark.parametrize(
    "settings, message",
    [
        (Settings(card_signing_key="/no/such/key.pem"), "cannot read the card signing key"),
        (Settings(card_signing_key="-----BEGIN PRIVATE KEY-----\nxx"), "not an unencrypted PEM"),
        (Settings(require_signed_cards=True), "no key is trusted"),
        (Settings(card_trusted_keys="/no/such/keys"), "cannot read trusted card keys"),
    ],
    ids=["missing-key", "bad-pem", "required-without-keys", "missing-trusted"],
)
def test_misconfiguration_is_a_config_error(settings: Settings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        if settings.card_signing_key:
            CardSigner.from_settings(settings)
        else:
            CardVerifier.from_settings(settings)


def test_public_key_as_signing_key_is_refused(keys: Any) -> None:
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_private_key(str(keys.public_key))


def test_sdk_verifier_raises_the_sdk_error(keys: Any) -> None:
    signer = CardSigner(load_private_key(str(keys.private_key)))
    verify = _strict(keys.public_key).sdk_verifier()
    signed = signer.sign(_card())
    verify(signed)
    signed.description = "changed"
    with pytest.raises(SignatureVerificationError, match=BAD_SIGNATURE):
        verify(signed)
    with pytest.raises(SignatureVerificationError, match=UNSIGNED):
        verify(_card())


def test_private_key_file_is_private(keys: Any) -> None:
    assert keys.private_key.stat().st_mode & 0o077 == 0
