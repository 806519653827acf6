"""Noisy neighbour: does one tenant's flood of slow model calls slow another tenant down?

One mesh (nats-server, a coordinator and one prompted agent as OS processes): the agent's brain
is the chain `anthropic:claude-sonnet-5-5,rules` pointed at a local Anthropic-compatible fake
(in this process, `mesh.testing.fake_anthropic`) that answers tenant `flood`'s requests after
`delay_s` and everyone else's at once. Event type `noisy.vote` is decided by that one agent.
Tenant `flood` publishes from a process of its own (`flooder`, started by the bench and told
what to publish over NATS): another application, sharing no event loop with the bench, which
stamps the steady tenant's decisions as they arrive.

Tenant `steady` publishes at `steady_rate`/s on a fixed grid (open loop) for `seconds` per
window; its latency (publish → decision received) is measured:

1. solo (nobody else publishing) and 2. with tenant `flood` publishing `flood_rate`/s at the
   same time, at random times (exponential gaps, seeded: independent producers share no
   clock), under its quotas: `[tenants.flood] concurrent_calls` (the models file: model calls
   at once, refused past it by the agent) and `[tenants.flood] events_at_once` (the
   coordinator's policies: events being decided at once, dead-lettered `over_quota` past it
   before any agent is asked). The product as configured. These two alternate in `rounds`
   pairs of windows, in the order solo, flood, flood, solo, solo, flood, … (each pair mirrors
   the one before), and each side's windows are pooled: a machine whose load drifts during the
   run bills both sides alike. The spread between the solo windows themselves is reported
   too: the noise a ratio must be read against. A first window of the steady tenant alone,
   not measured, warms the mesh up;
3. the same flood answered at once by the model (the flood's volume alone, no slow call);
4. the flood on the steady tenant's own grid, from the same instant: every steady event
   arrives together with a flood event (the worst alignment);
5. the model-call quota alone (a coordinator restarted without `events_at_once`): every flood
   event is an agent call, all but the quota's refused by the agent (on the lean path);
6. the slow flood with no quota at all (the models file rewritten; the agent re-reads it on
   its next call): what the quotas buy;
7. with no quota and calls of `over_delay_s`, so that the flood's calls at once
   (`flood_rate` * `over_delay_s`, 80) outnumber the agent's call slots (64): the flood's
   backlog waits in the coordinator's admission, where fairness between tenants (issue 16)
   lets the steady tenant's events go ahead of it.

Target (issue 16): the steady tenant's pooled p99 in 2 within 10 % of its pooled p99 in 1. The
others are shown, not judged.

`python -m bench.noisy` is also the agent process (`NOISY_AGENT` names it) and, with
`NOISY_FLOODER` set, the flood's publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bench.common import Sized, banner, fmt, md_table, note, num, pct
from bench.harness import BenchMesh
from mesh import envelope, subjects
from mesh.bus import Bus, read_stream
from mesh.records import dead_letter_decoder, decision_decoder
from mesh.server import EmbeddedServer
from mesh.testing.fake_anthropic import FakeAnthropic
from tests.support import samples
from tests.support.launcher import ProcessMesh

AGENT = "noisy-reviewer"
SKILL = "noisy-vote"
EVENT_TYPE = "noisy.vote"
STEADY, FLOOD = "steady", "flood"
MODEL = "claude-sonnet-5-5"
FLOOD_SUBJECT = "bench.noisy.flood"  # the bench's orders to the flood publisher process


@dataclass
class Opts(Sized):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"seconds": 10.0, "steady_rate": 20.0, "flood_rate": 20.0},
        "smoke": {
            "seconds": 2.0,
            "rounds": 1,
            "steady_rate": 5.0,
            "flood_rate": 5.0,
            "delay_s": 0.5,
            "over_delay_s": 0.5,
        },
    }
    seconds: float = 30.0
    steady_rate: float = 20.0  # events/s of the steady tenant
    flood_rate: float = 20.0  # events/s of the flooding tenant
    delay_s: float = 2.0  # the model's answer time for the flooding tenant
    # Step 5's answer time: 20/s * 4 s = 80 calls at once, past the agent's 64 slots, and
    # under half the policy's agent_timeout_s (10 s), so the calls do not count as overload.
    over_delay_s: float = 4.0
    quota: int = 2  # the flooding tenant's concurrent model calls (in the mesh)
    events_at_once: int = 2  # the flooding tenant's events being decided at once (policies)
    rounds: int = 3  # pairs of (solo, flood) windows for the target: 3 is S F F S S F


@dataclass
class Run:
    label: str
    lat_ms: list[float]
    sent: int
    flood_sent: int = 0
    flood_decided: int = 0
    flood_outcomes: dict[str, int] | None = None
    model_calls: int = 0
    # Where a steady event's time went: in the coordinator (handler start → decision: the wait
    # in admission included) and in its agent call.
    coord_ms: list[float] | None = None
    call_ms: list[float] | None = None

    def p(self, q: float) -> float:
        return pct(sorted(self.lat_ms), q)

    @classmethod
    def pooled(cls, label: str, windows: list[Run]) -> Run:
        """One run of every window's samples."""

        def joined(field: str) -> list[float]:
            return [x for w in windows for x in getattr(w, field) or []]

        outcomes: dict[str, int] = {}
        for w in windows:
            for k, v in (w.flood_outcomes or {}).items():
                outcomes[k] = outcomes.get(k, 0) + v
        return cls(
            label,
            joined("lat_ms"),
            sum(w.sent for w in windows),
            flood_sent=sum(w.flood_sent for w in windows),
            flood_decided=sum(w.flood_decided for w in windows),
            flood_outcomes=outcomes,
            model_calls=sum(w.model_calls for w in windows),
            coord_ms=joined("coord_ms"),
            call_ms=joined("call_ms"),
        )


