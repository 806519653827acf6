"""The NATS binding of A2A JSON-RPC (`NATS+JSONRPC`, docs/a2a-nats-binding.md), server side.

A request is one NATS message whose body is a JSON-RPC request; it goes to the shared dispatch
with a call context built from its headers (the caller: the bearer token in `Authorization`,
as over HTTP; a request without one that verifies is refused and never reaches the handler),
and the answer goes back to its reply subject:
one message for a unary method, `Mesh-Stream: frame` messages then an empty `Mesh-Stream: end`
for a streaming one. The agent publishes replies itself rather than `msg.respond()`, which
would echo the request's headers. With `Mesh-Progress: <s>` the caller also gets an empty
`Mesh-Status: working` message every `s` seconds while the request is being worked on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping

from a2a.server.request_handlers import RequestHandler
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh import subjects
from mesh._internal.tasks import TaskPool
from mesh.a2a import dispatch, jsonrpc
from mesh.a2a.auth import Authenticator
from mesh.a2a.lean import LeanSend

log = logging.getLogger(__name__)

_INTERNAL_BODY = jsonrpc.error_body(None, jsonrpc.INTERNAL_ERROR, "internal error")
_HEADROOM = 1024  # bytes of a reply kept free for its headers under max_payload
# What one subscription may hold before its callback has seen it (nats-py's defaults, 512K
# messages / 128 MiB, let a flood grow an agent by hundreds of MB). The callback answers "busy"
# at once, so only a burst faster than that answer ever fills these.
PENDING_MSGS_LIMIT = 4096
PENDING_BYTES_LIMIT = 16 * 1024 * 1024
# Request bodies held by admitted requests (running or waiting), at most: the backlog is counted
# in requests, and this keeps it small in bytes too whatever their size (one is always taken).
HELD_BYTES_LIMIT = 32 * 1024 * 1024
# The pause a "busy" answer suggests before the same request is sent again.
BUSY_RETRY_AFTER_MS = 250


class NatsBinding:
    """Serves one handler on NATS subscriptions; every request runs in `pool` (shared with the
    HTTP binding): a slot, or a place in its short backlog, or a `BUSY` answer at once.

    A stream holds its slot until it ends (or its caller cancels it).
    """

    def __init__(
        self,
        handler: RequestHandler,
        auth: Authenticator,
        *,
        pool: TaskPool,
        lean: LeanSend | None = None,
    ) -> None:
        self.handler = handler
        self.auth = auth
        self.pool = pool
        self.lean = lean  # the lean SendMessage (mesh.a2a.lean), for the requests it takes
        self._held = 0  # bytes of the request bodies admitted and not finished

    def callback(self, nc: NATS) -> Callable[[Msg], Awaitable[None]]:
        """The subscription callback for requests that arrive on `nc` (answered on it too)."""

        async def on_message(msg: Msg) -> None:
            size = len(msg.data)
            if self._held and self._held + size > HELD_BYTES_LIMIT:
                await self._busy(nc, msg)
            elif await self.pool.admit(self._admitted(nc, msg, size)):
                self._held += size
            else:
                await self._busy(nc, msg)

        return on_message

    async def _admitted(self, nc: NATS, msg: Msg, size: int) -> None:
        try:
            await self._serve(nc, msg)
        finally:
            self._held -= size

    async def subscribe(self, nc: NATS, subject: str, *, queue: str = "") -> Subscription:
        """Serve requests on `subject` (in queue group `queue`, if given), with this binding's
        bounded pending limits."""
        return await nc.subscribe(
            subject,
            queue=queue,
            cb=self.callback(nc),
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )

    async def _busy(self, nc: NATS, msg: Msg) -> None:
        """No room: say so at once, framed as the request's method expects."""
        if not msg.reply:
            return
        request_id, method = jsonrpc.request_head(msg.data)
        body = jsonrpc.busy_body(
            request_id, len(self.pool) + self.pool.waiting, BUSY_RETRY_AFTER_MS
        )
        await _answer_with(nc, msg.reply, dispatch.Answer(body, method, request_id))

    async def _serve(self, nc: NATS, msg: Msg) -> None:
        if not msg.reply:
            log.warning("A2A request on %s without a reply subject; dropped", msg.subject)
            return
        headers = msg.headers or {}
        ticker = None
        interval = _progress_interval(headers)
        if interval is not None:
            ticker = asyncio.create_task(_send_progress(nc, msg.reply, interval))
        try:
            await self._answer(nc, msg, headers)
        except Exception:  # the dispatch maps errors itself; this is a last line of defence
            log.exception("A2A over NATS failed")
            await _publish(nc, msg.reply, _INTERNAL_BODY, None)
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _answer(self, nc: NATS, msg: Msg, headers: Mapping[str, str]) -> None:
        reply: dispatch.Reply
        user = dispatch.authenticate(self.auth, _header(headers, subjects.H_AUTHORIZATION))
        if isinstance(user, dispatch.Answer):
            # Refused: the handler never sees it. The method only says how to frame the refusal
            # (a stream's caller waits for frames).
            reply = dataclasses.replace(user, method=jsonrpc.request_method(msg.data))
        else:
            reply = await dispatch.respond(
                self.handler,
                msg.data,
                content_type=_header(headers, subjects.H_CONTENT_TYPE),
                context=dispatch.call_context(headers, user=user),
                lean=self.lean,
            )
        if isinstance(reply, dispatch.Stream):
            await _stream(nc, msg.reply, reply)
        else:
            await _answer_with(nc, msg.reply, reply)


