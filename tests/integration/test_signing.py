"""Signed cards in the registry: tampered, unsigned and foreign cards are refused when signing
is required; the a2a-sdk client verifies the card an agent serves over HTTP."""

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
from a2a.utils.signing import SignatureVerificationError

from mesh import subjects
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.registry import Registration, Registry, RegistryView
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from mesh.signing import KeyPair, TrustedKeys, generate_keypair
from tests.support.samples import voting_agent
from tests.support.waits import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    return generate_keypair(tmp_path / "keys")


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


async def _put_forged(bus: Bus, reg: Registration, instance: str, **card_changes: Any) -> str:
    """A copy of a real registration under another instance, its card changed as given."""
    card = {**reg.card, **card_changes}
    forged = msgspec.structs.replace(
        reg,
        instance=instance,
        card=card,
        skills=[s["id"] for s in card["skills"]],
        seen_at=time.time() + 60,  # stays live for the whole test
        direct_subject=subjects.a2a_instance(reg.agent, instance),
    )
    kv = await bus.kv(subjects.CARDS_BUCKET)
    await kv.put(forged.key, msgspec.json.encode(forged))
    return forged.key


def _refusals(caplog: pytest.LogCaptureFixture, instance: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mesh.registry" and r.levelno == logging.WARNING and instance in r.getMessage()
    ]


