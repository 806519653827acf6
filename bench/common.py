"""Shared helpers for the benchmarks: /proc readings, percentiles, tables, the machine.

Processes, waits and payloads come from `tests.support` (the same launcher and samples the
fault and chaos suites use): every wait there has a deadline, every process is stopped by pid.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- run sizes -------------------------------------------------------------------------------
@dataclass
class Sized:
    """A benchmark's options at a run size: `full` (the defaults), `quick` (minutes) or `smoke`
    (seconds: does it still run?). A subclass lists what differs per size in SIZES."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = {}
    size: str = "full"

    @classmethod
    def make(cls, size: str, **chosen: Any) -> Self:
        """`chosen` (from the command line) wins over the size's presets."""
        return cls(size=size, **{**cls.SIZES.get(size, {}), **chosen})

    @property
    def short(self) -> bool:
        return self.size != "full"


# -- /proc ------------------------------------------------------------------------------------
@dataclass
class Proc:
    """CPU time and memory of one process, read from /proc (Linux)."""

    pid: int
    name: str = ""

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (0 if the process is gone)."""
        try:
            raw = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return 0.0
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        fields = raw[raw.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
        return (utime + stime) / _CLK_TCK

    def _status(self, key: str) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB → MB (MiB)
        except OSError:
            pass
        return 0.0

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def hwm_mb(self) -> float:
        """Peak RSS."""
        return self._status("VmHWM")


def cpu_of(procs: Iterable[Proc]) -> float:
    return sum(p.cpu_s() for p in procs)


# -- statistics and tables --------------------------------------------------------------------
def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def fmt(v: Any, digits: int = 0) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(v: float, digits: int = 1) -> float | None:
    """A JSON-safe rounded number (None for nan)."""
    if math.isnan(v):
        return None
    return round(float(v), digits)


# -- the machine ------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from mesh.server import find_binary

        out = subprocess.run(
            [find_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        nats_version = (out.stdout or out.stderr).strip()
    except Exception as e:
        nats_version = f"unknown ({e})"
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "nats_server": nats_version,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def banner(text: str) -> None:
    print(f"\n=== {text} (load {loadavg()}) ===", flush=True)


def note(text: str) -> None:
    print(f"  · {text}", flush=True)
