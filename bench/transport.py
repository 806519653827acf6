"""Transport floor: one ~1 KiB A2A SendMessage to a trivial agent, three ways, in one run.

(a) raw nats-py request/reply to a responder process that answers canned bytes (the floor);
(b) A2A over NATS: `mesh.a2a.AgentClient.send_lean` (the coordinator's client: msgspec request
    and reply view, mesh/a2a/wire.py; the row "typed client" is `AgentClient.send`, a2a-sdk's
    protobuf objects, the client before) to the test voting agent (`tests.support.voter`:
    `Agent.main`, as shipped, its own process), which answers at once;
(c) A2A over HTTP: the same agent process's uvicorn endpoint, httpx keep-alive client,
    header `A2A-Version: 1.0` (and a minimal client, to show what httpx itself costs).

Three agent processes: `bench-echo` exactly as shipped (JetStream KV task store; blocking
SendMessage over NATS on the lean path, mesh/a2a/lean.py), `bench-echo-sdk` with
`MESH_A2A_LEAN=0` (every request through a2a-sdk's handler, as before the lean path), and
`bench-echo-mem` with `MESH_TASK_STORE=memory` — what the A2A stack costs without the KV writes.

Latency at concurrency 1 and throughput at concurrency 32 are measured in interleaved rounds
(every transport gets a slice of each round), so a neighbour's burst of load hits all of them
alike and the ratios hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from bench import profile
from bench.common import Proc, Sized, banner, fmt, md_table, note, num, pct
from mesh import subjects
from mesh.a2a import (
    AgentClient,
    OutgoingMessage,
    data_part,
    jsonrpc,
    task_of,
    task_state,
    user_message,
)
from mesh.bus import Bus
from mesh.dev.launcher import Child
from mesh.registry import Registry
from mesh.server import EmbeddedServer
from tests.support.launcher import ProcessMesh
from tests.support.waits import all_alive, eventually

RAW_SUBJECT = "bench.raw"
AGENT = "bench-echo"
AGENT_MEM = "bench-echo-mem"
AGENT_SDK = "bench-echo-sdk"
PAYLOAD = {"id": "bench-transport", "blob": "x" * 960}  # the data part: ~1 KiB of JSON


@dataclass
class Opts(Sized):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"n": 200, "latency_budget_s": 4, "throughput_s": 1.0, "warmup": 50},
        "smoke": {"n": 40, "latency_budget_s": 1, "throughput_s": 0.4, "rounds": 2, "warmup": 5},
    }
    profile: bool = False
    n: int = 2000  # calls at concurrency 1 (after warm-up), per transport
    latency_budget_s: float = 20.0  # per transport, at concurrency 1
    concurrency: int = 32
    throughput_s: float = 5.0  # per transport, at concurrency 32
    rounds: int = 4
    warmup: int = 200


@dataclass
class Stats:
    name: str
    label: str
    server: Proc
    lat_us: list[float] = field(default_factory=list)
    c1_calls: int = 0
    c1_errors: int = 0
    c1_server_cpu: float = 0.0
    c1_client_cpu: float = 0.0
    c1_wall: float = 0.0
    tp_ok: int = 0
    tp_errors: int = 0
    tp_wall: float = 0.0
    tp_server_cpu: float = 0.0
    tp_client_cpu: float = 0.0
    tp_nats_cpu: float = 0.0

    def p(self, q: float) -> float:
        return pct(sorted(self.lat_us), q)

    @property
    def rps(self) -> float:
        return self.tp_ok / self.tp_wall if self.tp_wall else float("nan")

    def server_us(self) -> float:
        return self.tp_server_cpu / self.tp_ok * 1e6 if self.tp_ok else float("nan")

    def client_us(self) -> float:
        return self.tp_client_cpu / self.tp_ok * 1e6 if self.tp_ok else float("nan")

    def nats_us(self) -> float:
        return self.tp_nats_cpu / self.tp_ok * 1e6 if self.tp_ok else float("nan")


Call = Callable[[], Awaitable[bool]]


async def _latency(call: Call, n: int, budget_s: float, st: Stats, nats: Proc) -> None:
    s0, c0, t0 = st.server.cpu_s(), time.process_time(), time.perf_counter()
    deadline = t0 + budget_s
    for _ in range(n):
        start = time.perf_counter_ns()
        try:
            ok = await call()
        except Exception:
            ok = False
        end = time.perf_counter_ns()
        st.c1_calls += 1
        if ok:
            st.lat_us.append((end - start) / 1000)
        else:
            st.c1_errors += 1
        if time.perf_counter() > deadline:
            break
    st.c1_wall += time.perf_counter() - t0
    st.c1_server_cpu += st.server.cpu_s() - s0
    st.c1_client_cpu += time.process_time() - c0


async def _throughput(call: Call, conc: int, seconds: float, st: Stats | None, nats: Proc) -> None:
    ok = errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal ok, errors
        while time.perf_counter() < stop_at:
            try:
                good = await call()
            except Exception:
                good = False
            if good:
                ok += 1
            else:
                errors += 1

    s0 = st.server.cpu_s() if st else 0.0
    n0, c0, t0 = nats.cpu_s(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    if st is None:
        return
    st.tp_wall += time.perf_counter() - t0
    st.tp_ok += ok
    st.tp_errors += errors
    st.tp_server_cpu += st.server.cpu_s() - s0
    st.tp_client_cpu += time.process_time() - c0
    st.tp_nats_cpu += nats.cpu_s() - n0


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client (one request per connection at a time, the request
    in one write). It shows what the server costs when the client costs next to nothing; httpx
    spends several ms of CPU per request here, which on 2 cores also slows the server."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        self.host, _, port = hostport.rpartition(":")
        self.port = int(port)
        self.head = "POST / HTTP/1.1\r\nHost: " + hostport + "\r\n"
        self.head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.all: list[asyncio.StreamWriter] = []

    async def post(self, body: bytes) -> tuple[int, bytes]:
        # A kept-alive connection the server closed meanwhile (uvicorn: 5 s idle) fails on
        # first use: drop it and go again on a fresh one, as any keep-alive client does.
        for attempt in range(2):
            fresh = not self.idle
            if fresh:
                conn = await asyncio.open_connection(self.host, self.port)
                self.all.append(conn[1])
            else:
                conn = self.idle.pop()
            try:
                return await self._exchange(conn, body)
            except (ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError):
                conn[1].close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], body: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        head = self.head + f"Content-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split(b" ", 2)[1])
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await reader.readexactly(length)
        self.idle.append(conn)
        return status, data

    async def aclose(self) -> None:
        for writer in self.all:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _completed(result: Any) -> bool:
    try:
        return bool(result["task"]["status"]["state"] == "TASK_STATE_COMPLETED")
    except (KeyError, TypeError):
        return False


async def run(opts: Opts) -> dict[str, Any]:
    banner("transport floor: raw NATS vs A2A over NATS vs A2A over HTTP")
    work = Path(tempfile.mkdtemp(prefix="mesh-bench-transport-"))
    note(f"work dir and child logs: {work}")
    # The product's own liveness clocks: nothing here waits on them.
    with (
        EmbeddedServer(store_dir=work / "js") as server,
        ProcessMesh(server.url, work, server=server) as procs,
    ):
        return await _run(opts, server, procs)


async def _start_agents(procs: ProcessMesh, bus: Bus) -> dict[str, tuple[int, str]]:
    """Both agents, started together (their imports are the slow part); name → (pid, HTTP
    URL), read from their registrations once they are live."""
    children = [
        procs.voter(AGENT, AGENT),
        procs.voter(AGENT_MEM, AGENT_MEM, env={"MESH_TASK_STORE": "memory"}),
        procs.voter(AGENT_SDK, AGENT_SDK, env={"MESH_A2A_LEAN": "0"}),
    ]
    pids = [c.proc.pid for c in children]
    await procs.wait_agents(
        bus, [AGENT, AGENT_MEM, AGENT_SDK], pids=pids, alive=all_alive(*children)
    )
    out = {}
    for r in await Registry(bus).live():
        if r.pid in pids:
            [url] = [
                i["url"]
                for i in r.card.get("supportedInterfaces", [])
                if i.get("protocolBinding") == "JSONRPC"
            ]
            out[r.agent] = (r.pid, str(url))
    return out


async def _start_raw(procs: ProcessMesh, bus: Bus, reply: bytes, probe: bytes) -> Child:
    """The floor's responder, answering exactly the bytes the A2A agent answered; ready once it
    answers a request."""
    reply_file = procs.work / "reply.json"
    reply_file.write_bytes(reply)
    child = procs.spawn(
        "raw",
        "bench.raw_responder",
        {"BENCH_REPLY_FILE": str(reply_file), "BENCH_RAW_SUBJECT": RAW_SUBJECT},
    )

    async def answers() -> bool:
        with contextlib.suppress(Exception):  # no responders yet, or a timeout while it starts
            return bool(await bus.nc.request(RAW_SUBJECT, probe, timeout=1))
        return False

    await eventually(answers, "the raw responder answers", timeout=60, alive=all_alive(child))
    return child


def _a2a_headers(bus: Bus) -> dict[str, str]:
    """Every A2A call carries the caller's bearer token; the raw floor carries it too, so both
    move the same bytes."""
    assert bus.identity is not None, "the bench runs as the operator of its identity folder"
    return {"A2A-Version": "1.0", subjects.H_AUTHORIZATION: f"Bearer {bus.identity.token}"}


def _nats_calls(client: AgentClient) -> tuple[Callable[[str], Call], Callable[[str], Call]]:
    """Calls to an agent over NATS: as the coordinator makes them, and with the typed client."""
    # The coordinator's way (coordinator/dispatch.py): the data part's JSON made once per
    # event (here: once, one payload), the message and the reply in msgspec
    # (`AgentClient.send_lean`, mesh/a2a/wire.py).
    part = data_part(PAYLOAD)

    def a2a_nats(agent: str) -> Call:
        async def call() -> bool:
            message = OutgoingMessage(message_id=str(uuid.uuid4()), role="ROLE_USER", parts=[part])
            sent = await client.send_lean(agent, message, timeout=5)
            return task_state(task_of(sent)) == "TASK_STATE_COMPLETED"

        return call

    def a2a_nats_typed(agent: str) -> Call:
        async def call() -> bool:
            sent = await client.send(agent, user_message(data=PAYLOAD), timeout=5)
            return task_state(task_of(sent)) == "TASK_STATE_COMPLETED"

        return call

    return a2a_nats, a2a_nats_typed


async def _run(opts: Opts, server: EmbeddedServer, procs: ProcessMesh) -> dict[str, Any]:
    nats = Proc(server.pid or 0, "nats-server")
    bus = await Bus.connect(server.url, name="bench-transport")
    await bus.ensure()  # as the operator, before any agent: no other identity may create them
    http = httpx.AsyncClient(
        timeout=10.0,
        limits=httpx.Limits(max_connections=opts.concurrency * 2, max_keepalive_connections=64),
    )
    raw_clients: list[RawHttp] = []
    try:
        agents = await _start_agents(procs, bus)
        client = AgentClient(bus)
        nc = bus.nc
        ids = itertools.count(1)
        probe = jsonrpc.request_body(
            "SendMessage", {"message": user_message(data=PAYLOAD)}, next(ids)
        )
        a2a_headers = _a2a_headers(bus)
        reply = await nc.request(subjects.a2a(AGENT), probe, timeout=10, headers=a2a_headers)
        result, error = jsonrpc.parse_response(reply.data)
        if error is not None or not _completed(result):
            raise RuntimeError(f"the bench agent did not complete a task: {reply.data[:400]!r}")
        raw_child = await _start_raw(procs, bus, reply.data, probe)
        note(
            f"request {len(probe)} B, reply {len(reply.data)} B; agent pid {agents[AGENT][0]} "
            f"(as shipped), {agents[AGENT_SDK][0]} (SDK path), "
            f"{agents[AGENT_MEM][0]} (memory store), "
            f"raw responder {raw_child.proc.pid}"
        )

        async def raw() -> bool:
            await nc.request(RAW_SUBJECT, probe, timeout=5, headers=a2a_headers)
            return True

        a2a_nats, a2a_nats_typed = _nats_calls(client)

        headers = {"Content-Type": "application/json", **a2a_headers}

        def a2a_http(url: str) -> Call:
            async def call() -> bool:
                body = jsonrpc.request_body(
                    "SendMessage", {"message": user_message(data=PAYLOAD)}, next(ids)
                )
                r = await http.post(url, content=body, headers=headers)
                res, err = jsonrpc.parse_response(r.content)
                return err is None and _completed(res)

            return call

        def a2a_rawhttp(url: str) -> Call:
            conn = RawHttp(url, headers)
            raw_clients.append(conn)

            async def call() -> bool:
                body = jsonrpc.request_body(
                    "SendMessage", {"message": user_message(data=PAYLOAD)}, next(ids)
                )
                status, data = await conn.post(body)
                res, err = jsonrpc.parse_response(data)
                return status == 200 and err is None and _completed(res)

            return call

        agent_proc, mem_proc, sdk_proc = (
            Proc(agents[a][0], a) for a in (AGENT, AGENT_MEM, AGENT_SDK)
        )
        url, mem_url = agents[AGENT][1], agents[AGENT_MEM][1]
        plan: list[tuple[Stats, Call]] = [
            (Stats("raw_nats", "raw nats-py request/reply (floor)", Proc(raw_child.proc.pid)), raw),
            (
                Stats("a2a_nats", "A2A over NATS (as shipped: lean path)", agent_proc),
                a2a_nats(AGENT),
            ),
            (
                Stats(
                    "a2a_nats_typed",
                    "A2A over NATS, typed client (AgentClient.send: protobuf)",
                    agent_proc,
                ),
                a2a_nats_typed(AGENT),
            ),
            (
                Stats("a2a_nats_sdk", "A2A over NATS, SDK path (MESH_A2A_LEAN=0)", sdk_proc),
                a2a_nats(AGENT_SDK),
            ),
            (Stats("a2a_http", "A2A over HTTP (as shipped)", agent_proc), a2a_http(url)),
            (
                Stats("a2a_http_rawclient", "A2A over HTTP, minimal client", agent_proc),
                a2a_rawhttp(url),
            ),
            (
                Stats("a2a_nats_mem", "A2A over NATS, memory task store", mem_proc),
                a2a_nats(AGENT_MEM),
            ),
            (
                Stats("a2a_http_mem", "A2A over HTTP, memory task store", mem_proc),
                a2a_http(mem_url),
            ),
        ]
        rss_line = await _measure_rss(opts, plan, nats, [agent_proc, mem_proc, sdk_proc])
        profiles_md, profiles = "", {}
        if opts.profile:
            profiles_md, profiles = await _profile(opts, plan, procs.work, nats)
    finally:
        await http.aclose()
        for conn in raw_clients:
            await conn.aclose()
        await bus.close()
    sizes = (len(probe), len(reply.data))
    return _report(opts, plan, rss_line, sizes, (profiles_md, profiles))


async def _measure_rss(
    opts: Opts, plan: list[tuple[Stats, Call]], nats: Proc, agent_procs: list[Proc]
) -> str:
    """`_measure`, plus each agent's RSS before and after (does memory grow per request?)."""
    agents = {a.pid: a for a in agent_procs}
    before = {pid: a.rss_mb() for pid, a in agents.items()}
    await _measure(opts, plan, nats)
    after = {pid: a.rss_mb() for pid, a in agents.items()}
    served = dict.fromkeys(agents, 0)
    for st, _ in plan:
        if st.server.pid in served:
            served[st.server.pid] += st.c1_calls + st.tp_ok + st.tp_errors
    line = "Agent RSS before → after the measured calls (warm-up excluded): " + "; ".join(
        f"{agents[pid].name} {before[pid]:.1f} → {after[pid]:.1f} MB over {served[pid]:,} "
        f"requests ({(after[pid] - before[pid]) * 1024 / max(1, served[pid]):.1f} KiB/request)"
        for pid in agents
    )
    note(line)
    return line


