"""Signed, instance-bound cards in the registry (real nats-server): tampered, replayed under
another instance id, expired, unsigned and wrongly signed cards are refused; keys issued or
revoked while a reader runs count; the a2a-sdk client verifies the card served over HTTP."""

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.errors import AgentCardResolutionError
from a2a.types import AgentCard
from a2a.utils.signing import SignatureVerificationError

from mesh import registry as registry_module
from mesh import subjects
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.cards import card_to_dict, load_card, with_interfaces
from mesh.identity import IdentityDir, Signer, Trust, load_identity, load_trust
from mesh.registry import Registration, Registry, RegistryView, new_instance_id
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from mesh.signing import BoundCard, CardSigner, CardVerifier
from tests.support.samples import REPO, voting_agent
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

SECURITY = "security-review"


def _settings(**kw: Any) -> Settings:
    return Settings(heartbeat_s=0.3, card_ttl_s=1.5, http_port=0, **kw)


@contextlib.asynccontextmanager
async def _bus(server: EmbeddedServer, settings: Settings) -> AsyncIterator[Bus]:
    async with await Bus.connect(server.url, name="reader", settings=settings) as bus:
        await bus.ensure()
        yield bus


@contextlib.asynccontextmanager
async def _agent(
    tmp_path: Path, name: str, skill: str, bus: Bus, settings: Settings
) -> AsyncIterator[RunningAgent]:
    async with voting_agent(tmp_path, name, skill).serve(bus, settings=settings) as running:
        yield running


@contextlib.asynccontextmanager
async def _view(bus: Bus, registry: Registry | None = None) -> AsyncIterator[RegistryView]:
    view = RegistryView(registry or Registry(bus))
    await view.start()
    try:
        yield view
    finally:
        await view.stop()


async def _put(bus: Bus, reg: Registration) -> str:
    kv = await bus.kv(subjects.CARDS_BUCKET)
    await kv.put(reg.key, msgspec.json.encode(reg))
    return reg.key


async def _put_copy(bus: Bus, reg: Registration, instance: str, **card_changes: Any) -> str:
    """A copy of a real registration under another instance, its card changed as given."""
    card = {**reg.card, **card_changes}
    return await _put(
        bus,
        msgspec.structs.replace(
            reg,
            instance=instance,
            card=card,
            skills=[s["id"] for s in card["skills"]],
            seen_at=time.time() + 60,  # stays live for the whole test
            direct_subject=subjects.a2a_instance(reg.agent, instance),
        ),
    )


def _registration(bound: BoundCard) -> Registration:
    return Registration(
        agent=bound.agent,
        instance=bound.instance,
        card=card_to_dict(bound.card),
        skills=[s.id for s in bound.card.skills],
        seen_at=time.time() + 60,
        ttl_s=60,
        direct_subject=bound.direct_subject,
    )


def _security_card() -> AgentCard:
    card = load_card(REPO / "cards" / f"{SECURITY}.json")
    return with_interfaces(card, http_url=None, nats_subject=subjects.a2a(SECURITY))


def _bound(signer: Signer | None, instance: str = "", **kw: Any) -> BoundCard:
    instance = instance or new_instance_id()
    return BoundCard(
        _security_card(),
        instance=instance,
        key=Signer.generate(),
        signer=CardSigner(signer) if signer else None,
        direct_subject=subjects.a2a_instance(SECURITY, instance),
        **kw,
    )


def _refusals(caplog: pytest.LogCaptureFixture, instance: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mesh.registry" and r.levelno == logging.WARNING and instance in r.getMessage()
    ]


async def _refused(caplog: pytest.LogCaptureFixture, instance: str, registry: Registry) -> str:
    """The refusal logged for `instance`'s card, once `registry` read it."""

    async def logged() -> bool:
        await registry.live()
        return bool(_refusals(caplog, instance))

    await eventually(logged)
    return _refusals(caplog, instance)[0]


