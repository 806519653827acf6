"""Signed Agent Cards: JWS over the RFC 8785 canonical card (a2a-sdk's signing helpers).

Agents sign their live card once at start (after the interfaces are filled in) with
`MESH_CARD_SIGNING_KEY`; the signature travels inside the card (`signatures`), so the registry
entry and the HTTP `/.well-known/agent-card.json` carry the same signed card, and any A2A client
can check it (`create_client(url, signature_verifier=CardVerifier(...).sdk_verifier())`).

Readers (the registry) verify against `MESH_CARD_TRUSTED_KEYS`:

* a PEM public key file — the key is known by its RFC 7638 thumbprint (the default kid a signer
  uses) and by its file name without `.pem` (for a kid set with `MESH_CARD_SIGNING_KID`);
* a folder — every `*.pem` in it, named the same way;
* a JWKS file (`{"keys": [...]}`) — each key by its `kid` and its thumbprint.

Keys: EC P-256 (ES256, the default `generate_keypair` makes), P-384 (ES384), P-521 (ES512),
RSA (RS256) and Ed25519 (EdDSA); the algorithm follows from the key, so a signature can never
pick a weaker one.

The rule (`CardVerifier.refusal`):

* `MESH_REQUIRE_SIGNED_CARDS` on: a card is accepted only with a signature by a trusted key
  that verifies. Refused: "unsigned", "unknown key id", "signature does not verify".
* off: unsigned cards are accepted, and so are cards signed only by keys this reader does not
  know (neither is worse than unsigned, and a reader without trusted keys cannot tell). A card
  whose signature names a trusted key but does not verify is refused all the same: that is a
  tampered card, and tampering is never silently accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from a2a.types import AgentCard
from a2a.utils.signing import (
    ProtectedHeader,
    SignatureVerificationError,
    create_agent_card_signer,
    create_signature_verifier,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf.json_format import ParseDict, ParseError
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidKeyError, PyJWKError

from mesh.errors import ConfigError
from mesh.settings import Settings

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown key id"
BAD_SIGNATURE = "signature does not verify"

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# RFC 7638: the members of each key type's thumbprint.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    """The JWS algorithm a key signs with (fixed by the key, never by the signature)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ConfigError(
                f"EC curve {key.curve.name} is not supported for card signing",
                hint="use P-256 (ES256), P-384 or P-521",
            )
        return alg
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ConfigError(
        f"{type(key).__name__} keys are not supported for card signing",
        hint="use an EC P-256 key (mesh.signing.generate_keypair makes one)",
    )


def public_jwk(key: PublicKey) -> dict[str, Any]:
    alg = algorithm_for(key)
    algorithm = get_default_algorithms()[alg]
    jwk: dict[str, Any] = algorithm.to_jwk(key, as_dict=True)
    jwk["alg"] = alg
    return jwk


