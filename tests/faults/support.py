"""Helpers for the fault tests: processes, policies, publishing, and reading every outcome.

Plain functions and small classes (fixtures live in conftest.py). Every wait is a poll with a
deadline; a deadline that passes is a failure with the state at that moment, never a timing
assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, NotFoundError

from coordinator.ledger import state_key
from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.dev.launcher import Child, Topology
from mesh.records import DeadLetter, Decision, dead_letter_decoder, decision_decoder
from mesh.registry import Registry
from mesh.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "agents" / "samples"

HEARTBEAT_S = 0.5
CARD_TTL_S = 3.0

REVIEWERS = {
    "security-review": "agents.security_review",
    "compliance-review": "agents.compliance_review",
    "quality-review": "agents.quality_review",
}
REVIEWER_SKILLS = [
    "release-security-review",
    "release-compliance-review",
    "release-quality-review",
]
# What the three rule-based reviewers decide, unanimously, for each sample.
SAMPLE_OUTCOME = {
    "clean": "approved",
    "secret": "rejected",
    "phi": "rejected",
    "untested": "rejected",
}
SLOW_AGENT = "slow-review"


def fault_settings(card_ttl_s: float = CARD_TTL_S) -> Settings:
    return Settings(heartbeat_s=HEARTBEAT_S, card_ttl_s=card_ttl_s, http_port=0)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / f"release_{name}.json").read_text())
    return data


# -- policies and cards -----------------------------------------------------------------------
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of plain text is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_policy(
    path: Path, policies: dict[str, dict[str, Any]], *, ignore: Iterable[str] = ()
) -> Path:
    """A policy file the coordinator loads through MESH_POLICY_FILE."""
    lines = [f"ignore = {_toml(list(ignore))}", ""]
    for event_type, body in policies.items():
        lines.append(f"[{json.dumps(event_type)}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in body.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def reviewer_policy(**overrides: Any) -> dict[str, Any]:
    """`release.proposed` as shipped (three reviewers, unanimous), with clocks overridden."""
    body: dict[str, Any] = {
        "skills": list(REVIEWER_SKILLS),
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.5,
        "deadline_s": 4.0,
        "retries": 1,
        "timeout_counts_as": "reject",
        "decision_type": "release.decided",
    }
    body.update(overrides)
    return body


def write_slow_card(folder: Path, skill: str, name: str = SLOW_AGENT) -> Path:
    """The card `tests.faults.slow_agent` serves (it reads it from MESH_CARDS_DIR)."""
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "name": name,
        "description": "fault-test agent that sleeps delay_s before it votes",
        "version": "1.0.0",
        "capabilities": {"streaming": False},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [{"id": skill, "name": skill, "description": "fault test", "tags": ["test"]}],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


# -- processes --------------------------------------------------------------------------------
class FaultMesh:
    """A `Topology` of coordinator and agent processes plus what the fault tests do to them."""

    def __init__(self, nats_url: str, tmp_path: Path, *, card_ttl_s: float = CARD_TTL_S) -> None:
        self.tmp_path = tmp_path
        self.log_dir = tmp_path / "logs"
        self.topology = Topology(
            nats_url,
            self.log_dir,
            extra_env={
                "MESH_HEARTBEAT_S": str(HEARTBEAT_S),
                "MESH_CARD_TTL_S": str(card_ttl_s),
                "MESH_HOME": str(tmp_path / ".mesh"),
                "MESH_ALLOW_MODEL_REQUESTS": "0",
                "ANTHROPIC_API_KEY": "",
                # Children run `python -m tests.faults.slow_agent` too: the repo must import.
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
                ),
            },
        )
        self.paused: dict[int, Child] = {}
        self._ids = itertools.count(1)

    def coordinator(self, policy: Path | None = None, name: str | None = None) -> Child:
        name = name or f"coordinator-{next(self._ids)}"
        env = {"MESH_POLICY_FILE": str(policy)} if policy else {}
        return self.topology.spawn(name, "coordinator", env)

    def reviewers(self) -> list[Child]:
        return [self.topology.spawn(name, module) for name, module in REVIEWERS.items()]

    def slow_agent(self, cards_dir: Path, name: str = SLOW_AGENT) -> Child:
        return self.topology.spawn(
            f"{name}-{next(self._ids)}",
            "tests.faults.slow_agent",
            {"MESH_CARDS_DIR": str(cards_dir), "SLOW_AGENT_NAME": name},
        )

    def kill9(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)

    def pause(self, child: Child) -> None:
        self.paused[child.proc.pid] = child
        child.proc.send_signal(signal.SIGSTOP)

    def resume(self, child: Child) -> None:
        if self.paused.pop(child.proc.pid, None) is not None and child.alive:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGCONT)

    def log(self, child: Child) -> str:
        try:
            return child.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def logs_tail(self, chars: int = 800) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def error_summary(self, top: int = 5) -> str:
        """The most frequent logged errors of every child (JSON logs: level and exception)."""
        counts: Counter[str] = Counter()
        for path in self.log_dir.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(doc, dict) or doc.get("level") not in ("error", "critical"):
                    continue
                exc = str(doc.get("exc") or "").strip().splitlines()
                counts[f"{doc.get('msg', '')[:80]} | {exc[-1] if exc else ''}"] += 1
        return "\n".join(f"  {n}x {what}" for what, n in counts.most_common(top))

    def stop(self) -> None:
        for child in list(self.paused.values()):
            self.resume(child)
        self.topology.stop()


def assert_alive(*children: Child) -> Callable[[], None]:
    def check() -> None:
        for c in children:
            if not c.alive:
                raise AssertionError(f"{c.name} exited with code {c.proc.returncode}")

    return check


async def eventually(
    what: str,
    check: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    every: float = 0.1,
    alive: Callable[[], None] | None = None,
) -> Any:
    """Poll `check()` until it returns something truthy (returned); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        got = await check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f}s")
        await asyncio.sleep(every)


