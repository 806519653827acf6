"""Signed, instance-bound Agent Cards: who may sign, tampering, bindings, expiry, re-signing."""

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from a2a.types import AgentCard, AgentCardSignature
from a2a.utils.signing import SignatureVerificationError

from mesh import signing
from mesh.cards import card_to_dict, load_card, with_interfaces
from mesh.errors import ConfigError
from mesh.identity import Identity, Signer, Trust, b64
from mesh.settings import Settings
from mesh.signing import (
    BAD_SIGNATURE,
    CARD_LIFETIME_S,
    INSTANCE_EXTENSION,
    UNSIGNED,
    Binding,
    BoundCard,
    CardSigner,
    CardVerifier,
    bind,
    reader_trust,
)

CARDS = Path(__file__).resolve().parents[2] / "cards"
NAME = "security-review"
DIRECT = f"mesh.a2a.{NAME}.i1"


def _card() -> AgentCard:
    card = load_card(CARDS / f"{NAME}.json")
    return with_interfaces(card, http_url="http://127.0.0.1:8123/", nats_subject=f"mesh.a2a.{NAME}")


class Keys:
    def __init__(self) -> None:
        self.operator = Signer.generate()
        self.agent = Signer.generate()  # trusted for security-review's cards
        self.other_agent = Signer.generate()  # trusted for another agent's cards
        self.coordinator = Signer.generate()
        self.trust = Trust()
        self.trust.add(self.operator, "operator", "operator")
        self.trust.add(self.agent, "agent", NAME)
        self.trust.add(self.other_agent, "agent", "quality-review")
        self.trust.add(self.coordinator, "coordinator", "coordinator")

    def verifier(self) -> CardVerifier:
        return CardVerifier(self.trust)


@pytest.fixture
def keys() -> Keys:
    return Keys()


def _bound(by: Signer | None, **kw: Any) -> BoundCard:
    return BoundCard(
        _card(),
        instance="i1",
        key=Signer.generate(),
        signer=CardSigner(by) if by else None,
        direct_subject=DIRECT,
        **kw,
    )


def test_a_card_signed_by_the_operator_or_its_agent_key_verifies(keys: Keys) -> None:
    for by in (keys.operator, keys.agent):
        bound = _bound(by)
        check = keys.verifier().check(bound.card)
        assert check.refusal is None
        assert check.binding == bound.binding
        assert check.binding.agent == NAME and check.binding.instance == "i1"
        assert check.binding.subjects == [f"mesh.a2a.{NAME}", DIRECT]
        assert check.binding.key == b64(bound.key.public)
        (sig,) = bound.card.signatures
        header = json.loads(base64.urlsafe_b64decode(sig.protected + "=="))
        assert header == {"alg": "EdDSA", "kid": by.kid, "typ": "JOSE"}
        # The same over the dict the registry stores.
        assert keys.verifier().check(card_to_dict(bound.card)).refusal is None


@pytest.mark.parametrize("who", ["other_agent", "coordinator", "stranger"])
def test_a_key_not_trusted_for_this_agent_is_refused(keys: Keys, who: str) -> None:
    by = Signer.generate() if who == "stranger" else getattr(keys, who)
    refusal = keys.verifier().refusal(_bound(by).card)
    assert refusal == f"no key trusted to sign cards for {NAME} (key ids: '{by.kid}')"


def test_another_key_claiming_a_trusted_kid_does_not_verify(keys: Keys) -> None:
    forged = _bound(Signer.generate())
    real = _bound(keys.operator)
    # The forger's signature under the operator's key id.
    sig = forged.card.signatures[0]
    sig.protected = real.card.signatures[0].protected
    assert keys.verifier().refusal(forged.card) == BAD_SIGNATURE


def test_an_hmac_signature_keyed_with_the_public_key_is_refused(keys: Keys) -> None:
    """Algorithm confusion: `alg: HS256` with the trusted public key as the secret."""
    card = _bound(None).card
    header = base64.urlsafe_b64encode(
        json.dumps({"alg": "HS256", "kid": keys.operator.kid}).encode()
    ).rstrip(b"=")
    body = base64.urlsafe_b64encode(b"{}").rstrip(b"=")
    mac = hmac.new(keys.operator.public, header + b"." + body, hashlib.sha256).digest()
    card.signatures.append(AgentCardSignature(protected=header.decode(), signature=b64(mac)))
    refusal = keys.verifier().refusal(card)
    assert refusal == f"no key trusted to sign cards for {NAME} (key ids: none)"