async def _answer_with(nc: NATS, reply: str, answer: dispatch.Answer) -> None:
    """One answer, as its method's caller waits for it."""
    if answer.method in jsonrpc.STREAMING_METHODS:
        # A stream that fails before its first event: one error frame, then end.
        await _publish(nc, reply, answer.body, subjects.STREAM_FRAME, answer.request_id)
        await _publish(nc, reply, b"", subjects.STREAM_END)
    else:
        await _publish(nc, reply, answer.body, None, answer.request_id)


async def _publish(
    nc: NATS,
    reply: str,
    body: bytes,
    stream: str | None,
    request_id: dispatch.RequestId = None,
) -> bool:
    headers = {subjects.H_STREAM: stream} if stream else None
    limit = nc.max_payload
    if limit and len(body) > limit - _HEADROOM:
        # The answer cannot travel over this NATS connection: say so instead of going silent.
        body = jsonrpc.error_body(
            request_id,
            jsonrpc.INTERNAL_ERROR,
            f"the response ({len(body)} bytes) exceeds the NATS max_payload ({limit} bytes)",
        )
    try:
        await nc.publish(reply, body, headers=headers)
    except Exception as e:  # the caller may have gone (timeout); nothing to do
        log.debug("could not reply on %s: %s", reply, e)
        return False
    return True


async def _stream(nc: NATS, reply: str, stream: dispatch.Stream) -> None:
    """Send a stream's frames to `reply`, then `end`.

    The caller stops the stream early (as an HTTP client would by disconnecting) with a
    `Mesh-Stream: cancel` message on `<reply>.cancel`; the handler's event stream is then
    closed.
    """
    # The frames are read in this task; a caller's cancel interrupts it, and is told apart
    # from a shutdown by `by_caller`.
    me = asyncio.current_task()
    by_caller = False
    done = False

    async def on_cancel(_: Msg) -> None:
        nonlocal by_caller
        if not done and me is not None:
            by_caller = True
            me.cancel()

    cancel_sub = None
    try:
        # Subscribed before the first frame goes out, so a caller that cancels right after
        # it cannot be missed (one connection's SUB and PUBs reach the server in order).
        cancel_sub = await nc.subscribe(
            f"{reply}.{subjects.STREAM_CANCEL}", cb=on_cancel, max_msgs=1
        )
    except Exception as e:  # without it the stream still ends when the task does
        log.debug("no cancel subscription for %s: %s", reply, e)
    frames = stream.frames
    try:
        async for frame in frames:
            sent = await _publish(
                nc, reply, frame.data.encode(), subjects.STREAM_FRAME, stream.request_id
            )
            if not sent:
                break  # the connection is gone: stop working for nobody
    except asyncio.CancelledError:
        if not by_caller or me is None or me.cancelling() > 1:
            raise  # we are being shut down, not cancelled by the caller
        me.uncancel()
    except Exception:  # the dispatch frames errors itself; this is a last line of defence
        log.exception("A2A stream over NATS failed")
        failed = jsonrpc.error_body(stream.request_id, jsonrpc.INTERNAL_ERROR, "stream failed")
        await _publish(nc, reply, failed, subjects.STREAM_FRAME)
    finally:
        done = True
        with contextlib.suppress(Exception):
            await frames.aclose()
        if cancel_sub is not None:
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
    await _publish(nc, reply, b"", subjects.STREAM_END)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return str(value)
    return None


def _progress_interval(headers: Mapping[str, str]) -> float | None:
    try:
        value = float(headers[subjects.H_PROGRESS])
    except (KeyError, ValueError):
        return None
    return min(60.0, max(0.05, value))


async def _send_progress(nc: NATS, reply: str, interval: float) -> None:
    """The binding's keep-alive: while the request is being worked on, an empty message with
    `Mesh-Status: working` goes to the reply subject every `interval` seconds. A hung or
    paused process sends none, so the caller can tell slow-but-working from gone."""
    while True:
        await asyncio.sleep(interval)
        try:
            await nc.publish(reply, b"", headers={subjects.H_STATUS: subjects.STATUS_WORKING})
        except Exception:  # the caller's inbox is gone: it stopped waiting
            return