def thumbprint(key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default key id."""
    return _jwk_thumbprint(public_jwk(key))


def _jwk_thumbprint(jwk: dict[str, Any]) -> str:
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(m not in jwk for m in members):
        raise ConfigError(f"cannot compute a thumbprint for JWK of type {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# -- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    private_key: Path  # PEM, PKCS#8, mode 0600
    public_key: Path  # PEM, SubjectPublicKeyInfo
    kid: str  # the thumbprint: what signatures name by default


def generate_keypair(directory: str | Path, *, name: str = "card-signing") -> KeyPair:
    """Write a new EC P-256 key pair: `<name>.key` (private) and `<name>.pem` (public).

    Point `MESH_CARD_SIGNING_KEY` at the first and `MESH_CARD_TRUSTED_KEYS` at the second (or
    at the folder: only `*.pem` files are read there, so the private key is never "trusted").
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private_path = folder / f"{name}.key"
    public_path = folder / f"{name}.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private_path, public_path, thumbprint(key.public_key()))


def load_private_key(source: str) -> PrivateKey:
    """A private key from a PEM file path or from the PEM text itself."""
    text = source.strip()
    if text.startswith("-----BEGIN"):
        data, where = text.encode(), "MESH_CARD_SIGNING_KEY (inline PEM)"
    else:
        try:
            data, where = Path(text).expanduser().read_bytes(), text
        except OSError as e:
            raise ConfigError(
                f"cannot read the card signing key {text}: {e.strerror}",
                hint="MESH_CARD_SIGNING_KEY is a PEM file path or the PEM itself",
            ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{where} is not an unencrypted PEM private key: {e}",
            hint="make one with `python -c 'from mesh.signing import generate_keypair; "
            'generate_keypair("keys")\'`',
        ) from None
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{where}: {type(key).__name__} keys cannot sign cards")
    algorithm_for(key)  # rejects unsupported curves now, not at the first signature
    return key


# -- signing ------------------------------------------------------------------------------------
class CardSigner:
    """Signs Agent Cards with one private key (a JWS with a protected header: alg, kid, typ)."""

    def __init__(self, key: PrivateKey, *, kid: str = "") -> None:
        self.key = key
        self.algorithm = algorithm_for(key)
        self.kid = kid or thumbprint(key.public_key())
        header = {"alg": self.algorithm, "kid": self.kid, "typ": "JOSE"}
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._sign = create_agent_card_signer(pem, cast(ProtectedHeader, header))

    @classmethod
    def from_settings(cls, settings: Settings) -> CardSigner | None:
        """The signer MESH_CARD_SIGNING_KEY configures, or None when cards are not signed."""
        if not settings.card_signing_key.strip():
            return None
        return cls(load_private_key(settings.card_signing_key), kid=settings.card_signing_kid)

    def sign(self, card: AgentCard) -> AgentCard:
        """A copy of `card` with this key's signature as its only one."""
        signed = AgentCard()
        signed.CopyFrom(card)
        del signed.signatures[:]
        result: AgentCard = self._sign(signed)
        return result

    def trusted_keys(self) -> TrustedKeys:
        """The public half, as a reader would trust it (tests, self-checks)."""
        return TrustedKeys.of(self.key.public_key(), kid=self.kid)


# -- verifying ----------------------------------------------------------------------------------
class TrustedKeys:
    """Public keys by key id."""

    def __init__(self, keys: dict[str, PyJWK] | None = None) -> None:
        self.keys: dict[str, PyJWK] = dict(keys or {})

    def __bool__(self) -> bool:
        return bool(self.keys)

    @classmethod
    def of(cls, key: PublicKey, *, kid: str = "") -> TrustedKeys:
        jwk = public_jwk(key)
        found = cls()
        found._add(jwk, [kid] if kid else [], where="<key>")
        return found

    @classmethod
    def load(cls, source: str | Path) -> TrustedKeys:
        """A PEM file, a folder of *.pem files, or a JWKS JSON file (see the module doc)."""
        path = Path(source).expanduser()
        found = cls()
        if path.is_dir():
            for pem in sorted(path.glob("*.pem")):
                found._add_pem(pem)
            if not found:
                raise ConfigError(f"no *.pem public keys in {path}", hint=_TRUST_HINT)
            return found
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"cannot read trusted card keys {path}: {e.strerror}", hint=_TRUST_HINT
            ) from None
        if data.lstrip().startswith(b"{"):
            found._add_jwks(data, path)
        else:
            found._add_pem(path, data)
        return found

    def _add_pem(self, path: Path, data: bytes | None = None) -> None:
        try:
            key = serialization.load_pem_public_key(data if data is not None else path.read_bytes())
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"{path} is not a PEM public key: {e}", hint=_TRUST_HINT) from None
        if not isinstance(key, PublicKey):
            raise ConfigError(f"{path}: {type(key).__name__} keys are not supported")
        self._add(public_jwk(key), [path.name.removesuffix(".pem")], where=str(path))

    def _add_jwks(self, data: bytes, path: Path) -> None:
        try:
            doc = json.loads(data)
            entries = doc["keys"]
            if not isinstance(entries, list):
                raise TypeError("'keys' is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a JWKS document: {e}", hint=_TRUST_HINT) from None
        for i, jwk in enumerate(entries):
            if not isinstance(jwk, dict) or "d" in jwk:
                raise ConfigError(f"{path}: keys[{i}] is not a public JWK", hint=_TRUST_HINT)
            self._add(jwk, [str(jwk["kid"])] if jwk.get("kid") else [], where=f"{path} keys[{i}]")
        if not self:
            raise ConfigError(f"no keys in {path}", hint=_TRUST_HINT)

    def _add(self, jwk: dict[str, Any], kids: Iterable[str], *, where: str) -> None:
        try:
            key = PyJWK(jwk)
        except PyJWKError as e:
            raise ConfigError(f"{where}: unusable key: {e}", hint=_TRUST_HINT) from None
        for kid in [*kids, _jwk_thumbprint(jwk)]:
            self.keys[kid] = key

    @property
    def algorithms(self) -> list[str]:
        return sorted({k.algorithm_name for k in self.keys.values()})

    def provider(self, kid: str | None, jku: str | None) -> PyJWK:
        """a2a-sdk's key_provider: the key for `kid` (a `jku` URL is never fetched)."""
        del jku
        key = self.keys.get(kid or "")
        if key is None:
            raise InvalidKeyError(f"unknown key id {kid!r}")
        return key


