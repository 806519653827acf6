"""People in the simulation (tests/sim/world.py): the approvals stream and its durable consumer
as the real `coordinator.inbox.Inbox` sees them, and the people who answer.

- `SimApprovals`: MESH_APPROVALS's `coordinator-approvals` consumer over request and answer
  messages (`mesh.approval.T.req.*`, `.vote.*`): redelivery after `inbox.ACK_WAIT_S`, nak with
  a delay (a request message is its own timer), no max deliveries; acks, naks lost.
- `People`: a trust file of people of the tenant, each holding approver roles, with signed
  answers (`mesh.approvals.answer`, fixed keys: Ed25519 signatures are deterministic). When a
  request (or its next round) is first stored, each person who may see it draws what to do:
  answer after a random delay (sometimes after the request expired), answer twice, or never;
  and someone who holds a role the chain has not reached yet sometimes answers early.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator import inbox
from mesh import approvals, subjects
from mesh.approvals import ApprovalRequest
from mesh.identity import Signer, Trust, b64

if TYPE_CHECKING:
    from tests.sim.world import Node, World

# name → approver roles held (policies in tests/sim/world.py ask cso, then hos; and dpo).
PEOPLE = {"ann": ["cso"], "hal": ["hos"], "eve": ["hos"], "dan": ["dpo"]}


def _signer(name: str) -> Signer:
    return Signer.from_seed(b64(hashlib.sha256(f"tests/sim person {name}".encode()).digest()))


SIGNERS = {name: _signer(name) for name in PEOPLE}
TRUST = Trust()
for _name, _roles in PEOPLE.items():
    _kid = TRUST.add(SIGNERS[_name], "human", _name)
    TRUST.keys[_kid].tenant = "acme"
    TRUST.keys[_kid].claims = list(_roles)


@dataclass
class Answer:
    """One answer a person gave (what `check` holds a counted human vote to)."""

    request_id: str
    voter: str
    by: str
    answer: str
    round: int
    at: float  # wall clock, as signed


@dataclass
class ApprovalMsg:
    seq: int
    subject: str
    data: bytes
    acked: bool = False
    available_at: float = 0.0
    delivered: int = 0


class SimApprovalMsg:
    """One delivery of an approvals message (what `Inbox.handle` reads: subject, data, ack,
    nak), to one incarnation."""

    def __init__(self, world: World, msg: ApprovalMsg, node: Node) -> None:
        self.world = world
        self.msg = msg
        self.node = node
        self.subject = msg.subject
        self.data = msg.data

    async def _send(self, what: str) -> bool:
        await self.node.io()
        if self.world.rng.random() < self.world.knobs.p_lost_ack:
            self.world.note(f"{self.node.name} {what} approvals seq {self.msg.seq}: lost")
            return False
        return True

    async def ack(self) -> None:
        if await self._send("ack"):
            self.msg.acked = True

    async def nak(self, delay: float = 0.0) -> None:
        if await self._send("nak") and not self.msg.acked:
            self.msg.available_at = self.world.now() + delay
            self.world.approvals.wake()


class SimApprovals:
    def __init__(self, world: World) -> None:
        self.world = world
        self.msgs: list[ApprovalMsg] = []
        self._waiters: list[asyncio.Future[None]] = []

    def store(self, subject: str, data: bytes) -> None:
        _, kind, _ = subjects.parse_approval_subject(subject)
        if kind not in ("req", "vote"):
            return  # receipts: not the coordinators' consumer's
        self.msgs.append(ApprovalMsg(len(self.msgs) + 1, subject, data, available_at=0.0))
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def settled(self) -> bool:
        return all(m.acked for m in self.msgs)

    async def next(self, node: Node) -> SimApprovalMsg:
        w = self.world
        loop = asyncio.get_running_loop()
        while True:
            now = w.now()
            for m in self.msgs:
                if not m.acked and m.available_at <= now:
                    m.delivered += 1
                    m.available_at = now + inbox.ACK_WAIT_S
                    return SimApprovalMsg(w, m, node)
            due = [m.available_at for m in self.msgs if not m.acked]
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            timer = loop.call_later(max(0.0, min(due) - now), _resolve, fut) if due else None
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class People:
    """The people of tenant acme; each reacts once to each request round it may see."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.seen: set[tuple[str, int]] = set()
        self.answers: dict[tuple[str, float], Answer] = {}  # (by, at) → the answer
        self.tasks: set[asyncio.Task[None]] = set()

    def saw(self, request: ApprovalRequest) -> None:
        """A request message was stored: who reacts, and how."""
        if request.status != "open" or (request.id, request.round) in self.seen:
            return
        self.seen.add((request.id, request.round))
        rng = self.world.rng
        window = request.expires_at - request.asked_at
        for name, roles in PEOPLE.items():
            asked = set(roles) & set(request.roles)
            early = not asked and set(roles) & set(request.next_roles)
            if asked:
                roll = rng.random()
                times = 0 if roll < 0.25 else 2 if roll < 0.4 else 1
            elif early and rng.random() < 0.3:
                times = 1  # not asked yet: an answer the desk must refuse until it is
            else:
                continue
            for _ in range(times):
                delay = rng.uniform(0.0, 1.3 * window)  # sometimes after the request expired
                choice = rng.choice(["approve", "approve", "reject"])
                task = asyncio.ensure_future(self._answer(name, request, choice, delay))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _answer(self, name: str, request: ApprovalRequest, choice: str, delay: float) -> None:
        w = self.world
        await asyncio.sleep(delay)
        at = round(w.wall(), 3)
        vote = approvals.answer(
            SIGNERS[name],
            request,
            by=name,
            answer="approve" if choice == "approve" else "reject",
            reason=f"{name} looked at it",
            at=at,
        )
        self.answers[(name, vote.at)] = Answer(
            request.id, request.voter, name, vote.answer, request.round, vote.at
        )
        await asyncio.sleep(w.rng.expovariate(200.0))
        if w.rng.random() < w.knobs.p_write_fail:
            w.note(f"person {name} answer {request.id}: publish failed (given up)")
            return
        w.note(f"person {name} answers {request.id} round {request.round}: {vote.answer}")
        w.approvals.store(
            subjects.approval(request.tenant, "vote", request.id), approvals.encode(vote)
        )
