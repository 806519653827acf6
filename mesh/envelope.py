"""The CloudEvents 1.0 envelope (structured JSON mode) and the mesh context it carries.

Mesh context rides as CloudEvents extension attributes (lower-case, no separators, as the spec
requires): `tenant`, `principal`, `traceparent` (the CloudEvents distributed-tracing extension)
and `budget` (remaining budget in micro-units, an integer so it survives every JSON hop exactly).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from mesh import subjects


class Event(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    specversion: Literal["1.0"]  # required by CloudEvents: an event without it is malformed
    id: str
    source: str
    type: str
    time: datetime | None = None
    datacontenttype: str = "application/json"
    subject: str | None = None
    data: Any = None
    # mesh context (extension attributes)
    tenant: str = "default"
    principal: str | None = None
    traceparent: str | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        # Values that end up inside subject names must not carry wildcards or dots.
        if not self.id:
            raise ValueError("id must not be empty")
        if not subjects.valid_event_type(self.type):
            raise ValueError(f"type {self.type!r} is not a dotted name (e.g. release.proposed)")
        if not subjects.valid_token(self.tenant):
            raise ValueError(f"tenant {self.tenant!r} may hold only letters, digits, '-' and '_'")


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def new_event(
    event_type: str,
    data: Any,
    *,
    source: str = "mesh://cli",
    tenant: str = "default",
    principal: str | None = None,
    event_id: str | None = None,
    subject: str | None = None,
) -> Event:
    return Event(
        specversion="1.0",
        id=event_id or str(uuid.uuid4()),
        source=source,
        type=event_type,
        time=datetime.now(UTC),
        data=data,
        tenant=tenant,
        principal=principal,
        subject=subject,
    )


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(body: bytes) -> Event:
    """Parse and validate; raises `msgspec.ValidationError`/`DecodeError` with the bad field."""
    return _decoder.decode(body)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)
