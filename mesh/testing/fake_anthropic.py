"""A local stand-in for the Anthropic Messages API, served over real HTTP on 127.0.0.1.

In a test, the real `anthropic` SDK talks to it exactly as it would to the API:

    async with FakeAnthropic(lambda req: {"vote": "reject", "reasons": ["no tests"]}) as fake:
        client = anthropic.AsyncAnthropic(api_key="test", base_url=fake.base_url)
        ...
        fake.requests[0]["tools"][0]["input_schema"]     # what the SDK sent

The responder gets each request's JSON body and returns either the *input of the tool call* to
answer with (the tool is the one `tool_choice` names, else the first tool), or a full Messages
API response when the returned dict has `"type": "message"` (see `text_message`). To answer with
an HTTP error, construct with `status=529` (every request fails) or raise `FakeHTTPError` from the
responder (e.g. only for the first call). Error responses carry `retry-after-ms: 1` so the SDK's
own retries do not slow tests down.

As a process, for end-to-end tests that point agents at it through `ANTHROPIC_BASE_URL`:

    python -m mesh.testing.fake_anthropic --port 8765 [--vote reject --reason "scripted"]
    python -m mesh.testing.fake_anthropic --port 0 --port-file /tmp/fake.port
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mesh._internal.lifecycle import AsyncService

log = logging.getLogger(__name__)

Responder = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]

DEFAULT_TOOL_INPUT: dict[str, Any] = {"vote": "approve", "reasons": ["scripted"]}

# Error `type` values the real API uses for each status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

_ids = itertools.count(1)


class FakeHTTPError(Exception):
    """Raise from a responder to answer with an API error of this status."""

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message or f"fake error {status}"
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")
        self.headers = dict(headers or {})


def default_responder(request: dict[str, Any]) -> dict[str, Any]:
    """Approve with a scripted reason, whatever the request."""
    return dict(DEFAULT_TOOL_INPUT)


def requested_tool(request: dict[str, Any]) -> str | None:
    """The tool the request forces (`tool_choice`), else its first tool, else None."""
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and choice.get("name"):
        return str(choice["name"])
    tools = request.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict) and tools[0].get("name"):
        return str(tools[0]["name"])
    return None


def _estimate_tokens(obj: Any) -> int:
    # Roughly four characters per token: deterministic and non-zero, so usage is testable.
    return max(1, len(json.dumps(obj, separators=(",", ":"))) // 4)


def tool_use_message(
    request: dict[str, Any], tool_input: dict[str, Any], *, tool_name: str | None = None
) -> dict[str, Any]:
    """A Messages API response whose only content is one call of the requested tool."""
    name = tool_name or requested_tool(request) or "submit_verdict"
    return tool_calls_message(request, [(name, tool_input)])


def tool_calls_message(
    request: dict[str, Any], calls: list[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """A Messages API response calling each (tool name, input) of `calls`, in order: a model
    that uses the agent's tools before it answers (`turns` scripts the conversation)."""
    n = next(_ids)
    return {
        "id": f"msg_fake_{n:020d}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "fake"),
        "content": [
            {"type": "tool_use", "id": f"toolu_fake_{n:020d}_{i}", "name": name, "input": args}
            for i, (name, args) in enumerate(calls)
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": _estimate_tokens(request.get("messages", []))
            + _estimate_tokens(request.get("system", ""))
            + _estimate_tokens(request.get("tools", [])),
            "output_tokens": _estimate_tokens([args for _, args in calls]),
        },
    }


def turns(*answers: dict[str, Any] | Responder) -> Responder:
    """A responder for a conversation: the i-th request gets the i-th answer (the last one
    repeats). An answer is what a responder returns (the forced tool's input, or a whole
    message such as `tool_calls_message`'s) or a responder itself.

        FakeAnthropic(turns(
            lambda req: tool_calls_message(req, [("lookup_formulary", {"drug": "x"})]),
            {"vote": "approve", "reasons": ["in the formulary"]},
        ))
    """
    if not answers:
        raise ValueError("turns() needs at least one answer")
    count = itertools.count()

    def respond(request: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        answer = answers[min(next(count), len(answers) - 1)]
        return answer(request) if callable(answer) else dict(answer)

    return respond


def text_message(request: dict[str, Any], text: str) -> dict[str, Any]:
    """A Messages API response with text only (a model that ignored the tool)."""
    n = next(_ids)
    return {
        "id": f"msg_fake_{n:020d}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "fake"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": _estimate_tokens(request),
            "output_tokens": _estimate_tokens(text),
        },
    }


def _error(err: FakeHTTPError) -> JSONResponse:
    body = {"type": "error", "error": {"type": err.error_type, "message": err.message}}
    headers = {"retry-after-ms": "1", "request-id": f"req_fake_{next(_ids):020d}", **err.headers}
    return JSONResponse(body, status_code=err.status, headers=headers)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: inside a test or agent, the host process owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class FakeAnthropic(AsyncService):
    """An Anthropic-compatible `/v1/messages` endpoint on a free local port (async context)."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        status: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.status = status
        self.host = host
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.responses: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"])])
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _messages(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(FakeHTTPError(400, "body is not JSON"))
        if not isinstance(body, dict):
            return _error(FakeHTTPError(400, "body must be a JSON object"))
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        try:
            if self.status is not None:
                raise FakeHTTPError(self.status)
            if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
                raise FakeHTTPError(401, "an x-api-key or authorization header is required")
            missing = [k for k in ("model", "max_tokens", "messages") if k not in body]
            if missing:
                raise FakeHTTPError(400, f"missing required field(s): {', '.join(missing)}")
            answer = self.responder(body)
            if inspect.isawaitable(answer):
                answer = await answer
        except FakeHTTPError as e:
            return _error(e)
        response = answer if answer.get("type") == "message" else tool_use_message(body, answer)
        self.responses.append(response)
        return JSONResponse(response, headers={"request-id": f"req_fake_{next(_ids):020d}"})

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve())
        for _ in range(1000):  # bounded wait for the socket (≤ 5 s)
            if server.started or task.done():
                break
            await asyncio.sleep(0.005)
        if not server.started:
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await task
            raise RuntimeError(f"fake Anthropic API could not listen on {self.host}:{self.port}")
        self._server, self._task = server, task
        self.port = server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._task, timeout=5)
        self._server = self._task = None


def scripted(tool_input: dict[str, Any]) -> Responder:
    """A responder that always answers with `tool_input`."""

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        return dict(tool_input)

    return respond


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a test polling for the file never reads it half-written.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    responder = scripted({"vote": args.vote, "reasons": args.reason or ["scripted"]})
    async with FakeAnthropic(responder, status=args.status, host=args.host, port=args.port) as fake:
        if args.port_file:
            await asyncio.to_thread(_write_port_file, Path(args.port_file), fake.port)
        log.info("fake Anthropic API listening on %s", fake.base_url)
        await stop.wait()
    log.info("fake Anthropic API stopped after %d request(s)", len(fake.requests))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.testing.fake_anthropic",
        description="Serve a fake Anthropic Messages API that answers with a scripted tool call.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--vote", default="approve", choices=["approve", "reject", "abstain"])
    parser.add_argument("--reason", action="append", help="a scripted reason (repeatable)")
    parser.add_argument("--status", type=int, help="answer every request with this HTTP error")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
