"""The one A2A JSON-RPC dispatch: request bytes and a call context in, one answer or a stream out.

Both transports (`mesh.a2a.http`, `mesh.a2a.nats`) hand every request to `respond` and only
frame what comes back, so a request gets the same bytes whichever way it came: the same
validation, the same error codes, the same task store. The rules are a2a-sdk 1.3's
(`a2a.server.routes.jsonrpc_dispatcher.JsonRpcDispatcher`), rebuilt over the SDK's public pieces
— the request handler's `on_*` methods, `validate_version`, `build_error_response`, the protobuf
JSON conversion — because the SDK's dispatcher only takes a Starlette request, and a NATS message
is not one.

The answer of a unary method is one JSON-RPC response object (`Answer.body`, encoded as
Starlette's JSONResponse encodes it); a streaming method that gets past its first event is a
`Stream` of frames, each one JSON-RPC response object (the `data:` of one server-sent event).
A streaming method that fails before its first event is an `Answer` with the error.

Before any of that, `authenticate` decides who the caller is (mesh.a2a.auth): a request
without a bearer token that verifies is answered with `refusal` and never reaches the handler;
the caller it names becomes the call context's user, so the handler's stores scope tasks to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from a2a import types as pb  # the A2A protobuf messages
from a2a.auth.user import UnauthenticatedUser, User
from a2a.extensions.common import get_requested_extensions
from a2a.server.context import ServerCallContext
from a2a.server.jsonrpc_models import InternalError, JSONParseError, JSONRPCError
from a2a.server.jsonrpc_models import MethodNotFoundError as UnknownMethod
from a2a.server.request_handlers import RequestHandler
from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.server.routes.common import serialize_list_tasks_response
from a2a.utils import constants, json_utils, proto_utils
from a2a.utils.errors import (
    A2AError,
    ContentTypeNotSupportedError,
    InvalidParamsError,
    InvalidRequestError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.version_validator import validate_version
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message as Proto

from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.a2a.auth import Authenticator, Unauthenticated

if TYPE_CHECKING:
    from mesh.a2a.lean import LeanSend

log = logging.getLogger(__name__)

# `ServerCallContext.state` key: the request's `params` as decoded JSON (mesh.a2a.lean renders
# the reply's history from it rather than printing the parsed message back).
PARAMS_JSON = "mesh.params_json"

MAX_BODY = 4 * 1024 * 1024  # larger requests get -32600 instead of being parsed

# The request message of every method (the A2A 1.0 JSON-RPC names).
METHODS: dict[str, type[Proto]] = {
    "SendMessage": pb.SendMessageRequest,
    "SendStreamingMessage": pb.SendMessageRequest,
    "GetTask": pb.GetTaskRequest,
    "ListTasks": pb.ListTasksRequest,
    "CancelTask": pb.CancelTaskRequest,
    "CreateTaskPushNotificationConfig": pb.TaskPushNotificationConfig,
    "GetTaskPushNotificationConfig": pb.GetTaskPushNotificationConfigRequest,
    "ListTaskPushNotificationConfigs": pb.ListTaskPushNotificationConfigsRequest,
    "DeleteTaskPushNotificationConfig": pb.DeleteTaskPushNotificationConfigRequest,
    "SubscribeToTask": pb.SubscribeToTaskRequest,
    "GetExtendedAgentCard": pb.GetExtendedAgentCardRequest,
}

# What a JSON-RPC 2.0 request object may and must hold.
_REQUIRED = frozenset({"jsonrpc", "method"})
_ALLOWED = frozenset({"jsonrpc", "method", "params", "id"})

RequestId = str | int | None


@dataclass(frozen=True, slots=True)
class Answer:
    """One JSON-RPC response object, encoded (what HTTP sends as its body)."""

    body: bytes
    method: str | None = None  # the request's method, once the request was read that far
    request_id: RequestId = None
    # Set on a refusal for want of credentials: the `WWW-Authenticate` of HTTP's 401 answer.
    challenge: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One event of a stream: a JSON-RPC response object (an SSE event's `data:`)."""

    data: str
    error: bool = False


