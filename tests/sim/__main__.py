"""`python -m tests.sim`: run seeded schedules of the simulated mesh (see tests/sim/world.py).

python -m tests.sim --seed 1234          replay one seed, print its trace and verdict
python -m tests.sim --schedules 100000   run seeds 0..N-1, report failures and schedules/s
python -m tests.sim --bug late-vote ...  the same with a historical bug put back (mutants.py)
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time

from tests.sim import mutants
from tests.sim.world import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seed", type=int, help="replay this seed (prints the trace)")
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument(
        "--bug", choices=sorted(mutants.BUGS + mutants.RARE), help="put a historical bug back"
    )
    parser.add_argument("--stop-at-first", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--allow",
        default=",".join(mutants.KNOWN),
        help="violation kinds to count but not fail on (known, open findings)",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the code under test logs every crash it survives
    allowed = {k for k in args.allow.split(",") if k}
    if args.seed is not None:
        with mutants.applied(args.bug):
            result = run(args.seed)
        print(result.report())
        return 1 if [v for v in result.violations if v.kind not in allowed] else 0
    return sweep(
        args.start,
        args.schedules,
        allowed,
        jobs=args.jobs,
        bug=args.bug,
        stop_at_first=args.stop_at_first,
    )


def _chunk(job: tuple[int, int, str | None]) -> list[tuple[int, list[str]]]:
    """Seeds start..start+n-1 in a worker: the seeds that broke a promise, with what broke."""
    start, n, bug = job
    logging.disable(logging.CRITICAL)
    found = []
    with mutants.applied(bug):
        for seed in range(start, start + n):
            result = run(seed, keep_trace=False)
            if result.violations:
                found.append((seed, sorted({v.kind for v in result.violations})))
    return found


def sweep(
    start: int,
    n: int,
    allowed: set[str],
    *,
    jobs: int = 1,
    bug: str | None = None,
    stop_at_first: bool = False,
) -> int:
    began = time.perf_counter()
    chunk = 1 if stop_at_first else 500
    work = [(s, min(chunk, start + n - s), bug) for s in range(start, start + n, chunk)]
    kinds: dict[str, list[int]] = {}
    failed: list[int] = []
    done = 0
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        for part, (_, size, _) in zip(pool.imap(_chunk, work), work, strict=True):
            done += size
            for seed, broke in part:
                for kind in broke:
                    kinds.setdefault(kind, []).append(seed)
                if any(k not in allowed for k in broke):
                    failed.append(seed)
            if failed and stop_at_first:
                pool.terminate()
                break
            if done % 50_000 < chunk:
                rate = done / (time.perf_counter() - began)
                print(f"  {done} schedules, {rate:.0f}/s, {len(failed)} failed", flush=True)
    elapsed = time.perf_counter() - began
    print(
        f"{done} schedules (seeds {start}..{start + done - 1}, {jobs} process(es)) in "
        f"{elapsed:.1f} s: {done / elapsed:.0f} schedules/s; {len(failed)} failed"
    )
    for kind, seeds in sorted(kinds.items()):
        tag = " (known, allowed)" if kind in allowed else ""
        print(f"  {kind}{tag}: {len(seeds)} schedules, first seed {min(seeds)}")
    if failed:
        first = min(failed)
        with mutants.applied(bug):
            print(run(first).report())
        print(
            f"first failing seed: {first}; replay: make sim SEED={first}"
            + (f" BUG={bug}" if bug else "")
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