def models_file(path: Path, quota: int | None) -> None:
    text = f"[tenants.{FLOOD}]\nconcurrent_calls = {quota}\n" if quota is not None else ""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # whole or not at all: the agent may read it any time


class NoisyMesh(BenchMesh):
    def __init__(
        self,
        work: Path,
        fake: FakeAnthropic,
        models: Path,
        settle_s: float,
        events_at_once: int | None = None,
    ) -> None:
        super().__init__(work, voter_counts=[], settle_s=settle_s)
        self.fake = fake
        self.models = models
        self.events_at_once = events_at_once  # the flooding tenant's, in the first coordinator
        self.calls: dict[str, float] = {}  # event id → its longest vote's call, ms

    def _on_decision_sync(self, data: bytes) -> None:
        super()._on_decision_sync(data)
        with contextlib.suppress(Exception):
            d = decision_decoder.decode(data)
            self.calls.setdefault(d.event_id, max((v.latency_ms for v in d.votes), default=0))

    async def _dead_letters_since(self, seq: int) -> int:
        """The flood's events refused at the door (`over_quota`) end in the DLQ, not in a
        decision: read from the stream after a window, not followed live. A subscription would
        put every refusal (~19 of 20 flood events) into this event loop, which stamps the
        steady tenant's decisions as they arrive: an interference of the bench's own. The
        sequence to read from next."""
        assert self.bus is not None
        found = await read_stream(
            self.bus, subjects.DLQ_STREAM, filter_subject=subjects.dlq(FLOOD, "*"), start_seq=seq
        )
        for m in found:
            seq = max(seq, m.seq + 1)
            with contextlib.suppress(Exception):
                d = dead_letter_decoder.decode(m.data)
                if d.event_id:
                    self.recv.setdefault(d.event_id, (time.perf_counter(), f"dlq {d.reason}", 0.0))
        return seq

    async def _dlq_next_seq(self) -> int:
        assert self.bus is not None
        return int((await self.bus.js.stream_info(subjects.DLQ_STREAM)).state.last_seq) + 1

    async def drain_flood(self, sent: dict[str, float], since: int, bound_s: float) -> bool:
        """Until each of the flood's events has an outcome (a decision, or a dead letter read
        from `since` on), at most `bound_s`."""
        until = time.monotonic() + bound_s
        while True:
            since = await self._dead_letters_since(since)
            if all(e in self.recv for e in sent):
                return True
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        self.server = EmbeddedServer(store_dir=self.work / "js").start()
        self.bus = await Bus.connect(self.server.url, name="bench-noisy")
        await self.bus.ensure()
        await self.bus.nc.subscribe(f"{subjects.DECISIONS_ROOT}.>", cb=self._on_decision)
        self.procs = ProcessMesh(self.server.url, self.work, server=self.server)
        self.coordinator = self.procs.coordinator(
            self.policy(self.events_at_once), name="coordinator-noisy"
        )
        samples.write_card(self.procs.cards, AGENT, SKILL)
        env = {
            "MESH_CARDS_DIR": str(self.procs.cards),
            "NOISY_AGENT": AGENT,
            "ANTHROPIC_BASE_URL": self.fake.base_url,
            "ANTHROPIC_API_KEY": "bench-key-for-the-local-fake",
            "MESH_MODEL": f"anthropic:{MODEL},rules",
            "MESH_MODELS_FILE": str(self.models),
        }
        ident = self.procs.identity("agent", AGENT)
        self.reviewers[AGENT] = self.procs.spawn(AGENT, "bench.noisy", env, identity=ident)
        await self._wait_registered([AGENT], [self.reviewers[AGENT]])
        await self.start_flooder()

    def policy(self, events_at_once: int | None) -> Path:
        """The coordinator's policy file: `noisy.vote` decided by the one agent, and the
        flooding tenant's `events_at_once` when given."""
        assert self.procs is not None
        policies: dict[str, Any] = {
            EVENT_TYPE: samples.policy(
                [SKILL],
                rule={"kind": "majority"},
                agent_timeout_s=10.0,
                deadline_s=20.0,
                decision_type="noisy.decided",
            )
        }
        if events_at_once is not None:
            policies["tenants"] = {FLOOD: {"events_at_once": events_at_once}}
        return self.procs.policy(policies)

    async def restart_coordinator(self, events_at_once: int | None) -> None:
        """A new coordinator with another tenant limit (policies are read at start)."""
        assert self.procs is not None and self.coordinator is not None
        self.procs.stop_child(self.coordinator)
        self.coordinator = self.procs.coordinator(
            self.policy(events_at_once), name="coordinator-noisy-2"
        )
        await self.ready(EVENT_TYPE, {"id": "probe"})

    async def start_flooder(self) -> None:
        """The flooding tenant's publisher, as its own process (a tenant is another application):
        its publishing does not share this process's event loop, which stamps the steady
        tenant's decisions as they arrive."""
        assert self.procs is not None and self.bus is not None
        self.flooder = self.procs.spawn("flood-publisher", "bench.noisy", {"NOISY_FLOODER": "1"})
        deadline = time.monotonic() + 60
        while True:  # until it listens
            try:
                await self.bus.nc.request(FLOOD_SUBJECT, b"{}", timeout=1.0)
                return
            except Exception:
                if time.monotonic() > deadline or self.flooder.proc.poll() is not None:
                    raise RuntimeError("the flood publisher did not start: see its log") from None
                await asyncio.sleep(0.2)

    async def flood_at(
        self, rate: float, seconds: float, poisson: int | None = None
    ) -> dict[str, float]:
        """The flood publisher's `rate`/s for `seconds`; its event ids → when it was asked."""
        assert self.bus is not None
        self._seq += 1
        prefix = f"b{self.run_id}-{FLOOD}-{self._seq}-"
        order = {"prefix": prefix, "rate": rate, "seconds": seconds, "poisson": poisson}
        asked = time.perf_counter()
        reply = await self.bus.nc.request(
            FLOOD_SUBJECT, json.dumps(order).encode(), timeout=seconds + 60
        )
        return dict.fromkeys(json.loads(reply.data)["sent"], asked)

    async def publish_at(self, tenant: str, rate: float, seconds: float) -> dict[str, float]:
        assert self.bus is not None
        return await publish_at(self.bus, tenant, lambda: self._next_id(tenant), rate, seconds)

    async def drain(self, sent: dict[str, float], bound_s: float) -> bool:
        until = time.monotonic() + bound_s
        while time.monotonic() < until:
            if all(e in self.recv for e in sent):
                return True
            await asyncio.sleep(0.05)
        return False

    async def run(self, label: str, opts: Opts, *, flood: bool, poisson: int | None = None) -> Run:
        await self.settle()
        calls0 = len(self.fake.requests)
        dlq_from = await self._dlq_next_seq()
        work = [self.publish_at(STEADY, opts.steady_rate, opts.seconds)]
        if flood:
            work.append(self.flood_at(opts.flood_rate, opts.seconds, poisson))
        sents = await asyncio.gather(*work)
        steady = sents[0]
        flood_sent = sents[1] if flood else {}
        drained = await self.drain(steady, 30.0 + opts.seconds)
        # The flood's own decisions are not measured, only what they leave behind.
        if flood and not await self.drain_flood(flood_sent, dlq_from, 10.0):
            await self.purge()
        if not drained:
            note(f"{label}: not every steady event was decided within the drain bound")
        lat = [(self.recv[e][0] - t) * 1000 for e, t in steady.items() if e in self.recv]
        outcomes: dict[str, int] = {}
        for e in flood_sent:
            if e in self.recv:
                outcomes[self.recv[e][1]] = outcomes.get(self.recv[e][1], 0) + 1
        return Run(
            label,
            lat,
            len(steady),
            flood_sent=len(flood_sent),
            flood_decided=sum(outcomes.values()),
            flood_outcomes=outcomes,
            model_calls=len(self.fake.requests) - calls0,
            coord_ms=[self.recv[e][2] for e in steady if e in self.recv],
            call_ms=[self.calls[e] for e in steady if e in self.calls],
        )


