"""The reviewing agents' domain rules as configuration: `agents/rules.toml`, or the file
`MESH_RULES_FILE` names.

What a reviewer checks against (allowed data-residency regions, privacy roles, audited dependency
sources, the package denylist, the change-size limit) is the operator's to set, not code. Each
agent reads the file once, at start (its `agent.py` calls `domain_rules()`), so a mistake stops it
with a message naming the key; a table or key left out keeps today's default. What stays code:
the detection patterns (secret regexes, personal-data field names, triage signals), which are how
a reviewer looks rather than what an organisation allows.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import msgspec

from mesh.errors import ConfigError
from mesh.settings import get_settings

DEFAULT_FILE = Path(__file__).with_name("rules.toml")


def _set(*items: str) -> frozenset[str]:
    return frozenset(items)


class ComplianceRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    allowed_regions: frozenset[str] = _set("eu-west-1", "eu-central-1")
    privacy_roles: frozenset[str] = _set("privacy", "dpo")


class SecurityRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    allowed_sources: frozenset[str] = _set("pypi", "npm")
    known_bad_packages: frozenset[str] = _set(
        "reqeusts", "python3-dateutil", "jeilyfish", "colourama", "acqusition", "crossenv"
    )


class QualityRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_changed_lines: int = 1000


class DomainRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    compliance: ComplianceRules = ComplianceRules()
    security: SecurityRules = SecurityRules()
    quality: QualityRules = QualityRules()


def load(path: Path) -> DomainRules:
    """Parse and check a rules file; a ConfigError names the file and the key at fault."""
    try:
        rules = msgspec.toml.decode(path.read_bytes(), type=DomainRules)
    except OSError as e:
        raise ConfigError(
            f"rules file {path}: cannot be read ({e.strerror})",
            hint="set MESH_RULES_FILE to a readable file, or unset it for the defaults",
        ) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(
            f"rules file {path}: {e}", hint=f"see {DEFAULT_FILE.name} for every key and its default"
        ) from None
    if rules.quality.max_changed_lines < 0:
        raise ConfigError(
            f"rules file {path}: quality.max_changed_lines must be 0 or more",
            hint="lines added + removed over all files",
        )
    return rules


@lru_cache(maxsize=4)
def _cached(path: Path) -> DomainRules:
    return load(path)


def domain_rules() -> DomainRules:
    """The rules in force in this process: `MESH_RULES_FILE`, else the shipped defaults."""
    return _cached(get_settings().rules_file or DEFAULT_FILE)


def _shown(value: object) -> str:
    if isinstance(value, frozenset):
        return ", ".join(f"`{v}`" for v in sorted(value))
    return str(value)


def render_prompt(path: Path, rules: DomainRules | None = None) -> str:
    """A reviewer's prompt with its `{{table.key}}` placeholders filled from the rules in force,
    so a model brain checks against the same configuration as the deterministic rules. A
    placeholder naming no rule is a ConfigError (a typo would otherwise reach the model)."""
    rules = rules or domain_rules()
    text = path.read_text(encoding="utf-8")
    for table in msgspec.structs.fields(DomainRules):
        section = getattr(rules, table.name)
        for field in msgspec.structs.fields(section):
            value = _shown(getattr(section, field.name))
            text = text.replace(f"{{{{{table.name}.{field.name}}}}}", value)
    if "{{" in text:
        left = text[text.index("{{") :].split("}}", 1)[0] + "}}"
        raise ConfigError(
            f"prompt {path}: placeholder {left} names no rule",
            hint="placeholders are {{table.key}} of agents/rules.toml",
        )
    return text
