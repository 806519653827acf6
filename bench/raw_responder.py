"""`python -m bench.raw_responder`: the floor — plain nats-py request/reply, no A2A at all.

Subscribes to `$BENCH_RAW_SUBJECT` (default `bench.raw`) and answers every request with the
canned bytes in `$BENCH_REPLY_FILE` (the benchmark puts there a real SendMessage result from
the A2A agent, so both answer the same number of bytes). Runs until it is terminated (SIGTERM's
default action: there is nothing to drain). The benchmark knows it is ready when it answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import nats
from nats.aio.msg import Msg

_CANNED = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "x", "blob": "x" * 900}}}
).encode()


async def _serve(canned: bytes) -> None:
    # Authenticated as the mesh's processes are (this process's identity, its own inboxes): a
    # cost at connect time only, so the floor stays plain request/reply.
    from mesh.bus import connect_options
    from mesh.identity import resolve_identity
    from mesh.settings import get_settings

    settings = get_settings()
    servers = settings.nats_servers()
    auth = connect_options(settings, resolve_identity(settings), servers)
    nc = await nats.connect(servers, name="bench-raw-responder", **auth)

    async def on_request(msg: Msg) -> None:
        await nc.publish(msg.reply, canned)

    await nc.subscribe(os.environ.get("BENCH_RAW_SUBJECT", "bench.raw"), cb=on_request)
    await asyncio.Event().wait()


if __name__ == "__main__":
    reply_file = os.environ.get("BENCH_REPLY_FILE")
    asyncio.run(_serve(Path(reply_file).read_bytes() if reply_file else _CANNED))
