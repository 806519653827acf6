"""Faults between the coordinator and an agent, on the real wire.

    from mesh.testing.faults import drop, hang

    async with MeshHarness(*reviewers, policies=POLICIES) as mesh:
        mesh.faults.inject("security-review", drop())          # every call
        mesh.faults.inject("quality-review", hang(), nth=1)     # its first call only
        decision = await mesh.decision(await mesh.publish("release.proposed", release))

Where the faults happen: the harness's coordinator sends each A2A call to
`mesh.testing.fault.<proxy id>.<subject>` instead of `<subject>` (the replica's own subject or
the shared one, whichever its router picked); the proxy (`Faults`) subscribed there forwards the
request to `<subject>` and relays everything the agent sends back (keep-alives, the answer), or
does what a fault says instead. Both hops are NATS request/reply through the real nats-server,
and the coordinator and the agents run their production code on each side. Why not a proxy on
the agent's own subject: NATS hands a request to every plain subscriber of its subject, so the
agent would answer whatever the proxy did; the subject the caller sends to is the one place a
call can be withheld (the only change to the caller: `FaultyClient`, which rewrites it).

The kinds, as the caller sees them:
- `drop()`: the request never reaches the agent and nothing comes back; the caller's silence
  timer (`agent_timeout_s`) runs out.
- `delay(s)`: the request reaches the agent `s` seconds late; silence meanwhile.
- `duplicate()`: the request reaches the agent twice and both answers travel back. The agent
  runs it once (it de-duplicates by messageId); the caller takes the first answer.
- `garbage(body)`: the caller gets `body` at once, bytes that are no JSON-RPC answer; the agent
  never sees the request.
- `forge(verdict)`: the agent answers, and its answer arrives with `verdict` in place of the
  one the agent signed: well-formed, but not the agent's word.
- `hang()`: the request is taken and never answered, but a "working" keep-alive goes back as
  often as the caller asked (`Mesh-Progress`): a caller that accepts keep-alives (a policy with
  `agent_timeout_max_s`) waits until that cap or the deadline, not `agent_timeout_s`, with one
  attempt; a caller that does not ask for them sees silence, as with `drop`.

Which calls: `inject(agent, fault)` applies to every call to `agent` (over all its replicas);
`nth=2` or `nth={1, 3}` to those calls only (numbered from 1, from when the proxy started);
`probability=0.3, seed=7` to each call with that chance, drawn from its own seeded generator
(the same seed picks the same calls). The first rule (in the order injected) that picks a call
applies; `faults.calls` records every call and what was done to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, Unpack

import msgspec
from a2a.types import Message, SendMessageConfiguration, Task
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh import subjects
from mesh.a2a.client import AgentClient
from mesh.a2a.transport import CallOptions
from mesh.a2a.wire import OutgoingMessage, TaskView
from mesh.bus import Bus
from mesh.verdict import Verdict

log = logging.getLogger(__name__)

# The proxy's subjects: a test-only wire name, used by nothing outside this module.
FAULTS_ROOT = "mesh.testing.fault"
GARBAGE = b"\x00\xffthis is not JSON-RPC"
# How long the proxy relays an agent's silence before it gives up on the call (the caller's
# own timers are the real bound; this only keeps the proxy's tasks finite).
RELAY_LIMIT_S = 120.0
HANG_LIMIT_S = 600.0

Kind = Literal["drop", "delay", "duplicate", "garbage", "forge", "hang"]


@dataclass(frozen=True)
class Fault:
    """One kind of fault (build it with `drop()`, `delay(s)`, … below)."""

    kind: Kind
    delay_s: float = 0.0
    body: bytes = b""
    verdict: Verdict | None = None

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"delay({self.delay_s:g})"
        return f"{self.kind}()"


def drop() -> Fault:
    """The request is lost: the agent never sees it, nothing comes back."""
    return Fault("drop")


def delay(seconds: float) -> Fault:
    """The request reaches the agent `seconds` late."""
    if seconds < 0:
        raise ValueError("a delay cannot be negative")
    return Fault("delay", delay_s=seconds)


def duplicate() -> Fault:
    """The request reaches the agent twice; both answers travel back."""
    return Fault("duplicate")


def garbage(body: bytes = GARBAGE) -> Fault:
    """The caller gets `body` (not a JSON-RPC answer) instead of an answer."""
    return Fault("garbage", body=body)


def forge(verdict: Verdict) -> Fault:
    """The agent's answer arrives carrying `verdict` instead of what the agent signed."""
    return Fault("forge", verdict=verdict)