async def test_a_tampered_card_is_refused(
    bus: Bus, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(bus)
    async with (
        _view(bus, registry) as view,
        _agent(tmp_path, "signed", "review", bus, settings) as running,
    ):
        assert running.card.signatures
        await eventually(lambda: _agents(registry, ["signed"]))
        await eventually(lambda: _value(view.agents_with_skill("review") == ["signed"]))

        skills = [*running.registration.card["skills"]]
        skills.append({"id": "admin", "name": "admin", "description": "x", "tags": ["x"]})
        await _put_copy(bus, running.registration, "forged", skills=skills)
        line = await _refused(caplog, "forged", registry)
        assert "agent signed instance forged" in line
        assert line.endswith("signature does not verify")

        live = await registry.live()
        assert [(r.agent, r.instance) for r in live] == [("signed", running.registration.instance)]
        assert await registry.by_skill("admin") == []
        assert view.agents_with_skill("admin") == []
        assert [r.instance for r in view.instances("signed")] == [running.registration.instance]
        await registry.live()  # read again: the same revision is not logged again
        assert len(_refusals(caplog, "forged")) == 1


async def test_a_genuine_card_under_another_instance_id_is_refused(
    bus: Bus, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The card is untouched and its signature verifies, but it binds another instance."""
    registry = Registry(bus)
    async with (
        _view(bus, registry) as view,
        _agent(tmp_path, "bound", "review", bus, settings) as running,
    ):
        genuine = running.registration.instance
        await eventually(lambda: _value(len(view.instances("bound")) == 1))
        await _put_copy(bus, running.registration, "replayed")
        line = await _refused(caplog, "replayed", registry)
        assert f"the card is bound to bound/{genuine}, not stored as such" in line
        assert [r.instance for r in await Registry(bus).live()] == [genuine]
        assert [r.instance for r in view.instances("bound")] == [genuine]
        assert view.binding("bound", "replayed") is None
        binding = view.binding("bound", genuine)
        assert binding is not None and binding.instance == genuine


async def test_the_wrapper_must_agree_with_the_signed_card(
    bus: Bus, caplog: pytest.LogCaptureFixture, identities: IdentityDir
) -> None:
    """The signature covers the card; skills copied into the wrapper cannot be edited apart."""
    bound = _bound(identities.operator().signer())
    reg = msgspec.structs.replace(_registration(bound), skills=["admin"])
    await _put(bus, reg)
    registry = Registry(bus)
    assert await registry.by_skill("admin") == []
    line = await _refused(caplog, reg.instance, registry)
    assert "does not match its signed card (skills)" in line


async def test_an_expired_card_is_refused_and_a_live_one_is_re_signed_in_time(
    bus: Bus, caplog: pytest.LogCaptureFixture, identities: IdentityDir
) -> None:
    operator = identities.operator().signer()
    stale = _bound(operator, lifetime_s=0.5)
    await _put(bus, _registration(stale))
    registry = Registry(bus)
    assert "card expired at" in await _refused(caplog, stale.instance, registry)
    assert await registry.live() == []

    # Registered with a 1 s card lifetime, heartbeating every 0.3 s: re-signed on the way.
    fresh = Registry(bus, card_lifetime_s=1.0)
    async with _view(bus) as view, fresh.registered(_security_card(), "i-fresh") as reg:
        # The view learns of the registration through its watch: wait for it, then for a newer one.
        await eventually(lambda: _value(view.binding(SECURITY, "i-fresh") is not None))
        first = view.binding(SECURITY, "i-fresh")
        await eventually(lambda: _value(view.binding(SECURITY, "i-fresh") not in (None, first)))
        later = view.binding(SECURITY, "i-fresh")
        assert first is not None and later is not None
        await eventually(lambda: _value(time.time() > first.exp + 0.2))
        assert [r.instance for r in view.instances(SECURITY)] == [reg.instance]
        assert [r.instance for r in await registry.live()] == [reg.instance]
        assert later.key == first.key  # the same instance key, a new expiry


async def test_only_keys_trusted_for_the_agent_may_sign_its_card(
    bus: Bus, caplog: pytest.LogCaptureFixture, identities: IdentityDir
) -> None:
    other = load_identity(identities.issue("agent", "quality-review-x")).signer()
    own = load_identity(identities.issue("agent", SECURITY)).signer()
    registry = Registry(bus)
    by_other = _bound(other)
    by_stranger = _bound(Signer.generate())
    unsigned = _bound(None)
    by_own = _bound(own)
    for bound in (by_other, by_stranger, unsigned, by_own):
        await _put(bus, _registration(bound))
    await eventually(lambda: _agents(registry, [SECURITY]))
    assert [r.instance for r in await registry.live()] == [by_own.instance]
    line = await _refused(caplog, by_other.instance, registry)
    assert f"no key trusted to sign cards for {SECURITY} (key ids: '{other.kid}')" in line
    assert "no key trusted" in await _refused(caplog, by_stranger.instance, registry)
    assert (await _refused(caplog, unsigned.instance, registry)).endswith(": unsigned")


async def test_keys_issued_or_revoked_while_a_reader_runs_count(
    bus: Bus, identities: IdentityDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "TRUST_RELOAD_S", 0.0)
    async with _view(bus) as view:
        path = identities.issue("agent", "late-comer")
        signer = load_identity(path).signer()
        card = _security_card()
        card.name = "late-comer"
        bound = BoundCard(card, instance="i1", key=Signer.generate(), signer=CardSigner(signer))
        await _put(bus, _registration(bound))
        await eventually(lambda: _value(view.binding("late-comer", "i1") is not None))
        identities.revoke(path)
        assert signer.kid in load_trust(identities.trust_path).revoked
        await _put(bus, _registration(bound))  # its next heartbeat
        await eventually(lambda: _value(view.instances("late-comer") == []))


async def test_nothing_is_checked_on_an_insecure_bus(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with _bus(nats_server, _settings(insecure="bus")) as insecure:
        unsigned = _bound(None)
        await _put(insecure, _registration(unsigned))
        assert [r.instance for r in await Registry(insecure).live()] == [unsigned.instance]
        async with _view(insecure) as view:
            assert not view.checks_votes


async def test_a_refused_revision_replaces_an_accepted_one_in_the_view(
    bus: Bus, identities: IdentityDir
) -> None:
    reg = _registration(_bound(identities.operator().signer()))
    async with _view(bus) as view:
        await _put(bus, reg)
        await eventually(lambda: _value(len(view.instances(SECURITY)) == 1))
        await _put(bus, msgspec.structs.replace(reg, card={**reg.card, "description": "changed"}))
        await eventually(lambda: _value(view.instances(SECURITY) == []))
        # Its key is still known for a while: votes it gave just before still verify.
        assert view.binding(SECURITY, reg.instance) is not None
        await _put(bus, reg)  # its next heartbeat
        await eventually(lambda: _value(len(view.instances(SECURITY)) == 1))


async def test_the_sdk_client_verifies_the_card_served_over_http(
    bus: Bus, settings: Settings, tmp_path: Path, identities: IdentityDir
) -> None:
    async with _agent(tmp_path, "served", "review", bus, settings) as running:
        assert running.http_url is not None
        trusted = CardVerifier(identities.trust())
        client = await create_client(
            running.http_url,
            client_config=ClientConfig(streaming=False),
            signature_verifier=trusted.sdk_verifier(),
        )
        await client.close()
        wrong = CardVerifier(Trust())  # trusts nobody
        with pytest.raises((SignatureVerificationError, AgentCardResolutionError)):
            await create_client(running.http_url, signature_verifier=wrong.sdk_verifier())


async def _agents(registry: Registry, names: list[str]) -> bool:
    return sorted({r.agent for r in await registry.live()}) == names


async def _value(v: bool) -> bool:
    return v


async def test_a_card_from_a_key_issued_after_the_reader_started_is_accepted_at_once(
    bus: Bus, identities: IdentityDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No periodic re-read in this test (an hour): the unknown key itself makes the reader look
    at the trust file again, so a new agent is not refused for TRUST_RELOAD_S."""
    monkeypatch.setattr(registry_module, "TRUST_RELOAD_S", 3600.0)
    async with _view(bus) as view:
        path = identities.issue("agent", "just-issued")
        card = _security_card()
        card.name = "just-issued"
        signer = CardSigner(load_identity(path).signer())
        bound = BoundCard(card, instance="i1", key=Signer.generate(), signer=signer)

        async def heartbeat_then_look() -> bool:  # the agent's heartbeats repeat the same card
            await _put(bus, _registration(bound))
            return view.binding("just-issued", "i1") is not None

        await eventually(heartbeat_then_look)
