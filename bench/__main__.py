"""`python -m bench [transport|decisions|resources ...] [--quick|--smoke] [--profile] [--out DIR]`.

Runs the chosen benchmarks (all by default), prints their tables, the issue's targets with
met/missed, and writes `latest.json` and `latest.md` to `--out` (default bench/results). A
`--quick` run (minutes, small N) writes `quick.*` instead and a `--smoke` run (seconds, tiny N,
the profile step included: it only proves every benchmark still runs) writes `smoke.*`, so
neither replaces the figures of a full run. A run of only some benchmarks keeps the other
benchmarks' figures from the previous file in the same folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, fmt, loadavg, machine_info, md_table

ALL = ("transport", "decisions", "resources", "signing", "noisy")

# (label, result key, comparison, threshold, unit)
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("A2A over NATS p50 ≤ 1.5x raw NATS p50", "a2a_nats_over_raw_p50", "<=", 1.5, "x"),
    (
        "A2A over NATS req/s at c=32 ≥ 10x A2A over HTTP",
        "a2a_nats_over_http_rps_c32",
        ">=",
        10,
        "x",
    ),
    ("≥ 1000 decisions/s with 3 voters", "decisions_per_s_3_voters", ">=", 1000, "/s"),
    ("decision p99 < 50 ms at half of max load", "decision_p99_ms_half_load", "<", 50, "ms"),
    ("idle agent RSS ≤ 80 MB", "agent_idle_rss_mb", "<=", 80, "MB"),
    (
        "steady tenant p99 with a flooding neighbour ≤ 1.1x solo",
        "noisy_steady_p99_ratio",
        "<=",
        1.1,
        "x",
    ),
)

REQUIRED = (
    "a2a_nats_p50_us",
    "raw_nats_p50_us",
    "a2a_http_p50_us",
    "a2a_nats_rps_c32",
    "a2a_http_rps_c32",
    "decisions_per_s_3_voters",
    "decision_p99_ms_half_load",
    "agent_idle_rss_mb",
    "coordinator_idle_rss_mb",
)


def _met(value: Any, op: str, threshold: float) -> bool | None:
    if not isinstance(value, int | float):
        return None
    return {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op]


def targets_table(results: dict[str, Any]) -> str:
    rows = []
    for label, key, op, threshold, unit in TARGETS:
        value = results.get(key)
        met = _met(value, op, threshold)
        verdict = "not measured" if met is None else ("**met**" if met else "**missed**")
        shown = fmt(float(value), 2) if isinstance(value, int | float) else "-"
        rows.append((label, f"{shown} {unit}", f"{op} {threshold:g} {unit}", verdict))
    return "## Targets (from the issue)\n\n" + md_table(
        ["target", "measured", "goal", "verdict"], rows
    )


def _load(path: Any) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


async def _main(args: argparse.Namespace) -> int:
    chosen = args.benchmarks or list(ALL)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    stem = "latest" if size == "full" else size
    out_dir: Path = args.out
    previous = _load(out_dir / f"{stem}.json")
    results: dict[str, Any] = dict(previous.get("results", {}))
    sections: dict[str, str] = dict(previous.get("sections", {}))
    profiles: dict[str, Any] = dict(previous.get("profiles", {}))
    runs: dict[str, Any] = dict(previous.get("runs", {}))
    started = time.monotonic()
    machine = machine_info()
    print(
        f"machine: {machine['cpu_count']} x {machine['cpu_model']}, Python {machine['python']}, "
        f"{machine['nats_server']}; load average {loadavg()}",
        flush=True,
    )
    for name in chosen:
        runs[name] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "loadavg_at_start": loadavg(),
            "size": size,
        }
        if name == "transport":
            from bench import transport

            out = await transport.run(transport.Opts.make(size, profile=args.profile))
        elif name == "decisions":
            from bench import decisions

            opts = decisions.Opts.make(size, profile=args.profile, real=args.real)
            out = await decisions.run(opts)
        elif name == "signing":
            from bench import signing

            out = await signing.run(signing.Opts.make(size))
        elif name == "noisy":
            from bench import noisy

            out = await noisy.run(noisy.Opts.make(size))
        else:
            from bench import resources

            # The load runs at half the rate decisions sustained, if it ran (else it calibrates).
            chosen_opts = {"rate_hint": results.get("decisions_per_s_3_voters")}
            if args.events is not None:
                chosen_opts["events"] = args.events
            if args.max_seconds is not None:
                chosen_opts["max_seconds"] = args.max_seconds
            out = await resources.run(resources.Opts.make(size, **chosen_opts))
        results.update(out["results"])
        heading, _, body = out["markdown"].partition("\n\n")
        when = f"_Run {runs[name]['started']}, load average {runs[name]['loadavg_at_start']}._"
        sections[name] = f"{heading}\n\n{when}\n\n{body}"
        profiles.update(out.get("profiles", {}))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    targets = targets_table(results)
    header = (
        f"# Benchmark results ({size} run)\n\n"
        f"{now}; {machine['cpu_count']} x {machine['cpu_model']}; Python {machine['python']}; "
        f"{machine['nats_server']}. A shared, loaded machine: compare ratios within a "
        "benchmark's run, not absolute figures across runs; each section says when it ran."
    )
    md = "\n\n".join([header, targets, *(sections[n] for n in ALL if n in sections)]) + "\n"
    doc = {
        **{k: results.get(k) for k in REQUIRED},
        "machine": machine,
        "timestamp": now,
        "size": size,
        "benchmarks_run": chosen,
        "duration_s": round(time.monotonic() - started, 1),
        "results": results,
        "runs": runs,
        "sections": sections,
        "profiles": profiles,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    print("\n" + targets, flush=True)
    print(f"\nwrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmarks", nargs="*", metavar="BENCH", help=f"any of {', '.join(ALL)} (default: all)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small N: minutes instead of ~20")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny N, seconds: check that every benchmark still runs (implies --profile; "
        "its figures mean nothing)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample agent/coordinator with py-spy under load"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help=f"where the JSON and Markdown results go (default {RESULTS})",
    )
    parser.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run decisions with the real reviewer agents (default on)",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="events for the resources run (default: 100k if that fits in --max-seconds "
        "at the measured rate, else fewer)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time bound of the resources run's load phase (default 300; quick 60; smoke 5)",
    )
    args = parser.parse_args()
    for b in args.benchmarks:
        if b not in ALL:
            parser.error(f"unknown benchmark {b!r}; choose from {', '.join(ALL)}")
    args.profile = args.profile or args.smoke  # the profile step must not rot either
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from mesh.testing.identities import test_identities

    # Secured as `mesh up` is: the servers admit one identity folder's identities (a temporary
    # one unless MESH_IDENTITY names one), each mesh process its own, this process the operator.
    with test_identities():
        code = asyncio.run(_main(args))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
