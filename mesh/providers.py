"""Which brain an agent uses: its chain of brains, the provider clients, prices, start-up check.

Configuration is explicit (docs/models.md); nothing is inferred from ANTHROPIC_API_KEY being set.
An agent's chain is the first of:

1. `MESH_MODEL_<AGENT>` (e.g. `MESH_MODEL_SECURITY_REVIEW=anthropic:claude-sonnet-5-5,rules`);
2. `[agent.<name>] chain = [...]` in the models file (`MESH_MODELS_FILE`, TOML);
3. `MESH_MODEL` when set in the environment;
4. `[default] chain = [...]` in the models file;
5. `rules`.

A chain entry is `rules`, `abstain`, or `<provider>:<model>` (`anthropic`, `bedrock`, `vertex`;
a bare model name means `anthropic`). Clients are the anthropic SDK's own: `AsyncAnthropic`,
`AsyncAnthropicBedrock`, `AsyncAnthropicVertex`; credentials are read by the SDK (ANTHROPIC_API_KEY,
the AWS chain, Google application default credentials), never by the mesh.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mesh.errors import ConfigError
from mesh.settings import Settings, get_settings, model_chain_env

if TYPE_CHECKING:
    import anthropic

log = logging.getLogger(__name__)

Provider = Literal["anthropic", "bedrock", "vertex"]
PROVIDERS: tuple[Provider, ...] = ("anthropic", "bedrock", "vertex")
TERMINALS = ("rules", "abstain")

# USD per million tokens (input, output). Taken from Anthropic's public price list
# (https://www.anthropic.com/pricing) as remembered when this table was written: the Sonnet
# 4.x, Haiku 4.5 and Opus 4.5 list prices. The 5.5 entries ASSUME the same price as the tier
# before them — nobody has checked them. Check every figure against your contract and set
# `[prices."<model>"]` in the models file; a model with no price here or there is charged the
# most expensive price of this table, so a budget errs on the side of stopping.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "claude-sonnet-5-5": (3.0, 15.0),  # ASSUMED: Sonnet 4.x list price
    "claude-haiku-5-5": (1.0, 5.0),  # ASSUMED: Haiku 4.5 list price
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-opus-4-5": (5.0, 25.0),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model attempt of a chain."""

    provider: Provider
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


ChainEntry = ModelSpec | Literal["rules", "abstain"]


@dataclass(frozen=True)
class AgentModels:
    """An agent's resolved model configuration (what `select_brain` builds)."""

    chain: tuple[ChainEntry, ...]
    source: str  # where the chain came from, for the start-up line
    timeout_s: float = 30.0
    max_tokens: int = 1024
    redact_fields: tuple[str, ...] = ()
    redact_detectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantQuota:
    """Per-tenant limits enforced at each agent (docs/budgets.md). None: no limit."""

    cost_per_day_usd: float | None = None
    concurrent_calls: int | None = None


@dataclass(frozen=True)
class ModelsFile:
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    default: dict[str, Any] = field(default_factory=dict)
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)
    tenants: dict[str, TenantQuota] = field(default_factory=dict)


def parse_chain(text: str | list[str], *, where: str) -> tuple[ChainEntry, ...]:
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    chain: list[ChainEntry] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where}: empty entry in the brain chain", hint=_CHAIN_HINT)
        if item in TERMINALS:
            chain.append("rules" if item == "rules" else "abstain")
            continue
        provider, sep, model = item.partition(":")
        if not sep:
            provider, model = "anthropic", item
        if provider not in PROVIDERS or not model:
            raise ConfigError(f"{where}: {item!r} is not a brain", hint=_CHAIN_HINT)
        chain.append(ModelSpec(provider, model))  # type: ignore[arg-type]  # checked above
    if not chain:
        raise ConfigError(f"{where}: the brain chain is empty", hint=_CHAIN_HINT)
    for i, entry in enumerate(chain[:-1]):
        if entry in TERMINALS:
            raise ConfigError(
                f"{where}: {entry!r} answers every time, so {chain[i + 1]} after it is never tried",
                hint="put `rules` or `abstain` last",
            )
    return tuple(chain)


_CHAIN_HINT = (
    "a chain is comma separated: rules, abstain, or <provider>:<model> with provider "
    "anthropic, bedrock or vertex, e.g. anthropic:claude-sonnet-5-5,rules"
)