async def publish_at(
    bus: Bus,
    tenant: str,
    next_id: Callable[[], str],
    rate: float,
    seconds: float,
    *,
    poisson: int | None = None,
) -> dict[str, float]:
    """Publish `rate`/s for `seconds` (open loop); event id → when sent. On a fixed grid, or
    with `poisson` (a seed) at random times, exponential gaps at the same mean rate."""
    gaps = random.Random(poisson) if poisson is not None else None
    sent: dict[str, float] = {}
    pending: set[asyncio.Task[None]] = set()

    async def publish(eid: str) -> None:
        data = {"id": eid, "vote": "approve"}
        event = envelope.new_event(
            EVENT_TYPE, data, event_id=eid, source="mesh://bench", tenant=tenant
        )
        await bus.publish_event(event)

    t0 = time.perf_counter()
    at = 0.0
    for i in range(max(1, int(rate * seconds))):
        at = at + gaps.expovariate(rate) if gaps is not None else i / rate
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        eid = next_id()
        sent[eid] = time.perf_counter()
        task = asyncio.create_task(publish(eid))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    return sent


async def flooder() -> None:
    """The flood publisher process: each request on FLOOD_SUBJECT (`prefix`, `rate`,
    `seconds`) publishes tenant `flood`'s events and answers with their ids; an empty one is
    a ping. Ends with its parent (the bench stops it)."""
    from mesh.settings import get_settings

    async with await Bus.connect(settings=get_settings(), name="bench-noisy-flood") as bus:

        async def on_order(msg: Any) -> None:
            order = json.loads(msg.data or b"{}")
            ids: list[str] = []
            if order:
                seq = iter(range(1, 1 << 62))
                sent = await publish_at(
                    bus,
                    FLOOD,
                    lambda: f"{order['prefix']}{next(seq)}",
                    order["rate"],
                    order["seconds"],
                    poisson=order.get("poisson"),
                )
                ids = list(sent)
            await msg.respond(json.dumps({"sent": ids}).encode())

        await bus.nc.subscribe(FLOOD_SUBJECT, cb=on_order)
        await asyncio.Event().wait()


