"""`python -m bench.hotpath`: each of the fast path's hot-path changes (issue 14), before vs after.

One process, timeit (best of 5 repeats), µs per call. Not part of `python -m bench`: unlike the
benchmarks it reaches into private names, because each "before" is the replaced code rebuilt from
the parts the new code kept (and checked to give what the "after" gives where it can).
"""

from __future__ import annotations

import json
import time
import timeit
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
from a2a.helpers import get_data_parts
from a2a.types import SendMessageRequest
from google.protobuf.json_format import ParseDict
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.a2a.handler import MeshRequestHandler
from mesh.a2a.lean import Answerer, LeanSend
from mesh.a2a.wire import _timestamp
from mesh.registry import Registration, Registry, RegistryView

PAYLOAD = json.loads(
    (Path(__file__).parent.parent / "agents/samples/release_clean.json").read_text()
)


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def request_rows() -> tuple[str, float, float]:
    params = {
        "message": {
            "role": "ROLE_USER",
            "messageId": "m-1",
            "contextId": "c-1",
            "metadata": {"tenant": "acme", "eventId": "ev-1", "skill": "s"},
            "parts": [{"data": PAYLOAD, "mediaType": "application/json"}],
        }
    }

    class Handler:
        validates_input_modes = False

    class Immediate:
        def immediate(self, metadata: Mapping[str, Any]) -> bool:
            return True

    lean = LeanSend(cast("MeshRequestHandler", Handler()), cast("Answerer", Immediate()))

    def before() -> Any:
        parsed = ParseDict(params, SendMessageRequest(), ignore_unknown_fields=True)
        return get_data_parts(parsed.message.parts)[0], dict(parsed.message.metadata)

    def after() -> Any:
        request = lean.parse(params)
        assert request is not None
        view = request.view("t", "c")
        return view.data, view.metadata

    assert before()[0] == after()[0]
    return "request → the handler's data (3.3 KiB release payload)", *(
        per_call_us(f, 200) for f in (before, after)
    )


def timestamp_rows() -> list[tuple[str, float, float]]:
    stamp = "2026-11-30T23:19:17.123456Z"

    def read_before() -> float:
        ts = Timestamp()
        ts.FromJsonString(stamp)
        return float(ts.ToDatetime(tzinfo=UTC).timestamp())

    assert read_before() == _timestamp(stamp)

    def stamp_before() -> None:
        Timestamp().FromDatetime(datetime.now(UTC))

    def stamp_after() -> None:
        ts = Timestamp()
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        ts.seconds = seconds
        ts.nanos = micros * 1000

    return [
        (
            "the reply's status time (client)",
            *(per_call_us(f, 5000) for f in (read_before, lambda: _timestamp(stamp))),
        ),
        (
            "the task's timestamp (agent)",
            *(per_call_us(f, 5000) for f in (stamp_before, stamp_after)),
        ),
    ]


def store_row() -> tuple[str, float, float]:
    history = [{"messageId": "m", "role": "ROLE_USER", "parts": [{"data": PAYLOAD}]}]
    task = {"id": "t", "contextId": "c", "status": {"state": "COMPLETED"}, "history": history}
    doc = {"owner": "acme/agent:x", "prev": 0, "task": task}
    encoder = msgspec.json.Encoder()
    assert json.loads(encoder.encode(doc)) == doc
    return "task-store record encode (history with the payload)", *(
        per_call_us(f, 2000)
        for f in (
            lambda: json.dumps(doc, separators=(",", ":")).encode(),
            lambda: encoder.encode(doc),
        )
    )


def registry_row() -> tuple[str, float, float]:
    nc = SimpleNamespace(is_connected=True)
    fake = SimpleNamespace(heartbeat_s=1.0, bus=SimpleNamespace(nc=nc), verifier=None)
    view = RegistryView(cast("Registry", fake))
    now = time.time()
    for a in range(50):
        for i in range(4):
            reg = Registration(
                agent=f"agent-{a}", instance=str(i), card={}, skills=["s"], seen_at=now, ttl_s=30.0
            )
            view._keep(reg.key, reg)

    def scan() -> list[Registration]:  # what `instances` did before: every entry per route
        as_of = view._as_of()
        return [
            r for r in view._entries.values() if r.agent == "agent-7" and view._usable(r, as_of)
        ]

    assert scan() == view.instances("agent-7")
    return "RegistryView.instances, 200 entries (50 agents, 4 each)", *(
        per_call_us(f, 2000) for f in (scan, lambda: view.instances("agent-7"))
    )


def main() -> None:
    rows = [request_rows(), *timestamp_rows(), store_row(), registry_row()]
    print("| change | before µs | after µs |\n|---|---|---|")
    for name, before, after in rows:
        print(f"| {name} | {before:,.1f} | {after:,.1f} |")


if __name__ == "__main__":
    main()