async def wait_consuming(mesh: FaultMesh, coordinator: Child, timeout: float = 30.0) -> None:
    """Until this coordinator process has bound the durable (it logs `... consuming ...`)."""

    async def consuming() -> bool:
        return " consuming " in mesh.log(coordinator)

    await eventually(
        f"{coordinator.name} consuming", consuming, timeout=timeout, alive=assert_alive(coordinator)
    )


async def wait_agents(
    bus: Bus,
    names: Iterable[str],
    *,
    timeout: float = 30.0,
    alive: Callable[[], None] | None = None,
) -> None:
    wanted = set(names)
    registry = Registry(bus)

    async def registered() -> bool:
        return wanted <= {r.agent for r in await registry.live()}

    await eventually(
        f"agents {sorted(wanted)} registered", registered, timeout=timeout, alive=alive
    )


# -- events -----------------------------------------------------------------------------------
def release_event(
    event_id: str, data: dict[str, Any], event_type: str = "release.proposed"
) -> envelope.Event:
    return envelope.new_event(event_type, data, event_id=event_id, source="mesh://faults")


async def publish_paced(
    bus: Bus, events: list[envelope.Event], *, per_s: float, sent_at: dict[str, float]
) -> None:
    """Publish at a steady pace (`per_s` events a second); records when each went out."""
    start = time.monotonic()
    for i, event in enumerate(events):
        due = start + i / per_s
        pause = due - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        await bus.publish_event(event)
        sent_at[event.id] = time.monotonic()


