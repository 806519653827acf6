"""compose/: the container deployment, checked without Docker.

Parses compose/docker-compose.yml, compose/nats.conf, compose/otel-collector.yaml and
compose/Dockerfile and checks the rules the files promise: health-gated start-up, no published
NATS monitor port, one 3-node JetStream cluster, no anonymous NATS access and mTLS between the
nodes, an identity of its own for every mesh service, replicated coordinators and reviewers,
commands that resolve to real entry points, MESH_* names that are real settings, a non-root
runtime image without build tools, and a collector config whose pipelines name defined
components. The NATS config runs in a real nats-server (paths adjusted) that refuses an
anonymous client; `mesh creds compose` makes every secret the files mount; the container
healthcheck script (compose/healthcheck.py) is exercised against local servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import importlib
import importlib.util
import json
import re
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from mesh.dev import topology
from mesh.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
OTEL_FILE = COMPOSE_DIR / "otel-collector.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
HEALTHCHECK_SCRIPT = COMPOSE_DIR / "healthcheck.py"
NATS_CONF = COMPOSE_DIR / "nats.conf"
SECRETS = "./secrets/"  # what `mesh creds compose` writes (git-ignored), relative to compose/

NATS_MONITOR_PORT = 8222
# MESH_* variables read outside mesh/settings.py: none (Settings is their one reader).
MESH_VARS_READ_ELSEWHERE: frozenset[str] = frozenset()
BUILD_TOOLS = ("gcc", "g++", "clang", "build-essential", "make", "cmake", "python3-dev")


# -- loading ----------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose files")
    # safe_load resolves the anchors and `<<` merge keys the compose file uses.
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _load_yaml(COMPOSE_FILE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def otel() -> dict[str, Any]:
    doc = _load_yaml(OTEL_FILE)
    assert isinstance(doc, dict)
    return doc


def _is_nats(svc: dict[str, Any]) -> bool:
    return str(svc.get("image", "")).split(":", 1)[0] in ("nats", "docker.io/library/nats")


def _is_mesh(svc: dict[str, Any]) -> bool:
    """Built from compose/Dockerfile: runs `mesh ...`."""
    return "build" in svc


def _nats(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if _is_nats(s)}


def _mesh(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if _is_mesh(s)}


def _env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, from either compose form (mapping or KEY=VALUE list)."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], *names: str) -> str | None:
    """The value of `--flag value` or `--flag=value` in an argument list."""
    for i, arg in enumerate(cmd):
        for name in names:
            if arg == name and i + 1 < len(cmd):
                return cmd[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _replicas(svc: dict[str, Any]) -> int:
    return int((svc.get("deploy") or {}).get("replicas", 1))


def _healthcheck_test(svc: dict[str, Any]) -> list[str]:
    test = (svc.get("healthcheck") or {}).get("test") or []
    return shlex.split(test) if isinstance(test, str) else [str(t) for t in test]


def _port_numbers(spec: str | int | dict[str, Any]) -> set[int]:
    """Every container and host port a `ports:` entry names (short or long syntax, ranges)."""
    if isinstance(spec, dict):
        parts = [str(spec.get("target", "")), str(spec.get("published", ""))]
    else:
        text = str(spec).split("/", 1)[0]  # drop /tcp, /udp
        # [host_ip:][published:]target; an IPv6 host is bracketed, so rsplit keeps it whole.
        parts = text.rsplit(":", 2)[-2:] if ":" in text else [text]
    numbers: set[int] = set()
    for part in parts:
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            numbers.update(range(int(lo), int(hi or lo) + 1))
    return numbers


def _host_ip(spec: str | int | dict[str, Any]) -> str:
    if isinstance(spec, dict):
        return str(spec.get("host_ip", ""))
    text = str(spec).split("/", 1)[0]
    parts = text.rsplit(":", 2)
    return parts[0].strip("[]") if len(parts) == 3 else ""


def _allowed_mesh_vars() -> set[str]:
    prefix = Settings.model_config.get("env_prefix")
    assert prefix == "MESH_", "mesh.settings.Settings no longer reads MESH_*; update this test"
    return {f"{prefix}{name.upper()}" for name in Settings.model_fields} | set(
        MESH_VARS_READ_ELSEWHERE
    )


def _unknown_mesh_vars(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("MESH_")} - _allowed_mesh_vars()


# -- health-gated start-up --------------------------------------------------------------------
def test_every_service_has_a_healthcheck_or_a_reason(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if hc is not None:
            assert not hc.get("disable"), f"{name}: healthcheck disabled"
            test = _healthcheck_test(svc)
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck has no test"
            assert len(test) > 1, f"{name}: healthcheck test runs nothing"
        else:
            reason = svc.get("x-no-healthcheck")
            assert isinstance(reason, str) and len(reason.split()) >= 3, (
                f"{name}: no healthcheck and no `x-no-healthcheck: <reason>`"
            )


def test_every_depends_on_waits_for_health(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: list-form depends_on only waits for a start"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s missing check"
            elif condition == "service_completed_successfully":
                # A one-shot job (it exits when done): never restarted, its reason on record.
                assert services[dep].get("restart") == "no", f"{name} -> {dep}: not one-shot"
                assert "x-no-healthcheck" in services[dep], f"{name} -> {dep}: no reason"
            else:
                # Only a dependency that cannot have a healthcheck may be waited on otherwise,
                # and then its reason is on record.
                assert condition == "service_started", f"{name} -> {dep}: {condition}"
                assert "x-no-healthcheck" in services[dep], (
                    f"{name} -> {dep}: service_started without a reason"
                )


def test_mesh_processes_wait_for_the_whole_nats_cluster(services: dict[str, Any]) -> None:
    nats = set(_nats(services))
    for name, svc in _mesh(services).items():
        deps = svc.get("depends_on") or {}
        assert nats <= set(deps), f"{name} does not wait for {sorted(nats - set(deps))}"


# -- ports ------------------------------------------------------------------------------------
def test_port_parser() -> None:
    assert _port_numbers("8222") == {8222}
    assert _port_numbers("127.0.0.1:4222:4222") == {4222}
    assert _port_numbers("9000:8222/tcp") == {9000, 8222}
    assert _port_numbers("[::1]:8220-8225:8220-8225") >= {8222}
    assert _port_numbers({"target": 8222, "published": "18222"}) == {8222, 18222}
    assert _host_ip("127.0.0.1:4222:4222") == "127.0.0.1"
    assert _host_ip("[::1]:4222:4222") == "::1"
    assert _host_ip("4222:4222") == ""


def test_nats_monitor_port_is_never_published(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            assert NATS_MONITOR_PORT not in _port_numbers(spec), (
                f"{name} publishes {spec!r}: the NATS monitor port answers without auth"
            )


def test_published_ports_are_loopback_only(services: dict[str, Any]) -> None:
    # Clients are authenticated (nkeys) but their connections are not encrypted (no client
    # TLS in this topology): a published port must not reach beyond the host.
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            assert _host_ip(spec) in ("127.0.0.1", "::1", "localhost"), (
                f"{name} publishes {spec!r} on every interface"
            )


# -- the NATS cluster -------------------------------------------------------------------------
def test_three_nats_servers_form_one_jetstream_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats = _nats(services)
    assert len(nats) == 3, f"want a 3-node cluster, got {sorted(nats)}"
    cluster_names, server_names = set(), set()
    for name, svc in nats.items():
        cmd = _command(svc)
        assert "-js" in cmd or "--jetstream" in cmd, f"{name}: JetStream not enabled"
        assert _flag(cmd, "-m", "--http_port") == str(NATS_MONITOR_PORT), f"{name}: no monitor"
        cluster_names.add(_flag(cmd, "--cluster_name"))
        server_names.add(_flag(cmd, "--server_name", "-n"))
        assert _flag(cmd, "--cluster"), f"{name}: no cluster listen address"
        routes = (_flag(cmd, "--routes") or "").split(",")
        hosts = {urlsplit(r).hostname for r in routes if r}
        assert hosts == set(nats), f"{name}: routes {routes} do not name all three servers"
        assert all(urlsplit(r).port == 6222 for r in routes)
        # Its store is a named volume, so JetStream data survives a container replacement.
        store = _flag(cmd, "-sd", "--store_dir")
        assert store, f"{name}: no JetStream store dir"
        mounts = [str(v).split(":") for v in svc.get("volumes") or []]
        named = [m[0] for m in mounts if len(m) >= 2 and m[1] == store]
        assert named and named[0] in (compose.get("volumes") or {}), (
            f"{name}: {store} is not on a named volume"
        )
        # Health on the monitor port, from inside the container.
        test = " ".join(_healthcheck_test(svc))
        assert f"localhost:{NATS_MONITOR_PORT}/healthz" in test, f"{name}: healthcheck {test}"
    assert len(cluster_names) == 1 and None not in cluster_names, cluster_names
    assert len(server_names) == 3 and None not in server_names, server_names
    assert len({_flag(_command(s), "-sd", "--store_dir") for s in nats.values()}) == 1
    data = {v for s in nats.values() for v in s.get("volumes", []) if str(v).endswith(":/data")}
    assert len(data) == 3, "shared volume"


def test_mesh_processes_use_the_cluster_with_replicated_streams(services: dict[str, Any]) -> None:
    nats = _nats(services)
    for name, svc in _mesh(services).items():
        env = _env(svc)
        urls = [u for u in env.get("MESH_NATS_URL", "").split(",") if u]
        assert {urlsplit(u).hostname for u in urls} == set(nats), f"{name}: MESH_NATS_URL {urls}"
        assert all(urlsplit(u).scheme == "nats" and urlsplit(u).port == 4222 for u in urls)
        # The streams are R3 (mesh-init creates them; the others would expect as much).
        assert env.get("MESH_STREAM_REPLICAS") == str(len(nats)), f"{name}: stream replicas"


# -- the mesh processes -----------------------------------------------------------------------
def test_two_coordinators(services: dict[str, Any]) -> None:
    coords = {n: s for n, s in _mesh(services).items() if _command(s) == ["coordinator"]}
    assert sum(_replicas(s) for s in coords.values()) >= 2, f"coordinators: {sorted(coords)}"


def test_every_reviewer_runs_at_least_twice(services: dict[str, Any]) -> None:
    running: dict[str, int] = {}
    for svc in _mesh(services).values():
        cmd = _command(svc)
        if cmd[:1] == ["run"] and len(cmd) == 2:
            running[cmd[1]] = running.get(cmd[1], 0) + _replicas(svc)
    # The reviewers: the agents `mesh demo` runs, as the repository's mesh.toml marks them.
    shipped = topology.load(ROOT / topology.FILE_NAME)
    reviewers = [a.module for a in shipped.demo_plan().agents]
    assert reviewers, "the shipped mesh.toml marks no agent demo = true"
    for module in reviewers:
        assert running.get(module, 0) >= 2, f"{module}: {running.get(module, 0)} instance(s)"


def _cli_command_names() -> set[str]:
    from mesh.cli import app

    names = {
        info.name or info.callback.__name__.replace("_", "-")
        for info in app.registered_commands
        if info.callback is not None
    }
    return names | {g.name for g in app.registered_groups if g.name}


def test_every_mesh_command_resolves_to_a_real_entry_point(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in the image: cards come from MESH_CARDS_DIR (the Dockerfile sets /app/cards).
    monkeypatch.setenv("MESH_CARDS_DIR", str(ROOT / "cards"))
    commands = _cli_command_names()
    assert {"run", "coordinator"} <= commands
    mesh = _mesh(services)
    assert mesh, "no service is built from compose/Dockerfile"
    for name, svc in mesh.items():
        cmd = _command(svc)
        assert cmd and cmd[0] in commands, f"{name}: `mesh {' '.join(cmd)}` is no mesh command"
        if cmd[0] == "run":
            assert len(cmd) == 2, f"{name}: `mesh run` takes one module"
            module = cmd[1] if cmd[1].endswith(".agent") else f"{cmd[1]}.agent"
            agent = getattr(importlib.import_module(module), "agent", None)
            assert agent is not None, f"{name}: {module} defines no `agent`"
            card = agent.card()  # loads and validates cards/<name>.json
            assert card.name == agent.name
            # The agent healthcheck asks for this very card by name.
            test = _healthcheck_test(svc)
            assert test[-2:] == ["agent", card.name], f"{name}: healthcheck {test}"
            env = _env(svc)
            assert int(env.get("MESH_HTTP_PORT", "0")) > 0, f"{name}: needs a fixed HTTP port"
            assert env.get("OTEL_SERVICE_NAME") == card.name
        elif cmd == ["coordinator"]:
            assert _healthcheck_test(svc)[-1] == "coordinator", f"{name}: healthcheck"
            assert _env(svc).get("OTEL_SERVICE_NAME") == "coordinator"


def test_mesh_healthchecks_run_the_script_the_image_ships(services: dict[str, Any]) -> None:
    copies = _final_stage_copies()
    assert ("compose/healthcheck.py", "/app/healthcheck.py") in copies
    for name, svc in _mesh(services).items():
        if svc.get("restart") == "no":
            continue  # a one-shot job (mesh-init): done, not healthy
        test = _healthcheck_test(svc)
        assert test[:3] == ["CMD", "python", "/app/healthcheck.py"], f"{name}: {test}"


def test_mesh_services_export_traces_to_the_collector(
    services: dict[str, Any], otel: dict[str, Any]
) -> None:
    grpc = otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for name, svc in _mesh(services).items():
        env = _env(svc)
        endpoint = urlsplit(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        assert endpoint.hostname in services, f"{name}: OTLP endpoint {endpoint.geturl()!r}"
        assert "opentelemetry-collector" in str(services[endpoint.hostname].get("image", ""))
        assert str(endpoint.port) == grpc.rsplit(":", 1)[1], f"{name}: not the gRPC receiver"
        assert env.get("OTEL_SERVICE_NAME"), f"{name}: no OTEL_SERVICE_NAME"


def test_the_model_key_is_passed_through_never_written(compose: dict[str, Any]) -> None:
    for name, svc in _mesh(compose["services"]).items():
        value = _env(svc).get("ANTHROPIC_API_KEY")
        if value is not None:
            assert re.fullmatch(r"\$\{ANTHROPIC_API_KEY(:?-)?\}", value), (
                f"{name}: ANTHROPIC_API_KEY must come from the host env, got {value!r}"
            )


def test_trace_ui_is_reachable(services: dict[str, Any]) -> None:
    ui = [s for s in services.values() if "jaeger" in str(s.get("image", ""))]
    assert len(ui) == 1
    assert 16686 in {p for spec in ui[0].get("ports") or [] for p in _port_numbers(spec)}


# -- configuration: MESH_* names are real settings --------------------------------------------
def _compose_env_names(compose: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for svc in compose["services"].values():
        names |= set(_env(svc))
    # The shared anchors too, even where no service uses them (yet).
    for key, value in compose.items():
        if key.startswith("x-") and isinstance(value, dict) and key.endswith("env"):
            names |= {str(k) for k in value}
    return names


def test_every_mesh_variable_in_compose_is_a_setting(compose: dict[str, Any]) -> None:
    names = _compose_env_names(compose)
    assert "MESH_NATS_URL" in names  # the check below saw the environment at all
    assert not _unknown_mesh_vars(names), "not MESH_* settings (typo?)"


def test_every_mesh_variable_in_the_dockerfile_is_a_setting() -> None:
    env = _final_stage_env()
    assert not _unknown_mesh_vars(set(env)), "not MESH_* settings (typo?)"


def test_the_setting_check_catches_typos() -> None:
    assert _unknown_mesh_vars({"MESH_NATS_URLS", "MESH_NATS_URL", "PATH"}) == {"MESH_NATS_URLS"}
    assert not _unknown_mesh_vars({"MESH_CARDS_DIR", "MESH_STREAM_REPLICAS", "MESH_HOME"})


def test_compose_builds_the_dockerfile_from_the_repo_root(services: dict[str, Any]) -> None:
    for name, svc in _mesh(services).items():
        build = svc["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_mounted_files_exist(services: dict[str, Any], secrets: Path) -> None:
    """Every file a service mounts is in the repository, or is one `mesh creds compose`
    writes into the (git-ignored) secrets folder."""
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = str(vol).split(":", 1)[0]
            if source.startswith(SECRETS):
                made = secrets / source.removeprefix(SECRETS)
                assert made.exists(), f"{name}: `mesh creds compose` does not make {source}"
            elif source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: mounts missing {source}"


# -- the OpenTelemetry collector ----------------------------------------------------------------
def test_collector_pipelines_name_defined_components(otel: dict[str, Any]) -> None:
    service = otel["service"]
    pipelines = service["pipelines"]
    assert "traces" in pipelines
    for ext in service.get("extensions") or []:
        assert ext in (otel.get("extensions") or {}), f"extension {ext} is not defined"
    for pname, pipe in pipelines.items():
        assert pipe.get("receivers") and pipe.get("exporters"), pname
        for kind in ("receivers", "processors", "exporters"):
            defined = otel.get(kind) or {}
            for component in pipe.get(kind) or []:
                assert component in defined, f"{pname}: {kind[:-1]} {component} is not defined"


def test_collector_sends_traces_to_the_trace_ui(
    otel: dict[str, Any], services: dict[str, Any]
) -> None:
    exporters = otel["exporters"]
    for component in otel["service"]["pipelines"]["traces"]["exporters"]:
        endpoint = exporters[component].get("endpoint", "")
        host = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").hostname
        if host in services and "jaeger" in str(services[host].get("image", "")):
            return
    pytest.fail("the traces pipeline exports to no trace UI service")


# -- the Dockerfile (no YAML needed) ------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _final_stage() -> list[tuple[str, str]]:
    stages = _stages()
    assert len(stages) >= 2, "the Dockerfile is not multi-stage"
    return stages[-1]


def _final_stage_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _final_stage_copies() -> list[tuple[str, str]]:
    copies = []
    for word, rest in _final_stage():
        if word == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            copies.extend((src.rstrip("/"), args[-1].rstrip("/")) for src in args[:-1])
    return copies


def _exec_form(word: str) -> list[str]:
    values = [rest for w, rest in _final_stage() if w == word]
    assert values, f"no {word} in the final stage"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{word} must be in exec (JSON) form"
    return parsed


def test_dockerfile_runtime_runs_mesh_as_non_root() -> None:
    users = [rest for word, rest in _final_stage() if word == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    assert _exec_form("ENTRYPOINT") == ["mesh"]
    assert _exec_form("CMD") == ["--help"]


def test_dockerfile_runtime_has_no_build_tools() -> None:
    for word, rest in _final_stage():
        if word == "RUN":
            tokens = set(re.split(r"[\s;&|]+", rest))
            found = tokens & set(BUILD_TOOLS)
            assert not found, f"build tools {found} installed in the final stage"
            assert "pip install" not in rest, "the final stage installs packages itself"


def test_dockerfile_stages_share_the_python_base() -> None:
    args = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    bases = []
    for stage in _stages():
        image = stage[0][1].split()[0]
        bases.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    assert set(bases) == {"python:3.11-slim"}, bases


def test_dockerfile_runtime_environment() -> None:
    env = _final_stage_env()
    assert env.get("PATH", "").startswith("/opt/venv/bin:")
    assert env.get("MESH_HTTP_HOST") == "0.0.0.0"
    assert env.get("MESH_LOG_FORMAT") == "json"
    assert env.get("PYTHONUNBUFFERED") == "1"
    copies = _final_stage_copies()
    assert ("/opt/venv", "/opt/venv") in copies
    # The cards go where MESH_CARDS_DIR points.
    assert ("cards", env.get("MESH_CARDS_DIR")) in copies


def test_dockerfile_copies_only_what_exists() -> None:
    # The build context is the repository root (compose's `context: ..`).
    for word, rest in _instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


# -- compose/healthcheck.py ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_names_match_the_mesh(hc: ModuleType) -> None:
    from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH

    from mesh import subjects

    assert hc.EVENTS_STREAM == subjects.EVENTS_STREAM
    assert hc.COORDINATOR_DURABLE == subjects.COORDINATOR_DURABLE
    assert hc.CARD_PATH == AGENT_CARD_WELL_KNOWN_PATH


@contextlib.contextmanager
def _card_server(status: int, body: bytes) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/.well-known/agent-card.json" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_healthcheck(hc: ModuleType) -> None:
    card = json.dumps({"name": "security-review"}).encode()
    with _card_server(200, card) as port:
        assert hc.check_agent(port) is None
        assert hc.check_agent(port, "security-review") is None
        assert "expected 'quality-review'" in hc.check_agent(port, "quality-review")
    with _card_server(500, b"{}") as port:
        assert "HTTP 500" in hc.check_agent(port)
    with _card_server(200, b"not json") as port:
        assert "not return JSON" in hc.check_agent(port)
    assert "did not answer" in hc.check_agent(_free_port(), timeout=1)


def test_healthcheck_main_needs_a_fixed_port(
    hc: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_HTTP_PORT", "0")
    assert hc.main(["agent"]) == 1
    assert hc.main([]) == 2
    monkeypatch.setenv("MESH_NATS_URL", "")
    assert hc.main(["coordinator"]) == 1


def test_coordinator_healthcheck_without_nats(hc: ModuleType) -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    problem = asyncio.run(hc.check_coordinator([url], timeout=1))
    assert problem and "cannot connect" in problem


@pytest.mark.integration
async def test_coordinator_healthcheck_against_a_real_server(
    hc: ModuleType, identities: Any
) -> None:
    from nats.js.api import ConsumerConfig

    from mesh import subjects
    from mesh.bus import Bus
    from mesh.identity import load_identity
    from mesh.server import EmbeddedServer

    coordinator = str(identities.issue("coordinator", "hc"))
    assert hc.nats_identity(coordinator)["inbox_prefix"] == (
        load_identity(Path(coordinator)).inbox_prefix
    )
    with EmbeddedServer() as server:
        # Anonymous, the check is refused like any client.
        assert "authorization" in (await hc.check_coordinator([server.url]) or "").lower()
        # JetStream answers but no coordinator has made its durable yet: not healthy.
        problem = await hc.check_coordinator([server.url], identity=coordinator)
        assert "consumer" in (problem or "")
        async with await Bus.connect(server.url, name="test") as bus:
            await bus.ensure()
            await bus.js.add_consumer(
                subjects.EVENTS_STREAM,
                ConsumerConfig(durable_name=subjects.COORDINATOR_DURABLE),
            )
        assert await hc.check_coordinator([server.url], identity=coordinator) is None


# -- no anonymous access: NATS users, route mTLS, an identity per service ----------------------
@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `mesh creds compose` writes (as the compose file expects it in compose/secrets)."""
    from typer.testing import CliRunner

    from mesh.cli import app

    out = tmp_path_factory.mktemp("compose") / "secrets"
    result = CliRunner().invoke(app, ["creds", "compose", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_nats_config_admits_nkey_users_only_and_routes_over_mtls(
    services: dict[str, Any],
) -> None:
    text = NATS_CONF.read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    config = "\n".join(line for line in lines if line)
    assert 'include "secrets/nats-auth.conf"' in config
    for anonymous in ("no_auth_user", "authorization", "accounts", "token", "password"):
        assert anonymous not in config, f"nats.conf: {anonymous}"
    tls = config[config.index("cluster {") :]
    assert "tls {" in tls and "verify: true" in tls and "ca_file" in tls
    for name, svc in _nats(services).items():
        cmd = _command(svc)
        assert _flag(cmd, "-c", "--config") == "/etc/nats/nats.conf", f"{name}: not configured"
        env = _env(svc)
        assert env["NATS_ROUTE_CERT"].endswith(f"/{name}.pem"), f"{name}: another node's cert"
        assert env["NATS_ROUTE_KEY"].endswith(f"/{name}-key.pem")
        mounts = [str(v) for v in svc.get("volumes") or []]
        assert "./secrets/nats:/etc/nats/secrets:ro" in mounts, f"{name}: {mounts}"
        assert not any("identity" in m for m in mounts), f"{name} mounts identities"


def test_every_mesh_service_runs_as_its_own_identity(services: dict[str, Any]) -> None:
    used: dict[str, str] = {}
    for name, svc in _mesh(services).items():
        env = _env(svc)
        assert env.get("MESH_IDENTITY") == "/run/mesh/identity.json", name
        assert env.get("MESH_TRUST") == "/run/mesh/trust.json", name
        mounts = dict(str(v).rsplit(":", 2)[:2] for v in svc.get("volumes") or [])
        identity = {t: s for s, t in mounts.items()}.get("/run/mesh/identity.json")
        assert identity, f"{name}: no identity mounted"
        assert all(str(v).endswith(":ro") for v in svc["volumes"]), f"{name}: writable secrets"
        cmd = _command(svc)
        if cmd == ["coordinator"]:
            expected = "coordinator-coordinator.json"
        elif cmd[:1] == ["run"]:
            run = topology.AgentRun(cmd[1].rsplit(".", 1)[-1].replace("_", "-"), cmd[1], 1)
            expected = f"agent-{topology.agent_name(run, ROOT)}.json"
        else:
            assert cmd == ["ensure"], f"{name}: {cmd}"
            expected = "operator.json"
        assert identity == f"{SECRETS}identity/{expected}", f"{name}: {identity}"
        used[name] = expected
    operators = [n for n, f in used.items() if f == "operator.json"]
    assert operators == ["mesh-init"], f"the operator identity is used by {operators}"


def test_creds_compose_writes_every_secret_private(secrets: Path) -> None:
    import stat

    from mesh.identity import IdentityDir

    for path in [*secrets.rglob("*.json"), *secrets.rglob("*-key.pem"), *secrets.rglob("*.conf")]:
        if path.name in {"trust.json", "users.json"}:
            continue  # public: keys and names
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path}: mode {mode:o}"
    # What the NATS containers mount holds no private key but their own route keys.
    assert not list((secrets / "nats").rglob("*.json"))
    assert not (secrets / "nats" / "tls" / "ca-key.pem").exists()
    ids = IdentityDir(secrets / "identity")
    auth = (secrets / "nats" / "nats-auth.conf").read_text()
    assert all(u.nkey in auth for u in ids.users())
    assert {u.role for u in ids.users()} >= {"operator", "coordinator", "agent"}


def _compose_node(conf: Path, store: Path, name: str, ports: list[int], i: int) -> Any:
    """compose's nats-<i> command, on 127.0.0.1 ports (the routes named `localhost`):
    `ports` holds 3 client ports, then 3 route ports, then 3 monitor ports."""
    import subprocess

    from mesh.server import find_binary

    route_urls = ",".join(f"nats-route://localhost:{p}" for p in ports[3:6])
    cmd = [find_binary(), "-c", str(conf), "-js", "-sd", str(store), "--server_name", name]
    cmd += ["--cluster_name", "mesh", "--cluster", f"nats://127.0.0.1:{ports[3 + i]}"]
    cmd += ["--routes", route_urls, "--no_advertise", "-m", str(ports[6 + i])]
    cmd += ["-a", "127.0.0.1", "-p", str(ports[i])]
    log = open(store.parent / f"{name}.log", "wb")  # noqa: SIM115  # closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


@pytest.mark.integration
async def test_the_compose_nats_config_refuses_anonymous_clients(
    secrets: Path, tmp_path: Path
) -> None:
    """compose/nats.conf in a real 3-node nats-server cluster (its paths moved to a temp
    folder; route certificates for `localhost`): the nodes form a cluster over mTLS, an
    anonymous or unknown client is refused, the operator identity gets in."""
    import os
    import shutil

    import nats as nats_py

    from mesh.bus import Bus
    from mesh.cli.creds import issue_tls
    from mesh.identity import load_identity
    from mesh.settings import Settings
    from tests.support.waits import eventually

    etc = tmp_path / "etc"
    shutil.copytree(secrets / "nats", etc / "secrets")
    issue_tls(etc / "secrets" / "tls", servers=["localhost"], clients=[])
    conf = etc / "nats.conf"
    conf.write_text(NATS_CONF.read_text().replace("/etc/nats/", f"{etc}/"))
    tls = etc / "secrets" / "tls"
    os.environ["NATS_ROUTE_CERT"] = str(tls / "localhost.pem")
    os.environ["NATS_ROUTE_KEY"] = str(tls / "localhost-key.pem")
    ports = [_free_port() for _ in range(9)]
    procs = []
    try:
        for i in range(3):
            store = tmp_path / f"n{i}" / "data"
            store.mkdir(parents=True)
            procs.append(_compose_node(conf, store, f"nats-{i + 1}", ports, i))
        urls = [f"nats://127.0.0.1:{p}" for p in ports[:3]]
        operator = secrets / "identity" / "operator.json"
        settings = Settings(identity=operator, trust=secrets / "identity" / "trust.json")

        async def cluster_ready() -> bool:
            try:
                async with await Bus.connect(urls, settings=settings, connect_timeout_s=2) as bus:
                    reply = await bus.nc.request("$JS.API.INFO", b"", timeout=1)
                    return b'"error"' not in reply.data
            except Exception:
                return False

        await eventually(cluster_ready, "the compose cluster has a meta leader", timeout=30)
        for url in urls:
            for who in (None, load_identity(_stranger(tmp_path))):
                opts = {"nkeys_seed_str": who.nats_seed} if who else {}
                with pytest.raises(Exception, match=r"(?i)authorization"):
                    await nats_py.connect(url, allow_reconnect=False, connect_timeout=2, **opts)
        # The route port wants TLS before anything: a plaintext peer gets nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[3])
        try:
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(100), 10)
            assert b"PONG" not in answer and b"INFO" not in answer, answer
        finally:
            writer.close()
    finally:
        for proc, log in procs:
            proc.terminate()
            proc.wait(10)
            log.close()
        os.environ.pop("NATS_ROUTE_CERT", None)
        os.environ.pop("NATS_ROUTE_KEY", None)


def _stranger(tmp_path: Path) -> Path:
    from mesh.identity import IdentityDir

    return IdentityDir.init(tmp_path / "stranger").operator_path
