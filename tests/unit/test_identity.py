"""Identities, the trust file and bearer tokens (mesh.identity): the rules every signature in the
mesh is checked by."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.identity import (
    IdentityDir,
    Signer,
    TokenError,
    Trust,
    load_identity,
    mint_token,
    save_identity,
    verify_token,
)


@pytest.fixture
def ids(tmp_path: Path) -> IdentityDir:
    return IdentityDir.init(tmp_path / "identity")


def test_identity_files_are_private_and_never_show_their_secrets(ids: IdentityDir) -> None:
    path = ids.issue("agent", "security-review")
    assert path.stat().st_mode & 0o777 == 0o600
    assert (ids.path.stat().st_mode & 0o777) == 0o700
    identity = load_identity(path)
    for shown in (repr(identity), str(identity)):
        assert identity.nats_seed not in shown
        assert identity.signing_seed not in shown
        assert identity.token not in shown
        assert "security-review" in shown


def test_an_identity_file_others_can_read_is_refused(ids: IdentityDir) -> None:
    path = ids.issue("coordinator", "c1")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_identity(path)


def test_issue_registers_the_nats_user_and_trusts_signing_roles_only(ids: IdentityDir) -> None:
    coordinator = load_identity(ids.issue("coordinator", "c1"))
    reader = load_identity(ids.issue("reader", "r1", tenant="acme"))
    users = {u.nkey: u for u in ids.users()}
    assert users[coordinator.nats_public_key()].role == "coordinator"
    assert users[reader.nats_public_key()].tenant == "acme"
    trust = ids.trust()
    assert trust.keys[coordinator.signer().kid].role == "coordinator"
    assert reader.signer().kid not in trust.keys  # readers sign nothing


def test_publishers_and_readers_belong_to_one_tenant(ids: IdentityDir) -> None:
    with pytest.raises(ConfigError, match="one tenant"):
        ids.issue("reader", "r1")
    with pytest.raises(ConfigError, match="one tenant"):
        ids.issue("publisher", "p1", tenant="a.b")


def test_a_signature_verifies_only_for_its_purpose_and_a_role_allowed_to_make_it(
    ids: IdentityDir,
) -> None:
    coordinator = load_identity(ids.issue("coordinator", "c1")).signer()
    agent = load_identity(ids.issue("agent", "security-review")).signer()
    trust = ids.trust()
    sig = coordinator.sign("decision", b"payload")
    assert trust.refusal(coordinator.kid, "decision", b"payload", sig) is None
    # The same bytes under another purpose: domain separation.
    assert trust.refusal(coordinator.kid, "ledger", b"payload", sig) == (
        "signature does not verify"
    )
    assert trust.refusal(coordinator.kid, "decision", b"payloaD", sig) == (
        "signature does not verify"
    )
    forged = agent.sign("decision", b"payload")  # an agent's key cannot sign decisions
    assert "not trusted to sign decisions" in str(
        trust.refusal(agent.kid, "decision", b"payload", forged)
    )
    stranger = Signer.generate()
    assert "not trusted" in str(
        trust.refusal(stranger.kid, "decision", b"x", stranger.sign("decision", b"x"))
    )
    assert trust.refusal("", "decision", b"x", "") == "unsigned"


def test_an_agent_key_signs_its_own_cards_only(ids: IdentityDir) -> None:
    agent = load_identity(ids.issue("agent", "quality-review")).signer()
    trust = ids.trust()
    sig = agent.sign("card", b"card")
    assert trust.refusal(agent.kid, "card", b"card", sig, name="quality-review") is None
    assert trust.refusal(agent.kid, "card", b"card", sig, name="security-review") is not None


def test_revoked_keys_verify_nothing_retired_keys_keep_their_past(ids: IdentityDir) -> None:
    path = ids.issue("coordinator", "c1")
    signer = load_identity(path).signer()
    before = time.time() - 10
    sig = signer.sign("audit", b"r")
    ids.revoke(path, leaked=False)
    trust = ids.trust()
    assert trust.refusal(signer.kid, "audit", b"r", sig, at=before) is None
    assert "retired" in str(trust.refusal(signer.kid, "audit", b"r", sig, at=time.time() + 1))
    assert signer.kid not in {u.nkey for u in ids.users()}
    trust.revoke(signer.kid)
    assert "revoked" in str(trust.refusal(signer.kid, "audit", b"r", sig, at=before))


def test_bearer_tokens_name_their_principal_and_expire(ids: IdentityDir) -> None:
    identity = load_identity(ids.issue("publisher", "shop", tenant="acme"))
    principal = verify_token(ids.trust(), identity.token)
    assert (principal.name, principal.role, principal.tenant) == ("shop", "publisher", "acme")
    assert principal.owner == "acme/publisher:shop"
    operator = ids.operator().signer()
    expired = mint_token(operator, name="x", role="reader", tenant="acme", ttl_s=-60)
    with pytest.raises(TokenError, match="expired"):
        verify_token(ids.trust(), expired)


def test_a_token_from_an_untrusted_or_non_operator_key_is_refused(ids: IdentityDir) -> None:
    coordinator = load_identity(ids.issue("coordinator", "c1")).signer()
    for issuer in (Signer.generate(), coordinator):
        token = mint_token(issuer, name="x", role="operator", tenant="*")
        with pytest.raises(TokenError, match="trusted issuer"):
            verify_token(ids.trust(), token)
    with pytest.raises(TokenError, match="not a JWT"):
        verify_token(ids.trust(), "not-a-token")


def test_a_tampered_token_does_not_verify(ids: IdentityDir) -> None:
    identity = load_identity(ids.issue("reader", "r1", tenant="acme"))
    header, payload, sig = identity.token.split(".")
    tampered = f"{header}.{payload[:-2]}AA.{sig}"
    with pytest.raises(TokenError):
        verify_token(ids.trust(), tampered)


def test_save_identity_replaces_a_file_without_widening_its_mode(
    ids: IdentityDir, tmp_path: Path
) -> None:
    identity = load_identity(ids.issue("reader", "r1", tenant="acme"))
    target = tmp_path / "copy.json"
    target.write_text("{}")
    os.chmod(target, 0o644)
    save_identity(identity, target)
    assert target.stat().st_mode & 0o777 == 0o600
    assert load_identity(target).name == "r1"


def test_trust_round_trips(ids: IdentityDir) -> None:
    ids.issue("coordinator", "c1")
    trust = ids.trust()
    assert isinstance(trust, Trust)
    assert trust.kids(["coordinator"])


def test_a_tag_is_the_keys_own_and_the_same_every_time() -> None:
    from mesh import subjects

    a, b = Signer.generate(), Signer.generate()
    payload = subjects.event_msg_tag_payload("globex", "ticket-4711")
    assert a.tag(payload) == a.tag(payload) != b.tag(payload)
    assert a.tag(payload) != a.tag(subjects.event_msg_tag_payload("globex", "ticket-4712"))
    assert len(a.tag(payload)) == 22
    # The message id gives its event id back, with or without a tag, whatever the id holds.
    for event_id in ("ticket-4711", "a:b~c", "x" * 30):
        tagged = subjects.event_msg_id("globex", event_id, a.tag(payload))
        assert subjects.event_id_of_msg_id("globex", tagged) == event_id
        assert (
            subjects.event_id_of_msg_id("globex", subjects.event_msg_id("globex", event_id))
            == event_id
        )