@dataclass(frozen=True, slots=True)
class Stream:
    """The frames of a streaming method. Close `frames` to stop early (the handler's stream
    is closed with it)."""

    frames: AsyncGenerator[Frame, None]
    method: str
    request_id: RequestId


Reply = Answer | Stream


async def read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes]) -> bytes | None:
    """An HTTP request body, read chunk by chunk and never past `MAX_BODY` (refused at once when
    its Content-Length says more): None when it is larger. Both HTTP bindings (JSON-RPC and
    HTTP+JSON) read bodies this way; each answers "too large" in its own binding's shape."""
    try:
        declared = int(headers.get("content-length", "0"))
    except ValueError:
        declared = 0
    if declared > MAX_BODY:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
    return b"".join(parts)


# -- the caller and the call context ------------------------------------------------------------
def authenticate(auth: Authenticator, authorization: str | None) -> User | Answer:
    """The user a request calls as (from its `Authorization` value), or the refusal to answer
    instead of serving it."""
    try:
        return auth.authenticate(authorization)
    except Unauthenticated as e:
        return refusal(e)


def refusal(error: Unauthenticated) -> Answer:
    """The answer to a request that does not authenticate: the same bytes on both transports
    (id null: the body of a caller we do not know is not read), plus HTTP's challenge."""
    log.warning("A2A request refused: %s", error.reason)  # never the token itself
    body = jsonrpc.error_body(None, jsonrpc.UNAUTHENTICATED, f"Unauthenticated: {error.reason}")
    return Answer(body, challenge=error.challenge)


def call_context(
    headers: Mapping[str, str],
    *,
    user: User | None = None,
    extensions: list[str] | None = None,
) -> ServerCallContext:
    """The call context of a request: what a2a-sdk's `DefaultServerCallContextBuilder` makes
    of an HTTP request — the headers under lowercase names, the extensions the caller declares
    (`extensions`: every `A2A-Extensions` value, when a transport can repeat the header) — with
    `user` the authenticated caller. The `Authorization` header is left out: the token has done
    its work, and nothing downstream (executor, task metadata, logs) should hold it."""
    # `validate_version` reads A2A-Version from state["headers"]; the executor reads
    # traceparent there.
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    lowered.pop(_AUTHORIZATION, None)
    if extensions is None:
        declared = lowered.get(_EXTENSIONS)
        extensions = [declared] if declared else []
    return ServerCallContext(
        user=user if user is not None else UnauthenticatedUser(),
        state={"headers": lowered},
        requested_extensions=get_requested_extensions(extensions),
    )


_AUTHORIZATION = subjects.H_AUTHORIZATION.lower()
_EXTENSIONS = subjects.H_A2A_EXTENSIONS.lower()


# -- the entry point ----------------------------------------------------------------------------
async def respond(
    handler: RequestHandler,
    body: bytes,
    *,
    content_type: str | None,
    context: ServerCallContext,
    lean: LeanSend | None = None,
) -> Reply:
    """One request, as bytes: the checks a2a-sdk leaves to the host (size, Content-Type, JSON
    that will not parse), then `dispatch`. `lean` (NATS only) answers the SendMessage requests
    it takes (mesh.a2a.lean); everything else, and everything when it is None, goes to
    `handler`."""
    if len(body) > MAX_BODY:
        return error_answer(None, InvalidRequestError(message="Payload too large"))
    if content_type is not None and not is_json(content_type):
        return error_answer(
            jsonrpc.request_id(body),
            ContentTypeNotSupportedError(message=f"Content-Type {content_type!r} is not JSON"),
        )
    try:
        # msgspec, not json: invalid UTF-8, NaN and nesting too deep to parse are all parse
        # errors here (json.loads would let some through as -32603 internal errors).
        request = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        return error_answer(None, JSONParseError(message=f"Parse error: {e}"))
    return await dispatch(handler, request, context, lean)