def _responder(delay: dict[str, float]) -> Any:
    async def respond(body: dict[str, Any]) -> dict[str, Any]:
        # The tenant's event ids start with its name (`b<run>-flood-<n>`): its requests are slow.
        if delay["s"] and f"-{FLOOD}-" in json.dumps(body.get("messages", "")):
            await asyncio.sleep(delay["s"])
        return {"vote": "approve", "reasons": ["scripted"]}

    return respond


async def run(opts: Opts) -> dict[str, Any]:
    banner(
        f"noisy neighbour: {STEADY} at {opts.steady_rate:g}/s for {opts.seconds:g}s, "
        f"{FLOOD} at {opts.flood_rate:g}/s with {opts.delay_s:g}s model calls"
    )
    with tempfile.TemporaryDirectory(prefix="bench-noisy-") as tmp:
        work = Path(tmp)
        models = work / "models.toml"
        models_file(models, opts.quota)
        delay = {"s": opts.delay_s}
        async with FakeAnthropic(_responder(delay)) as fake:
            mesh = NoisyMesh(
                work,
                fake,
                models,
                settle_s=5.0 if opts.short else 30.0,
                events_at_once=opts.events_at_once,
            )
            try:
                await mesh.start()
                await mesh.ready(EVENT_TYPE, {"id": "probe"})
                # A window nobody measures first: the first events after start pay for warm
                # caches and connections, which would otherwise be billed to the first solo.
                await mesh.run("warm-up", opts, flood=False)
                solos: list[Run] = []
                floods: list[Run] = []
                for n in range(2 * opts.rounds):
                    # S F F S S F …: window n is solo when n % 4 is 0 or 3.
                    if n % 4 in (0, 3):
                        solos.append(await mesh.run(f"solo {len(solos) + 1}", opts, flood=False))
                    else:
                        label = f"flood {len(floods) + 1}"
                        floods.append(await mesh.run(label, opts, flood=True, poisson=n))
                runs = [
                    Run.pooled(f"solo ({len(solos)} windows)", solos),
                    Run.pooled(f"with {FLOOD} (quotas, {len(floods)} windows)", floods),
                ]
                # The same events answered at once: what the flood's volume costs by itself.
                delay["s"] = 0.0
                runs.append(
                    await mesh.run(
                        f"with {FLOOD}, fast model (quotas)", opts, flood=True, poisson=100
                    )
                )
                delay["s"] = opts.delay_s
                # The flood on the steady tenant's own 50 ms grid: each steady event arrives
                # with a flood event, the worst alignment, which independent producers do not
                # keep (shown, not judged).
                runs.append(await mesh.run(f"with {FLOOD} in step (quotas)", opts, flood=True))
                # The model-call quota alone: every flood event reaches the agent, which
                # refuses all but its quota's calls (what the quotas were before events_at_once).
                await mesh.restart_coordinator(None)
                runs.append(
                    await mesh.run(
                        f"with {FLOOD} (model-call quota only)", opts, flood=True, poisson=101
                    )
                )
                models_file(models, None)
                runs.append(
                    await mesh.run(f"with {FLOOD} (no quota)", opts, flood=True, poisson=102)
                )
                delay["s"] = opts.over_delay_s
                runs.append(
                    await mesh.run(
                        f"with {FLOOD} over the call slots (no quota, {opts.over_delay_s:g}s)",
                        opts,
                        flood=True,
                        poisson=103,
                    )
                )
                delay["s"] = opts.delay_s
                models_file(models, opts.quota)
            finally:
                await mesh.close()
    return _report(opts, runs, solos, floods)