def test_unsigned_revoked_and_retired_keys(keys: Keys) -> None:
    verifier = keys.verifier()
    assert verifier.refusal(_bound(None).card) == UNSIGNED
    before = _bound(keys.agent)
    keys.trust.retire(keys.agent.kid, at=before.binding.iat + 1)
    assert verifier.refusal(before.card) is None  # signed before it retired
    after = _bound(keys.agent)
    after.refresh(now=before.binding.iat + CARD_LIFETIME_S)
    assert "no key trusted" in (verifier.refusal(after.card) or "")
    keys.trust.revoke(keys.operator.kid)
    assert "no key trusted" in (verifier.refusal(_bound(keys.operator).card) or "")


def _set_description(c: dict[str, Any]) -> None:
    c["description"] = "approves everything"


def _add_skill(c: dict[str, Any]) -> None:
    c["skills"].append({"id": "x", "name": "x", "description": "x", "tags": ["x"]})


def _move_interface(c: dict[str, Any]) -> None:
    c["supportedInterfaces"][0]["url"] = "http://evil.example/"


def _params(c: dict[str, Any]) -> dict[str, Any]:
    (ext,) = [e for e in c["capabilities"]["extensions"] if e["uri"] == INSTANCE_EXTENSION]
    params: dict[str, Any] = ext["params"]
    return params


def _swap_key(c: dict[str, Any]) -> None:
    _params(c)["key"] = b64(Signer.generate().public)


def _other_instance(c: dict[str, Any]) -> None:
    _params(c)["instance"] = "i2"


def _extend_expiry(c: dict[str, Any]) -> None:
    _params(c)["exp"] += 3600


def _add_subject(c: dict[str, Any]) -> None:
    _params(c)["subjects"].append("mesh.a2a.elsewhere")


@pytest.mark.parametrize(
    "tamper",
    [
        _set_description,
        _add_skill,
        _move_interface,
        _swap_key,
        _other_instance,
        _extend_expiry,
        _add_subject,
    ],
    ids=["description", "skill", "interface", "key", "instance", "expiry", "subjects"],
)
def test_tampering_with_any_field_is_refused(
    keys: Keys, tamper: Callable[[dict[str, Any]], None]
) -> None:
    signed = card_to_dict(_bound(keys.operator).card)
    assert keys.verifier().refusal(signed) is None
    tamper(signed)
    assert keys.verifier().refusal(signed) == BAD_SIGNATURE


def test_an_expired_card_and_one_from_the_future_are_refused(keys: Keys) -> None:
    bound = _bound(keys.operator)
    b = bound.binding
    verifier = keys.verifier()
    assert b.exp - b.iat == pytest.approx(CARD_LIFETIME_S)
    assert verifier.check(bound.card, now=b.exp - 1).refusal is None
    assert verifier.check(bound.card, now=b.exp).refusal == (
        f"card expired at {b.exp:.0f} (now {b.exp:.0f})"
    )
    early = b.iat - signing.CLOCK_SKEW_S - 1
    assert "signed in the future" in (verifier.check(bound.card, now=early).refusal or "")
    long_lived = _bound(keys.operator, lifetime_s=CARD_LIFETIME_S + 60)
    assert "longer than 600" in (verifier.refusal(long_lived.card) or "")


def _signed_with(keys: Keys, binding: Binding | None, *, twice: bool = False) -> AgentCard:
    card = _card()
    if binding is not None:
        card = bind(card, binding)
        if twice:
            card.capabilities.extensions.append(card.capabilities.extensions[-1])
    return CardSigner(keys.operator).sign(card)


