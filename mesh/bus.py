"""The NATS connection and everything the mesh keeps in JetStream.

`Bus` owns one nats-py connection, made as this process's identity: its own nkey (or the
credentials in MESH_NATS_CREDS), its own reply inboxes, and TLS from the first byte for a
`tls://` URL. Without an identity it refuses to connect unless `MESH_INSECURE=bus`.

`ensure()` makes sure the streams and buckets the mesh needs exist. Only the operator may create
or change them (the server enforces it, `mesh.natsauth`): as the operator, `ensure()` creates
what is missing, idempotently, and a stream that already exists with settings that would break
our guarantees is an error that says what to do, never silently "fixed"; as anyone else it only
checks that they exist.

Events this process publishes are signed by its identity (`Mesh-Signature`), so the principal a
decision records is the key that signed the event, never a field in it.

No user name, password, token or seed is ever put in a log line or an error: URLs are shown
with their `user:pass@` part redacted (`redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.manager import JetStreamManager
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from mesh import contracts, envelope, natsauth, subjects, telemetry
from mesh.errors import ConfigError, NotConnectedError, StreamConflictError
from mesh.identity import Identity, Signer, inbox_token, resolve_identity
from mesh.settings import Settings, get_settings

log = logging.getLogger(__name__)

_DAY = 24 * 3600.0
STATE_FILE = "nats.json"  # written by `mesh up`/`mesh demo` so other commands find the server
_READ_WAIT_S = 2.0  # the longest pause between two messages while reading a stream
_READ_CONSUMER_IDLE_S = 5.0  # a read's consumers go away this long after their last use
KV_KEYS_TIMEOUT_S = 5.0  # one page of a bucket's keys (`Bus.kv_keys`)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age_s: float
    duplicate_window_s: float = 120.0
    immutable: bool = False  # deny delete and purge: nobody rewrites history through the API


# Dead letters; their bodies too large for a record (an object store) are kept as long.
DLQ = StreamSpec(subjects.DLQ_STREAM, [f"{subjects.DLQ_ROOT}.>"], 30 * _DAY)

STREAMS = (
    StreamSpec(subjects.EVENTS_STREAM, [subjects.events_filter()], 7 * _DAY),
    # Decisions and dead letters are the record of what the mesh did: kept longer.
    StreamSpec(subjects.DECISIONS_STREAM, [f"{subjects.DECISIONS_ROOT}.>"], 30 * _DAY),
    DLQ,
    # Audit: kept a year and immutable; max_age 0 would be "for ever" — a retention an
    # operator should choose deliberately, so a year is the default.
    StreamSpec(subjects.AUDIT_STREAM, [f"{subjects.AUDIT_ROOT}.>"], 365 * _DAY, immutable=True),
    # Signed checkpoints of the audit chains, kept apart from them and as long, as immutable.
    StreamSpec(
        subjects.CHECKPOINTS_STREAM,
        [f"{subjects.CHECKPOINT_ROOT}.>"],
        365 * _DAY,
        immutable=True,
    ),
    # Approval requests, people's answers and receipts (mesh.approvals): a request may wait
    # for days, and its message is its timer (coordinator.inbox), so they are kept a month.
    StreamSpec(subjects.APPROVALS_STREAM, [f"{subjects.APPROVALS_ROOT}.>"], 30 * _DAY),
)
# Spans for `mesh trace`, kept a day; only when MESH_TRACE_STREAM is on.
TRACES = StreamSpec(subjects.TRACE_STREAM, [f"{subjects.TRACE_ROOT}.>"], _DAY)
# Buckets whose keys are read one by one under per-key permissions: reads must name the key in
# the API subject (direct get), or no permission could tell one agent's tasks from another's.
_DIRECT_BUCKETS = frozenset({subjects.TASKS_BUCKET})
# Buckets whose non-operator readers are pinned to their own keys (mesh.natsauth): bound
# without a stream-info request. Direct gets: such reads name the key in the subject.
_PINNED_BUCKETS = _DIRECT_BUCKETS


# -- secrets never shown --------------------------------------------------------------------------
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s,]*@")


def redact(text: str) -> str:
    """`text` with the `user:pass@` (or `token@`) part of every URL in it replaced by `***@`."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def write_state(
    home: Path, url: str, pid: int, *, servers: list[dict[str, Any]] | None = None
) -> Path:
    """Where the NATS of a `mesh up` in `home` is (and, for `mesh creds`, how to make its
    servers reload their authorization)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / STATE_FILE
    path.write_text(json.dumps({"url": url, "pid": pid, "servers": servers or []}))
    return path


def read_state(home: Path) -> dict[str, Any] | None:
    """The state a running `mesh up` in `home` wrote, or None (none, or it is gone)."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)  # still alive?
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def clear_state(home: Path, pid: int) -> None:
    path = home / STATE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def resolve_servers(settings: Settings | None = None) -> list[str]:
    """MESH_NATS_URL first; else the embedded server a `mesh up` in this folder started."""
    settings = settings or get_settings()
    servers = settings.nats_servers()
    if servers:
        return servers
    state = read_state(settings.home)
    if state is None or not state.get("url"):
        raise NotConnectedError(
            "no NATS server to talk to",
            hint="start the mesh with `mesh up` in this folder, or set MESH_NATS_URL "
            "(e.g. nats://127.0.0.1:4222)",
        )
    return [u.strip() for u in str(state["url"]).split(",") if u.strip()]


