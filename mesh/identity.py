"""Who a process is, and whose signatures the mesh believes.

Every mesh process runs as one `Identity` (a JSON file, mode 0600, `MESH_IDENTITY`): its role,
its principal name, its tenant (publishers and readers belong to one), the NATS nkey it
connects with, the Ed25519 key it signs with, and the A2A bearer token it calls agents with.
`mesh up` and `mesh demo` issue one per process; `mesh creds` issues more.

The `Trust` file (`MESH_TRUST`, public) lists the signing keys the mesh believes, each with the
role it may sign as: a decision signed by a key that is not listed as a coordinator's does not
verify, whatever it says. A key trusted as an agent's signs only that agent's cards.

Signatures are Ed25519 over `quorum-mesh/<purpose>\\0<payload>`: the purpose separates the
domains, so a signature made for one kind of record can never be replayed as another.

Nothing here prints a secret: `Identity.__repr__` names the identity, never its keys.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.errors import ConfigError

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mesh.settings import Settings

# `human`: a person of one tenant who answers approval requests (mesh.approvals); which
# requests (the approver roles it holds) its trusted key's `claims` say.
Role = Literal["operator", "coordinator", "agent", "publisher", "reader", "human", "console"]
ROLES: tuple[Role, ...] = (
    "operator",
    "coordinator",
    "agent",
    "publisher",
    "reader",
    "human",
    "console",
)
ALL_TENANTS = "*"

# What each purpose may be signed by (the operator is the root of trust: it may sign anything).
Purpose = Literal[
    "vote",
    "decision",
    "ledger",
    "audit",
    "checkpoint",
    "card",
    "token",
    "event",
    "approval",
    "approval_request",
]
SIGNERS: dict[Purpose, tuple[Role, ...]] = {
    "decision": ("coordinator", "operator"),
    "ledger": ("coordinator", "operator"),
    # The web console records the replays its users ask for in the audit trail (mesh/console),
    # as any audit writer does: the records and the checkpoints that anchor them.
    "audit": ("coordinator", "operator", "console"),
    "checkpoint": ("coordinator", "operator", "console"),
    "card": ("agent", "operator"),
    "token": ("operator",),
    # An event's publisher (the principal a decision records) is the key that signed it.
    "event": ("publisher", "agent", "coordinator", "operator"),
    "vote": (),  # votes are signed by instance keys that a verified card binds, never by trust
    "approval": ("human",),  # a person's answer to an approval request
    "approval_request": ("coordinator", "operator"),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _message(purpose: str, payload: bytes) -> bytes:
    return b"quorum-mesh/" + purpose.encode() + b"\0" + payload


def key_id(public: Ed25519PublicKey | bytes) -> str:
    """A key's id: base64url of the first 16 bytes of the SHA-256 of its raw public key."""
    raw = public if isinstance(public, bytes) else public.public_bytes_raw()
    return b64(hashlib.sha256(raw).digest()[:16])


class Signer:
    """One Ed25519 private key that signs for one purpose at a time."""

    __slots__ = ("_key", "kid", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes_raw()
        self.kid = key_id(self.public)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> Signer:
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(unb64(seed)))
        except ValueError:
            raise ConfigError("a signing seed is not a 32-byte Ed25519 key") from None

    def seed(self) -> str:
        return b64(self._key.private_bytes_raw())

    def private_key(self) -> Ed25519PrivateKey:
        return self._key

    def sign(self, purpose: Purpose, payload: bytes) -> str:
        return b64(self._key.sign(_message(purpose, payload)))

    def tag(self, payload: bytes) -> str:
        """A short keyed digest of `payload` (22 characters): the same every time for this
        key, and nobody without the key can compute it. HMAC-SHA256 under a key derived from
        the private key, cut to 128 bits: an unguessable name, not a signature (nothing
        verifies it; `subjects.event_msg_id` uses it so another tenant cannot take an id)."""
        secret = hashlib.sha256(b"mesh tag key\0" + self._key.private_bytes_raw()).digest()
        return b64(hmac.new(secret, payload, hashlib.sha256).digest()[:16])

    def __repr__(self) -> str:
        return f"Signer(kid={self.kid})"