async def dispatch(
    handler: RequestHandler,
    request: Any,
    context: ServerCallContext,
    lean: LeanSend | None = None,
) -> Reply:
    """One parsed JSON-RPC request to the handler's `on_*` method; never raises (an error is
    an answer with its spec code)."""
    request_id = _id_of(request)
    method = _method_of(request)  # lets NATS frame an error to a streaming method as a stream
    try:
        invalid = _invalid(request)
        if invalid is not None:
            return error_answer(request_id, invalid, method)
        request_id = request.get("id")
        if not method:
            return error_answer(request_id, InvalidRequestError(message="Method is required"))
        model = METHODS.get(method)
        if model is None:
            return error_answer(request_id, UnknownMethod(), method)
        # The lean path reads the SendMessage requests it takes from their JSON (no protobuf).
        params = lean.parse(request.get("params")) if lean and method == "SendMessage" else None
        if params is None:
            try:
                # Unknown fields are ignored for forward compatibility (as a2a-sdk does).
                params = ParseDict(request.get("params", {}), model(), ignore_unknown_fields=True)
            except Exception as e:
                error = InvalidParamsError(data={"parseError": str(e)})
                return error_answer(request_id, error, method)
        context.tenant = getattr(params, "tenant", "")
        context.state["method"] = method
        context.state["request_id"] = request_id
        context.state[PARAMS_JSON] = request.get("params")  # the lean path renders from it
        if method in jsonrpc.STREAMING_METHODS:
            first, events = await _open_stream(handler, method, params, context)
            return Stream(_frames(first, events, request_id), method, request_id)
        try:
            result = await _unary(handler, method, params, context, lean=lean)
        except A2AError as e:
            return Answer(_encode(build_error_response(request_id, e)), method, request_id)
        response = {"result": result, "id": request_id, "jsonrpc": "2.0"}
        return Answer(_encode(response), method, request_id)
    except A2AError as e:
        return error_answer(request_id, e, method)
    except Exception as e:
        log.exception("A2A request failed")
        return error_answer(request_id, InternalError(message=str(e)), method)


def error_answer(
    request_id: RequestId, error: A2AError | JSONRPCError, method: str | None = None
) -> Answer:
    """An error response, logged as a2a-sdk's dispatcher logs them: internal errors at ERROR,
    the caller's mistakes at WARNING."""
    response = build_error_response(request_id, error)
    code = response.get("error", {}).get("code")
    log.log(
        logging.ERROR if code == jsonrpc.INTERNAL_ERROR else logging.WARNING,
        "A2A request %s answered %s: %s",
        request_id,
        code,
        response.get("error", {}).get("message"),
    )
    return Answer(_encode(response), method, request_id)


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "application/json-rpc", "") or media.endswith("+json")


# -- unary methods ------------------------------------------------------------------------------
@validate_version(constants.PROTOCOL_VERSION_1_0)
async def _unary(
    handler: RequestHandler,
    method: str,
    params: Any,
    context: ServerCallContext,
    *,
    lean: LeanSend | None = None,
) -> Any:
    """The `result` of a unary method, as JSON."""
    match method:
        case "SendMessage":
            if lean is not None and lean.eligible(params):
                return await lean.send(params, context)
            sent = await handler.on_message_send(params, context)
            if isinstance(sent, pb.Task):
                return MessageToDict(pb.SendMessageResponse(task=sent))
            return MessageToDict(pb.SendMessageResponse(message=sent))
        case "GetTask":
            return _task(await handler.on_get_task(params, context))
        case "CancelTask":
            return _task(await handler.on_cancel_task(params, context))
        case "ListTasks":
            listed = await handler.on_list_tasks(params, context)
            return serialize_list_tasks_response(listed, params.include_artifacts)
        case "CreateTaskPushNotificationConfig":
            return _json(await handler.on_create_task_push_notification_config(params, context))
        case "GetTaskPushNotificationConfig":
            return _json(await handler.on_get_task_push_notification_config(params, context))
        case "ListTaskPushNotificationConfigs":
            return _json(await handler.on_list_task_push_notification_configs(params, context))
        case "DeleteTaskPushNotificationConfig":
            await handler.on_delete_task_push_notification_config(params, context)
            return None
        case "GetExtendedAgentCard":
            return _json(await handler.on_get_extended_agent_card(params, context))
    raise UnsupportedOperationError(message=f"Method {method} is not supported.")


def _task(task: pb.Task | None) -> dict[str, Any]:
    if task is None:
        raise TaskNotFoundError
    return _json(task)


def _json(message: Proto) -> dict[str, Any]:
    result: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=False)
    return result