@lru_cache(maxsize=8)
def _load_file(path: Path, mtime_ns: int) -> ModelsFile:
    """Parsed once per version of the file (`mtime_ns` is the cache key's other half)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"models file {path}: {e.strerror}", hint="MESH_MODELS_FILE") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"models file {path}: not TOML: {e}") from None
    unknown = set(raw) - {"agent", "default", "providers", "prices", "tenants"}
    if unknown:
        raise ConfigError(
            f"models file {path}: unknown table(s) {', '.join(sorted(unknown))}",
            hint="tables: default, agent, providers, prices, tenants (docs/models.md)",
        )
    prices = {}
    for model, p in raw.get("prices", {}).items():
        try:
            prices[model] = (float(p["input_per_mtok"]), float(p["output_per_mtok"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"models file {path}: [prices.{model!r}] needs input_per_mtok and "
                "output_per_mtok (USD per million tokens)"
            ) from None
    tenants = {}
    for tenant, q in raw.get("tenants", {}).items():
        unknown_q = set(q) - {"cost_per_day_usd", "concurrent_calls"}
        if unknown_q:
            raise ConfigError(
                f"models file {path}: [tenants.{tenant}] unknown key(s) {sorted(unknown_q)}",
                hint="keys: cost_per_day_usd, concurrent_calls",
            )
        tenants[tenant] = TenantQuota(
            cost_per_day_usd=q.get("cost_per_day_usd"), concurrent_calls=q.get("concurrent_calls")
        )
    return ModelsFile(
        agents=raw.get("agent", {}),
        default=raw.get("default", {}),
        providers=raw.get("providers", {}),
        prices=prices,
        tenants=tenants,
    )


def models_file(settings: Settings | None = None) -> ModelsFile:
    settings = settings or get_settings()
    if settings.models_file is None:
        return ModelsFile()
    path = settings.models_file
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise ConfigError(
            f"models file {path}: {e.strerror}", hint="MESH_MODELS_FILE names a TOML file"
        ) from None
    return _load_file(path, mtime)


def agent_models(agent: str, settings: Settings | None = None) -> AgentModels:
    """`agent`'s chain, timeouts and redaction, from the sources in the module docstring."""
    settings = settings or get_settings()
    file = models_file(settings)
    own = file.agents.get(agent, {})
    base = file.default
    env = model_chain_env(agent)
    if env is not None and env[0] != "MESH_MODEL":
        chain, source = parse_chain(env[1], where=env[0]), env[0]
    elif "chain" in own:
        chain, source = parse_chain(own["chain"], where=f"[agent.{agent}]"), "models file"
    elif env is not None:
        chain, source = parse_chain(env[1], where="MESH_MODEL"), "MESH_MODEL"
    elif "chain" in base:
        chain, source = parse_chain(base["chain"], where="[default]"), "models file [default]"
    else:
        chain, source = ("rules",), "default"
    redact = {**base.get("redact", {}), **own.get("redact", {})}
    return AgentModels(
        chain=chain,
        source=source,
        timeout_s=float(own.get("timeout_s", base.get("timeout_s", settings.model_timeout_s))),
        max_tokens=int(own.get("max_tokens", base.get("max_tokens", 1024))),
        redact_fields=tuple(redact.get("fields", ())),
        redact_detectors=tuple(redact.get("detectors", ())),
    )


def price_of(model: str, settings: Settings | None = None) -> tuple[float, float]:
    """USD per million (input, output) tokens: the models file, else MESH_PRICE_* (one price
    for every model), else the default table, else the table's dearest (see DEFAULT_PRICES)."""
    settings = settings or get_settings()
    file = models_file(settings)
    if model in file.prices:
        return file.prices[model]
    if settings.price_input_per_mtok is not None and settings.price_output_per_mtok is not None:
        return settings.price_input_per_mtok, settings.price_output_per_mtok
    for name, price in DEFAULT_PRICES.items():
        if model == name or model.endswith(name) or name in model:  # bedrock/vertex ids
            return price
    return max(DEFAULT_PRICES.values())


def tenant_quota(tenant: str, settings: Settings | None = None) -> TenantQuota:
    tenants = models_file(settings).tenants
    return tenants.get(tenant) or tenants.get("*") or TenantQuota()


def build_client(
    spec: ModelSpec, *, timeout_s: float, settings: Settings | None = None
) -> anthropic.AsyncAnthropic | anthropic.AsyncAnthropicBedrock | anthropic.AsyncAnthropicVertex:
    """The anthropic SDK's own async client for `spec.provider`. No network is touched here.

    One attempt per chain entry: the SDK retries nothing (`max_retries=0`), the chain moves on
    to its next entry instead, so `timeout_s` is the whole of an attempt."""
    import anthropic

    settings = settings or get_settings()
    conf = models_file(settings).providers.get(spec.provider, {})
    if spec.provider == "bedrock":
        region = conf.get("aws_region") or settings.bedrock_region or None
        return anthropic.AsyncAnthropicBedrock(
            aws_region=region, base_url=conf.get("base_url"), timeout=timeout_s, max_retries=0
        )
    if spec.provider == "vertex":
        region = conf.get("region") or settings.vertex_region
        project = conf.get("project_id") or settings.vertex_project
        if not region:
            raise ConfigError(
                f"{spec}: no Google Cloud region",
                hint="set MESH_VERTEX_REGION or [providers.vertex] region in the models file",
            )
        kwargs: dict[str, Any] = {"region": region}
        if project:
            kwargs["project_id"] = project
        return anthropic.AsyncAnthropicVertex(
            **kwargs, base_url=conf.get("base_url"), timeout=timeout_s, max_retries=0
        )
    return anthropic.AsyncAnthropic(base_url=conf.get("base_url"), timeout=timeout_s, max_retries=0)


def known_models() -> frozenset[str]:
    """The model names the installed anthropic SDK lists (its `Model` type)."""
    import typing

    from anthropic.types import Model

    names: set[str] = set()
    for arg in typing.get_args(Model):
        names.update(a for a in typing.get_args(arg) if isinstance(a, str))
    return frozenset(names)


def startup_problems(spec: ModelSpec, settings: Settings | None = None) -> list[str]:
    """What is certainly wrong with `spec` before any call: no key, no region, a model name
    the SDK does not know. Local checks only; reachability is `probe`'s."""
    settings = settings or get_settings()
    problems = []
    if spec.provider == "anthropic":
        if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            problems.append("no ANTHROPIC_API_KEY")
        if spec.model not in known_models():
            problems.append(f"unknown model {spec.model!r} (the anthropic SDK does not list it)")
    elif spec.provider == "vertex":
        conf = models_file(settings).providers.get("vertex", {})
        if not (conf.get("region") or settings.vertex_region):
            problems.append("no Google Cloud region (MESH_VERTEX_REGION)")
    elif spec.provider == "bedrock":
        conf = models_file(settings).providers.get("bedrock", {})
        if not (
            conf.get("aws_region")
            or settings.bedrock_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        ):
            problems.append("no AWS region (MESH_BEDROCK_REGION or AWS_REGION)")
    return problems
