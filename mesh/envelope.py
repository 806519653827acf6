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
from mesh.errors import ConfigError

# The deepest `data` an event may nest (objects and arrays): what an A2A data part can still
# carry to a voter (protobuf's Struct parser stops at 100 levels of messages, reached at 34
# nested JSON objects). A deeper event could never be asked about, so it is malformed on arrival.
MAX_DATA_DEPTH = 32


class MalformedEventError(ConfigError, msgspec.DecodeError):
    """Bytes that are not an event the mesh can carry; the message says why.

    Also a `msgspec.DecodeError`, so code that catches msgspec's errors around `decode` keeps
    catching every way a body can be bad."""


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
    """Parse and validate any bytes; raises `MalformedEventError` (and nothing else) naming
    what is wrong: not UTF-8, not JSON, nested too deep, or the CloudEvent field at fault.

    This is the one decoding of events off the wire: the coordinator and the dead-letterer of
    give-up advisories both use it, so no body can raise what either of them does not catch.
    """
    try:
        event = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise MalformedEventError(f"not a valid CloudEvent: {e}") from None
    except msgspec.DecodeError as e:
        raise MalformedEventError(f"not a CloudEvent (not JSON: {e})") from None
    except UnicodeDecodeError as e:
        # e.object is the string msgspec was decoding, not the whole body: no offset to give.
        raise MalformedEventError(
            f"not a CloudEvent (not UTF-8 text: byte 0x{e.object[e.start]:02x} in a string, "
            f"{e.reason})"
        ) from None
    except RecursionError:
        raise MalformedEventError(
            f"not a CloudEvent the mesh can carry (nested too deep to parse; data may nest "
            f"{MAX_DATA_DEPTH} levels)"
        ) from None
    except Exception as e:  # the bytes are anyone's: whatever else they make the parser raise
        raise MalformedEventError(
            f"not a CloudEvent (cannot be parsed: {type(e).__name__}: {e})"
        ) from None
    depth = nesting(event.data)
    if depth > MAX_DATA_DEPTH:
        raise MalformedEventError(
            f"not a CloudEvent the mesh can carry: data nests {depth} levels deep, at most "
            f"{MAX_DATA_DEPTH} fit an A2A data part"
        )
    return event


def nesting(value: Any) -> int:
    """How many objects/arrays deep `value` nests (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_DATA_DEPTH:
            return depth  # deeper than allowed is all the caller needs to know
        stack.extend((c, depth) for c in children)
    return deepest


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)
