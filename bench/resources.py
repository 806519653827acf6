"""Resources: RSS of idle processes, CPU seconds per decision, and RSS after N events.

A coordinator, 3 trivial voters (`bench.agent`, decide `bench.v3`) and, idle beside them, the 3
real reviewer agents as shipped (HTTP on, JetStream task store): their idle RSS is the
`agent_idle_rss_mb` figure. Then N events are decided, sampling every process's RSS and CPU time
from /proc at each tenth.

N defaults to 100k when that fits in `--max-seconds` at the measured rate, else to what fits
(printed); the load phase is also cut at `--max-seconds` whatever N is. The load is open loop at
half the highest sustained rate (from the decisions benchmark in the same run, else a short
calibration): above capacity the coordinator collapses (audit-chain races) and the run would
measure that instead of memory.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bench.common import Proc, Sized, banner, fmt, md_table, note, num
from bench.harness import BenchMesh
from tests.support.samples import sample

TARGET_EVENTS = 100_000
AGENT_BOUND_MB = 80.0  # the idle-agent target, also applied after the run


@dataclass
class Opts(Sized):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"events": 500, "max_seconds": 60.0},
        "smoke": {"events": 30, "max_seconds": 5.0, "idle_s": 0.5, "settle_s": 5},
    }
    events: int | None = None
    max_seconds: float = 300.0
    rate_hint: float | None = None  # decisions/s measured by the decisions benchmark, if it ran
    idle_s: float = 3.0  # how long the processes sit idle before their RSS is read
    settle_s: float = 60.0  # bound of the wait for idle processes


@dataclass
class Sample:
    decided: int
    at: float
    rss: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


def _procs(mesh: BenchMesh) -> dict[str, Proc]:
    procs = {"coordinator": mesh.coord, "nats-server": mesh.nats}
    procs.update({p.name: p for p in mesh.voter_procs()})
    return procs


def _sample(decided: int, procs: dict[str, Proc]) -> Sample:
    return Sample(
        decided,
        time.monotonic(),
        {n: p.rss_mb() for n, p in procs.items()},
        {n: p.cpu_s() for n, p in procs.items()} | {"bench (publisher)": time.process_time()},
    )


async def run(opts: Opts) -> dict[str, Any]:
    banner("resources: idle RSS, CPU per decision, RSS after N events")
    work = Path(tempfile.mkdtemp(prefix="mesh-bench-resources-"))
    note(f"work dir and child logs: {work}")
    mesh = BenchMesh(work, voter_counts=[3], settle_s=opts.settle_s)
    try:
        await mesh.start()
        return await _run(opts, mesh)
    finally:
        await mesh.close()


async def _run(opts: Opts, mesh: BenchMesh) -> dict[str, Any]:
    data = sample("clean")
    await mesh.ensure_voters(3)
    await mesh.start_reviewers(lean=True)
    procs = _procs(mesh)
    # Idle: up, registered, heartbeating, nothing asked of them yet.
    await mesh.settle()
    await asyncio.sleep(opts.idle_s)
    idle = _sample(0, procs)
    note(
        "idle RSS: "
        + ", ".join(f"{n} {v:.1f} MB" for n, v in idle.rss.items() if n != "nats-server")
    )
    await mesh.ready("bench.v3", data)

    # The load: open loop at half the highest sustained rate. Above that the coordinator's
    # audit appends race each other and it falls over (see bench/README.md), which would
    # measure the collapse, not the memory.
    rate = opts.rate_hint
    if not rate:
        note("calibrating: closed loop, 4 in flight")
        cal = await mesh.closed_loop(
            "calibration", "bench.v3", data, window=4, seconds=1.0 if opts.short else 5.0
        )
        rate = cal.offered
    rate = max(1.0, rate / 2)
    fits = int(rate * opts.max_seconds)
    events = opts.events or min(TARGET_EVENTS, max(100, fits // 100 * 100))
    if opts.events is None and events < TARGET_EVENTS:
        note(
            f"{TARGET_EVENTS:,} events would take ~{TARGET_EVENTS / rate / 60:.0f} min at "
            f"{rate:.0f}/s; using {events:,} (--max-seconds {opts.max_seconds:.0f})"
        )
    short_why = (
        ""
        if events >= TARGET_EVENTS
        else f"{TARGET_EVENTS:,} events at {rate:.0f}/s (half the sustained rate) would take "
        f"~{TARGET_EVENTS / rate / 60:.0f} min, past --max-seconds {opts.max_seconds:.0f}"
        if opts.events is None
        else f"--events {events:,} asked"
    )
    seconds = min(opts.max_seconds, events / rate)
    note(f"deciding {events:,} events at {rate:.1f}/s (open loop, ~{seconds:.0f} s)")

    samples: list[Sample] = [_sample(0, procs)]
    before = len(mesh.recv)
    marks = [max(1, events * i // 10) for i in range(1, 11)]

    async def sampler() -> None:
        while marks:
            decided = len(mesh.recv) - before
            while marks and decided >= marks[0]:
                marks.pop(0)
                samples.append(_sample(decided, procs))
                note(
                    f"{decided:,} decided; coordinator RSS {samples[-1].rss['coordinator']:.1f} MB"
                )
            await asyncio.sleep(0.2)

    watch = asyncio.create_task(sampler())
    try:
        load = await mesh.offer(
            "resources", "bench.v3", data, rate=rate, seconds=seconds, drain_s=30.0
        )
    finally:
        watch.cancel()
    end = _sample(load.decided, procs)
    await mesh.settle()
    await asyncio.sleep(opts.idle_s)
    after = _sample(load.decided, procs)
    return _report(
        opts,
        idle=idle,
        samples=samples,
        end=end,
        after=after,
        decided=load.decided,
        seconds=load.publish_s,
        asked=events,
        short_why=short_why,
    )


def slope_mb_per_10k(samples: list[Sample], name: str, decided: int) -> float:
    """RSS growth of `name` per 10k events over the run's second half, least squares over
    the samples there (robust to one noisy sample, unlike two end points); NaN if < 2."""
    pts = [(s.decided, s.rss[name]) for s in samples if s.decided >= decided / 2]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    if var == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in pts) / var * 10_000


def _report(
    opts: Opts,
    *,
    idle: Sample,
    samples: list[Sample],
    end: Sample,
    after: Sample,
    decided: int,
    seconds: float,
    asked: int,
    short_why: str = "",
) -> dict[str, Any]:
    voters = [n for n in idle.rss if n.startswith("bench-voter-")]
    reviewers = [n for n in idle.rss if n.endswith("-review")]
    lean = [n for n in idle.rss if n.endswith("-lean")]
    start = samples[0]
    cpu_rows = []
    per_decision: dict[str, float] = {}
    groups = {
        "coordinator": ["coordinator"],
        "3 voters (sum)": voters,
        "nats-server": ["nats-server"],
        "bench (publisher, this process)": ["bench (publisher)"],
    }
    for label, names in groups.items():
        used = sum(end.cpu[n] - start.cpu[n] for n in names)
        per_decision[label] = used / decided * 1000 if decided else float("nan")
        cpu_rows.append((label, fmt(used, 1), fmt(per_decision[label], 2)))
    total = sum(per_decision.values())
    cpu_rows.append(("**total**", "", fmt(total, 2)))

    mid = min(samples, key=lambda s: abs(s.decided - decided / 2))
    rss_rows = []
    bounded: dict[str, bool] = {}
    slopes: dict[str, float] = {}
    for name in ["coordinator", *voters, *reviewers, *lean, "nats-server"]:
        first, last = idle.rss[name], after.rss[name]
        late_growth = end.rss[name] - mid.rss[name]
        per_10k = slope_mb_per_10k([*samples, end], name, decided)
        if math.isnan(per_10k):  # too few samples: the two end points then
            per_10k = late_growth / max(1, end.decided - mid.decided) * 10_000
        slopes[name] = per_10k
        # Flat: the slope over the second half of the run adds up to no growth to speak of
        # (≤ 5 % of idle or ≤ 2 MB) over that half, nor per 10k events (a short run cannot
        # hide a steep slope); bounded: flat, and agents within the idle target after the run.
        allowed = max(2.0, 0.05 * first)
        half = end.decided - mid.decided
        flat = per_10k <= allowed and per_10k * half / 10_000 <= allowed
        agent = name in voters or name in reviewers or name in lean
        within = last <= AGENT_BOUND_MB if agent else True
        if name == "nats-server":  # the Go server's caches: shown, not judged
            bounded[name] = True
            verdict = "n/a"
        else:
            bounded[name] = flat and within
            verdict = ("flat" if flat else "**not flat**") + (
                ("" if within else f", **> {AGENT_BOUND_MB:.0f} MB**") if agent else ""
            )
        rss_rows.append(
            (
                name,
                fmt(first, 1),
                fmt(mid.rss[name], 1),
                fmt(end.rss[name], 1),
                fmt(last, 1),
                fmt(last - first, 1),
                fmt(per_10k, 2),
                verdict,
            )
        )
    rss_table = md_table(
        [
            "process",
            "idle MB",
            f"after {mid.decided:,}",
            f"after {end.decided:,}",
            "settled after run",
            "growth MB",
            "slope MB per 10k events (2nd half, least squares)",
            "flat?",
        ],
        rss_rows,
    )
    curve = md_table(
        ["decided", *[n for n in ["coordinator", voters[0] if voters else ""] if n]],
        [
            (f"{s.decided:,}", *[fmt(s.rss[n], 1) for n in ["coordinator", *voters[:1]]])
            for s in samples
        ],
    )
    agent_idle = max(idle.rss[n] for n in reviewers) if reviewers else float("nan")
    trivial_idle = max(idle.rss[n] for n in voters) if voters else float("nan")
    lean_idle = max(idle.rss[n] for n in lean) if lean else float("nan")
    cut = "" if decided >= asked else f" of {asked:,} asked (time bound hit)"
    if short_why:
        cut += f"; not {TARGET_EVENTS:,}: {short_why}"
    md = "\n\n".join(
        [
            "## Resources",
            f"RSS (VmRSS) and CPU time from /proc. {decided:,} events decided in "
            f"{seconds:.0f} s ({decided / seconds if seconds else 0:.1f}/s offered open loop, "
            f"3 trivial voters){cut}; "
            f"the real reviewers stayed idle beside them. 'Flat' = the least-squares slope of RSS "
            "over the run's second half adds up to ≤ max(2 MB, 5 % of idle) over that half and "
            "per 10k events; agents must also stay ≤ 80 MB after it.",
            "### CPU per decision",
            md_table(["process", "CPU s over the run", "CPU ms per decision"], cpu_rows),
            "### RSS",
            rss_table,
            "RSS while deciding (MB):",
            curve,
            f"Idle agent as shipped (max of the three reviewers): **{agent_idle:.1f} MB**; "
            f"idle trivial bench agent: {trivial_idle:.1f} MB; idle coordinator: "
            f"**{idle.rss['coordinator']:.1f} MB**. security-review without the `anthropic` "
            f"import (`bench/agent_lean.py`, a stub in its place): {lean_idle:.1f} MB.",
        ]
    )
    results: dict[str, Any] = {
        "agent_idle_rss_mb": num(agent_idle),
        "agent_idle_rss_mb_trivial": num(trivial_idle),
        "agent_idle_rss_mb_without_anthropic": num(lean_idle),
        "coordinator_idle_rss_mb": num(idle.rss["coordinator"]),
        "nats_server_idle_rss_mb": num(idle.rss["nats-server"]),
        "resources_events": decided,
        "resources_events_asked": asked,
        "resources_rate_per_s": num(decided / seconds if seconds else 0.0),
        "coordinator_rss_after_mb": num(after.rss["coordinator"]),
        "agent_rss_after_mb": num(max(after.rss[n] for n in voters)) if voters else None,
        "rss_bounded": all(bounded.values()),
        "rss_slope_mb_per_10k_coordinator": num(slopes["coordinator"], 3),
        "rss_slope_mb_per_10k_voter_max": (
            num(max(slopes[n] for n in voters), 3) if voters else None
        ),
        "cpu_ms_per_decision_coordinator": num(per_decision["coordinator"], 3),
        "cpu_ms_per_decision_voters": num(per_decision["3 voters (sum)"], 3),
        "cpu_ms_per_decision_nats_server": num(per_decision["nats-server"], 3),
        "cpu_ms_per_decision_total": num(total, 3),
    }
    print("\n" + md, flush=True)
    return {"results": results, "markdown": md}
