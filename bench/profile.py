"""Sampling a process under load with py-spy (if installed) and summarising where its CPU goes.

py-spy is not a project dependency: `.venv/bin/pip install py-spy` to get profiles; without it
the benchmarks skip this step and say so. Only the thread holding the GIL is sampled (`--gil`):
the event loop waiting in epoll and worker threads waiting for the GIL are left out, so the
share of samples in a function ≈ its share of the process's Python CPU time; multiplied by the
CPU seconds per request measured from /proc, that is µs per request (an estimate: time outside
the GIL, e.g. in socket syscalls, is spread over the Python frames by that multiplication).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import md_table

_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)\s*$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


async def record(pid: int, seconds: float, out: Path, rate: int = 250) -> bool:
    """Collapsed stacks of `pid` for `seconds` into `out`; False if py-spy is missing/failed."""
    exe = py_spy()
    if exe is None:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "-p",
        str(pid),
        "-d",
        str(max(1, round(seconds))),
        "-r",
        str(rate),
        "-f",
        "raw",
        "-o",
        str(out),
        "--nonblocking",
        "--gil",  # only the thread holding the GIL: Python CPU time, no threads waiting for it
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    if proc.returncode != 0 or not _exists(out):
        print(f"  · py-spy failed: {err.decode(errors='replace')[-300:]}", flush=True)
        return False
    return True


def _exists(path: Path) -> bool:
    return path.exists()


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py:123)` → `func (module.py)`; paths shortened to the package."""
    m = _LINE.search(frame)
    if not m:
        return frame.strip()
    func = frame[: m.start()].strip()
    path = m.group(1)
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# Buckets: (label, substrings of a frame that put a sample in it). Each sample goes to the first
# bucket matched walking from the innermost frame outwards; the event loop only gets samples
# whose innermost frame is its own (every stack has asyncio at its root).
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "exception formatting (OTel record_exception → traceback, linecache, ast)",
        ("traceback.py", "linecache.py", "ast.py", "record_exception", "textwrap.py"),
    ),
    ("JSON (de)serialisation, protobuf conversion", ("json_format", "json/", "msgspec")),
    ("JetStream task store (mesh/a2a/taskstore.py)", ("taskstore.py",)),
    ("nats-py client (parse, publish, flush)", ("nats/aio", "nats/js", "nats/protocol")),
    (
        "OpenTelemetry spans and context (no-op/proxy tracer included)",
        (
            "opentelemetry",
            "trace/__init__.py",
            "trace/span.py",
            "trace/propagation",
            "context/__init__.py",
            "contextvars_context.py",
            "util/_decorator.py",
            "sdk/trace",
            "a2a/utils/telemetry.py:",
        ),
    ),
    # Before a2a-sdk's: its pattern ("a2a/") would also take the mesh's own mesh/a2a/ frames.
    ("mesh A2A code (mesh/a2a: binding, dispatch, lean path)", ("mesh/a2a/",)),
    (
        "mesh agent runtime and votes (mesh/agent.py, mesh/votes.py)",
        ("mesh/agent.py", "mesh/votes.py", "mesh/identity.py"),
    ),
    ("a2a-sdk request handler / task manager / event queue", ("a2a/", "aiologic", "culsans")),
    ("starlette / uvicorn / h11 (HTTP)", ("starlette/", "uvicorn/", "h11/", "httptools")),
    ("logging", ("logging/",)),
    ("worker thread hand-off (asyncio.to_thread)", ("concurrent/futures", "threading.py")),
)
_LOOP = ("asyncio/",)


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Inclusive and self shares per function, and a coarse breakdown by component."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        for name in set(frames):
            inclusive[name] += count
        self_time[frames[-1]] += count
        raw = stack.split(";")
        label = "other Python (mesh code, handler, stdlib)"
        for frame in reversed(raw):  # the innermost frame that belongs to a known component
            hit = next((b for b, keys in BUCKETS if any(k in frame for k in keys)), None)
            if hit:
                label = hit
                break
        else:
            if any(k in raw[-1] for k in _LOOP):
                label = "asyncio event loop itself"
        buckets[label] += count
    if total == 0:
        return {"samples": 0}

    def share(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, cnt / total) for name, cnt in c.most_common(n)]

    return {
        "samples": total,
        "inclusive": share(inclusive, top * 3),
        "self": share(self_time, top),
        "buckets": share(buckets, len(BUCKETS) + 1),
    }


def report(title: str, summary: dict[str, Any], cpu_us_per_unit: float, unit: str) -> str:
    """Markdown: component breakdown and top self-time functions, in % and µs per `unit`."""
    if not summary.get("samples"):
        return f"### {title}\n\n(no samples)\n"
    us = cpu_us_per_unit
    bucket_rows = [
        (name, f"{share * 100:.1f}%", f"{share * us:,.0f}") for name, share in summary["buckets"]
    ]
    self_rows = [
        (f"`{name}`", f"{share * 100:.1f}%", f"{share * us:,.0f}")
        for name, share in summary["self"]
    ]
    # Inclusive: only frames that say something (skip the event loop's own plumbing).
    skip = ("asyncio/", "<module>", "runpy", "run (", "main (", "_run_once", "_run (", "Thread.")
    inc = [(n, s) for n, s in summary["inclusive"] if not any(k in n for k in skip)][:15]
    inc_rows = [(f"`{name}`", f"{share * 100:.1f}%", f"{share * us:,.0f}") for name, share in inc]
    return "\n\n".join(
        [
            f"### {title}\n\n{summary['samples']} samples; CPU per {unit} {us:,.0f} µs "
            "(from /proc); µs columns = share x that.",
            md_table(["component (innermost frame)", "share", f"µs/{unit}"], bucket_rows),
            md_table(["function (inclusive)", "share", f"µs/{unit}"], inc_rows),
            md_table(["function (self)", "share", f"µs/{unit}"], self_rows),
        ]
    )
