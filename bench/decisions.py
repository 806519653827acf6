"""Decisions end to end: coordinator + voters as OS processes, events at a sweep of offered loads.

1. Open-loop sweep with 3 trivial voters (50, 100, 200, ... /s, each step bounded): decisions/s
   and wall-clock publish → decision latency (the bench subscribes to `mesh.decision.>` and
   matches event ids). Doubling stops at the first step not sustained (a backlog left after the
   drain bound, p99 ≥ 1 s, or < 85 % of the offered rate decided per second in the window's second
   half); bisection then narrows the gap. `decisions_per_s_3_voters` = the highest offered rate
   sustained. A closed loop (16 events in flight) gives the throughput without a schedule.
2. Half the sustained rate → `decision_p99_ms_half_load`.
3. 1, 3, 5, 9, 16 voters: closed-loop throughput and CPU per decision, then latency at one fixed
   open-loop load (a quarter of the 3-voter sustained rate).
4. The real reviewer agents (`agents/samples/release_clean.json`, majority of 3): closed loop,
   then half of that.

Between steps the bench waits until coordinator and voters are idle, so one step's leftovers are
billed to it and not to the next.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bench import profile
from bench.common import Sized, banner, fmt, md_table, note, num
from bench.harness import BenchMesh, Step
from tests.support.samples import sample

GROUPS = ("coordinator", "voters", "nats-server", "bench (publisher)")


@dataclass
class Opts(Sized):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "rates": [25, 50, 100, 200, 400],
            "voter_counts": [1, 3, 5],
            "step_s": 2.0,
            "drain_s": 6.0,
            "refine": 1,
        },
        "smoke": {
            "rates": [20, 40],
            "voter_counts": [1, 3],
            "step_s": 1.0,
            "drain_s": 3.0,
            "refine": 0,
            "window": 4,
            "settle_s": 5.0,
        },
    }
    profile: bool = False
    real: bool = True
    rates: list[int] = field(default_factory=lambda: [50, 100, 200, 400, 800, 1600])
    step_s: float = 5.0
    drain_s: float = 10.0
    voter_counts: list[int] = field(default_factory=lambda: [1, 3, 5, 9, 16])
    refine: int = 2  # bisection steps between the last sustained rate and the first not
    window: int = 16  # events in flight in the closed-loop runs
    settle_s: float = 60.0  # bound of the wait for idle processes between steps


def _step_row(s: Step) -> tuple[Any, ...]:
    return (
        s.label,
        s.voters,
        fmt(s.offered),
        fmt(s.published_rate),
        fmt(s.steady_rate),
        f"{s.decided}/{s.published}",
        fmt(s.p(50), 1),
        fmt(s.p(99), 1),
        fmt(s.coord_p(50), 1),
        fmt(s.cpu_ms_per_decision("coordinator"), 2),
        fmt(s.cpu_ms_per_decision("voters"), 2),
        fmt(s.cpu_ms_per_decision("nats-server"), 2),
        "yes" if s.sustainable else "**no**",
        s.not_approved(),
    )


STEP_HEADERS = (
    "step",
    "voters",
    "offered/s",
    "published/s",
    "decided/s (steady)",
    "decided",
    "p50 ms",
    "p99 ms",
    "coord. latency_ms p50",
    "coordinator CPU ms/decision",
    "voters CPU ms/decision",
    "nats-server CPU ms/decision",
    "sustained",
    "not approved",
)


def _show(s: Step) -> None:
    note(
        f"{s.label}: offered {s.offered:.0f}/s, published {s.published_rate:.0f}/s, "
        f"steady {s.steady_rate:.0f}/s, decided {s.decided}/{s.published}, "
        f"p50 {s.p(50):.1f} ms p99 {s.p(99):.1f} ms, "
        f"{'sustained' if s.sustainable else 'NOT sustained'}"
    )


async def run(opts: Opts) -> dict[str, Any]:
    banner("decisions end to end: coordinator + voters as OS processes")
    work = Path(tempfile.mkdtemp(prefix="mesh-bench-decisions-"))
    note(f"work dir and child logs: {work}")
    mesh = BenchMesh(work, voter_counts=opts.voter_counts, settle_s=opts.settle_s)
    try:
        await mesh.start()
        return await _run(opts, mesh, sample("clean"))
    finally:
        await mesh.close()


async def _sweep(opts: Opts, mesh: BenchMesh, data: Any) -> list[Step]:
    """Doubling rates until one is not sustained, then bisect between the last good and it."""
    steps: list[Step] = []

    async def step(rate: float) -> Step:
        s = await mesh.offer(
            f"sweep {rate:.0f}/s",
            "bench.v3",
            data,
            rate=rate,
            seconds=opts.step_s,
            drain_s=opts.drain_s,
        )
        s.voters = 3
        steps.append(s)
        _show(s)
        return s

    good, bad = 0.0, 0.0
    for rate in opts.rates:
        if (await step(rate)).sustainable:
            good = rate
        else:
            bad = rate
            break
    for _ in range(opts.refine if bad else 0):
        mid = (good + bad) / 2
        if mid < 1 or bad - good < max(5.0, 0.1 * bad):
            break
        if (await step(mid)).sustainable:
            good = mid
        else:
            bad = mid
    return steps


async def _pair(
    opts: Opts,
    mesh: BenchMesh,
    data: Any,
    label: str,
    *,
    event_type: str,
    voters: int,
    rate: float | None,
) -> list[Step]:
    """A closed-loop run (throughput), then an open-loop one at `rate` (None: half of that
    throughput)."""
    cap = await mesh.closed_loop(
        f"{label}, closed loop", event_type, data, window=opts.window, seconds=opts.step_s
    )
    cap.voters = voters
    _show(cap)
    rate = max(1.0, rate if rate is not None else cap.offered / 2)
    lat = await mesh.offer(
        f"{label}, {rate:.0f}/s",
        event_type,
        data,
        rate=rate,
        seconds=opts.step_s,
        drain_s=opts.drain_s,
    )
    lat.voters = voters
    _show(lat)
    return [cap, lat]


async def _run(opts: Opts, mesh: BenchMesh, data: Any) -> dict[str, Any]:
    await mesh.ensure_voters(3)
    await mesh.ready("bench.v3", data)
    note("mesh up: coordinator + 3 voters, one event decided")
    await mesh.offer("warm-up", "bench.v3", data, rate=opts.rates[0], seconds=1.0, drain_s=5)

    sweep = await _sweep(opts, mesh, data)
    max_sustained = _max_sustained(sweep)
    closed3 = await mesh.closed_loop(
        f"closed loop, {opts.window} in flight",
        "bench.v3",
        data,
        window=opts.window,
        seconds=opts.step_s,
    )
    closed3.voters = 3
    _show(closed3)
    note(
        f"max sustained ≈ {max_sustained:.0f}/s open loop; closed loop ({opts.window} in "
        f"flight) {closed3.offered:.0f}/s"
    )
    half_rate = max(1.0, (max_sustained or closed3.offered) / 2)
    half = await mesh.offer(
        "half load", "bench.v3", data, rate=half_rate, seconds=opts.step_s, drain_s=opts.drain_s
    )
    half.voters = 3
    _show(half)

    profiles_md, profiles = "", {}
    if opts.profile:
        profiles_md, profiles = await _profile(opts, mesh, data)

    voters: list[Step] = []
    fixed = max(1.0, (max_sustained or closed3.offered) / 4)
    for k in opts.voter_counts:
        await mesh.ensure_voters(k)
        await mesh.ready(f"bench.v{k}", data)
        voters += await _pair(
            opts, mesh, data, f"{k} voters", event_type=f"bench.v{k}", voters=k, rate=fixed
        )

    real: list[Step] = []
    if opts.real:
        mesh.stop_voters()
        await mesh.start_reviewers()
        await mesh.ready("bench.real", data)
        note("real reviewers up")
        real = await _pair(
            opts, mesh, data, "real reviewers", event_type="bench.real", voters=3, rate=None
        )

    return _report(opts, Steps(sweep, closed3, half, voters, real), (profiles_md, profiles))


async def _profile(
    opts: Opts, mesh: BenchMesh, data: Any, tag: str = ""
) -> tuple[str, dict[str, Any]]:
    if profile.py_spy() is None:
        note("py-spy not installed: no profile (pip install py-spy into .venv to get one)")
        return "", {}
    seconds = 3.0 if opts.short else 8.0
    coord_path = mesh.work / f"profile-coordinator{tag}.txt"
    voter_path = mesh.work / f"profile-voter{tag}.txt"
    voter = mesh.voter_procs()[0]
    await mesh.settle()
    note(f"profiling coordinator (pid {mesh.coord.pid}) and {voter.name}, closed loop")
    recs = [
        asyncio.create_task(profile.record(mesh.coord.pid, seconds, coord_path)),
        asyncio.create_task(profile.record(voter.pid, seconds, voter_path)),
    ]
    await asyncio.sleep(0.3)
    v0 = voter.cpu_s()
    step = await mesh.closed_loop(
        "profile", "bench.v3", data, window=opts.window, seconds=seconds - 0.5
    )
    v1 = voter.cpu_s()
    done = await asyncio.gather(*recs)
    parts: list[str] = []
    out: dict[str, Any] = {}
    if done[0]:
        summary = profile.summarise(coord_path)
        us = step.cpu_ms_per_decision("coordinator") * 1000
        parts.append(
            profile.report("Coordinator, per decision (3 voters)", summary, us, "decision")
        )
        out["coordinator"] = {
            "cpu_us_per_decision": num(us, 0),
            "buckets": [(n, round(s, 4)) for n, s in summary.get("buckets", [])],
            "self": [(n, round(s, 4)) for n, s in summary.get("self", [])],
            "raw_stacks": str(coord_path),
        }
    if done[1] and step.decided and not tag:
        summary = profile.summarise(voter_path)
        us = (v1 - v0) / step.decided * 1e6
        parts.append(profile.report("One voter agent, per vote", summary, us, "vote"))
        out["voter"] = {
            "cpu_us_per_vote": num(us, 0),
            "buckets": [(n, round(s, 4)) for n, s in summary.get("buckets", [])],
            "self": [(n, round(s, 4)) for n, s in summary.get("self", [])],
            "raw_stacks": str(voter_path),
        }
    return "\n\n".join(parts), {"decisions": out}


def _max_sustained(steps: list[Step]) -> float:
    """The highest offered rate among the steps that were sustained (0 if none was)."""
    return max((s.offered for s in steps if s.sustainable), default=0.0)


@dataclass
class Steps:
    """Every step a run made, by phase (see the module docstring)."""

    sweep: list[Step]  # the open-loop sweep, 3 voters
    closed3: Step  # closed loop, 3 voters
    half: Step  # half the sustained rate
    voters: list[Step]  # closed loop then fixed load, per number of voters
    real: list[Step]  # the real reviewers (empty with --no-real)

    @property
    def max_sustained(self) -> float:
        return _max_sustained(self.sweep)

    @property
    def saturated(self) -> bool:
        return any(not s.sustainable for s in self.sweep)


def _report(opts: Opts, steps: Steps, profiled: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    sweep, half, voters, real = [*steps.sweep, steps.closed3], steps.half, steps.voters, steps.real
    max_sustained, closed3, saturated = steps.max_sustained, steps.closed3, steps.saturated
    profiles_md, profiles = profiled
    sections = [
        "## Decisions end to end",
        f"Coordinator + voters as OS processes, one nats-server; event payload "
        f"`agents/samples/release_clean.json`; rule majority, agent_timeout_s 5, deadline_s 10; "
        f"each step {opts.step_s:.0f} s of open-loop publishing then ≤ {opts.drain_s:.0f} s to "
        "drain (a backlog left is purged). Latency = wall clock from publish to the decision "
        "arriving on `mesh.decision.>`; 'steady' = decisions/s in the second half of the window. "
        "CPU per decision from /proc over the step (incl. drain).",
        "### Offered-load sweep, 3 trivial voters",
        md_table(STEP_HEADERS, [_step_row(s) for s in [*sweep, half]]),
        f"Highest offered rate sustained with 3 voters: **{max_sustained:.0f} decisions/s** "
        f"({'a higher step was not sustained' if saturated else 'no step failed: a lower bound'}"
        f"); closed loop with {opts.window} events in flight: {closed3.offered:.0f}/s. "
        f"At half the sustained rate ({half.offered:.0f}/s): p50 {half.p(50):.1f} ms, "
        f"**p99 {half.p(99):.1f} ms**.",
        "### Voters per decision (closed loop for throughput, then a fixed open-loop load)",
        md_table(STEP_HEADERS, [_step_row(s) for s in voters]),
    ]
    if real:
        sections += [
            "### Real reviewer agents (security, compliance, quality; rules, no model)",
            md_table(STEP_HEADERS, [_step_row(s) for s in real]),
        ]
    if profiles_md:
        sections.append(profiles_md)
    md = "\n\n".join(sections)
    results: dict[str, Any] = {
        "decisions_per_s_3_voters": num(max_sustained),
        "decisions_per_s_3_voters_closed_loop": num(closed3.offered),
        "decisions_saturated": saturated,
        "decisions_max_sustained_offered_per_s": num(max_sustained),
        "decision_p50_ms_half_load": num(half.p(50), 2),
        "decision_p99_ms_half_load": num(half.p(99), 2),
        "decision_half_load_rate_per_s": num(half.offered),
    }
    three = next((s for s in voters if s.voters == 3 and s.closed), None)
    if three is not None:
        results["coordinator_cpu_ms_per_decision_3_voters"] = num(
            three.cpu_ms_per_decision("coordinator"), 3
        )
        results["voters_cpu_ms_per_decision_3_voters"] = num(three.cpu_ms_per_decision("voters"), 3)
    for s in voters:
        if s.closed:
            results[f"decisions_per_s_{s.voters}_voters_closed_loop"] = num(s.offered)
            results[f"cpu_ms_per_decision_{s.voters}_voters"] = num(
                sum(s.cpu_ms_per_decision(g) for g in GROUPS[:3]), 2
            )
        else:
            results[f"decision_p99_ms_{s.voters}_voters_fixed_load"] = num(s.p(99), 2)
    if real:
        results["decisions_per_s_real_reviewers_closed_loop"] = num(real[0].offered)
        results["decision_p99_ms_half_load_real_reviewers"] = num(real[1].p(99), 2)
    print("\n" + md, flush=True)
    return {"results": results, "markdown": md, "profiles": profiles}