# -- how this process connects --------------------------------------------------------------------
def tls_context(settings: Settings) -> ssl.SSLContext:
    """Verify servers against MESH_TLS_CA (else the system's CAs); present MESH_TLS_CERT and
    MESH_TLS_KEY when the servers ask for a client certificate (mTLS)."""
    try:
        ctx = ssl.create_default_context(
            cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
        )
        if settings.tls_cert is not None or settings.tls_key is not None:
            if settings.tls_cert is None or settings.tls_key is None:
                raise ConfigError(
                    "MESH_TLS_CERT and MESH_TLS_KEY go together",
                    hint="set both (the client certificate and its private key), or neither",
                )
            _check_private(settings.tls_key, "MESH_TLS_KEY")
            ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the TLS files: {getattr(e, 'strerror', None) or e}",
            hint="check MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY (PEM files)",
        ) from None
    return ctx


def _check_private(path: Path, what: str) -> None:
    """Refuse a secret file others may read, as ssh refuses such a key."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {path}",
        )


_CREDS_SEED = re.compile(rb"\bSU[A-Z2-7]{50,}\b")


def _creds_options(path: Path) -> tuple[dict[str, Any], str]:
    """nats-py options for MESH_NATS_CREDS (a `.creds` JWT file or an nkey seed file), and the
    public nkey they authenticate as."""
    import nkeys

    _check_private(path, "MESH_NATS_CREDS")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read MESH_NATS_CREDS {path}: {e.strerror}") from None
    found = _CREDS_SEED.search(data)
    if found is None:
        raise ConfigError(
            f"MESH_NATS_CREDS {path} holds no NATS user seed",
            hint="give a .creds file (JWT and seed) or a file with an nkey seed (SU…)",
        )
    public = str(nkeys.from_seed(bytearray(found.group())).public_key.decode())
    if b"BEGIN NATS USER JWT" in data:
        return {"user_credentials": str(path)}, public
    return {"nkeys_seed": str(path)}, public


# A server that stops answering (SIGSTOP, a frozen VM, a half-open TCP connection) closes no
# socket: only missed PONGs reveal it. nats-py's default (a ping every 120 s, 2 may be missed)
# leaves a client on a frozen node deaf for minutes, its subscriptions unreachable ("no
# responders") all the while. A ping every 1.5 s, 2 allowed outstanding: a frozen server is
# noticed after 3 to 4.5 s of silence and the client reconnects to another cluster node. The
# cost: a client whose own event loop stalls that long (it reads no PONG either) reconnects
# needlessly, which is harmless (subscriptions are replayed, requests in flight fail as
# infrastructure errors and are retried), and the pings cost nothing worth counting.
PING_INTERVAL_S = 1.5
MAX_OUTSTANDING_PINGS = 2


def connect_options(
    settings: Settings, identity: Identity | None, servers: list[str]
) -> dict[str, Any]:
    """How to authenticate and encrypt: nkey or creds, own inbox prefix, TLS."""
    opts: dict[str, Any] = {}
    public = ""
    if settings.nats_creds is not None:
        creds, public = _creds_options(settings.nats_creds)
        opts.update(creds)
    elif identity is not None and identity.nats_seed:
        opts["nkeys_seed_str"] = identity.nats_seed
        public = identity.nats_public_key()
    elif "bus" not in settings.insecure_parts():
        raise ConfigError(
            "no NATS identity: this process would connect anonymously",
            hint="set MESH_IDENTITY to an identity file (`mesh creds` writes one; `mesh up` "
            "makes .mesh/identity here) or MESH_NATS_CREDS to a .creds or nkey seed file; "
            "MESH_INSECURE=bus only for an anonymous local experiment",
        )
    else:
        log.warning("MESH_INSECURE=bus: connecting to NATS anonymously, nothing is signed")
    if public:
        # Replies come to inboxes only this identity may read (the server enforces it).
        opts["inbox_prefix"] = f"{natsauth.INBOX_ROOT}.{inbox_token(public)}"
    schemes = {urlsplit(s if "://" in s else f"nats://{s}").scheme for s in servers}
    if "tls" in schemes:
        if schemes != {"tls"}:
            raise ConfigError(
                "MESH_NATS_URL mixes tls:// with plaintext URLs",
                hint="use tls:// for every server (or none)",
            )
        # tls:// means TLS from the first byte: nothing, not even the server's INFO or our
        # credentials, ever crosses in plaintext (servers set `handshake_first` in their tls
        # block). A server that does not start TLS fails the handshake: no silent downgrade.
        opts["tls"] = tls_context(settings)
        opts["tls_handshake_first"] = True
    elif settings.tls_ca is not None or settings.tls_cert is not None:
        opts["tls"] = tls_context(settings)  # used when the server requires TLS
    return opts


def _why(reason: str, servers: list[str]) -> str:
    lowered = reason.lower()
    if "authorization" in lowered or "authentication" in lowered:
        return (
            "the server refused this identity: issue one it knows (`mesh creds …`, then the "
            "running server reloads) or check MESH_IDENTITY / MESH_NATS_CREDS"
        )
    if any(s.startswith("tls://") for s in servers) and (
        "ssl" in lowered or "tls" in lowered or "record" in lowered
    ):
        return (
            "tls:// needs a server that starts TLS first (`handshake_first` in its tls block) "
            "with a certificate MESH_TLS_CA trusts; it will not fall back to plaintext"
        )
    return "is the server running? check MESH_NATS_URL, or start one with `mesh up`"


class PermissionDeniedError(ConfigError):
    """The server refused this identity a publish or a subscription (its role may not)."""


_DENIED = re.compile(r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.I)
_DENIED_KEPT = 256  # the most recent refusals remembered, to explain a publish that timed out


# -- JetStream: consumers that permissions can see ------------------------------------------------
def _named(config: ConsumerConfig | None, params: dict[str, Any]) -> ConsumerConfig:
    """`config` with a name: nats-py puts a named consumer's filter in the API subject
    (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), where a server permission can pin it;
    an unnamed one goes to `…CREATE.<stream>`, which no permission can tell apart by filter."""
    config = (config or ConsumerConfig()).evolve(**params)
    if config.name:
        return config
    return config.evolve(name=config.durable_name or f"mesh-{uuid.uuid4().hex[:16]}")


class _Naming(JetStreamManager):
    """Every consumer it creates has a name (see `_named`)."""

    async def add_consumer(
        self,
        stream: str,
        config: ConsumerConfig | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> ConsumerInfo:
        return await super().add_consumer(stream, _named(config, params), timeout)


class _JetStream(_Naming, JetStreamContext):
    """nats-py's JetStream context whose consumers always have a name (see `_named`).

    nats-py's subscriptions and KV watches create their consumers through the manager its
    private `_jsm` property returns; this adapter returns the naming manager there. The one
    place the mesh leans on a nats-py internal, checked by tests/integration/test_nats_auth.py
    (an agent's task watch works under permissions that allow only filtered creates)."""

    @property
    def _jsm(self) -> JetStreamManager:
        return _Naming(conn=self._nc, prefix=self._prefix, timeout=self._timeout)


class Bus:
    """One NATS connection plus the JetStream handles the mesh uses."""

    def __init__(self, nc: NATS, settings: Settings, identity: Identity | None = None) -> None:
        self.nc = nc
        # Who this connection is (None only with MESH_INSECURE=bus): signs what it publishes.
        self.identity = identity
        self.js: JetStreamContext = _JetStream(nc)
        self.settings = settings
        self._kv: dict[str, KeyValue] = {}
        self._signer: Signer | None = (
            identity.signer() if identity is not None and identity.signing_seed else None
        )
        self._denied: dict[str, None] = {}  # subjects the server refused us, most recent last

    async def _on_error(self, e: Exception) -> None:
        """The server's asynchronous errors; a permissions violation is remembered, so the
        publish it made time out can say why."""
        found = _DENIED.search(str(e))
        if found:
            self._denied.pop(found.group(1).lower(), None)
            self._denied[found.group(1).lower()] = None
            while len(self._denied) > _DENIED_KEPT:
                self._denied.pop(next(iter(self._denied)))
        await _log_error(e)

    def refused(self, subject: str) -> PermissionDeniedError | None:
        """The error to raise if the server refused this connection `subject`."""
        if subject.lower() not in self._denied:
            return None
        who = self.identity.principal if self.identity else "this connection"
        return PermissionDeniedError(
            f"the NATS server refused {who} publishing to {subject}",
            hint=_permission_hint(self.identity, subject),
        )

    @classmethod
    async def connect(
        cls,
        servers: list[str] | str | None = None,
        *,
        name: str = "mesh",
        settings: Settings | None = None,
        connect_timeout_s: float = 5.0,
    ) -> Bus:
        settings = settings or get_settings()
        identity = resolve_identity(settings)
        if servers is None:
            servers = resolve_servers(settings)
        elif isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        options = connect_options(settings, identity, servers)
        nc = NATS()
        first_errors: list[Exception] = []
        made: list[Bus] = []

        outage: list[Exception] = []  # connect failures since the connection was lost

        async def on_error(e: Exception) -> None:
            # Until connected, errors are the answer to give the user, not log noise.
            if made:
                if nc.is_reconnecting and isinstance(e, OSError | TimeoutError):
                    # Once per outage: the client retries every second for as long as it takes.
                    outage.append(e)
                    if len(outage) > 1:
                        log.debug("nats: %s", redact(str(e)))
                        return
                await made[0]._on_error(e)
            elif nc.is_connected:
                await _log_error(e)
            else:
                first_errors.append(e)

        async def on_reconnected() -> None:
            at = nc.connected_url
            where = f"{at.hostname}:{at.port}" if at else "?"  # never the URL's userinfo
            log.info("nats: reconnected to %s after %d failed attempt(s)", where, len(outage))
            outage.clear()

        try:
            # nats-py applies max_reconnect_attempts to the first connect too: try each server
            # twice, and only once connected let reconnects go on for ever, to the same URLs
            # (a NATS cluster restarting under us, or a `mesh up` restarted on its old port,
            # must not kill the process).
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=2,
                    max_reconnect_attempts=2,
                    reconnect_time_wait=0.2,  # type: ignore[arg-type]  # typed int, takes float
                    allow_reconnect=True,
                    ping_interval=PING_INTERVAL_S,  # type: ignore[arg-type]  # takes float
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    error_cb=on_error,
                    disconnected_cb=_log_disconnected,
                    reconnected_cb=on_reconnected,
                    **options,
                ),
                timeout=connect_timeout_s,
            )
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 1
        except Exception as e:
            with contextlib.suppress(Exception):
                await nc.close()
            cause = first_errors[-1] if first_errors else e
            reason = str(cause) or type(cause).__name__
            if isinstance(cause, TimeoutError):
                reason = f"no answer within {connect_timeout_s:.0f}s"
            raise NotConnectedError(
                redact(f"cannot connect to NATS at {', '.join(servers)}: {reason}"),
                hint=_why(reason, servers),
            ) from None
        made.append(cls(nc, settings, identity))
        return made[0]

    async def close(self) -> None:
        """Drain and close; never raises: a connection whose server is gone (reconnecting, or
        lost mid-write) is closed all the same, and what it could not send is lost with it."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # a broken connection cannot drain; closing is all we need
                try:
                    await self.nc.close()
                except Exception as e:  # nats-py flushes pending data first, to a dead socket
                    log.info("nats: closed without flushing (%s)", type(e).__name__)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def is_operator(self) -> bool:
        """Whether this connection may create and change streams and buckets: the operator's,
        or an anonymous one (MESH_INSECURE=bus) to a server that checks nothing. A connection
        made with MESH_NATS_CREDS alone has no known role: it only checks."""
        if self.identity is not None:
            return self.identity.role == "operator"
        return self.settings.nats_creds is None

    def tenant_filter(self, stream: str) -> str | None:
        """What of `stream` this connection may read when it belongs to one tenant (a
        reader): that tenant's subjects. None: no such limit."""
        if self.identity is None or self.identity.role != "reader":
            return None
        return natsauth.tenant_filter(stream, self.identity.tenant)

    # -- streams and buckets --------------------------------------------------------------------
    async def ensure(self) -> None:
        """Every stream and bucket the mesh needs: created (idempotent, conflict-checked) as
        the operator, only checked as anyone else."""
        specs = [*STREAMS, *([TRACES] if self.settings.trace_stream else [])]
        if not self.is_operator:
            buckets = (subjects.CARDS_BUCKET, subjects.DECISIONS_BUCKET)
            await self._check_exist(
                [s.name for s in specs]
                + [subjects.kv_stream(b) for b in buckets]
                + [subjects.obj_stream(subjects.DLQ_BODIES_BUCKET)]
            )
            return
        for spec in specs:
            await self._ensure_stream(spec)
        from mesh import schedules  # it reads streams through this module

        await schedules.ensure_stream(self)
        await self.kv(subjects.CARDS_BUCKET, ttl_s=self.settings.card_ttl_s)
        await self.kv(subjects.DECISIONS_BUCKET, history=5)
        # Dead-lettered bodies too large for a DLQ record, kept as long as the records.
        if subjects.obj_stream(subjects.DLQ_BODIES_BUCKET) not in await self.stream_names():
            await self.js.create_object_store(
                subjects.DLQ_BODIES_BUCKET,
                ObjectStoreConfig(
                    description="dead-lettered bodies too large for their DLQ record",
                    ttl=DLQ.max_age_s,
                    storage=StorageType.FILE,
                    replicas=self.settings.stream_replicas,
                ),
            )
        # Budget use by event and tenant-day (mesh.budget), as BudgetLedger asks for it.
        await self.kv(subjects.BUDGETS_BUCKET, ttl_s=36 * 3600.0)
        # Canary and shadow candidates' counts and stop state (coordinator.canary).
        await self.kv(subjects.CANARIES_BUCKET)
        if self.settings.task_store == "jetstream":
            # As JetStreamTaskStore.open asks for it: one revision per task, the TTL set.
            await self.kv(subjects.TASKS_BUCKET, ttl_s=self.settings.task_ttl_s or None)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """One stream: created as the operator, checked as anyone else."""
        if self.is_operator:
            await self._ensure_stream(spec)
        else:
            await self._check_exist([spec.name])

    async def _check_exist(self, names: list[str]) -> None:
        have = await self.stream_names()
        missing = [n for n in names if n not in have]
        if missing:
            raise self._missing(missing)

    def _missing(self, names: list[str]) -> ConfigError:
        who = self.identity.principal if self.identity else "this process"
        return ConfigError(
            f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not exist, and {who} "
            "may not create streams or buckets (only the operator may)",
            hint="start the mesh with `mesh up`, or have the operator run `mesh ensure` "
            "(MESH_IDENTITY=<operator.json>) against this NATS first",
        )

    async def stream_names(self) -> set[str]:
        """The names of every stream of the account (names only: any identity may ask)."""
        names: set[str] = set()
        offset = 0
        while True:
            reply = await self.nc.request(
                f"{subjects.JS_API}.STREAM.NAMES", json.dumps({"offset": offset}).encode(), 5
            )
            doc = json.loads(reply.data)
            if "error" in doc:
                raise NotConnectedError(
                    f"JetStream refused to list streams: {doc['error'].get('description')}",
                    hint="is JetStream enabled on this server (-js)?",
                )
            page = doc.get("streams") or []
            names.update(page)
            offset += len(page)
            if not page or offset >= int(doc.get("total", 0)):
                return names

    async def _ensure_stream(self, spec: StreamSpec) -> None:
        try:
            info = await self.js.stream_info(spec.name)
        except NotFoundError:
            await self.js.add_stream(
                StreamConfig(
                    name=spec.name,
                    subjects=spec.subjects,
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    max_age=spec.max_age_s,
                    duplicate_window=spec.duplicate_window_s,
                    num_replicas=self.settings.stream_replicas,
                    deny_delete=spec.immutable,
                    deny_purge=spec.immutable,
                )
            )
            log.debug("created stream %s", spec.name)
            return
        cfg = info.config
        problems = []
        if sorted(cfg.subjects or []) != sorted(spec.subjects):
            problems.append(f"subjects are {cfg.subjects}, the mesh needs {spec.subjects}")
        if cfg.retention not in (None, RetentionPolicy.LIMITS):
            problems.append(f"retention is {cfg.retention}, the mesh needs limits")
        if (cfg.duplicate_window or 0) < 1:
            problems.append("duplicate window is off; event ids would not deduplicate")
        if spec.immutable and not (cfg.deny_delete and cfg.deny_purge):
            problems.append("it allows delete or purge; the audit trail must not")
        if problems:
            raise StreamConflictError(
                f"stream {spec.name} exists with conflicting settings: " + "; ".join(problems),
                hint=f"remove or fix it (nats stream rm {spec.name}) or use another NATS account",
            )

    async def kv(self, bucket: str, *, ttl_s: float | None = None, history: int = 1) -> KeyValue:
        """The bucket's handle; the operator creates a missing bucket (`ttl_s`, `history`)."""
        if bucket in self._kv:
            return self._kv[bucket]
        if bucket in _PINNED_BUCKETS and not self.is_operator:
            # Bound without nats-py's stream-info lookup: whoever reads only their own keys of
            # it may not ask for the stream's info, whose subjects filter lists every key.
            await self._check_exist([subjects.kv_stream(bucket)])
            kv = KeyValue(
                name=bucket,
                stream=subjects.kv_stream(bucket),
                pre=f"$KV.{bucket}.",
                js=self.js,
                direct=True,  # the operator turns direct gets on (`_harden`)
            )
            self._kv[bucket] = kv
            return kv
        try:
            kv = await self.js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            if not self.is_operator:
                raise self._missing([f"bucket {bucket}"]) from None
            kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=history,
                    ttl=ttl_s,
                    storage=StorageType.FILE,
                    replicas=self.settings.stream_replicas,
                    direct=bucket in _DIRECT_BUCKETS,
                )
            )
        if self.is_operator:
            kv = await self._harden(bucket, kv)
        self._kv[bucket] = kv
        return kv

    async def _harden(self, bucket: str, kv: KeyValue) -> KeyValue:
        """What permissions cannot say, the bucket's stream must: no rollup headers (one
        `Nats-Rollup: all` on a writer's own key would erase every other key of the bucket;
        the mesh never rolls up), and direct gets where reads are pinned per key."""
        stream = subjects.kv_stream(bucket)
        cfg = (await self.js.stream_info(stream)).config
        direct = bool(cfg.allow_direct) or bucket in _DIRECT_BUCKETS
        if not cfg.allow_rollup_hdrs and bool(cfg.allow_direct) == direct:
            return kv
        await self.js.update_stream(cfg.evolve(allow_rollup_hdrs=False, allow_direct=direct))
        log.debug("bucket %s: rollups off, direct gets %s", bucket, "on" if direct else "off")
        return await self.js.key_value(bucket)

    async def kv_keys(self, bucket: str) -> list[str]:
        """The keys of `bucket` that hold a message, sorted; a deleted key's marker is a message,
        so a get of one may still say `KeyNotFoundError`. One stream-info request per 100,000
        keys. Not nats-py's `KeyValue.keys()`: that lists through a new ephemeral consumer,
        which the server keeps, heartbeating to nobody, for minutes after the listing (called
        every second, or per delegation, they piled up by the hundred)."""
        prefix = f"$KV.{bucket}."
        request: dict[str, Any] = {"subjects_filter": f"{prefix}>"}
        keys: list[str] = []
        while True:
            reply = await self.nc.request(
                f"{subjects.JS_API}.STREAM.INFO.{subjects.kv_stream(bucket)}",
                json.dumps(request).encode(),
                timeout=KV_KEYS_TIMEOUT_S,
            )
            info = json.loads(reply.data)
            if "error" in info:
                raise APIError.from_error(info["error"])
            page = (info.get("state") or {}).get("subjects") or {}
            keys += [s.removeprefix(prefix) for s in page]
            # The server pages a long subject list (`total`, `offset`, `limit` in the answer).
            if not page or len(keys) >= int(info.get("total") or 0):
                return sorted(keys)
            request["offset"] = len(keys)

    # -- publishing -----------------------------------------------------------------------------
    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        parent: otel_context.Context | None = None,
    ) -> PubAck:
        """Publish to a stream and wait for the ack; `msg_id` makes a re-publish a no-op.

        Under a `send` producer span whose context rides in the headers (W3C traceparent). An
        event (`mesh.evt.…`) is signed by this process's identity unless it already carries a
        signature (a replayed dead letter keeps its publisher's)."""
        with telemetry.tracer().start_as_current_span(
            f"send {subject}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.messaging_attrs("send", "send", subject, msg_id or ""),
        ):
            hdrs = telemetry.inject(headers)
            if msg_id:
                hdrs[subjects.H_MSG_ID] = msg_id
            if (
                self._signer is not None
                and subject.startswith(f"{subjects.EVENTS_ROOT}.")
                and subjects.H_SIGNATURE not in hdrs
            ):
                # Binary mode: the `ce-` headers are part of the event, so they are signed too.
                hdrs[subjects.H_SIGNATURE] = event_signature(
                    self._signer, subject, envelope.signed_content(hdrs, body)
                )
            try:
                return await self.js.publish(subject, body, timeout=timeout, headers=hdrs or None)
            except NatsTimeoutError:
                # A refused publish gets no answer at all: say why instead of "timeout".
                denied = self.refused(subject)
                if denied is not None:
                    raise denied from None
                raise

    def event_msg_id(self, tenant: str, event_id: str) -> str:
        """The `Nats-Msg-Id` this process gives an event: tagged with its key when it has one,
        so a publisher of another tenant cannot take the id first (`subjects.event_msg_id`)."""
        if self._signer is None:
            return subjects.event_msg_id(tenant, event_id)
        tag = self._signer.tag(subjects.event_msg_tag_payload(tenant, event_id))
        return subjects.event_msg_id(tenant, event_id, tag)

    async def publish_event(self, event: envelope.Event, *, binary: bool = False) -> PubAck:
        """Publish a domain event, signed; its id (per tenant) deduplicates re-publishes.

        Its data must fit its type's JSON Schema, if it has one (`SchemaViolationError`, one
        line naming the field and the schema). `binary=True` publishes it in CloudEvents binary
        mode (attributes as `ce-` headers, data as the body) instead of structured mode."""
        contracts.check(event)
        if binary:
            headers, body = envelope.binary_message(event)
        else:
            headers, body = None, envelope.encode(event)
        return await self.publish(
            subjects.event(event.tenant, event.type),
            body,
            headers=headers,
            msg_id=self.event_msg_id(event.tenant, event.id),
            # An event that carries its producer's trace (CloudEvents `traceparent`) continues it.
            parent=telemetry.extract({subjects.H_TRACEPARENT: event.traceparent})
            if event.traceparent
            else None,
        )


