"""Shared helpers for the benchmarks: processes, /proc readings, percentiles, tables, results.

Everything here is bounded: every wait has a deadline, every process we start is stopped by pid.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SAMPLES = REPO / "agents" / "samples"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


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


# -- child processes --------------------------------------------------------------------------
def child_env(nats_url: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MESH_NATS_URL": nats_url,
        "MESH_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "ANTHROPIC_API_KEY": "",  # the rules answer, never a model
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.update(extra)
    return env


def spawn(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m module` as its own OS process (own session), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=str(REPO),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM this one process (by pid), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def wait_json_file(
    path: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0
) -> dict[str, Any]:
    """A ready file a child writes once it serves; the child dying or the deadline is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited with {proc.returncode}:\n{tail(log_path)}")
        data = read_json(path)
        if data is not None:
            return data
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{log_path.stem} not ready within {timeout:.0f}s (log: {log_path})")


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if it is missing or half written."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def write_json(path: Path, doc: Any) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def write_card(folder: Path, name: str, skill: str) -> Path:
    card = {
        "name": name,
        "description": f"benchmark agent {name}",
        "version": "1.0.0",
        "capabilities": {"streaming": False},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [{"id": skill, "name": skill, "description": "benchmark", "tags": ["bench"]}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


def sample(name: str = "clean") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / f"release_{name}.json").read_text())
    return data


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
