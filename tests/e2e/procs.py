"""End-to-end helpers: run the `mesh` console script as real OS processes, and clean up.

Everything here is bounded in time and kills only what the test started: each `mesh` process
gets its own session (so its process group is ours to signal), and the processes it spawns in
turn (nats-server, coordinator, agents: each in a session of its own) are found through /proc
as descendants of the process we started, remembered with their start time (so a recycled pid
is never touched), and killed on teardown if they outlived their parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.support.waits import eventually, wait_for

MESH = Path(sys.executable).parent / "mesh"

HEARTBEAT_S = 0.5
CARD_TTL_S = 3.0
CLI_TIMEOUT_S = 30.0
UP_READY_TIMEOUT_S = 60.0
UP_STOP_TIMEOUT_S = 20.0


# -- environment ----------------------------------------------------------------------------------
def mesh_env(cwd: Path, *, fast_clocks: bool = True, **extra: str) -> dict[str, str]:
    """A copy of our environment for a `mesh` process: no MESH_* from outside (in particular no
    MESH_NATS_URL), its own MESH_HOME under `cwd`, no model API key; with `fast_clocks`, short
    heartbeat and card TTL (children inherit them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    for key in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        env.pop(key, None)
    env.update(
        MESH_HOME=str(cwd / ".mesh"),
        MESH_ALLOW_MODEL_REQUESTS="0",
        MESH_CONSOLE_PORT="0",  # any free port: parallel `mesh up`s never collide on 8780
        PYTHONUNBUFFERED="1",
        COLUMNS="250",  # rich tables are not truncated or wrapped in the captured output
        TMPDIR=str(cwd),  # temp folders the product makes (demo logs, ports files) stay here
    )
    if fast_clocks:
        env.update(MESH_HEARTBEAT_S=str(HEARTBEAT_S), MESH_CARD_TTL_S=str(CARD_TTL_S))
    env.update(extra)
    return env


# -- processes ------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) for every process we can see in /proc."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of `pid` as {pid: start time} (empty where /proc is not available)."""
    if not Path("/proc").is_dir():
        return {}
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        ppid, state, started = table[p]
        if state not in ("Z", "X"):
            found[p] = started
        todo.extend(children.get(p, []))
    return found


def still_running(known: dict[int, str]) -> list[int]:
    """The remembered processes that still run (same pid and start time)."""
    return [pid for pid, started in known.items() if _start_time(pid) == started]


def kill_remembered(known: dict[int, str]) -> list[int]:
    """SIGKILL every remembered process still alive (same pid *and* start time); their pids."""
    killed = []
    for pid, started in known.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@dataclass
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"`mesh {' '.join(self.args)}` exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"
        )

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_mesh(
    args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = CLI_TIMEOUT_S
) -> Ran:
    """Run `mesh ARGS` to completion (bounded); never leaves it or anything it spawned behind."""
    proc = subprocess.Popen(
        [str(MESH), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    known: dict[int, str] = {}
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            known.update(descendants(proc.pid))
            _kill_group(proc)
            out, err = proc.communicate(timeout=10)
            ran = Ran(args, -9, out.decode(errors="replace"), err.decode(errors="replace"))
            raise AssertionError(f"timed out after {timeout:.0f}s: {ran}") from None
    finally:
        if proc.poll() is None:
            known.update(descendants(proc.pid))
            _kill_group(proc)
        kill_remembered(known)
    return Ran(args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# -- `mesh up` ------------------------------------------------------------------------------------
@dataclass
class MeshUp:
    """A running `mesh up` (started by `start_mesh_up`)."""

    cwd: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    url: str = ""
    known: dict[int, str] = field(default_factory=dict)  # everything it spawned
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)

    @property
    def home(self) -> Path:
        return self.cwd / ".mesh"

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def remember_children(self) -> dict[int, str]:
        found = descendants(self.proc.pid)
        self.known.update(found)
        return found

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"`mesh up` exited with {self.proc.returncode}\n{self.logs()}")

    def wait_decision(self, event_id: str, *, timeout: float = 20.0) -> dict[str, Any]:
        """The decision `mesh decisions --json` lists for `event_id`, once there (bounded; the
        bound only ends a broken run); a failure carries the processes' logs."""

        def decided() -> dict[str, Any] | None:
            listed = self.mesh("decisions", "--json", "--limit", "100")
            assert listed.returncode == 0, str(listed)
            return next((d for d in listed.json() if d["event_id"] == event_id), None)

        try:
            found: dict[str, Any] = wait_for(
                decided,
                f"decision for {event_id}",
                timeout=timeout,
                every=0.2,
                alive=self.assert_running,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None
        return found

    def logs(self) -> str:
        parts = [
            f"--- mesh up stdout ---\n{self.stdout()[-2000:]}",
            f"--- mesh up stderr ---\n{self.stderr()[-3000:]}",
        ]
        for log in sorted((self.home / "logs").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    async def wait_agents(
        self, ready: Callable[[list[Any]], bool], what: str, *, timeout: float = 30.0
    ) -> list[Any]:
        """Until the live registrations (read as the product reads them) satisfy `ready`;
        returns them. On failure: what was live at the end, and every log."""
        seen: list[str] = []

        async def check() -> list[Any] | None:
            regs = await live_registrations(self.url, self.home)
            now = time.time()
            seen[:] = [
                f"{r.agent}/{r.instance} pid={r.pid} seen {now - r.seen_at:.1f}s ago" for r in regs
            ]
            return regs if ready(regs) else None

        try:
            got: list[Any] = await eventually(
                check,
                what,
                timeout=timeout,
                every=0.2,
                alive=self.assert_running,
                detail=lambda: seen,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None
        return got

    def mesh(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> Ran:
        """Run another `mesh` command in the same folder (it finds the server via MESH_HOME)."""
        return run_mesh(list(args), cwd=self.cwd, env=self.env, timeout=timeout)

    def stop(self) -> None:
        """SIGINT, wait (bounded), then kill the group; then anything it left behind. Raises if
        a graceful stop left processes running (that is a product bug worth seeing)."""
        leftovers: list[int] = []
        try:
            if self.proc.poll() is None:
                self.remember_children()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(UP_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    _kill_group(self.proc)
                else:
                    # A clean stop waits for its children; give stragglers a bounded moment.
                    with contextlib.suppress(AssertionError):
                        wait_for(lambda: not still_running(self.known), "children gone", timeout=5)
                    leftovers = still_running(self.known)
        finally:
            _kill_group(self.proc)
            kill_remembered(self.known)
            for f in self._files:
                f.close()
        if leftovers:
            raise AssertionError(f"`mesh up` stopped but left processes running: {leftovers}")


def _up_ready(up: MeshUp) -> bool:
    up.assert_running()
    if "mesh is up" not in up.stdout():
        return False
    state = up.home / "nats.json"
    try:
        up.url = str(json.loads(state.read_text())["url"])
    except (OSError, ValueError, KeyError):
        return False
    return True


def start_mesh_up(cwd: Path, *args: str, **extra_env: str) -> MeshUp:
    """Start `mesh up ARGS` in `cwd` and wait until it says it is up and wrote its state file
    (on failure: its output and every process log in the error)."""
    env = mesh_env(cwd, **extra_env)
    out = open(cwd / "up.stdout", "wb")  # noqa: SIM115  # closed in MeshUp.stop
    err = open(cwd / "up.stderr", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(MESH), "up", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
    )
    up = MeshUp(cwd, env, proc, cwd / "up.stdout", cwd / "up.stderr", _files=[out, err])
    try:
        what = " ".join(["`mesh up", *args]) + "` ready"
        wait_for(lambda: _up_ready(up), what, timeout=UP_READY_TIMEOUT_S)
        up.remember_children()
    except BaseException as e:
        logs = up.logs()
        up.stop()
        if isinstance(e, AssertionError) and logs not in str(e):
            raise AssertionError(f"{e}\n{logs}") from None
        raise
    return up


# -- talking to the mesh from the test process ----------------------------------------------------
def bus_settings(home: Path | None = None) -> Any:
    """Settings for the test process's own connections. `home`: a `mesh up`'s MESH_HOME, whose
    operator identity (the one its servers admit) the test then connects as; without it, the
    run's identity (MESH_IDENTITY, for servers the tests start themselves)."""
    from mesh.settings import Settings

    who: dict[str, Any] = {}
    if home is not None:
        who = {
            "identity": home / "identity" / "operator.json",
            "trust": home / "identity" / "trust.json",
        }
    # Explicit values, so MESH_* variables of whoever runs the tests cannot change them.
    return Settings(
        heartbeat_s=HEARTBEAT_S,
        card_ttl_s=CARD_TTL_S,
        http_port=0,
        tenant="default",
        stream_replicas=1,
        nats_url="",
        **who,
    )


def bearer(home: Path) -> dict[str, str]:
    """The `Authorization` header an A2A call over HTTP carries: the operator's token of the
    `mesh up` in `home` (agents ask for one once A2A authentication is on)."""
    from mesh.identity import load_identity

    token = load_identity(home / "identity" / "operator.json").token
    return {"Authorization": f"Bearer {token}"}


async def live_registrations(url: str, home: Path | None = None) -> list[Any]:
    """The registry as the product reads it (`mesh.registry.Registry`), over a fresh connection
    (as the operator of the `mesh up` in `home`, when given)."""
    from mesh.bus import Bus
    from mesh.registry import Registry

    async with await Bus.connect(url, name="e2e-test", settings=bus_settings(home)) as bus:
        return await Registry(bus).live()


# -- who the processes are ------------------------------------------------------------------------
def environ_of(pid: int) -> dict[str, str]:
    """A process's environment, as /proc shows it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def argv_of(pid: int) -> list[str]:
    return (
        Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    )


def secrets_of(home: Path) -> list[str]:
    """Every secret in a `mesh up`'s identity folder: seeds, signing keys, tokens."""
    from mesh.identity import load_identity

    found = []
    for path in (home / "identity").glob("*.json"):
        if path.name in ("trust.json", "users.json"):
            continue
        identity = load_identity(path)
        found += [identity.nats_seed, identity.signing_seed, identity.token]
    return [s for s in found if s]


async def refused(url: str, seed: str | None = None) -> str:
    """Connect as an outside client (anonymous, or with a NATS seed): the server's refusal."""
    import nats

    errors: list[str] = []

    async def remember(e: Exception) -> None:
        errors.append(str(e))

    opts = {"nkeys_seed_str": seed} if seed else {}
    try:
        nc = await nats.connect(
            url,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
            error_cb=remember,
            **opts,  # type: ignore[arg-type]
        )
    except Exception as e:
        return f"{e} {' '.join(errors)}".lower()
    await nc.close()
    raise AssertionError(f"{url} let a client in ({'anonymous' if not seed else 'a wrong key'})")


def stranger_seed(folder: Path) -> str:
    """The seed of a well-formed identity no `mesh up` was ever told about."""
    from mesh.identity import IdentityDir

    return IdentityDir.init(folder / "stranger").operator().nats_seed