def verify_with(public: bytes, purpose: Purpose, payload: bytes, signature: str) -> bool:
    """Whether `signature` is `public`'s over `payload` for `purpose` (never raises)."""
    try:
        _public_key(public).verify(unb64(signature), _message(purpose, payload))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


@functools.lru_cache(maxsize=4096)
def _public_key(public: bytes) -> Ed25519PublicKey:
    """The key object of `public` (made once: the same few keys verify every message)."""
    return Ed25519PublicKey.from_public_bytes(public)


# -- identities ------------------------------------------------------------------------------------
class Identity(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One process's identity: the file `MESH_IDENTITY` names (mode 0600: it holds secrets)."""

    role: Role
    name: str  # the principal: "coordinator", an agent's name, a publisher's or reader's name
    tenant: str = ALL_TENANTS  # publishers and readers: their one tenant
    nats_seed: str = ""  # NATS nkey user seed (`SU…`); empty when NATS credentials come elsewhere
    signing_seed: str = ""  # Ed25519 private key (base64url, 32 bytes)
    token: str = ""  # A2A bearer token this process calls agents with

    def __repr__(self) -> str:  # never the secrets
        return f"Identity(role={self.role}, name={self.name}, tenant={self.tenant})"

    __str__ = __repr__

    @property
    def principal(self) -> str:
        return f"{self.role}:{self.name}"

    def signer(self) -> Signer:
        if not self.signing_seed:
            raise ConfigError(f"identity {self.principal} has no signing key")
        return Signer.from_seed(self.signing_seed)

    def nats_public_key(self) -> str:
        """The public nkey (`U…`) the server knows this identity by."""
        import nkeys

        return str(nkeys.from_seed(self.nats_seed.encode()).public_key.decode())

    @property
    def inbox_prefix(self) -> str:
        """This identity's own reply inboxes (`_INBOX.<id>`): no other client may read them."""
        return f"_INBOX.{inbox_token(self.nats_public_key())}"


def inbox_token(nats_public_key: str) -> str:
    return nats_public_key[:16].lower()


_identity_dec = msgspec.json.Decoder(Identity)


def write_secret(path: Path, data: bytes) -> Path:
    """Write `data` to `path` created with mode 0600 (never readable by others, not even for a
    moment), replacing what was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def save_identity(identity: Identity, path: Path) -> Path:
    return write_secret(path, msgspec.json.format(msgspec.json.encode(identity)))


def load_identity(path: Path) -> Identity:
    """Read an identity file; refuse one that others can read (as ssh refuses such a key)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the identity file {path}: {e.strerror}",
            hint="set MESH_IDENTITY to a file `mesh creds` wrote, or run `mesh up` here",
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the identity file {path} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {path}",
        )
    try:
        return _identity_dec.decode(data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path} is not an identity file: {e}") from None


# -- trust -----------------------------------------------------------------------------------------
class TrustedKey(msgspec.Struct, kw_only=True, omit_defaults=True):
    public: str  # raw Ed25519 public key, base64url
    role: Role
    name: str
    added_at: float = 0.0
    # Rotated out at this time: what it signed before still verifies (old audit records,
    # decisions), nothing it signs later does. Revocation (`Trust.revoked`) is for a key that
    # leaked: then nothing it ever signed is believed.
    retired_at: float = 0.0
    # A human's: its tenant, and the approver roles it holds (who may answer which requests).
    tenant: str = ""
    claims: list[str] = msgspec.field(default_factory=list)