def ratio_interval(
    solos: list[Run], floods: list[Run], *, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A 90 % bootstrap interval of the pooled p99 ratio (flood / solo): each window's samples
    drawn again with replacement (every window keeps its weight), pooled, the ratio taken; the
    5th and 95th percentiles of `rounds` such ratios. (nan, nan) without samples."""
    if not any(w.lat_ms for w in solos) or not any(w.lat_ms for w in floods):
        return float("nan"), float("nan")
    rng = random.Random(seed)

    def p99_again(windows: list[Run]) -> float:
        drawn = [x for w in windows if w.lat_ms for x in rng.choices(w.lat_ms, k=len(w.lat_ms))]
        return pct(sorted(drawn), 99)

    ratios = sorted(p99_again(floods) / p99_again(solos) for _ in range(rounds))
    return ratios[int(0.05 * rounds)], ratios[int(0.95 * rounds) - 1]


def _report(opts: Opts, runs: list[Run], solos: list[Run], floods: list[Run]) -> dict[str, Any]:
    solo, quota, fast, in_step, calls_only, free, over = runs
    rows = []
    for r in runs:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted((r.flood_outcomes or {}).items()))
        rows.append(
            (
                r.label,
                f"{len(r.lat_ms)}/{r.sent}",
                fmt(r.p(50), 1),
                fmt(r.p(99), 1),
                fmt(pct(sorted(r.coord_ms or []), 50), 1),
                fmt(pct(sorted(r.call_ms or []), 50), 1),
                f"{r.flood_decided}/{r.flood_sent}" if r.flood_sent else "-",
                outcomes or "-",
                r.model_calls,
            )
        )
    ratio = quota.p(99) / solo.p(99) if solo.lat_ms and quota.lat_ms else float("nan")
    low, high = ratio_interval(solos, floods)
    table = md_table(
        [
            "run",
            f"{STEADY} decided",
            "p50 ms",
            "p99 ms",
            "in coordinator p50 ms",
            "agent call p50 ms",
            f"{FLOOD} decided",
            f"{FLOOD} outcomes",
            "model calls",
        ],
        rows,
    )
    solo_p99s = [w.p(99) for w in solos]
    flood_p99s = [w.p(99) for w in floods]
    # The noise floor: how far apart the solo windows themselves are (nothing changed between
    # them but the machine).
    noise = max(solo_p99s) / min(solo_p99s) if len(solos) > 1 and min(solo_p99s) > 0 else None
    md = (
        "## Noisy neighbour\n\n"
        f"Tenant `{STEADY}` publishes {opts.steady_rate:g} events/s on a fixed grid for "
        f"{opts.seconds:g} s a window; tenant `{FLOOD}`, from a process of its own, "
        f"{opts.flood_rate:g}/s at random times whose model calls take {opts.delay_s:g} s, "
        f"under its quotas: {opts.quota} model calls at once in the mesh (`concurrent_calls`) "
        f"and {opts.events_at_once} events being decided at once (`events_at_once`; past it, "
        "dead-lettered `over_quota`). One agent decides both; latency is publish → decision "
        "received. Solo and flood windows alternate (solo, flood, flood, solo, …) and each "
        "side's windows are pooled. The fast-model run floods with the same events answered "
        "at once: what the flood's volume costs without any slow call. The in-step run "
        "publishes the flood on the steady tenant's own grid (each steady event arrives with a "
        "flood event). The model-call-quota-only run has no `events_at_once`: every flood "
        "event is an agent call. The over-the-slots run has no quota and "
        f"{opts.over_delay_s:g} s calls: more flood calls at once than the agent has slots, so "
        "the flood's backlog waits in the coordinator's admission, which shares the slots "
        "fairly between tenants.\n\n"
        f"{table}\n\n"
        f"{STEADY} p99 per window, ms: solo {', '.join(fmt(x, 1) for x in solo_p99s)}; "
        f"flood {', '.join(fmt(x, 1) for x in flood_p99s)}"
        + (f" (solo windows apart: {noise:.2f}x)" if noise is not None else "")
        + ".\n\n"
        f"{STEADY} p99 with the flood (under its quotas) / solo, pooled: **{ratio:.2f}x** "
        f"(target ≤ 1.10x; 90 % bootstrap interval {low:.2f}x to {high:.2f}x: how far the "
        "ratio moves with other samples from the same windows, not with the machine's drift "
        "between them, which the solo windows' spread shows)."
    )
    results = {
        "noisy_steady_p99_solo_ms": num(solo.p(99)),
        "noisy_steady_p99_flood_ms": num(quota.p(99)),
        "noisy_steady_p99_flood_fast_model_ms": num(fast.p(99)),
        "noisy_steady_p99_flood_in_step_ms": num(in_step.p(99)),
        "noisy_steady_p99_flood_model_call_quota_only_ms": num(calls_only.p(99)),
        "noisy_steady_p99_flood_no_quota_ms": num(free.p(99)),
        "noisy_steady_p99_flood_over_slots_ms": num(over.p(99)),
        "noisy_steady_p99_solo_windows_ms": [num(x) for x in solo_p99s],
        "noisy_steady_p99_flood_windows_ms": [num(x) for x in flood_p99s],
        "noisy_steady_p99_ratio": num(ratio, 3),
        "noisy_steady_p99_ratio_interval": [num(low, 3), num(high, 3)],
    }
    print(md, flush=True)
    return {"results": results, "markdown": md}


if __name__ == "__main__" and os.environ.get("NOISY_FLOODER"):
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(flooder())
elif __name__ == "__main__":
    from mesh import Agent, Verdict
    from tests.support.samples import Proposal

    agent = Agent(os.environ["NOISY_AGENT"], prompt="Vote on the proposal.")

    def rules(p: Proposal) -> Verdict:
        return Verdict.approve("rules: the model chain fell through")

    agent.rules(rules)
    agent.main()