_TRUST_HINT = (
    "MESH_CARD_TRUSTED_KEYS is a PEM public key file, a folder of *.pem files, or a JWKS file"
)


@dataclass(frozen=True)
class CardCheck:
    refusal: str | None  # None: accepted
    verified: bool = False  # a signature by a trusted key verified


_ACCEPTED = CardCheck(None)


class CardVerifier:
    """Decides whether a card is accepted; see the module doc for the rule."""

    def __init__(self, trusted: TrustedKeys | None = None, *, required: bool = False) -> None:
        self.trusted = trusted or TrustedKeys()
        self.required = required
        self._verify = (
            create_signature_verifier(self.trusted.provider, self.trusted.algorithms)
            if self.trusted
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CardVerifier:
        trusted = (
            TrustedKeys.load(settings.card_trusted_keys)
            if settings.card_trusted_keys.strip()
            else TrustedKeys()
        )
        if settings.require_signed_cards and not trusted:
            raise ConfigError(
                "MESH_REQUIRE_SIGNED_CARDS is on but no key is trusted",
                hint="set MESH_CARD_TRUSTED_KEYS to the agents' public key(s)",
            )
        return cls(trusted, required=settings.require_signed_cards)

    @property
    def checks_anything(self) -> bool:
        """False when every card passes (not required, no trusted keys): callers skip work."""
        return self.required or bool(self.trusted)

    def refusal(self, card: AgentCard | dict[str, Any]) -> str | None:
        """Why `card` is refused ("unsigned", "unknown key id ...", "signature does not
        verify", "card does not parse ..."), or None if it is accepted."""
        return self.check(card).refusal

    def check(self, card: AgentCard | dict[str, Any]) -> CardCheck:
        if isinstance(card, dict):
            if not card.get("signatures") and not self.required:
                return _ACCEPTED
            try:
                parsed: AgentCard = ParseDict(card, AgentCard(), ignore_unknown_fields=True)
            except ParseError as e:
                return CardCheck(f"card does not parse ({e})")
            card = parsed
        if not card.signatures:
            return CardCheck(UNSIGNED) if self.required else _ACCEPTED
        kids = [_kid_of(s.protected) for s in card.signatures]
        if not any(kid in self.trusted.keys for kid in kids if kid is not None):
            if not self.required:
                return _ACCEPTED  # not verifiable here, and no worse than unsigned
            named = ", ".join(repr(k) for k in kids) if any(kids) else "none"
            return CardCheck(f"{UNKNOWN_KEY} ({named})")
        assert self._verify is not None
        try:
            self._verify(card)
        except SignatureVerificationError:
            return CardCheck(BAD_SIGNATURE)
        return CardCheck(None, verified=True)

    def sdk_verifier(self) -> Callable[[AgentCard], None]:
        """A `signature_verifier` for a2a-sdk clients (`create_client`, `A2ACardResolver`):
        raises `SignatureVerificationError` for a card this verifier refuses."""

        def verify(card: AgentCard) -> None:
            reason = self.refusal(card)
            if reason is not None:
                raise SignatureVerificationError(f"agent card {card.name!r} refused: {reason}")

        return verify


def _kid_of(protected: str) -> str | None:
    try:
        padded = protected + "=" * (-len(protected) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None