class Trust(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The signing keys the mesh believes (the file `MESH_TRUST` names; public, not secret)."""

    keys: dict[str, TrustedKey] = msgspec.field(default_factory=dict)
    revoked: list[str] = msgspec.field(default_factory=list)  # key ids, never to verify again

    def add(self, signer: Signer | bytes, role: Role, name: str) -> str:
        public = signer.public if isinstance(signer, Signer) else signer
        kid = key_id(public)
        self.keys[kid] = TrustedKey(public=b64(public), role=role, name=name, added_at=time.time())
        return kid

    def revoke(self, kid: str) -> None:
        if kid not in self.revoked:
            self.revoked.append(kid)

    def retire(self, kid: str, at: float | None = None) -> None:
        entry = self.keys.get(kid)
        if entry is not None and not entry.retired_at:
            entry.retired_at = time.time() if at is None else at

    def signer_of(
        self, kid: str, purpose: Purpose, *, name: str | None = None
    ) -> TrustedKey | None:
        """The trusted key `kid` if it may sign for `purpose` (for cards: for agent `name`)."""
        entry = self.keys.get(kid)
        if entry is None or kid in self.revoked or entry.role not in SIGNERS[purpose]:
            return None
        if purpose == "card" and entry.role == "agent" and entry.name != name:
            return None  # an agent's key signs its own cards only
        return entry

    def refusal(
        self,
        kid: str,
        purpose: Purpose,
        payload: bytes,
        signature: str,
        *,
        name: str | None = None,
        at: float | None = None,
    ) -> str | None:
        """Why a signature is not believed ("unsigned", "untrusted key …", "does not verify"),
        or None when it verifies under a key trusted for `purpose`. `at` is when the signed
        thing says it was made: a retired key's signatures count only from before it retired
        (without `at`, a retired key counts for nothing new)."""
        if not signature or not kid:
            return "unsigned"
        if kid in self.revoked:
            return f"key {kid} is revoked"
        entry = self.signer_of(kid, purpose, name=name)
        if entry is None:
            return f"key {kid} is not trusted to sign {purpose}s" + (
                f" for {name}" if name and purpose == "card" else ""
            )
        if entry.retired_at and (at is None or at > entry.retired_at):
            return f"key {kid} was retired"
        if not verify_with(unb64(entry.public), purpose, payload, signature):
            return "signature does not verify"
        return None

    def kids(self, roles: Iterable[Role]) -> list[str]:
        wanted = set(roles)
        return sorted(k for k, v in self.keys.items() if v.role in wanted and k not in self.revoked)


_trust_dec = msgspec.json.Decoder(Trust)


def load_trust(path: Path) -> Trust:
    try:
        return _trust_dec.decode(path.read_bytes())
    except OSError as e:
        raise ConfigError(
            f"cannot read the trust file {path}: {e.strerror}",
            hint="set MESH_TRUST to the trust.json `mesh up` or `mesh creds init` wrote",
        ) from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path} is not a trust file: {e}") from None


def save_trust(trust: Trust, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(trust)))
    os.replace(tmp, path)
    return path


# -- A2A bearer tokens -----------------------------------------------------------------------------
TOKEN_AUDIENCE = "quorum-mesh/a2a"
TOKEN_ISSUER = "quorum-mesh"


class Principal(msgspec.Struct, frozen=True):
    """Who an authenticated A2A caller is (from a verified token, never from a header)."""

    name: str
    role: Role
    tenant: str  # ALL_TENANTS for coordinators and operators

    @property
    def owner(self) -> str:
        """The owner of the tasks this caller makes: nobody else sees them."""
        return f"{self.tenant}/{self.role}:{self.name}"


def mint_token(
    issuer: Signer, *, name: str, role: Role, tenant: str, ttl_s: float = 30 * 24 * 3600.0
) -> str:
    """An A2A bearer token (a JWT, EdDSA) for `name`, signed by `issuer` (an operator key)."""
    import jwt

    now = int(time.time())
    claims = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": name,
        "role": role,
        "tenant": tenant,
        "iat": now,
        "exp": now + int(ttl_s),
    }
    return jwt.encode(claims, issuer.private_key(), algorithm="EdDSA", headers={"kid": issuer.kid})


class TokenError(ConfigError):
    """A bearer token that does not authenticate anyone (the message says why)."""


def verify_token(trust: Trust, token: str) -> Principal:
    """The principal a bearer token names, if a trusted issuer signed it and it has not
    expired; TokenError otherwise."""
    import jwt

    try:
        kid = str(jwt.get_unverified_header(token).get("kid", ""))
    except jwt.PyJWTError:
        raise TokenError("the bearer token is not a JWT") from None
    entry = trust.signer_of(kid, "token")
    if entry is None:
        raise TokenError("the bearer token is not signed by a trusted issuer")
    try:
        claims = jwt.decode(
            token,
            Ed25519PublicKey.from_public_bytes(unb64(entry.public)),
            algorithms=["EdDSA"],
            audience=TOKEN_AUDIENCE,
            issuer=TOKEN_ISSUER,
            options={"require": ["exp", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("the bearer token has expired") from None
    except jwt.PyJWTError as e:
        raise TokenError(f"the bearer token does not verify: {e}") from None
    if entry.retired_at and float(claims.get("iat", 0)) > entry.retired_at:
        raise TokenError("the bearer token was issued by a retired key")
    role = claims.get("role")
    if role not in ROLES:
        raise TokenError("the bearer token names no mesh role")
    return Principal(str(claims["sub"]), role, str(claims.get("tenant") or ALL_TENANTS))


# -- the folder `mesh up` keeps identities in ------------------------------------------------------
class NatsUser(msgspec.Struct, kw_only=True, frozen=True):
    """A NATS user the server knows: a public nkey and the role its permissions follow."""

    nkey: str
    role: Role
    name: str
    tenant: str = ALL_TENANTS


class IdentityDir:
    """`<home>/identity`: the operator (root of trust), every issued identity (0600 each), the
    public trust file and the NATS users the server config is made from.

        ids = IdentityDir.init(home / "identity")        # idempotent
        path = ids.issue("agent", "security-review")      # → agent-security-review.json
    """

    TRUST = "trust.json"
    USERS = "users.json"
    OPERATOR = "operator.json"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def init(cls, path: Path) -> IdentityDir:
        ids = cls(path)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        if not (path / cls.OPERATOR).exists():
            ids._write_users([])
            save_trust(Trust(), path / cls.TRUST)
            ids.issue("operator", "operator")
        return ids

    @property
    def trust_path(self) -> Path:
        return self.path / self.TRUST

    @property
    def operator_path(self) -> Path:
        return self.path / self.OPERATOR

    def trust(self) -> Trust:
        return load_trust(self.trust_path)

    def operator(self) -> Identity:
        return load_identity(self.operator_path)

    def users(self) -> list[NatsUser]:
        try:
            return msgspec.json.decode((self.path / self.USERS).read_bytes(), type=list[NatsUser])
        except FileNotFoundError:
            return []

    def _write_users(self, users: list[NatsUser]) -> None:
        tmp = self.path / f".{self.USERS}.tmp"
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(users)))
        os.replace(tmp, self.path / self.USERS)

    @staticmethod
    def file_name(role: Role, name: str, tenant: str = ALL_TENANTS) -> str:
        if role == "operator":
            return IdentityDir.OPERATOR
        tenanted = ("publisher", "reader", "human")
        suffix = f"-{tenant}" if tenant != ALL_TENANTS and role in tenanted else ""
        return f"{role}-{name}{suffix}.json"

    def issue(
        self,
        role: Role,
        name: str,
        *,
        tenant: str = ALL_TENANTS,
        path: Path | None = None,
        token_ttl_s: float = 30 * 24 * 3600.0,
        claims: Iterable[str] = (),
    ) -> Path:
        """A new identity (fresh keys), registered with the NATS users and, for the roles that
        sign, in the trust file. Written 0600 to `path` (default: in this folder). `claims`:
        a human's approver roles, recorded with its key in the trust file."""
        from mesh import subjects

        claims = list(claims)
        if claims and role != "human":
            raise ConfigError("only a human identity holds approver roles")
        if role in ("publisher", "reader", "human"):
            if tenant == ALL_TENANTS or not subjects.valid_token(tenant):
                raise ConfigError(
                    f"a {role} belongs to one tenant", hint=f"mesh creds {role} NAME --tenant T"
                )
        else:
            tenant = ALL_TENANTS
        if not subjects.valid_token(name):
            raise ConfigError(f"{name!r} cannot name an identity: use letters, digits, '-' or '_'")
        nats_seed = new_nats_seed()
        signer = Signer.generate()
        issuer = signer if role == "operator" else self.operator().signer()
        identity = Identity(
            role=role,
            name=name,
            tenant=tenant,
            nats_seed=nats_seed,
            signing_seed=signer.seed(),
            token=mint_token(issuer, name=name, role=role, tenant=tenant, ttl_s=token_ttl_s),
        )
        target = path or self.path / self.file_name(role, name, tenant)
        save_identity(identity, target)
        user = NatsUser(nkey=identity.nats_public_key(), role=role, name=name, tenant=tenant)
        self._write_users([*self.users(), user])
        if role != "reader":  # readers sign nothing
            trust = self.trust()
            kid = trust.add(signer, role, name)
            if role == "human":
                trust.keys[kid].tenant = tenant
                trust.keys[kid].claims = claims
            save_trust(trust, self.trust_path)
        return target

    def revoke(self, identity_file: Path, *, leaked: bool = True) -> Identity:
        """Forget an identity: its NATS user goes (after a server reload) and its signing key
        is revoked (`leaked`: nothing it ever signed is believed) or retired (rotation: what it
        signed until now still verifies)."""
        identity = load_identity(identity_file)
        nkey = identity.nats_public_key()
        self._write_users([u for u in self.users() if u.nkey != nkey])
        if identity.signing_seed:
            trust = self.trust()
            kid = identity.signer().kid
            if leaked:
                trust.revoke(kid)
            else:
                trust.retire(kid)
            save_trust(trust, self.trust_path)
        return identity


def new_nats_seed() -> str:
    """A fresh NATS user nkey seed (`SU…`)."""
    import nkeys

    raw = os.urandom(32)
    seed: bytes = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)
    return seed.decode()


