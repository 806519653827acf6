"""JSON-RPC 2.0 framing and the A2A error codes (one table, used by both transports)."""

from __future__ import annotations

from typing import Any

import msgspec
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message as Proto

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
PUSH_NOT_SUPPORTED = -32003
UNSUPPORTED_OPERATION = -32004
CONTENT_TYPE_NOT_SUPPORTED = -32005
INVALID_AGENT_RESPONSE = -32006
EXTENDED_CARD_NOT_CONFIGURED = -32007
EXTENSION_SUPPORT_REQUIRED = -32008
VERSION_NOT_SUPPORTED = -32009
# The mesh's own: a request without a bearer token that verifies (docs/a2a-nats-binding.md).
# A2A 1.0 leaves authentication to the transport and names no code for it; this one sits
# outside JSON-RPC's reserved block (-32768..-32000, where A2A's own codes live and new ones
# will come), so it can never collide with a spec code, and ends in 401 like the HTTP status.
UNAUTHENTICATED = -31401
# The mesh's own, beside it: the agent is working on all the requests it takes at once and has
# no room to queue this one; nothing was done, the same request may be sent again (after
# `error.data.retryAfterMs`). Ends in 429 like the HTTP status it travels with.
BUSY = -31429

# Methods whose answer is a stream of JSON-RPC responses (SSE over HTTP, frames over NATS).
STREAMING_METHODS = frozenset({"SendStreamingMessage", "SubscribeToTask"})


def _builtins(obj: Any) -> Any:
    # a2a-sdk's typed objects (protobuf messages) travel as their proto JSON, camelCase.
    if isinstance(obj, Proto):
        return MessageToDict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_enc = msgspec.json.Encoder(enc_hook=_builtins)


class _Envelope(msgspec.Struct, omit_defaults=True):
    jsonrpc: str = "2.0"
    id: str | int | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    method: str | None = None


_dec = msgspec.json.Decoder(_Envelope)


def request_body(method: str, params: dict[str, Any], request_id: str | int) -> bytes:
    """A JSON-RPC request; `params` may hold a2a-sdk objects (a `Message`, …)."""
    return _enc.encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def error_body(request_id: str | int | None, code: int, message: str) -> bytes:
    return _enc.encode(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    )


def busy_body(request_id: str | int | None, in_progress: int, retry_after_ms: int) -> bytes:
    """The answer to a request the agent has no room for (`BUSY`)."""
    return _enc.encode(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {
                "code": BUSY,
                "message": f"busy: {in_progress} requests in progress; retry later",
                "data": {"retryAfterMs": retry_after_ms},
            },
        }
    )


def request_head(body: bytes) -> tuple[str | int | None, str | None]:
    """(`id`, `method`) of a request body, each None if unreadable; one pass over the JSON
    that skips `params` (cheap enough to run for every request, even ones refused at once)."""
    try:
        env = _dec.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None, None
    return env.id, env.method


def request_id(body: bytes) -> str | int | None:
    try:
        return _dec.decode(body).id
    except (msgspec.DecodeError, RecursionError):
        return None


def request_method(body: bytes) -> str | None:
    """The `method` of a request body, if it has a readable one (nothing else is looked at)."""
    try:
        return _dec.decode(body).method
    except (msgspec.DecodeError, RecursionError):
        return None


def parse_response(body: bytes) -> tuple[Any, dict[str, Any] | None]:
    """(result, error) of a JSON-RPC response; a body that is not one raises ValueError."""
    try:
        env = _dec.decode(body)
    except msgspec.DecodeError as e:
        raise ValueError(f"not a JSON-RPC response: {e}") from None
    if env.error is None and env.result is None:
        raise ValueError("JSON-RPC response has neither result nor error")
    return env.result, env.error