def _permission_hint(identity: Identity | None, subject: str) -> str:
    if subject.startswith(f"{subjects.EVENTS_ROOT}."):
        tenant = subject.split(".")[2] if subject.count(".") >= 2 else "T"
        return (
            f"publish events as a publisher of tenant {tenant} "
            f"(`mesh creds publisher NAME --tenant {tenant}`, then MESH_IDENTITY=<its file>)"
        )
    role = identity.role if identity else "anonymous"
    return f"a {role} may not (see mesh/natsauth.py); use an identity whose role may"


def event_signature(signer: Signer, subject: str, body: bytes) -> str:
    """The `Mesh-Signature` header of an event: `<key id>:<signature>` over `subject\\0body`
    (purpose "event"; verified with `Trust.refusal(kid, "event", payload, sig)`)."""
    return f"{signer.kid}:{signer.sign('event', event_payload(subject, body))}"


def event_payload(subject: str, body: bytes) -> bytes:
    """What an event's signature covers: its subject and its body."""
    return subject.encode() + b"\0" + body


async def _log_error(e: Exception) -> None:
    log.warning("nats: %s", redact(str(e)))


async def _log_disconnected() -> None:
    log.info("nats: disconnected, reconnecting")


# -- reading streams ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamMessage:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Reader:
    """Reads a stream through short-lived consumers, filtered by subject: what any identity may
    do within its permissions (a reader's filter is its tenant's, pinned by the server). The
    consumers push to this connection's own inbox, and are gone soon after (inactive)."""

    def __init__(self, bus: Bus, stream: str, filter_subject: str | None) -> None:
        self.bus = bus
        self.stream = stream
        self.filter = filter_subject

    def _config(self, start: int | None, *, deliver: str | None = None) -> ConsumerConfig:
        return ConsumerConfig(
            name=f"mesh-read-{uuid.uuid4().hex[:16]}",
            filter_subject=self.filter,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
            opt_start_seq=start,
            deliver_subject=deliver,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=_READ_CONSUMER_IDLE_S,
        )

    async def pending(self, start: int | None = None) -> int | None:
        """How many messages match from `start` on (None: no such stream)."""
        try:
            info = await self.bus.js.add_consumer(self.stream, self._config(start))
        except NotFoundError:
            return None
        return int(info.num_pending or 0)

    async def last_seq(self) -> int:
        """The stream sequence of the last matching message (0: none)."""
        got = [m async for m in self.read(None, 1, last=True)]
        return got[0].seq if got else 0

    async def read(
        self, start: int | None, limit: int | None, *, last: bool = False
    ) -> AsyncIterator[StreamMessage]:
        """The matching messages from `start` (or all), up to `limit`, in stream order."""
        inbox = self.bus.nc.new_inbox()
        sub = await self.bus.nc.subscribe(inbox)
        try:
            config = self._config(start, deliver=inbox)
            if last:
                config = config.evolve(deliver_policy=DeliverPolicy.LAST, opt_start_seq=None)
            try:
                info = await self.bus.js.add_consumer(self.stream, config)
            except NotFoundError:
                return
            remaining = int(info.num_pending or 0)
            if last:
                remaining = min(remaining, 1)  # the one it delivers: the last match
            count = 0
            while remaining > 0 and (limit is None or count < limit):
                try:
                    msg: Msg = await sub.next_msg(timeout=_READ_WAIT_S)
                except Exception:  # nats' TimeoutError: nothing more arrived
                    return
                meta = msg.metadata
                remaining = meta.num_pending
                count += 1
                yield StreamMessage(
                    meta.sequence.stream,
                    msg.subject,
                    msg.data,
                    {str(k): str(v) for k, v in (msg.headers or {}).items()},
                )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def read_stream(
    bus: Bus, stream: str, *, filter_subject: str | None = None, start_seq: int = 1
) -> list[StreamMessage]:
    """Every message of `stream` (matching `filter_subject`) from `start_seq` on, in order,
    with headers. A reader reads its tenant's messages whatever filter it gives (its default
    filter is its tenant's); [] when the stream does not exist."""
    reader = _Reader(bus, stream, filter_subject or bus.tenant_filter(stream))
    return [m async for m in reader.read(start_seq if start_seq > 1 else None, None)]


async def tail(
    bus: Bus, stream: str, limit: int, *, filter_subject: str | None = None
) -> list[tuple[int, str, bytes]]:
    """The last `limit` messages of a stream (matching `filter_subject`) as (sequence, subject,
    body), oldest first; [] when the stream does not exist.

    Read through filtered consumers, so it works under a reader's permissions (whose default
    filter is its tenant's). Where to start is found with a few counting consumers (a binary
    search on the start sequence), never by reading what is not shown."""
    reader = _Reader(bus, stream, filter_subject or bus.tenant_filter(stream))
    total = await reader.pending()
    if not total:
        return []
    start: int | None = None
    if total > limit:
        # The largest start sequence from which at least `limit` messages match.
        lo, hi = 1, await reader.last_seq()
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (await reader.pending(mid) or 0) >= limit:
                lo = mid
            else:
                hi = mid - 1
        start = lo
    rows = [(m.seq, m.subject, m.data) async for m in reader.read(start, limit)]
    return rows[-limit:]
