"""The NATS connection and everything the mesh keeps in JetStream.

`Bus` owns one nats-py connection. `ensure()` creates the streams and buckets the mesh needs,
idempotently; a stream that already exists with settings that would break our guarantees is an
error that says what to do, never silently "fixed".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from mesh import envelope, subjects, telemetry
from mesh.errors import NotConnectedError, StreamConflictError
from mesh.identity import Identity, resolve_identity
from mesh.settings import Settings, get_settings

log = logging.getLogger(__name__)

_DAY = 24 * 3600.0
STATE_FILE = "nats.json"  # written by `mesh up`/`mesh demo` so other commands find the server


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age_s: float
    duplicate_window_s: float = 120.0
    immutable: bool = False  # deny delete and purge: nobody rewrites history through the API


STREAMS = (
    StreamSpec(subjects.EVENTS_STREAM, [subjects.events_filter()], 7 * _DAY),
    # Decisions and dead letters are the record of what the mesh did: kept longer.
    StreamSpec(subjects.DECISIONS_STREAM, [f"{subjects.DECISIONS_ROOT}.>"], 30 * _DAY),
    StreamSpec(subjects.DLQ_STREAM, [f"{subjects.DLQ_ROOT}.>"], 30 * _DAY),
    # Audit: kept a year and immutable; max_age 0 would be "for ever" — a retention an
    # operator should choose deliberately, so a year is the default.
    StreamSpec(subjects.AUDIT_STREAM, [f"{subjects.AUDIT_ROOT}.>"], 365 * _DAY, immutable=True),
)


def write_state(home: Path, url: str, pid: int) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / STATE_FILE
    path.write_text(json.dumps({"url": url, "pid": pid}))
    return path


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
    path = settings.home / STATE_FILE
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)  # still alive?
        return [u.strip() for u in str(state["url"]).split(",") if u.strip()]
    except (OSError, ValueError, KeyError):
        raise NotConnectedError(
            "no NATS server to talk to",
            hint="start the mesh with `mesh up` in this folder, or set MESH_NATS_URL "
            "(e.g. nats://127.0.0.1:4222)",
        ) from None


class Bus:
    """One NATS connection plus the JetStream handles the mesh uses."""

    def __init__(self, nc: NATS, settings: Settings, identity: Identity | None = None) -> None:
        self.nc = nc
        # Who this connection is (None only with MESH_INSECURE=bus): signs what it publishes.
        self.identity = identity
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self._kv: dict[str, KeyValue] = {}

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
        nc = NATS()
        first_errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            # Until connected, errors are the answer to give the user, not log noise.
            if nc.is_connected:
                await _log_error(e)
            else:
                first_errors.append(e)

        try:
            # nats-py applies max_reconnect_attempts to the first connect too: try each server
            # twice, and only once connected let reconnects go on for ever (a NATS cluster
            # restarting under us must not kill the process).
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=2,
                    max_reconnect_attempts=2,
                    reconnect_time_wait=0.2,  # type: ignore[arg-type]  # typed int, takes float
                    allow_reconnect=True,
                    error_cb=on_error,
                    disconnected_cb=_log_disconnected,
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
                f"cannot connect to NATS at {', '.join(servers)}: {reason}",
                hint="is the server running? check MESH_NATS_URL, or start one with `mesh up`",
            ) from None
        return cls(nc, settings, identity)

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # a broken connection cannot drain; closing is all we need
                await self.nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- streams and buckets --------------------------------------------------------------------
    async def ensure(self) -> None:
        """Create every stream and bucket the mesh needs (idempotent, conflict-checked)."""
        for spec in STREAMS:
            await self._ensure_stream(spec)
        await self.kv(subjects.CARDS_BUCKET, ttl_s=self.settings.card_ttl_s)
        await self.kv(subjects.DECISIONS_BUCKET, history=5)

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
        if bucket in self._kv:
            return self._kv[bucket]
        try:
            kv = await self.js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=history,
                    ttl=ttl_s,
                    storage=StorageType.FILE,
                    replicas=self.settings.stream_replicas,
                )
            )
        self._kv[bucket] = kv
        return kv

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

        Under a `send` producer span whose context rides in the headers (W3C traceparent)."""
        with telemetry.tracer().start_as_current_span(
            f"send {subject}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.messaging_attrs("send", "send", subject, msg_id or ""),
        ):
            hdrs = telemetry.inject(headers)
            if msg_id:
                hdrs[subjects.H_MSG_ID] = msg_id
            return await self.js.publish(subject, body, timeout=timeout, headers=hdrs or None)

    async def publish_event(self, event: envelope.Event) -> PubAck:
        """Publish a domain event; its id (per tenant) deduplicates re-publishes."""
        return await self.publish(
            subjects.event(event.tenant, event.type),
            envelope.encode(event),
            msg_id=subjects.event_msg_id(event.tenant, event.id),
            # An event that carries its producer's trace (CloudEvents `traceparent`) continues it.
            parent=telemetry.extract({subjects.H_TRACEPARENT: event.traceparent})
            if event.traceparent
            else None,
        )


async def _log_error(e: Exception) -> None:
    log.warning("nats: %s", e)


async def _log_disconnected() -> None:
    log.info("nats: disconnected, reconnecting")


async def tail(bus: Bus, stream: str, limit: int) -> list[tuple[int, str, bytes]]:
    """The last `limit` messages of a stream as (sequence, subject, body), oldest first."""
    try:
        info = await bus.js.stream_info(stream)
    except NotFoundError:
        return []
    first, last = max(1, info.state.first_seq), info.state.last_seq
    out: list[tuple[int, str, bytes]] = []
    seq = last
    # Bounded walk backwards; deleted sequences are skipped.
    while seq >= first and len(out) < limit and last - seq < limit * 4:
        try:
            raw = await bus.js.get_msg(stream, seq)
            out.append((seq, raw.subject or "", raw.data or b""))
        except NotFoundError:
            pass
        seq -= 1
    return list(reversed(out))