async def _measure(opts: Opts, plan: list[tuple[Stats, Call]], nats: Proc) -> None:
    note(f"warm-up: {opts.warmup} calls at c=1 and a burst at c={opts.concurrency} each")
    for st, call in plan:
        for _ in range(opts.warmup):
            if not await call():
                raise RuntimeError(f"{st.name}: warm-up call failed")
        await _throughput(call, opts.concurrency, 0.5 if opts.short else 1.0, None, nats)
    per_round = max(1, opts.n // opts.rounds)
    budget = opts.latency_budget_s / opts.rounds
    for r in range(opts.rounds):
        note(f"c=1 round {r + 1}/{opts.rounds}: {per_round} calls per transport")
        for st, call in plan:
            await _latency(call, per_round, budget, st, nats)
    slice_s = opts.throughput_s / opts.rounds
    for r in range(opts.rounds):
        note(f"c={opts.concurrency} round {r + 1}/{opts.rounds}: {slice_s:.2f} s per transport")
        for st, call in plan:
            await _throughput(call, opts.concurrency, slice_s, st, nats)


async def _profile(
    opts: Opts, plan: list[tuple[Stats, Call]], work: Path, nats: Proc
) -> tuple[str, dict[str, Any]]:
    if profile.py_spy() is None:
        note("py-spy not installed: no profile (pip install py-spy into .venv to get one)")
        return "", {}
    seconds = 3.0 if opts.short else 8.0
    parts: list[str] = []
    out: dict[str, Any] = {}
    wanted = {"a2a_nats", "a2a_nats_typed", "a2a_nats_sdk", "a2a_nats_mem", "a2a_http"}
    for st, call in plan:
        if st.name not in wanted:
            continue
        note(f"profiling the agent (pid {st.server.pid}) under {st.name} at c={opts.concurrency}")
        probe = Stats(st.name, st.label, st.server)
        path = work / f"profile-{st.name}.txt"
        recording = asyncio.create_task(profile.record(st.server.pid, seconds, path))
        await asyncio.sleep(0.3)  # py-spy attaches
        await _throughput(call, opts.concurrency, seconds - 0.5, probe, nats)
        with contextlib.suppress(Exception):
            if not await recording:
                continue
        summary = profile.summarise(path)
        cpu_us = probe.server_us()
        title = f"Agent process, {st.label}, per SendMessage"
        parts.append(profile.report(title, summary, cpu_us, "request"))
        out[st.name] = {
            "cpu_us_per_request": num(cpu_us, 0),
            "buckets": [(n, round(s, 4)) for n, s in summary.get("buckets", [])],
            "self": [(n, round(s, 4)) for n, s in summary.get("self", [])],
            "raw_stacks": str(path),
        }
    return "\n\n".join(parts), out


def _report(
    opts: Opts,
    plan: list[tuple[Stats, Call]],
    rss_line: str,
    sizes: tuple[int, int],
    profiled: tuple[str, dict[str, Any]],
) -> dict[str, Any]:
    """The table, the ratios and the results; `sizes` = (request, reply) bytes."""
    req_bytes, reply_bytes = sizes
    profiles_md, profiles = profiled
    by = {st.name: st for st, _ in plan}
    raw, nats_st, http_st = by["raw_nats"], by["a2a_nats"], by["a2a_http"]
    rows = []
    for st, _ in plan:
        rows.append(
            (
                st.label,
                len(st.lat_us),
                fmt(st.p(50)),
                fmt(st.p(99)),
                fmt(st.p(50) / raw.p(50), 2) + "x",
                fmt(st.rps),
                fmt(st.rps / http_st.rps, 2) + "x",
                fmt(st.server_us()),
                fmt(st.client_us()),
                fmt(st.nats_us()),
                st.c1_errors + st.tp_errors,
            )
        )
    table = md_table(
        [
            "transport",
            "n (c=1)",
            "p50 µs",
            "p99 µs",
            "p50 / raw",
            f"req/s c={opts.concurrency}",
            "rps / a2a HTTP",
            "server CPU µs/req",
            "client CPU µs/req",
            "nats-server CPU µs/req",
            "errors",
        ],
        rows,
    )
    ratio_p50 = nats_st.p(50) / raw.p(50)
    ratio_rps = nats_st.rps / http_st.rps
    md = "\n\n".join(
        [
            "## Transport floor",
            f"One SendMessage of {req_bytes} B (data part ~1 KiB) → reply {reply_bytes} B; "
            f"trivial `@agent.rules` handler in its own process; c=1: up to {opts.n} calls "
            f"(≤ {opts.latency_budget_s:.0f} s) per transport; c={opts.concurrency}: "
            f"{opts.throughput_s:.0f} s per transport; {opts.rounds} interleaved rounds. "
            "CPU columns from /proc over the c=32 phase (server = the responder/agent "
            "process; client = this benchmark process).",
            table,
            f"Ratios (as shipped): A2A-NATS p50 / raw p50 = **{ratio_p50:.2f}x**; "
            f"A2A-NATS rps / A2A-HTTP rps at c={opts.concurrency} = **{ratio_rps:.2f}x**. "
            "The agents serve HTTP with TCP_NODELAY (as shipped since the bench found the "
            "delayed-ACK stall): the minimal-client row shows what httpx itself costs.",
            rss_line + ".",
        ]
    )
    if profiles_md:
        md += "\n\n" + profiles_md
    results: dict[str, Any] = {}
    for st, _ in plan:
        results[f"{st.name}_p50_us"] = num(st.p(50))
        results[f"{st.name}_p99_us"] = num(st.p(99))
        results[f"{st.name}_rps_c{opts.concurrency}"] = num(st.rps)
        results[f"{st.name}_server_cpu_us_per_req"] = num(st.server_us())
        results[f"{st.name}_client_cpu_us_per_req"] = num(st.client_us())
        results[f"{st.name}_errors"] = st.c1_errors + st.tp_errors
    results["a2a_nats_over_raw_p50"] = num(ratio_p50, 2)
    results["a2a_nats_over_http_rps_c32"] = num(ratio_rps, 2)
    results["transport_request_bytes"] = req_bytes
    results["transport_reply_bytes"] = reply_bytes
    print("\n" + md, flush=True)
    return {"results": results, "markdown": md, "profiles": {"transport": profiles}}