async def test_a_tampered_card_is_refused_when_signing_is_required(
    nats_server: EmbeddedServer, keys: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = _settings(card_signing_key=str(keys.private_key))
    reader = _settings(card_trusted_keys=str(keys.public_key), require_signed_cards=True)
    async with _bus(nats_server, signer) as agent_bus, _bus(nats_server, reader) as bus:
        registry = Registry(bus)
        view = RegistryView(registry)
        await view.start()
        try:
            async with _agent(tmp_path, "signed", "review", agent_bus, signer) as running:
                assert running.card.signatures
                await eventually(lambda: _agents(registry, ["signed"]))
                await eventually(lambda: _value(view.agents_with_skill("review") == ["signed"]))

                skills = [*running.registration.card["skills"]]
                skills.append({"id": "admin", "name": "admin", "description": "x", "tags": ["x"]})
                await _put_forged(bus, running.registration, "forged", skills=skills)
                await eventually(lambda: _value(bool(_refusals(caplog, "forged"))))

                live = await registry.live()
                assert [(r.agent, r.instance) for r in live] == [
                    ("signed", running.registration.instance)
                ]
                assert await registry.by_skill("admin") == []
                assert view.agents_with_skill("admin") == []
                assert [r.instance for r in view.instances("signed")] == [
                    running.registration.instance
                ]
                await registry.live()  # read again: the same revision is not logged again
                (line,) = _refusals(caplog, "forged")
                assert "agent signed instance forged" in line
                assert line.endswith("signature does not verify")
        finally:
            await view.stop()


async def test_the_wrapper_must_agree_with_the_signed_card(
    nats_server: EmbeddedServer, keys: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The signature covers the card; skills copied into the wrapper cannot be edited apart."""
    signer = _settings(card_signing_key=str(keys.private_key))
    reader = _settings(card_trusted_keys=str(keys.public_key), require_signed_cards=True)
    async with _bus(nats_server, signer) as agent_bus, _bus(nats_server, reader) as bus:
        registry = Registry(bus)
        async with _agent(tmp_path, "wrapped", "review", agent_bus, signer) as running:
            reg = running.registration
            wrapper_only = msgspec.structs.replace(
                reg, instance="sneaky", skills=["admin"], seen_at=time.time() + 60
            )
            kv = await bus.kv(subjects.CARDS_BUCKET)
            await kv.put(wrapper_only.key, msgspec.json.encode(wrapper_only))
            await eventually(lambda: _agents(registry, ["wrapped"]))
            assert await registry.by_skill("admin") == []
            (line,) = _refusals(caplog, "sneaky")
            assert "does not match its signed card (skills)" in line


async def test_unsigned_and_foreign_agents_are_refused_only_when_required(
    nats_server: EmbeddedServer, keys: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = generate_keypair(tmp_path / "stranger")
    unsigned = _settings()
    foreign = _settings(card_signing_key=str(stranger.private_key))
    strict = _settings(card_trusted_keys=str(keys.public_key), require_signed_cards=True)
    lax = _settings(card_trusted_keys=str(keys.public_key))
    async with (
        _bus(nats_server, unsigned) as agent_bus,
        _bus(nats_server, strict) as strict_bus,
        _bus(nats_server, lax) as lax_bus,
        _agent(tmp_path, "plain", "review", agent_bus, unsigned) as plain,
        _agent(tmp_path, "alien", "review", agent_bus, foreign) as alien,
    ):
        assert not plain.card.signatures and alien.card.signatures
        lax_registry = Registry(lax_bus)
        await eventually(lambda: _agents(lax_registry, ["alien", "plain"]))
        assert not _refusals(caplog, "plain")

        strict_registry = Registry(strict_bus)
        assert await strict_registry.live() == []
        assert await strict_registry.by_skill("review") == []
        (plain_line,) = _refusals(caplog, plain.registration.instance)
        assert "agent plain" in plain_line and plain_line.endswith(": unsigned")
        (alien_line,) = _refusals(caplog, alien.registration.instance)
        assert f"unknown key id ('{stranger.kid}')" in alien_line


async def test_tampering_is_refused_even_when_signatures_are_optional(
    nats_server: EmbeddedServer, keys: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = _settings(card_signing_key=str(keys.private_key))
    lax = _settings(card_trusted_keys=str(keys.public_key))
    async with _bus(nats_server, signer) as agent_bus, _bus(nats_server, lax) as bus:
        registry = Registry(bus)
        view = RegistryView(registry)
        await view.start()
        try:
            async with _agent(tmp_path, "honest", "review", agent_bus, signer) as running:
                await _put_forged(bus, running.registration, "liar", description="changed")
                await eventually(lambda: _value(bool(_refusals(caplog, "liar"))))
                assert [r.instance for r in await registry.live()] == [
                    running.registration.instance
                ]
                assert [r.instance for r in view.instances("honest")] == [
                    running.registration.instance
                ]
        finally:
            await view.stop()


async def test_a_refused_revision_replaces_an_accepted_one_in_the_view(
    nats_server: EmbeddedServer, keys: KeyPair, tmp_path: Path
) -> None:
    signer = _settings(card_signing_key=str(keys.private_key))
    reader = _settings(card_trusted_keys=str(keys.public_key), require_signed_cards=True)
    async with _bus(nats_server, signer) as agent_bus, _bus(nats_server, reader) as bus:
        view = RegistryView(Registry(bus))
        await view.start()
        try:
            async with _agent(tmp_path, "flip", "review", agent_bus, signer) as running:
                reg = running.registration
                key = await _put_forged(bus, reg, "copy")  # an unchanged card: accepted
                await eventually(lambda: _value(len(view.instances("flip")) == 2))
                await _put_forged(bus, reg, "copy", description="changed")
                await eventually(lambda: _value(len(view.instances("flip")) == 1))
                assert key not in [r.key for r in view.instances("flip")]
        finally:
            await view.stop()


async def test_the_sdk_client_verifies_the_card_served_over_http(
    bus: Bus, keys: KeyPair, tmp_path: Path
) -> None:
    from mesh.signing import CardVerifier

    signer = _settings(card_signing_key=str(keys.private_key))
    async with _agent(tmp_path, "served", "review", bus, signer) as running:
        assert running.http_url is not None
        trusted = CardVerifier(TrustedKeys.load(keys.public_key), required=True)
        client = await create_client(
            running.http_url,
            client_config=ClientConfig(streaming=False),
            signature_verifier=trusted.sdk_verifier(),
        )
        await client.close()
        stranger = generate_keypair(tmp_path / "stranger")
        wrong = CardVerifier(TrustedKeys.load(stranger.public_key), required=True)
        with pytest.raises((SignatureVerificationError, AgentCardResolutionError)):
            await create_client(running.http_url, signature_verifier=wrong.sdk_verifier())


async def _agents(registry: Registry, names: list[str]) -> bool:
    return sorted({r.agent for r in await registry.live()}) == names


async def _value(v: bool) -> bool:
    return v
