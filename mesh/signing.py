"""Signed Agent Cards that bind an agent instance's own key (JWS over the RFC 8785 canonical
card, a2a-sdk's signing helpers).

Each agent instance makes an Ed25519 key at start, in memory only: it dies with the process.
Its live card carries a *binding*, an A2A card extension (`INSTANCE_EXTENSION`, in
`capabilities.extensions`) whose params name the agent, the instance id, the instance's public
key, the subjects it serves, when it was signed and when it expires. The card is signed (JWS,
EdDSA) by the key of the process's identity (`Bus.identity`); the JWS `kid` is that key's id in
the trust file. The instance then signs its votes with its own key (`mesh.votes`), and a reader
believes such a vote only through a card that verifies.

A reader (`CardVerifier`, built from the trust file) accepts a card only if:

* its signature names a key the trust file trusts to sign cards for the card's agent name (an
  agent's key signs that agent's cards only; an operator key signs any; a revoked key nothing;
  a retired key only cards it signed before it retired), and the signature verifies;
* it carries exactly one binding, for that agent, and the binding has not expired.

The registry also checks that the binding names the instance and subjects of the entry the card
is stored under (`mesh.registry`), so a genuine card copied to another instance id is refused.
Cards are re-signed well before they expire (`BoundCard.refresh`): a copied card, or a stolen
instance key, is good for `CARD_LIFETIME_S` at most.

With `MESH_INSECURE=bus` there is no trust file and nothing is checked (logged once, loudly).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from a2a.types import AgentCard, AgentExtension
from a2a.utils.signing import (
    ProtectedHeader,
    SignatureVerificationError,
    create_agent_card_signer,
    create_signature_verifier,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.struct_pb2 import Struct
from jwt.exceptions import InvalidKeyError

from mesh import subjects
from mesh.errors import ConfigError
from mesh.identity import (
    SIGNERS,
    Identity,
    Signer,
    Trust,
    TrustedKey,
    b64,
    require_trust,
    unb64,
)
from mesh.settings import Settings

log = logging.getLogger(__name__)

INSTANCE_EXTENSION = "urn:quorum-mesh:instance:v1"
# How long a signed card is believed. Short, because a card copied out of the registry (or an
# instance key that leaked with a core dump) is good until then; long enough that a reader's
# clock a minute off, or a heartbeat that misses a few beats, never drops a live agent. The
# runtime re-signs when half of it is gone (`RENEW_AT`), which costs one signature per 5 min.
CARD_LIFETIME_S = 600.0
RENEW_AT = 0.5  # re-sign once this share of the lifetime has passed
CLOCK_SKEW_S = 30.0  # a card signed up to this far in a reader's future is still believed
ALGORITHM = "EdDSA"  # the only one: identity keys are Ed25519, and a signature never picks it

NO_TRUSTED_KEY = "no key trusted to sign cards for"  # (a reader may not know a new key yet)
UNSIGNED = "unsigned"
BAD_SIGNATURE = "signature does not verify"


class Binding(msgspec.Struct, frozen=True, kw_only=True):
    """What a card says about the one instance it belongs to (the extension's params)."""

    agent: str
    instance: str
    key: str  # the instance's raw Ed25519 public key, base64url
    subjects: list[str]  # where it serves A2A: the agent's shared subject, then its own
    iat: float  # signed at (Unix time)
    exp: float  # not believed after (Unix time)

    def public_key(self) -> bytes:
        return unb64(self.key)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.exp


def instance_subjects(agent: str, direct_subject: str) -> list[str]:
    """The subjects a binding names: the shared one, and the instance's own if it has one."""
    return [subjects.a2a(agent), *([direct_subject] if direct_subject else [])]


def bind(card: AgentCard, binding: Binding) -> AgentCard:
    """A copy of `card` whose only binding is `binding` (and no signature yet)."""
    bound = AgentCard()
    bound.CopyFrom(card)
    del bound.signatures[:]
    keep = []
    for e in bound.capabilities.extensions:
        if e.uri != INSTANCE_EXTENSION:
            kept = AgentExtension()
            kept.CopyFrom(e)  # a copy: the originals go with the `del` below
            keep.append(kept)
    del bound.capabilities.extensions[:]
    bound.capabilities.extensions.extend(keep)
    params = Struct()
    params.update(msgspec.to_builtins(binding))
    bound.capabilities.extensions.append(
        AgentExtension(
            uri=INSTANCE_EXTENSION,
            description="Quorum Mesh: the instance this card belongs to and the key it signs "
            "its votes with",
            required=False,  # clients that do not know it lose nothing
            params=params,
        )
    )
    return bound


def binding_of(card: AgentCard) -> Binding | str:
    """The card's binding, or why it has no usable one (unverified: see `CardVerifier`)."""
    found = [e for e in card.capabilities.extensions if e.uri == INSTANCE_EXTENSION]
    if len(found) != 1:
        return "no instance binding" if not found else "more than one instance binding"
    try:
        return msgspec.convert(MessageToDict(found[0].params), Binding, strict=False)
    except msgspec.ValidationError as e:
        return f"malformed instance binding ({e})"


# -- signing ---------------------------------------------------------------------------------------
class CardSigner:
    """Signs Agent Cards with an identity's Ed25519 key (a JWS with protected alg, kid, typ).

    The same key signs other records through `Signer.sign` (`quorum-mesh/<purpose>\\0…`); a
    JWS signing input starts with the base64url of its header (`eyJ…`), so a signature made for
    one can never pass for the other."""

    def __init__(self, signer: Signer) -> None:
        self.kid = signer.kid
        header = {"alg": ALGORITHM, "kid": signer.kid, "typ": "JOSE"}
        pem = signer.private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._sign = create_agent_card_signer(pem, cast(ProtectedHeader, header))

    @classmethod
    def of(cls, identity: Identity | None, settings: Settings, *, agent: str) -> CardSigner | None:
        """The signer of this process's cards for `agent`: its identity's key, which must be
        one that may sign them (an operator's, or an agent identity of that name); None (cards
        go unsigned) only with MESH_INSECURE=bus and no identity that may sign them (nobody
        checks them then)."""
        insecure = "bus" in settings.insecure_parts()
        if identity is None:
            if insecure:
                return None
            raise ConfigError(
                "an agent needs an identity to sign its card",
                hint="set MESH_IDENTITY (`mesh creds agent NAME` writes one), or run with "
                "MESH_INSECURE=bus (local experiments only)",
            )
        if identity.role not in SIGNERS["card"] or (
            identity.role == "agent" and identity.name != agent
        ):
            if insecure:
                return None
            raise ConfigError(
                f"identity {identity.principal} cannot sign the card of agent {agent}: no "
                "registry reader would believe it",
                hint=f"run it with an identity issued for it (`mesh creds agent {agent}`)",
            )
        return cls(identity.signer())

    def sign(self, card: AgentCard) -> AgentCard:
        """A copy of `card` with this key's signature as its only one."""
        signed = AgentCard()
        signed.CopyFrom(card)
        del signed.signatures[:]
        result: AgentCard = self._sign(signed)
        return result


class BoundCard:
    """One instance's live card, bound to its key and signed, kept fresh.

    `card` is the same object for the instance's whole life: `refresh` re-signs it in place,
    so whatever holds it (the HTTP server's card route) serves the current signature."""

    def __init__(
        self,
        card: AgentCard,
        *,
        instance: str,
        key: Signer,
        signer: CardSigner | None,
        direct_subject: str = "",
        lifetime_s: float = CARD_LIFETIME_S,
    ) -> None:
        self.template = card
        self.instance = instance
        self.key = key
        self.signer = signer
        self.direct_subject = direct_subject
        self.lifetime_s = lifetime_s
        self.card = AgentCard()
        self.binding = self._sign()

    @property
    def agent(self) -> str:
        return self.template.name

    def _sign(self, now: float | None = None) -> Binding:
        now = time.time() if now is None else now
        binding = Binding(
            agent=self.agent,
            instance=self.instance,
            key=b64(self.key.public),
            subjects=instance_subjects(self.agent, self.direct_subject),
            iat=round(now, 3),
            exp=round(now + self.lifetime_s, 3),
        )
        bound = bind(self.template, binding)
        self.card.CopyFrom(self.signer.sign(bound) if self.signer else bound)
        return binding

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now >= self.binding.iat + self.lifetime_s * RENEW_AT

    def refresh(self, now: float | None = None) -> bool:
        """Re-sign with a new expiry if half the lifetime is gone; whether it did."""
        if not self.due(now):
            return False
        self.binding = self._sign(now)
        return True


# -- verifying -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardCheck:
    refusal: str | None  # None: accepted
    binding: Binding | None = None  # the verified binding (None when nothing is checked)


_UNCHECKED = CardCheck(None)
_warned: set[str] = set()  # what this process has warned about already


def reader_trust(settings: Settings, *, what: str) -> Trust | None:
    """The trust file a card and vote reader believes, or None with MESH_INSECURE=bus (then
    nothing is checked: said once per process, as a warning)."""
    if "bus" in settings.insecure_parts():
        if "insecure" not in _warned:
            _warned.add("insecure")
            log.warning(
                "MESH_INSECURE=bus: agent cards and votes are NOT checked; any client on the "
                "bus can register as any agent and vote as it"
            )
        return None
    return require_trust(settings, what=what)


class CardVerifier:
    """Whether a card is believed, under one trust file (None: every card, nothing checked)."""

    def __init__(self, trust: Trust | None) -> None:
        self.trust = trust

    @classmethod
    def from_settings(
        cls, settings: Settings, *, what: str = "reading agent cards"
    ) -> CardVerifier:
        return cls(reader_trust(settings, what=what))

    @property
    def checks_anything(self) -> bool:
        return self.trust is not None

    def check(self, card: AgentCard | Mapping[str, Any], *, now: float | None = None) -> CardCheck:
        """`verify`, and the binding has not expired (nor was signed in our future)."""
        checked = self.verify(card)
        return expiry(checked, now)

    def verify(self, card: AgentCard | Mapping[str, Any]) -> CardCheck:
        """Signature, trust and binding, whatever the time (what the registry may cache: it
        checks the expiry with `expiry` each time)."""
        if self.trust is None:
            return _UNCHECKED
        if not isinstance(card, AgentCard):
            try:
                parsed: AgentCard = ParseDict(dict(card), AgentCard(), ignore_unknown_fields=True)
            except (ParseError, TypeError, ValueError) as e:
                return CardCheck(f"card does not parse ({e})")
            card = parsed
        if not card.signatures:
            return CardCheck(UNSIGNED)
        bound = binding_of(card)
        if isinstance(bound, str):
            return CardCheck(bound)
        if bound.agent != card.name:
            return CardCheck(f"the binding names agent {bound.agent!r}, not {card.name!r}")
        kids = [_kid_of(s.protected) for s in card.signatures]
        trusted = {
            kid: entry
            for kid in kids
            if kid and (entry := self._card_key(kid, card.name, bound)) is not None
        }
        if not trusted:
            named = ", ".join(repr(k) for k in kids if k) or "none"
            return CardCheck(f"{NO_TRUSTED_KEY} {card.name} (key ids: {named})")

        def key_provider(kid: str | None, jku: str | None) -> bytes:
            del jku  # a key URL is never fetched: only the trust file names keys
            entry = trusted.get(kid or "")
            if entry is None:
                raise InvalidKeyError(f"key {kid!r} is not trusted here")
            return _public_pem(entry.public)

        try:
            create_signature_verifier(key_provider, [ALGORITHM])(card)
        except SignatureVerificationError:
            return CardCheck(BAD_SIGNATURE)
        return CardCheck(None, bound)

    def _card_key(self, kid: str, name: str, binding: Binding) -> TrustedKey | None:
        assert self.trust is not None
        entry = self.trust.signer_of(kid, "card", name=name)
        if entry is None:
            return None
        # A retired key still vouches for the cards it signed before it retired (they expire
        # soon anyway); a card it signs later is not believed.
        if entry.retired_at and binding.iat > entry.retired_at:
            return None
        return entry

    def refusal(self, card: AgentCard | Mapping[str, Any]) -> str | None:
        return self.check(card).refusal

    def sdk_verifier(self) -> Callable[[AgentCard], None]:
        """A `signature_verifier` for a2a-sdk clients (`create_client`, `A2ACardResolver`):
        raises `SignatureVerificationError` for a card this verifier refuses."""

        def verify(card: AgentCard) -> None:
            reason = self.refusal(card)
            if reason is not None:
                raise SignatureVerificationError(f"agent card {card.name!r} refused: {reason}")

        return verify


def expiry(checked: CardCheck, now: float | None = None) -> CardCheck:
    """`checked`, refused if its binding has expired or was signed in the reader's future."""
    b = checked.binding
    if checked.refusal is not None or b is None:
        return checked
    now = time.time() if now is None else now
    if b.expired(now):
        return CardCheck(f"card expired at {b.exp:.0f} (now {now:.0f})")
    if b.iat > now + CLOCK_SKEW_S:
        return CardCheck(f"card signed in the future ({b.iat:.0f}, now {now:.0f})")
    if b.exp - b.iat > CARD_LIFETIME_S + 1.0:  # +1: both are rounded to the millisecond
        # Else a key could vouch for far beyond its own retirement with one long-lived card.
        return CardCheck(f"card valid for {b.exp - b.iat:.0f} s, longer than {CARD_LIFETIME_S:.0f}")
    return checked


def _public_pem(public: str) -> bytes:
    return Ed25519PublicKey.from_public_bytes(unb64(public)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kid_of(protected: str) -> str | None:
    try:
        padded = protected + "=" * (-len(protected) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
        return None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None
