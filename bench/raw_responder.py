"""`python -m bench.raw_responder`: the floor — plain nats-py request/reply, no A2A at all.

Subscribes to `$BENCH_RAW_SUBJECT` (default `bench.raw`) and answers every request with the
canned bytes in `$BENCH_REPLY_FILE` (the benchmark puts there a real SendMessage result from
the A2A agent, so both answer the same number of bytes). Writes `$BENCH_READY_FILE` once
subscribed; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import nats

from bench.common import write_json

_CANNED = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "x", "blob": "x" * 900}}}
).encode()


def _canned() -> bytes:
    reply_file = os.environ.get("BENCH_REPLY_FILE")
    return Path(reply_file).read_bytes() if reply_file else _CANNED


async def _serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    canned = _canned()
    nc = await nats.connect(os.environ["MESH_NATS_URL"], name="bench-raw-responder")

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        await nc.publish(msg.reply, canned)

    await nc.subscribe(os.environ.get("BENCH_RAW_SUBJECT", "bench.raw"), cb=on_request)
    await nc.flush()
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        write_json(Path(ready), {"pid": os.getpid(), "bytes": len(canned)})
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(_serve())
