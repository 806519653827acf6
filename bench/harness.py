"""A whole mesh for the decision benchmarks: nats-server, a coordinator and voters as OS processes
(`tests.support.launcher.ProcessMesh`), an open-loop event publisher, and a listener that
matches every decision to its event.

Voters are the test voting agent (`tests.support.voter`) named `bench-voter-<i>` with skill
`bench-vote-<i>`; event type `bench.v<k>` is decided by voters 1..k (rule majority,
agent_timeout_s 5, deadline_s 10). Event type `bench.real` is decided by the three real reviewer
agents (`agents.*_review`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bench.common import Proc, note, pct
from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.dev.launcher import Child
from mesh.records import decision_decoder
from mesh.server import EmbeddedServer
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.waits import all_alive

VOTER_COUNTS_MAX = 16
LEAN = "security-review-lean"  # security-review without the anthropic import (bench/agent_lean.py)


def voter_name(i: int) -> str:
    return f"bench-voter-{i}"


def voter_skill(i: int) -> str:
    return f"bench-vote-{i}"


def policies(counts: list[int]) -> dict[str, dict[str, Any]]:
    """`bench.v<k>` for each k in `counts` (voters 1..k), and `bench.real` (the reviewers)."""

    def majority(event_type: str, skills: list[str]) -> dict[str, Any]:
        return samples.policy(
            skills,
            rule={"kind": "majority"},
            agent_timeout_s=5.0,
            deadline_s=10.0,
            decision_type=f"{event_type}.decided",
        )

    out = {}
    for k in counts:
        out[f"bench.v{k}"] = majority(f"bench.v{k}", [voter_skill(i) for i in range(1, k + 1)])
    out["bench.real"] = majority("bench.real", samples.REVIEWER_SKILLS)
    return out


@dataclass
class Step:
    """One load step: what was offered, what came back, and what it cost."""

    label: str
    offered: float
    seconds: float
    published: int = 0
    publish_errors: int = 0
    publish_s: float = 0.0
    decided: int = 0
    steady_rate: float = 0.0  # decisions/s over the second half of the publish window
    drained: bool = False
    lat_ms: list[float] = field(default_factory=list)  # wall clock, publish → decision received
    coord_ms: list[float] = field(default_factory=list)  # the decision's own latency_ms
    outcomes: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # process group → CPU seconds
    voters: int = 0
    closed: bool = False  # closed loop: `offered` is the rate reached, not a schedule
    recv_times: list[float] = field(default_factory=list)

    @property
    def published_rate(self) -> float:
        return self.published / self.publish_s if self.publish_s else 0.0

    @property
    def sustainable(self) -> bool:
        """Everything decided within the drain bound, no backlog building (p99 under a second),
        and ≥ 85 % of the offered rate decided per second in the window's second half (that
        last check only when the half holds enough events to mean something)."""
        if self.closed:
            return self.publish_errors == 0
        few = self.offered * self.seconds / 2 < 20
        steady_ok = few or self.steady_rate >= 0.85 * self.offered
        return self.drained and steady_ok and self.p(99) < 1000

    def p(self, q: float) -> float:
        return pct(sorted(self.lat_ms), q)

    def coord_p(self, q: float) -> float:
        return pct(sorted(self.coord_ms), q)

    def cpu_ms_per_decision(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / self.decided * 1000 if self.decided else math.nan

    def not_approved(self) -> int:
        return sum(n for o, n in self.outcomes.items() if o != "approved")


class BenchMesh:
    """Owns every process it starts; `close()` stops them (by pid) and the server."""

    def __init__(self, work: Path, *, voter_counts: list[int], settle_s: float = 60.0) -> None:
        self.work = work
        self.voter_counts = voter_counts
        self.settle_s = settle_s  # the bound of `settle` (a smoke run keeps it short)
        self.server: EmbeddedServer | None = None
        self.bus: Bus | None = None
        self.procs: ProcessMesh | None = None
        self.coordinator: Child | None = None
        self.voters: dict[int, Child] = {}
        self.reviewers: dict[str, Child] = {}
        self.recv: dict[str, tuple[float, str, float]] = {}  # event id → (t, outcome, latency)
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self.run_id = secrets.token_hex(3)
        self._seq = 0

    # -- life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.server = EmbeddedServer(store_dir=self.work / "js").start()
        self.bus = await Bus.connect(self.server.url, name="bench-decisions")
        await self.bus.ensure()
        await self.bus.nc.subscribe(f"{subjects.DECISIONS_ROOT}.>", cb=self._on_decision)
        # The product's own clocks: nothing here waits on liveness.
        self.procs = ProcessMesh(self.server.url, self.work, server=self.server)
        policy = self.procs.policy(policies(self.voter_counts))
        self.coordinator = self.procs.coordinator(policy, name="coordinator")

    async def close(self) -> None:
        if self.procs is not None:
            self.procs.stop()
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self.server is not None:
            self.server.stop()

    @property
    def nats(self) -> Proc:
        assert self.server is not None
        return Proc(self.server.pid or 0, "nats-server")

    @property
    def coord(self) -> Proc:
        assert self.coordinator is not None
        return Proc(self.coordinator.proc.pid, "coordinator")

    def voter_procs(self) -> list[Proc]:
        return [Proc(c.proc.pid, voter_name(i)) for i, c in self.voters.items()] + [
            Proc(c.proc.pid, name) for name, c in self.reviewers.items()
        ]

    def cpu_snapshot(self) -> dict[str, float]:
        return {
            "coordinator": self.coord.cpu_s(),
            "voters": sum(p.cpu_s() for p in self.voter_procs()),
            "nats-server": self.nats.cpu_s(),
            "bench (publisher)": time.process_time(),
        }

    def _alive(self) -> None:
        assert self.coordinator is not None
        all_alive(self.coordinator, *self.voters.values(), *self.reviewers.values())()

    async def _wait_registered(self, names: list[str], children: list[Child]) -> None:
        assert self.procs is not None and self.bus is not None
        pids = [c.proc.pid for c in children]
        await self.procs.wait_agents(self.bus, names, pids=pids, timeout=90, alive=self._alive)

    # -- voters ---------------------------------------------------------------------------------
    async def ensure_voters(self, k: int) -> None:
        """Voters 1..k running and registered (others stay as they are)."""
        assert self.procs is not None
        for i in range(1, k + 1):
            if i not in self.voters:
                self.voters[i] = self.procs.voter(voter_name(i), voter_skill(i))
        wanted = range(1, k + 1)
        names = [voter_name(i) for i in wanted]
        await self._wait_registered(names, [self.voters[i] for i in wanted])

    def stop_voters(self) -> None:
        assert self.procs is not None
        for child in self.voters.values():
            self.procs.stop_child(child)
        self.voters.clear()

    async def start_reviewers(self, *, lean: bool = False) -> None:
        """The three real reviewers; `lean` adds an idle `bench.agent_lean` (security-review
        without the anthropic import) for the memory what-if."""
        assert self.procs is not None
        for name in samples.REVIEWERS:
            self.reviewers[name] = self.procs.reviewer(name, "bench")
        if lean:  # a second instance of security-review
            self.reviewers[LEAN] = self.procs.spawn(LEAN, "bench.agent_lean")
        await self._wait_registered(list(samples.REVIEWERS), list(self.reviewers.values()))

    async def ready(self, event_type: str, data: Any, timeout: float = 60.0) -> None:
        """One event decided end to end (the coordinator sees the voters and is consuming)."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            self._alive()
            eid = self._next_id("probe")
            waiter: asyncio.Future[float] = loop.create_future()
            self._waiters[eid] = waiter
            await self._publish(event_type, data, eid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    waiter, timeout=max(0.1, min(5.0, deadline - time.monotonic()))
                )
            self._waiters.pop(eid, None)
            if eid in self.recv and self.recv[eid][1] == "approved":
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"no approved decision for {event_type} within {timeout:.0f}s")

    # -- traffic --------------------------------------------------------------------------------
    def _next_id(self, tag: str) -> str:
        self._seq += 1
        return f"b{self.run_id}-{tag}-{self._seq}"

    async def _publish(self, event_type: str, data: Any, eid: str) -> None:
        assert self.bus is not None
        event = envelope.new_event(event_type, data, event_id=eid, source="mesh://bench")
        await self.bus.publish_event(event)

    def _on_decision_sync(self, data: bytes) -> None:
        now = time.perf_counter()
        try:
            d = decision_decoder.decode(data)
        except Exception:
            return
        self.recv.setdefault(d.event_id, (now, d.outcome, d.latency_ms))
        waiter = self._waiters.pop(d.event_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    async def _on_decision(self, msg: Msg) -> None:
        self._on_decision_sync(msg.data)

    async def offer(
        self,
        label: str,
        event_type: str,
        data: Any,
        *,
        rate: float,
        seconds: float,
        drain_s: float,
        max_outstanding: int = 2000,
    ) -> Step:
        """Publish `rate`/s for `seconds` (open loop: on a fixed schedule, not waiting for
        decisions), then wait up to `drain_s` for every decision; purge what is left."""
        await self.settle()
        step = Step(label, rate, seconds)
        n = max(1, int(rate * seconds))
        sent: dict[str, float] = {}
        slots = asyncio.Semaphore(max_outstanding)
        pending: set[asyncio.Task[None]] = set()
        cpu0 = self.cpu_snapshot()
        t0 = time.perf_counter()
        give_up = t0 + seconds * 1.5 + 2

        async def publish(eid: str) -> None:
            try:
                await self._publish(event_type, data, eid)
            except Exception:
                step.publish_errors += 1
                sent.pop(eid, None)
            finally:
                slots.release()

        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() > give_up:
                break  # the publisher itself cannot keep up: stop offering
            eid = self._next_id(label)
            await slots.acquire()
            sent[eid] = time.perf_counter()
            task = asyncio.create_task(publish(eid))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
        t_end = time.perf_counter()
        step.publish_s = max(1e-6, t_end - t0)
        step.published = len(sent)
        drain_until = time.monotonic() + drain_s
        while time.monotonic() < drain_until:
            if all(e in self.recv for e in sent):
                step.drained = True
                break
            await asyncio.sleep(0.05)
        if not step.drained:
            await self.purge()
        await self.settle()  # the step's leftovers (retries, in-flight work) are billed to it
        cpu1 = self.cpu_snapshot()
        step.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        self._tally(step, sent, t0, seconds)
        return step

    def _tally(self, step: Step, sent: dict[str, float], t0: float, seconds: float) -> None:
        half = t0 + seconds / 2
        window_end = t0 + seconds
        steady = 0
        for eid, t_pub in sent.items():
            got = self.recv.get(eid)
            if got is None:
                continue
            t_recv, outcome, latency = got
            step.decided += 1
            step.lat_ms.append((t_recv - t_pub) * 1000)
            step.coord_ms.append(latency)
            step.outcomes[outcome] += 1
            if half <= t_recv <= window_end:
                steady += 1
        step.steady_rate = steady / (window_end - half)

    async def purge(self) -> None:
        """Drop the backlog of events not yet decided, then wait until decisions stop coming."""
        assert self.bus is not None
        note("backlog left: purging the events stream and waiting for in-flight work to end")
        with contextlib.suppress(Exception):
            await self.bus.js.purge_stream(subjects.EVENTS_STREAM)
        deadline = time.monotonic() + 30
        last = len(self.recv)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if len(self.recv) != last:
                last = len(self.recv)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 2.0:
                return

    async def settle(self, timeout: float | None = None, idle_share: float = 0.05) -> float:
        """Wait until the coordinator and voters are idle (< `idle_share` of a core each over
        0.5 s): a step that left work behind (audit retries, in-flight events) must not bill
        the next one. Returns the seconds waited (bounded by `timeout`)."""
        timeout = self.settle_s if timeout is None else timeout
        start = time.monotonic()
        procs = [self.coord, *self.voter_procs()]
        before = [p.cpu_s() for p in procs]
        while time.monotonic() - start < timeout:
            await asyncio.sleep(0.5)
            after = [p.cpu_s() for p in procs]
            busy = max((a - b) / 0.5 for a, b in zip(after, before, strict=True))
            before = after
            if busy < idle_share:
                break
        return time.monotonic() - start

    async def closed_loop(
        self,
        label: str,
        event_type: str,
        data: Any,
        *,
        window: int,
        seconds: float,
        max_events: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Step:
        """`window` events in flight at all times (a new one as each is decided) for `seconds`
        (or until `max_events` are published): the throughput the mesh reaches without a backlog
        building up. `progress(decided)` is called after each decision."""
        await self.settle()
        step = Step(label, 0.0, seconds)
        loop = asyncio.get_running_loop()
        cpu0 = self.cpu_snapshot()
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        half = t0 + seconds / 2
        steady = 0

        async def worker() -> None:
            nonlocal steady
            while time.perf_counter() < stop_at:
                if max_events is not None and step.published + step.publish_errors >= max_events:
                    break
                eid = self._next_id(label)
                waiter: asyncio.Future[float] = loop.create_future()
                self._waiters[eid] = waiter
                t_pub = time.perf_counter()
                try:
                    await self._publish(event_type, data, eid)
                    step.published += 1
                    t_recv = await asyncio.wait_for(waiter, timeout=30)
                except Exception:
                    self._waiters.pop(eid, None)
                    step.publish_errors += 1
                    continue
                _, outcome, latency = self.recv[eid]
                step.decided += 1
                step.lat_ms.append((t_recv - t_pub) * 1000)
                step.coord_ms.append(latency)
                step.outcomes[outcome] += 1
                step.recv_times.append(t_recv)
                if half <= t_recv <= stop_at:
                    steady += 1
                if progress is not None:
                    progress(step.decided)

        await asyncio.gather(*(worker() for _ in range(window)))
        step.publish_s = time.perf_counter() - t0
        if max_events is not None:
            stop_at = min(stop_at, t0 + step.publish_s)
            half = t0 + step.publish_s / 2
            steady = sum(1 for t in step.recv_times if half <= t <= stop_at)
        cpu1 = self.cpu_snapshot()
        step.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        step.steady_rate = steady / (stop_at - half)
        await self.settle()
        step.offered = step.decided / step.publish_s  # closed loop: what it reached
        step.drained = True
        step.closed = True
        return step
