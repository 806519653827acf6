"""Settings from `MESH_*` environment variables — the only place they are read."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    nats_url: str = Field(
        default="",
        description="One or more NATS URLs (comma separated). Empty: use or spawn an embedded "
        "nats-server.",
    )
    home: Path = Field(
        default=Path(".mesh"),
        description="Working folder for the embedded server's store and state files.",
    )
    tenant: str = Field(default="default", description="Tenant used when none is given.")
    http_host: str = Field(default="127.0.0.1", description="Where agents serve A2A over HTTP.")
    http_port: int = Field(default=0, description="Agent HTTP port; 0 picks a free one.")
    console_port: int = Field(
        default=8780,
        ge=-1,
        le=65535,
        description="Port of the web console `mesh up` serves on 127.0.0.1 (docs/console.md); "
        "0 picks a free one, -1 serves none. Taken: a free one, with a warning.",
    )
    grpc_port: int = Field(
        default=0,
        ge=-1,
        description="Agent gRPC port (A2A's gRPC binding, on MESH_HTTP_HOST); 0 picks a free "
        "one, -1 serves no gRPC.",
    )
    http_advertise: str = Field(
        default="",
        description="URL put in the agent card (behind a proxy or NAT); default: "
        "http://<host>:<port>/ from where it binds.",
    )
    heartbeat_s: float = Field(default=2.0, gt=0, description="Agent registry heartbeat.")
    card_ttl_s: float = Field(
        default=6.0, gt=0, description="An agent not heard from for this long is not live."
    )
    no_agent_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="How long the coordinator keeps a new event waiting for a live agent with "
        "each skill its policy needs before dead-lettering it as `no_agent`.",
    )
    policy_file: Path | None = Field(
        default=None, description="Decision policies (TOML). Default: coordinator/policies.toml."
    )
    schema_dir: Path | None = Field(
        default=None,
        description="Folder of your own event schemas (`<event type>.schema.json`, JSON Schema "
        "2020-12), checked at publish and by the coordinator; one here replaces the shipped "
        "schema of the same type. Unset: only the shipped schemas (mesh/schemas/).",
    )
    rules_file: Path | None = Field(
        default=None,
        description="The reviewing agents' domain rules (TOML: allowed regions, privacy roles, "
        "dependency sources, change size...). Unset: agents/rules.toml.",
    )
    max_inflight: int = Field(default=256, gt=0, description="Events a coordinator works at once.")
    push_allow_private: bool = Field(
        default=False,
        description="Allow push-notification webhooks to private, loopback and link-local "
        "addresses (off: such targets are refused, against SSRF).",
    )
    metrics_port: int = Field(
        default=-1, description="Coordinator /metrics port: -1 off, 0 any free port."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Where /metrics listens.")
    log_format: str = Field(
        default="auto",
        description="`auto` (console on a terminal, else JSON lines), `json` or `console`.",
    )
    log_level: str = Field(
        default="INFO",
        description="Log level of mesh processes: `DEBUG`, `INFO`, `WARNING`, `ERROR`.",
    )
    stream_replicas: int = Field(
        default=1, ge=1, description="Replicas for mesh streams (3 on a NATS cluster)."
    )

    task_store: Literal["jetstream", "memory"] = Field(
        default="jetstream",
        description="Where agents keep A2A tasks: jetstream (KV bucket mesh_tasks, shared by "
        "every replica, survives restarts) or memory (per process, lost on stop).",
    )
    task_ttl_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=0,
        description="A task not written for this long is dropped from mesh_tasks; 0 keeps "
        "tasks for ever. Applies when the bucket is created.",
    )
    a2a_lean: bool = Field(
        default=True,
        description="Agents answer blocking SendMessage over NATS on the lean path (one task "
        "write, no a2a-sdk task machinery: mesh/a2a/lean.py); false sends every request "
        "through a2a-sdk's handler.",
    )
    uvloop: bool = Field(
        default=True,
        description="Agent processes (`Agent.main`) and the coordinator (`python -m "
        "coordinator`) run on uvloop when it is installed; false "
        "keeps asyncio's own loop.",
    )
    agent_version: str = Field(
        default="",
        description="The human label of an agent's composite version (`label+hash12`, "
        "docs/versions.md), unless `Agent(version=...)` gives one; empty: the card's `version`.",
    )
    cards_dir: Path | None = Field(
        default=None,
        description='Folder of the A2A Agent Cards (`<agent name>.json`); `Agent("four-eyes")` '
        "loads `<folder>/four-eyes.json`. Unset: `./cards`, else the `cards/` next to the "
        "installed packages.",
    )
    telemetry: bool = Field(
        default=True,
        description="`off` turns tracing and metrics off, as does the standard "
        "`OTEL_SDK_DISABLED=true`.",
    )
    trace_stream: bool = Field(
        default=False,
        description="On: also keep recent spans (a day) in the JetStream stream `MESH_TRACES`, "
        "so `mesh trace EVENT_ID` works without a tracing backend.",
    )
    price_input_per_mtok: float | None = Field(
        default=None,
        ge=0,
        description="USD per million input tokens, for the `mesh.gen_ai.cost` metric. Set both "
        "prices to your contract; unset, no cost is recorded (tokens still are).",
    )
    price_output_per_mtok: float | None = Field(
        default=None, ge=0, description="USD per million output tokens (see above)."
    )
    allow_model_requests: bool = Field(
        default=True,
        description="Off: model requests go to local hosts only (127.0.0.1, localhost, ::1).",
    )

    model: str = Field(
        default="rules",
        description="The mesh-wide brain chain of prompted agents, tried in order: `rules`, "
        "`abstain`, or `<provider>:<model>` with provider `anthropic`, `bedrock` or `vertex` "
        "(comma separated, e.g. `anthropic:claude-sonnet-5-5,rules`). One agent's own: "
        "MESH_MODEL_<AGENT> (name upper-cased, `-` as `_`). ANTHROPIC_API_KEY alone no longer "
        "picks Claude (docs/models.md).",
    )
    model_timeout_s: float = Field(
        default=30.0, gt=0, description="Each model attempt in a chain gives up after this long."
    )
    models_file: Path | None = Field(
        default=None,
        description="TOML with per-agent brain chains, providers, prices, redaction and "
        "per-tenant quotas (docs/models.md, docs/budgets.md). Unset: none.",
    )
    bedrock_region: str = Field(
        default="", description="AWS region of the `bedrock` provider (else the AWS default)."
    )
    vertex_region: str = Field(default="", description="Google Cloud region of `vertex`.")
    vertex_project: str = Field(default="", description="Google Cloud project of `vertex`.")

    max_hops: int = Field(
        default=4,
        ge=0,
        description="How many delegations deep one call may go (agent → agent → ...); past it a "
        "delegation fails with a hop-limit error (loops end there).",
    )

    profile: Literal["default", "regulated"] = Field(
        default="default",
        description="`regulated`: nothing is allowed that an authorization policy does not "
        "permit (Cedar; the shipped clinic set unless MESH_AUTHZ_DIR is set). `default`: the "
        "shipped policies permit what the mesh does without policies; MESH_AUTHZ_DIR's are "
        "added to them (docs/authorization.md).",
    )
    authz_dir: Path | None = Field(
        default=None,
        description="Folder of Cedar authorization policies (`*.cedar`, at most one "
        "`*.cedarschema`, optional `entities.json`), reloaded when they change.",
    )

    topology: Path | None = Field(
        default=None,
        description="The topology file `mesh up` and `mesh demo` run (which agents, replicas, "
        "coordinators). Default: mesh.toml in the working folder or the nearest folder above.",
    )

    identity: Path | None = Field(
        default=None,
        description="This process's identity file (mode 0600: NATS nkey, signing key, A2A "
        "token; `mesh creds` writes one). Unset: `<home>/identity/operator.json` when it exists "
        "(the operator's, for the CLI next to a `mesh up`).",
    )
    trust: Path | None = Field(
        default=None,
        description="The trust file: signing keys the mesh believes and what each may sign. "
        "Unset: `<home>/identity/trust.json` when it exists.",
    )
    nats_creds: Path | None = Field(
        default=None,
        description="NATS credentials to join an existing server or cluster: a `.creds` file "
        "(JWT) or an nkey seed file; overrides the identity's own nkey.",
    )
    tls_ca: Path | None = Field(
        default=None, description="CA bundle that signs the NATS servers' certificates."
    )
    tls_cert: Path | None = Field(
        default=None, description="Client certificate for NATS servers that require mTLS."
    )
    tls_key: Path | None = Field(default=None, description="Private key of MESH_TLS_CERT.")
    insecure: str = Field(
        default="",
        description="Switch protections off by name, for local experiments only: `a2a` (agents "
        "answer A2A calls without a token), `bus` (anonymous NATS, nothing signed), or "
        "`a2a,bus`. Every process says so loudly at start.",
    )

    def insecure_parts(self) -> set[str]:
        return {p.strip() for p in self.insecure.split(",") if p.strip()}

    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def agent_model_variable(agent: str) -> str:
    """`security-review` → `MESH_MODEL_SECURITY_REVIEW`."""
    return f"MESH_MODEL_{agent.upper().replace('-', '_').replace('.', '_')}"


def model_chain_env(agent: str) -> tuple[str, str] | None:
    """(variable, chain) of `agent`'s own MESH_MODEL_<AGENT>, else of MESH_MODEL, when set.

    Read when an agent picks its brain (not cached with the other settings), as
    ANTHROPIC_API_KEY was before: a test or a launcher may set it just before serving."""
    for name in (agent_model_variable(agent), "MESH_MODEL"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
