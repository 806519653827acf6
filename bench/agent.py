"""`python -m bench.agent`: the trivial agent the benchmarks call (its own OS process).

A typed `@agent.rules` handler that returns at once. Environment:

- `BENCH_AGENT_NAME` (default `bench-echo`): the agent's name; its card is
  `$MESH_CARDS_DIR/<name>.json` (the benchmark writes it, choosing the skill).
- `BENCH_HTTP` (default 1): also serve A2A JSON-RPC over HTTP (uvicorn, one worker).
- `BENCH_READY_FILE`: written once serving, `{"pid", "http_url", "subject"}`.
- `BENCH_ASYNC=1`: register an `async def` handler (default: a plain `def`, which the
  runtime runs in a worker thread).
- `BENCH_TCP_NODELAY=1`: set TCP_NODELAY on the HTTP listening socket (accepted sockets inherit
  it). `mesh.agent._bind` makes its socket with proto 0, so asyncio never turns Nagle off and
  every HTTP response (headers and body are two writes) waits ~40 ms for the client's delayed
  ACK. This bench-only patch shows what HTTP costs once that is fixed.
- `BENCH_PROFILE`: a path; run under cProfile and dump the stats there on SIGTERM/SIGINT.

Everything else (`MESH_NATS_URL`, `MESH_TASK_STORE`, …) is the mesh's usual settings.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import msgspec

from bench.common import write_json
from mesh import Agent, Verdict


class Payload(msgspec.Struct, forbid_unknown_fields=False):
    id: str = ""


agent = Agent(os.environ.get("BENCH_AGENT_NAME", "bench-echo"))


def review(p: Payload) -> Verdict:
    return Verdict(vote="approve", reasons=["ok"])


async def review_async(p: Payload) -> Verdict:
    return Verdict(vote="approve", reasons=["ok"])


# A sync handler runs in a worker thread (asyncio.to_thread); BENCH_ASYNC=1 registers the async
# twin instead, so the two costs can be told apart.
agent.rules(review_async if os.environ.get("BENCH_ASYNC", "0") == "1" else review)


def _nodelay_patch() -> None:
    import mesh.agent as runtime

    bind = runtime._bind

    def bind_nodelay(settings: Any) -> socket.socket:
        sock = bind(settings)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    runtime._bind = bind_nodelay


async def _serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = os.environ.get("BENCH_HTTP", "1") not in ("0", "false", "off")
    async with agent.serve(http=http) as running:
        ready = os.environ.get("BENCH_READY_FILE")
        if ready:
            doc = {"pid": os.getpid(), "http_url": running.http_url, "subject": running.subject}
            write_json(Path(ready), doc)
        await stop.wait()


def main() -> None:
    from mesh._internal.logs import configure

    configure()
    if os.environ.get("BENCH_TCP_NODELAY") == "1":
        _nodelay_patch()
    profile = os.environ.get("BENCH_PROFILE")
    if not profile:
        asyncio.run(_serve())
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        asyncio.run(_serve())
    finally:
        prof.disable()
        prof.dump_stats(profile)


if __name__ == "__main__":
    main()
