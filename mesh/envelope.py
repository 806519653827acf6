"""The CloudEvents 1.0 envelope and the mesh context it carries.

Both content modes of the CloudEvents NATS protocol binding are read: structured (the whole event
as one JSON body, what the mesh publishes by default) and binary (attributes as `ce-<name>`
headers, `content-type` as `datacontenttype`, the body is `data`, JSON only). `decode(body,
headers)` gives one `Event` either way, with the same checks, and raises only
`MalformedEventError`. `binary_message(event)` makes the binary form for a producer that wants it.

Mesh context rides as CloudEvents extension attributes (lower-case, no separators, as the spec
requires): `tenant`, `principal`, `traceparent` (the CloudEvents distributed-tracing extension)
and `budget` (remaining cost in micro-USD, an integer so it survives every JSON hop exactly), with
`budgettokens`, `budgettoolcalls` and `budgetms` (wall clock from `time`) beside it (mesh.budget).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
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
    # The rest of the budget (mesh.budget): tokens, model/tool calls, wall clock from `time`.
    budgettokens: int | None = None
    budgettoolcalls: int | None = None
    budgetms: int | None = None

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


def decode(body: bytes, headers: Mapping[str, str] | None = None) -> Event:
    """Parse and validate any bytes (and headers); raises `MalformedEventError` (and nothing
    else) naming what is wrong: not UTF-8, not JSON, nested too deep, or the CloudEvent field at
    fault. A message with any `ce-` header is in binary mode (`decode_binary`), else structured.

    This is the one decoding of events off the wire: the coordinator, event handlers and the
    dead-letterer of give-up advisories all use it, so no message can raise what one of them
    does not catch.
    """
    if is_binary(headers):
        assert headers is not None
        return decode_binary(body, headers)
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
    _check_depth(event.data)
    return event


def _check_depth(data: Any) -> None:
    depth = nesting(data)
    if depth > MAX_DATA_DEPTH:
        raise MalformedEventError(
            f"not a CloudEvent the mesh can carry: data nests {depth} levels deep, at most "
            f"{MAX_DATA_DEPTH} fit an A2A data part"
        )


# -- binary content mode ---------------------------------------------------------------------------
CE_PREFIX = "ce-"
CONTENT_TYPE = "content-type"
# Attributes that never come from a `ce-` header: `data` is the body and `datacontenttype` is the
# `content-type` header, as the binding says.
_NOT_HEADERS = frozenset({"data", "datacontenttype"})


def is_binary(headers: Mapping[str, str] | None) -> bool:
    """Whether a message is in binary content mode: it carries at least one `ce-` header."""
    return bool(headers) and any(
        str(k).strip().lower().startswith(CE_PREFIX) for k in headers or ()
    )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media.startswith("text/json")


def _utf8(name: str, value: Any) -> str:
    # Headers are anyone's bytes; a value that cannot be UTF-8 text would break every re-encoding.
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedEventError(
            f"not a CloudEvent (binary mode): header {name!r} is not UTF-8 text"
        ) from None
    return text


def binary_attributes(headers: Mapping[str, str]) -> dict[str, str]:
    """The CloudEvent attributes of a binary-mode message: `ce-<name>` headers (any case) by
    `<name>`, and `datacontenttype` from `content-type`. Raises `MalformedEventError` on a name
    given twice (in two cases) or a value that is not UTF-8."""
    attrs: dict[str, str] = {}
    for key, value in headers.items():
        lower = _utf8("header name", key).strip().lower()
        if lower == CONTENT_TYPE:
            name = "datacontenttype"
        elif lower.startswith(CE_PREFIX) and lower[len(CE_PREFIX) :] not in _NOT_HEADERS:
            name = lower[len(CE_PREFIX) :]
        else:
            continue
        if name in attrs:
            raise MalformedEventError(
                f"not a CloudEvent (binary mode): header {key!r} is given twice"
            )
        # Stripped as NATS clients strip header values on reading: what a reader sees.
        attrs[name] = _utf8(key, value).strip()
    return attrs


def decode_binary(body: bytes, headers: Mapping[str, str]) -> Event:
    """A binary-mode message as an `Event`: the same checks as structured mode. Data must be
    JSON (`content-type` absent, `application/json` or `*+json`): it travels on to A2A voters
    as a data part; an empty body is an event without data."""
    attrs = binary_attributes(headers)
    content_type = attrs.get("datacontenttype", "application/json")
    if not _is_json(content_type):
        raise MalformedEventError(
            f"not a CloudEvent the mesh can carry (binary mode): content-type {content_type!r} "
            "is not JSON"
        )
    data: Any = None
    if body:
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            raise MalformedEventError(
                f"not a CloudEvent (binary mode, data not JSON: {e})"
            ) from None
        except UnicodeDecodeError as e:
            raise MalformedEventError(
                f"not a CloudEvent (binary mode, data not UTF-8 text: {e.reason})"
            ) from None
        except RecursionError:
            raise MalformedEventError(
                f"not a CloudEvent the mesh can carry (binary mode, data nested too deep to "
                f"parse; data may nest {MAX_DATA_DEPTH} levels)"
            ) from None
        except Exception as e:  # anyone's bytes
            raise MalformedEventError(
                f"not a CloudEvent (binary mode, data cannot be parsed: {type(e).__name__}: {e})"
            ) from None
    _check_depth(data)
    try:
        # strict=False: header values are text, so `ce-budget: 12` must become the integer 12.
        event = msgspec.convert(attrs, Event, strict=False)
    except msgspec.ValidationError as e:
        raise MalformedEventError(
            f"not a valid CloudEvent (binary mode, from the ce- headers): {e}"
        ) from None
    except Exception as e:  # whatever else the values make the converter raise
        raise MalformedEventError(
            f"not a CloudEvent (binary mode, headers cannot be read: {type(e).__name__}: {e})"
        ) from None
    event.data = data
    return event


def binary_message(event: Event) -> tuple[dict[str, str], bytes]:
    """(headers, body) of `event` in binary mode: `ce-` headers, `content-type`, JSON data."""
    attrs = msgspec.to_builtins(event)
    data = attrs.pop("data", None)
    headers = {
        CONTENT_TYPE if name == "datacontenttype" else f"{CE_PREFIX}{name}": str(value)
        for name, value in attrs.items()
        if value is not None
    }
    headers.setdefault(CONTENT_TYPE, "application/json")
    for name, value in headers.items():
        if value != value.strip() or any(c in value for c in "\r\n\0"):
            # A line break would end the header and start another (header injection); outer
            # blanks are stripped by every reader. Such an event goes in structured mode.
            raise MalformedEventError(
                f"event {event.id!r} cannot go in binary mode: its {name} header would hold a "
                "line break or outer blanks",
                hint="publish it in structured mode (the default)",
            )
    return headers, (b"" if data is None else _encoder.encode(data))


def signed_content(headers: Mapping[str, str] | None, body: bytes) -> bytes:
    """What an event's `Mesh-Signature` covers besides its subject: the body in structured mode;
    in binary mode the attribute headers too (sorted `name: value` lines, then the body), so
    changing `ce-id` or `ce-source` of a signed message breaks its signature as changing the
    body would. Never raises: anything odd here fails the decoding, not the signature."""
    if not is_binary(headers):
        return body
    assert headers is not None
    names = {str(k): str(k).strip().lower() for k in headers}
    lines = sorted(
        f"{names[str(k)]}: {str(v).strip()}"
        for k, v in headers.items()
        if names[str(k)].startswith(CE_PREFIX) or names[str(k)] == CONTENT_TYPE
    )
    return "\n".join(["cloudevents-binary", *lines]).encode("utf-8", "surrogatepass") + (
        b"\0" + body
    )


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