# -- streaming methods --------------------------------------------------------------------------
@validate_version(constants.PROTOCOL_VERSION_1_0)
async def _open_stream(
    handler: RequestHandler, method: str, params: Any, context: ServerCallContext
) -> tuple[Any, AsyncGenerator[Any, None]]:
    """The handler's event stream, and its first event read at once: a request the handler
    refuses (unknown task, no streaming…) fails here, as one error answer, not a stream."""
    if method == "SendStreamingMessage":
        events = handler.on_message_send_stream(params, context)
    else:
        events = handler.on_subscribe_to_task(params, context)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    return first, events


async def _frames(
    first: Any, events: AsyncGenerator[Any, None], request_id: RequestId
) -> AsyncGenerator[Frame, None]:
    try:
        try:
            if first is not None:
                yield _event_frame(first, request_id)
            async for event in events:
                yield _event_frame(event, request_id)
        except A2AError as e:  # a failure mid-stream is one error event, as over SSE
            yield _error_frame(build_error_response(request_id, e))
        except Exception as e:
            log.exception("A2A stream failed")
            yield _error_frame(build_error_response(request_id, InternalError(message=str(e))))
    finally:
        # Closed here, not left to the garbage collector: an early stop (HTTP disconnect, NATS
        # cancel) ends the handler's subscription at once.
        await events.aclose()


def _event_frame(event: Any, request_id: RequestId) -> Frame:
    result = MessageToDict(proto_utils.to_stream_response(event), preserving_proto_field_name=False)
    return Frame(json_utils.dumps({"result": result, "id": request_id, "jsonrpc": "2.0"}))


def _error_frame(response: dict[str, Any]) -> Frame:
    return Frame(json_utils.dumps(response), error=True)


# -- helpers ------------------------------------------------------------------------------------
def _encode(response: dict[str, Any]) -> bytes:
    # Byte for byte what Starlette's JSONResponse renders (a2a-sdk answered with one).
    return json.dumps(
        response, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def _id_of(request: Any) -> RequestId:
    if isinstance(request, dict):
        rid = request.get("id")
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            return rid
    return None


def _method_of(request: Any) -> str | None:
    method = request.get("method") if isinstance(request, dict) else None
    return method if isinstance(method, str) else None


def _invalid(request: Any) -> A2AError | None:
    """Why `request` is not one JSON-RPC 2.0 request object, or None if it is one.

    The checks (and their order) of the `json-rpc` package a2a-sdk validates with, then the
    SDK's own: a batch is refused, `jsonrpc` must be "2.0", an id may not be a boolean.
    """
    batch = isinstance(request, list)
    items = request if batch else [request]
    try:
        if not items:
            raise ValueError("[] value is not accepted")
        if not all(isinstance(item, dict) for item in items):
            raise ValueError("Each request should be an object (dict)")
        for item in items:
            _check_fields(item)
    except ValueError as e:
        return InvalidRequestError(data={"parseError": str(e)})
    if batch:
        return InvalidRequestError(message="Batch requests are not supported")
    if request.get("jsonrpc") != "2.0":
        return InvalidRequestError(message="Invalid request: 'jsonrpc' must be exactly '2.0'")
    if isinstance(request.get("id"), bool):
        return InvalidRequestError(message="Invalid request: id must be a string, integer, or null")
    return None


def _check_fields(item: dict[str, Any]) -> None:
    keys = set(item)
    if not _REQUIRED <= keys <= _ALLOWED:
        raise ValueError(
            f"Invalid request. Extra fields: {keys - _ALLOWED}, "
            f"Missed fields: {set(_REQUIRED) - keys}"
        )
    method = item["method"]
    if not isinstance(method, str):
        raise ValueError("Method should be string")
    if method.startswith("rpc."):
        raise ValueError(
            "Method names that begin with the word rpc followed by a period character "
            "(U+002E or ASCII 46) are reserved for rpc-internal methods and extensions and "
            "MUST NOT be used for anything else."
        )
    params = item.get("params")
    if params is not None and not isinstance(params, list | dict):
        raise ValueError(f"Incorrect params {params}")
    rid = item.get("id")
    if rid is not None and not isinstance(rid, str | int):
        raise ValueError("id should be string or integer")