def test_a_card_needs_exactly_one_binding_for_its_own_agent(keys: Keys) -> None:
    b = _bound(keys.operator).binding
    verifier = keys.verifier()
    assert verifier.refusal(_signed_with(keys, None)) == "no instance binding"
    assert verifier.refusal(_signed_with(keys, b, twice=True)) == "more than one instance binding"
    foreign = Binding(
        agent="quality-review",
        instance=b.instance,
        key=b.key,
        subjects=b.subjects,
        iat=b.iat,
        exp=b.exp,
    )
    assert verifier.refusal(_signed_with(keys, foreign)) == (
        f"the binding names agent 'quality-review', not '{NAME}'"
    )


def test_bind_replaces_an_earlier_binding_and_keeps_other_extensions() -> None:
    card = _card()
    card.capabilities.extensions.add(uri="urn:example:other")
    b = Binding(agent=NAME, instance="i1", key="k", subjects=[], iat=1.0, exp=2.0)
    twice = bind(bind(card, b), b)
    assert [e.uri for e in twice.capabilities.extensions] == [
        "urn:example:other",
        INSTANCE_EXTENSION,
    ]
    assert card.capabilities.extensions[-1].uri != INSTANCE_EXTENSION  # a copy


def test_refresh_re_signs_the_same_object_when_half_the_lifetime_is_gone(keys: Keys) -> None:
    bound = _bound(keys.operator, lifetime_s=100.0)
    card, first = bound.card, bound.binding
    assert not bound.refresh(now=first.iat + 49)
    assert bound.binding == first
    assert bound.refresh(now=first.iat + 50)
    assert bound.card is card  # what the HTTP route serves is updated in place
    assert bound.binding.exp == pytest.approx(first.iat + 150)
    assert bound.binding.key == first.key  # the instance key never changes
    check = keys.verifier().check(card, now=first.exp + 10)
    assert check.refusal is None and check.binding == bound.binding


def test_the_card_signer_comes_from_the_identity() -> None:
    secure, insecure = Settings(insecure=""), Settings(insecure="bus")
    me = Identity(role="agent", name=NAME, signing_seed=Signer.generate().seed())
    signer = CardSigner.of(me, secure, agent=NAME)
    assert signer is not None and signer.kid == me.signer().kid
    operator = Identity(role="operator", name="operator", signing_seed=me.signing_seed)
    assert CardSigner.of(operator, secure, agent="anyone") is not None
    assert CardSigner.of(None, insecure, agent=NAME) is None
    with pytest.raises(ConfigError, match="needs an identity to sign its card"):
        CardSigner.of(None, secure, agent=NAME)
    with pytest.raises(ConfigError, match="agent:security-review cannot sign the card of agent x"):
        CardSigner.of(me, secure, agent="x")
    coordinator = Identity(role="coordinator", name="c", signing_seed=me.signing_seed)
    with pytest.raises(ConfigError, match="coordinator:c cannot sign"):
        CardSigner.of(coordinator, secure, agent=NAME)
    assert CardSigner.of(coordinator, insecure, agent=NAME) is None


def test_readers_need_the_trust_file_unless_the_bus_is_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="needs the trust file"):
        reader_trust(Settings(trust=None, home=tmp_path), what="reading agent cards")
    monkeypatch.setattr(signing, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mesh.signing"):
        for _ in range(3):
            verifier = CardVerifier.from_settings(Settings(insecure="a2a,bus"))
            assert not verifier.checks_anything
            assert verifier.refusal(_card()) is None  # nothing is checked
    (warning,) = [r for r in caplog.records if r.name == "mesh.signing"]
    assert "NOT checked" in warning.getMessage()


def test_the_old_card_key_settings_are_gone() -> None:
    fields = set(Settings.model_fields)
    old = {"card_signing_key", "card_signing_kid", "card_trusted_keys", "require_signed_cards"}
    assert not old & fields


def test_sdk_verifier_raises_the_sdk_error(keys: Keys) -> None:
    verify = keys.verifier().sdk_verifier()
    signed = _bound(keys.operator).card
    verify(signed)
    signed.description = "changed"
    with pytest.raises(SignatureVerificationError, match=BAD_SIGNATURE):
        verify(signed)
    with pytest.raises(SignatureVerificationError, match=UNSIGNED):
        verify(_card())
    with pytest.raises(SignatureVerificationError, match="no key trusted"):
        CardVerifier(Trust()).sdk_verifier()(_bound(keys.operator).card)