# -- outcomes ---------------------------------------------------------------------------------
@dataclass
class Outcomes:
    """Every message of MESH_DECISIONS and MESH_DLQ, read in full by sequence (get_msg), with
    the monotonic time this reader first saw each (resolution: the polling interval)."""

    bus: Bus
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    dead: list[tuple[float, DeadLetter]] = field(default_factory=list)
    dead_by_seq: dict[int, DeadLetter] = field(default_factory=dict)  # by MESH_DLQ sequence
    _next: dict[str, int] = field(
        default_factory=lambda: {subjects.DECISIONS_STREAM: 1, subjects.DLQ_STREAM: 1}
    )
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        async with self._lock:  # the background watcher and a waiter may both refresh
            await self._refresh()

    async def _refresh(self) -> None:
        for stream in (subjects.DECISIONS_STREAM, subjects.DLQ_STREAM):
            try:
                info = await self.bus.js.stream_info(stream)
            except NotFoundError:
                continue
            last = info.state.last_seq
            seq = max(self._next[stream], info.state.first_seq or 1)
            while seq <= last:
                try:
                    raw = await self.bus.js.get_msg(stream, seq)
                except NotFoundError:
                    seq += 1
                    continue
                now = time.monotonic()
                if stream == subjects.DECISIONS_STREAM:
                    self.decisions.append((now, decision_decoder.decode(raw.data or b"")))
                else:
                    record = dead_letter_decoder.decode(raw.data or b"")
                    self.dead.append((now, record))
                    self.dead_by_seq[seq] = record
                seq += 1
            self._next[stream] = seq

    def decided_ids(self) -> Counter[str]:
        return Counter(d.event_id for _, d in self.decisions)

    def dead_ids(self) -> Counter[str]:
        return Counter(d.event_id for _, d in self.dead if d.event_id)

    def decision(self, event_id: str) -> Decision | None:
        return next((d for _, d in self.decisions if d.event_id == event_id), None)

    def dead_letters(self, event_id: str) -> list[DeadLetter]:
        return [d for _, d in self.dead if d.event_id == event_id]

    def missing(self, ids: Iterable[str]) -> set[str]:
        have = set(self.decided_ids()) | set(self.dead_ids())
        return set(ids) - have

    async def wait_all(
        self,
        ids: Iterable[str],
        *,
        timeout: float,
        alive: Callable[[], None] | None = None,
    ) -> set[str]:
        """Until every id has a decision or a dead letter; returns the ids still missing."""
        ids = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            if alive is not None:
                alive()
            await self.refresh()
            missing = self.missing(ids)
            if not missing or time.monotonic() >= deadline:
                return missing
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def watching(self, every: float = 0.1) -> AsyncIterator[Outcomes]:
        """Refresh in the background while the block runs, so arrival times are close to when
        each outcome was stored."""

        async def loop() -> None:
            while True:
                with contextlib.suppress(Exception):  # e.g. a timeout on a busy box
                    await self.refresh()
                await asyncio.sleep(every)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def arrivals(self, ids: Iterable[str]) -> list[float]:
        ids = set(ids)
        times = [t for t, d in self.decisions if d.event_id in ids]
        times += [t for t, d in self.dead if d.event_id in ids]
        return sorted(times)

    def max_stall(self, ids: Iterable[str], started: float) -> float:
        """The longest stretch with no outcome: from the first publish to the first outcome,
        then between consecutive outcomes; while some event still has none, up to now."""
        ids = set(ids)
        points = [started, *self.arrivals(ids)]
        if self.missing(ids):
            points.append(time.monotonic())
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


async def wait_settled(bus: Bus, timeout: float = 60.0) -> str:
    """Until the coordinators' durable has nothing pending and nothing unacknowledged, so no
    redelivery can still add an outcome. Returns "" once settled, else what is still open."""
    deadline = time.monotonic() + timeout
    while True:
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return ""
        if time.monotonic() >= deadline:
            return (
                f"after {timeout:.0f}s the coordinator durable still has "
                f"{info.num_pending} pending and {info.num_ack_pending} unacknowledged events"
            )
        await asyncio.sleep(0.2)


async def kv_state(bus: Bus, tenant: str, event_id: str) -> dict[str, Any] | None:
    kv = await bus.kv(subjects.DECISIONS_BUCKET)
    try:
        entry = await kv.get(state_key(tenant, event_id))
    except KeyNotFoundError:
        return None
    doc: dict[str, Any] = msgspec.json.decode(entry.value or b"{}")
    return doc


async def ledger_mismatches(bus: Bus, outcomes: Outcomes, ids: Iterable[str]) -> list[str]:
    """Events whose durable state (KV ledger) disagrees with what was published: a decided
    event must hold exactly the decision on its subject (same coordinator, same moment)."""
    bad = []
    for event_id in ids:
        published = outcomes.decision(event_id)
        if published is None:
            continue
        state = await kv_state(bus, published.tenant, event_id)
        stored = (state or {}).get("decision") or {}
        if (state or {}).get("state") != "decided" or (
            stored.get("coordinator"),
            stored.get("decided_at"),
            stored.get("outcome"),
        ) != (published.coordinator, published.decided_at, published.outcome):
            bad.append(f"{event_id}: ledger {(state or {}).get('state')} {stored.get('outcome')}")
    return bad


@contextlib.asynccontextmanager
async def advisory_dead_letters(bus: Bus) -> AsyncIterator[str]:
    """Events whose redeliveries run out must still end in the DLQ. If the coordinator process
    does not listen for JetStream's give-up advisories itself, the test process does; yields
    who handles them."""
    import coordinator.run
    import coordinator.service

    sources = inspect.getsource(coordinator.run) + inspect.getsource(coordinator.service)
    if "AdvisoryDeadLetters" in sources:
        yield "coordinator"
        return
    from coordinator.dlq import AdvisoryDeadLetters

    async with AdvisoryDeadLetters(bus):
        yield "test process"