def hang() -> Fault:
    """The request is taken and never answered; keep-alives say it is being worked on."""
    return Fault("hang")


@dataclass
class Rule:
    """A fault for some calls to one agent (what `Faults.inject` returns)."""

    agent: str
    fault: Fault
    nth: frozenset[int] | None = None
    probability: float | None = None
    seed: int = 0
    applied: int = 0  # calls it applied to so far
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def picks(self, number: int) -> bool:
        """Whether this rule applies to the agent's `number`-th call (1-based)."""
        if self.nth is not None:
            return number in self.nth
        if self.probability is not None:
            return self._rng.random() < self.probability
        return True


@dataclass(frozen=True)
class Call:
    """One call the proxy saw: to which agent and subject, its number, what was done to it and
    how many answers (not keep-alives) went back to the caller."""

    agent: str
    subject: str
    number: int
    fault: Fault | None
    answers: int = 0


class Faults:
    """The fault rules and the proxy that applies them (`MeshHarness.faults`)."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self._counts: dict[str, int] = {}
        # Its own subjects, so two harnesses on one server never relay each other's calls.
        self.root = f"{FAULTS_ROOT}.{secrets.token_hex(4)}"
        self._nc: NATS | None = None
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what a test uses -----------------------------------------------------------------------
    def inject(
        self,
        agent: str,
        fault: Fault,
        *,
        nth: int | Iterable[int] | None = None,
        probability: float | None = None,
        seed: int = 0,
    ) -> Rule:
        """Apply `fault` to calls to `agent`: every one, the `nth` (1-based; one or several),
        or each with `probability` (seeded). Returns the rule (`remove(rule)` ends it)."""
        if nth is not None and probability is not None:
            raise ValueError("choose the calls by nth or by probability, not both")
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        picked = None
        if nth is not None:
            picked = frozenset([nth] if isinstance(nth, int) else nth)
            if not picked or min(picked) < 1:
                raise ValueError("calls are numbered from 1")
        rule = Rule(agent, fault, nth=picked, probability=probability, seed=seed)
        self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        self.rules.remove(rule)

    def clear(self) -> None:
        """No faults from now on (calls keep their numbers)."""
        self.rules.clear()

    def calls_to(self, agent: str) -> list[Call]:
        return [c for c in self.calls if c.agent == agent]

    def client(self, bus: Bus | NATS) -> FaultyClient:
        """An `AgentClient` whose calls go through this proxy."""
        return FaultyClient(bus, self)

    # -- the proxy ------------------------------------------------------------------------------
    def subject_for(self, subject: str) -> str:
        """Where a call meant for `subject` goes to pass through the proxy."""
        return f"{self.root}.{subject}"

    async def start(self, nc: NATS) -> None:
        self._nc = nc
        self._sub = await nc.subscribe(f"{self.root}.>", cb=self._on_request)
        await nc.flush()

    async def aclose(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _on_request(self, msg: Msg) -> None:
        target = msg.subject.removeprefix(f"{self.root}.")
        agent = _agent_of(target)
        number = self._counts[agent] = self._counts.get(agent, 0) + 1
        rule = next((r for r in self.rules if r.agent == agent and r.picks(number)), None)
        fault = rule.fault if rule is not None else None
        if rule is not None:
            rule.applied += 1
            log.info("fault: %s on call %d to %s (%s)", fault, number, agent, target)
        index = len(self.calls)
        self.calls.append(Call(agent, target, number, fault))
        # nats-py runs one subscription's callbacks one at a time: each call gets its own task,
        # so a delayed or hung one holds up no other.
        task = asyncio.create_task(self._handle(msg, target, fault, index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg, target: str, fault: Fault | None, index: int) -> None:
        if not msg.reply:
            return
        kind = fault.kind if fault is not None else None
        try:
            if kind == "drop":
                return
            if kind == "garbage":
                assert fault is not None
                await self._reply(msg.reply, fault.body, None, index)
                return
            if kind == "hang":
                await self._hang(msg)
                return
            if kind == "delay":
                assert fault is not None
                await asyncio.sleep(fault.delay_s)
            await self._forward(
                msg,
                target,
                copies=2 if kind == "duplicate" else 1,
                verdict=fault.verdict if fault is not None else None,
                index=index,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # a proxy failure must show, not turn into a silent "drop"
            log.exception("fault proxy: call to %s failed", target)

    async def _hang(self, msg: Msg) -> None:
        interval = _progress_interval(msg)
        if interval is None:
            return  # the caller asked for no keep-alives: silence
        nc = self._connection()
        loop = asyncio.get_running_loop()
        until = loop.time() + HANG_LIMIT_S
        while loop.time() < until:
            await asyncio.sleep(interval)
            await nc.publish(
                str(msg.reply), b"", headers={subjects.H_STATUS: subjects.STATUS_WORKING}
            )

    async def _forward(
        self, msg: Msg, target: str, *, copies: int, verdict: Verdict | None, index: int
    ) -> None:
        """Send the request to `target` (`copies` times) and relay what comes back, until as
        many answers as requests have gone back (or the agent stays silent too long)."""
        nc = self._connection()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            headers = dict(msg.headers or {})
            for _ in range(copies):
                await nc.publish(target, msg.data, reply=inbox, headers=headers or None)
            done = 0
            while done < copies:
                try:
                    answer = await sub.next_msg(timeout=RELAY_LIMIT_S)
                except TimeoutError:
                    return
                got = dict(answer.headers or {})
                if got.get(subjects.H_STATUS) == subjects.STATUS_WORKING:
                    await nc.publish(str(msg.reply), answer.data, headers=got)
                    continue
                if got.get(subjects.H_STREAM) == subjects.STREAM_FRAME:
                    await nc.publish(str(msg.reply), answer.data, headers=got)
                    continue
                body = answer.data
                if verdict is not None and not _no_responders(answer):
                    body = _with_verdict(body, verdict)
                # "No responders" goes back as it came: an empty message with `Status: 503`.
                await self._reply(str(msg.reply), body, got or None, index)
                done += 1
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _reply(
        self, reply: str, body: bytes, headers: dict[str, str] | None, index: int
    ) -> None:
        await self._connection().publish(reply, body, headers=headers)
        call = self.calls[index]
        self.calls[index] = Call(
            call.agent, call.subject, call.number, call.fault, call.answers + 1
        )

    def _connection(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("the fault proxy is not started")
        return self._nc


class FaultyClient(AgentClient):
    """The coordinator's `AgentClient`, sending every call through a `Faults` proxy."""

    def __init__(self, bus: Bus | NATS, faults: Faults) -> None:
        super().__init__(bus)
        self.faults = faults

    async def send(
        self,
        agent: str,
        message: Message,
        *,
        timeout: float,
        configuration: SendMessageConfiguration | None = None,
        **options: Unpack[CallOptions],
    ) -> Task | Message:
        options["subject"] = self.faults.subject_for(options.get("subject") or subjects.a2a(agent))
        return await super().send(
            agent, message, timeout=timeout, configuration=configuration, **options
        )

    async def send_lean(
        self,
        agent: str,
        message: Message | OutgoingMessage,
        *,
        timeout: float,
        max_timeout: float | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> TaskView | Task | Message:
        # The coordinator's path (mesh.a2a.wire): through the proxy as well.
        return await super().send_lean(
            agent,
            message,
            timeout=timeout,
            max_timeout=max_timeout,
            subject=self.faults.subject_for(subject or subjects.a2a(agent)),
            headers=headers,
        )


def _agent_of(subject: str) -> str:
    """`mesh.a2a.<agent>[.<instance>]` → `<agent>`."""
    rest = subject.removeprefix(f"{subjects.A2A_ROOT}.")
    return rest.split(".", 1)[0]


def _progress_interval(msg: Msg) -> float | None:
    for key, value in (msg.headers or {}).items():
        if key.lower() == subjects.H_PROGRESS.lower():
            try:
                return max(0.05, float(value))
            except ValueError:
                return None
    return None


def _no_responders(msg: Msg) -> bool:
    status = (msg.headers or {}).get(subjects.H_NATS_STATUS)
    return status == subjects.NATS_NO_RESPONDERS and not msg.data


def _with_verdict(body: bytes, verdict: Verdict) -> bytes:
    """A SendMessage answer with its first data part replaced by `verdict` (the rest, the
    signature included, as the agent sent it); other bodies unchanged."""
    try:
        doc: Any = msgspec.json.decode(body)
        parts = doc["result"]["task"]["artifacts"][0]["parts"]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        return body
    for part in parts:
        if isinstance(part, dict) and "data" in part:
            part["data"] = msgspec.to_builtins(verdict)
            break
    return msgspec.json.encode(doc)
