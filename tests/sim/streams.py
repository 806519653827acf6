"""JetStream streams in memory for the simulation (tests/sim/world.py): the audit stream, the
approvals stream and the DLQ, as the real `mesh.audit.AuditLog`, `coordinator.inbox.Inbox` and
`Coordinator._publish_dead_letter` see them through a `Bus`.

What the server does, and the simulation with it (nats-server's `processJetStreamMsg`):

- a message id (`Nats-Msg-Id`) seen within the stream's duplicate window is not stored again:
  the publisher gets the first copy's sequence with `duplicate` set. The dedup check comes
  before the expected-sequence checks, so a repeat answers "duplicate" whatever it expects;
- `Nats-Expected-Last-Subject-Sequence` (over the subjects that
  `Nats-Expected-Last-Subject-Sequence-Subject` names, a wildcard): refused with error 10071
  unless the last message on those subjects has that sequence (0: none);
- a publish may fail before it lands, or land while its reply is lost (the caller cannot tell
  which: `SimIOError` both times), as `NodeStore` writes do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.js.api import PubAck
from nats.js.errors import BadRequestError, NotFoundError

from mesh import subjects
from mesh.bus import STREAMS

if TYPE_CHECKING:
    from tests.sim.world import Node, World

WRONG_LAST_SEQUENCE = subjects.JS_WRONG_LAST_SEQUENCE[0]
DUPLICATE_WINDOW_S = next(s for s in STREAMS if s.name == subjects.AUDIT_STREAM).duplicate_window_s


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    at: float = 0.0  # world time it was stored


@dataclass
class SimStream:
    """One stream: messages in sequence order, message ids within the duplicate window."""

    name: str
    world: World
    window_s: float = DUPLICATE_WINDOW_S
    msgs: list[StoredMsg] = field(default_factory=list)
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # msg id → (seq, world time)

    def last_on(self, pattern: str) -> StoredMsg | None:
        return next((m for m in reversed(self.msgs) if matches(pattern, m.subject)), None)

    def store(
        self, subject: str, data: bytes, msg_id: str | None, headers: dict[str, str] | None
    ) -> PubAck:
        now = self.world.now()
        if msg_id:
            seen = self.ids.get(msg_id)
            if seen is not None and now - seen[1] < self.window_s:
                return PubAck(stream=self.name, seq=seen[0], duplicate=True)
        hdrs = dict(headers or {})
        expected = hdrs.get(subjects.H_EXPECTED_LAST_SUBJECT_SEQ)
        if expected is not None:
            over = hdrs.get(subjects.H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT, subject)
            last = self.last_on(over)
            if (last.seq if last else 0) != int(expected):
                raise BadRequestError(
                    code=400, err_code=WRONG_LAST_SEQUENCE, description="wrong last sequence"
                )
        seq = len(self.msgs) + 1
        self.msgs.append(StoredMsg(seq, subject, data, hdrs, now))
        if msg_id:
            self.ids[msg_id] = (seq, now)
        return PubAck(stream=self.name, seq=seq)


@dataclass
class RawMsg:
    """What `js.get_msg` / `js.get_last_msg` return, as far as AuditLog reads it."""

    seq: int
    subject: str
    data: bytes


class SimJS:
    """The JetStream calls `mesh.audit.AuditLog` makes to read a chain's tip."""

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node

    def _stream(self, name: str) -> SimStream:
        if name != subjects.AUDIT_STREAM:
            raise NotFoundError(code=404, description=f"stream {name} not simulated")
        return self.world.audit_stream

    async def get_last_msg(self, stream_name: str, subject: str, **_: Any) -> RawMsg:
        await self.node.io()
        last = self._stream(stream_name).last_on(subject)
        if last is None:
            raise NotFoundError(code=404, description="no message found")
        return RawMsg(last.seq, last.subject, last.data)

    async def get_msg(
        self, stream_name: str, seq: int, *, subject: str | None = None, next: bool = False
    ) -> RawMsg:
        await self.node.io()
        for m in self._stream(stream_name).msgs:
            if m.seq < seq or (m.seq > seq and not next):
                continue
            if subject is None or matches(subject, m.subject):
                return RawMsg(m.seq, m.subject, m.data)
            if not next:
                break
        raise NotFoundError(code=404, description="no message found")


class SimSettings:
    """What `AuditLog` reads of the settings: no trust file, MESH_INSECURE=bus (the simulated
    records are unsigned: see docs/simulation.md, "Not covered yet")."""

    trust = None
    home = Path("/nonexistent/tests-sim")

    @staticmethod
    def insecure_parts() -> set[str]:
        return {"bus"}


class _NC:
    max_payload = 1024 * 1024


class SimBus:
    """`mesh.bus.Bus` as one coordinator incarnation sees it: publishes to the simulated
    streams (each a round trip that may fail before landing or lose its reply)."""

    settings = SimSettings()
    identity = None
    nc = _NC()

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node
        self.js = SimJS(world, node)

    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        **_: Any,
    ) -> PubAck:
        w, name = self.world, self.node.name
        what = subject.split(".", 3)[1]  # audit, dlq, approval
        await self.node.io()
        if w.rng.random() < w.knobs.p_write_fail:
            w.note(f"{name} publish {subject}: failed")
            raise SimIOError(f"publish {subject} failed")
        ack = w.stored(subject, body, msg_id, headers, by=name)
        await self.node.io()
        if w.rng.random() < w.knobs.p_reply_lost:
            w.note(f"{name} publish {what} {subject}: reply lost (it landed)")
            raise SimIOError(f"publish {subject}: reply lost")
        return ack


class SimIOError(Exception):
    """A failed call to the (simulated) server: the caller cannot tell whether it landed."""