# -- what this process runs as ---------------------------------------------------------------------
def identity_dir(home: Path) -> Path:
    return home / "identity"


def resolve_identity(settings: Settings) -> Identity | None:
    """MESH_IDENTITY, else the operator identity of a `mesh up` in this folder, else None."""
    if settings.identity is not None:
        return load_identity(settings.identity)
    default = identity_dir(settings.home) / IdentityDir.OPERATOR
    return load_identity(default) if default.exists() else None


def resolve_trust(settings: Settings) -> Trust | None:
    """MESH_TRUST, else the trust file of a `mesh up` in this folder, else None."""
    if settings.trust is not None:
        return load_trust(settings.trust)
    default = identity_dir(settings.home) / IdentityDir.TRUST
    return load_trust(default) if default.exists() else None


def trust_path(settings: Settings) -> Path:
    """Where the trust file is: MESH_TRUST, else the one a `mesh up` here wrote."""
    return settings.trust or identity_dir(settings.home) / IdentityDir.TRUST


class TrustFile:
    """The trust file, read again when it changes (looked at every `every_s` at most): keys
    issued, retired or revoked while a process runs count without a restart.

        source = TrustFile(trust_path(settings), trust)
        trust, changed = source.current()
    """

    def __init__(self, path: Path, trust: Trust, *, every_s: float = 1.0) -> None:
        self.path = path
        self.trust = trust
        self.every_s = every_s
        self._mtime = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def current(self, *, force: bool = False) -> tuple[Trust, bool]:
        """(the trust, whether it was just read again and differs). `force`: look at the file
        now (a stat; it is read only if it changed)."""
        now = time.monotonic()
        if not force and now - self._checked < self.every_s:
            return self.trust, False
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return self.trust, False
        try:
            trust = load_trust(self.path)
        except ConfigError as e:  # half-written or gone: keep believing what we believed
            _log.warning("keeping the trust already loaded: %s", e.message)
            return self.trust, False
        self._mtime = mtime
        if msgspec.json.encode(trust) == msgspec.json.encode(self.trust):
            return self.trust, False
        self.trust = trust
        _log.info("trust file %s read again", self.path)
        return trust, True


def require_trust(settings: Settings, *, what: str) -> Trust | None:
    """The trust file, or None when `MESH_INSECURE=bus` says nothing is checked; a ConfigError
    that says what to do when it is missing otherwise."""
    trust = resolve_trust(settings)
    if trust is None and "bus" not in settings.insecure_parts():
        raise ConfigError(
            f"{what} needs the trust file (whose signatures to believe)",
            hint="set MESH_TRUST (`mesh up` writes .mesh/identity/trust.json), or run with "
            "MESH_INSECURE=bus to check nothing (local experiments only)",
        )
    return trust
