"""Event payload contracts: one JSON Schema (draft 2020-12) per event type, for its `data`.

The schemas are data files, `<event type>.schema.json`: the ones the mesh ships sit in
`mesh/schemas/` (generated from the msgspec types in `agents/release.py` and `agents/tickets.py`;
`tests/unit/test_contracts.py` fails when the two drift apart), and an operator's own in
`MESH_SCHEMA_DIR`, which win over a shipped one of the same type. The mesh core reads them as
files, so it never imports the agents that define the types.

Checked where events enter the mesh: `Bus.publish_event` (and so `EventContext.publish`) refuses
an event whose data breaks its type's schema with a one-line `SchemaViolationError` naming the
field and the schema; the coordinator dead-letters such a body as `malformed` with the same line.
Objects allow properties the schema does not list (`additionalProperties` is true), as the docs
promise producers may add fields. An event type without a schema is not checked at all.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

# jsonschema ships no type information (no py.typed; types-jsonschema is not installed).
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import (  # type: ignore[import-untyped]
    SchemaError,
    ValidationError,
    best_match,
)

from mesh.envelope import Event, MalformedEventError
from mesh.errors import ConfigError

SHIPPED_DIR = Path(__file__).with_name("schemas")
SUFFIX = ".schema.json"
# A violation is reported on one line; a value quoted in it (a 900 KB string) is cut to this.
_MAX_MESSAGE = 200


class SchemaViolationError(MalformedEventError):
    """An event whose data breaks its type's JSON Schema; the message names field and schema."""


def _folders() -> tuple[Path, ...]:
    from mesh.settings import get_settings

    own = get_settings().schema_dir
    return (own, SHIPPED_DIR) if own is not None else (SHIPPED_DIR,)


def schema_path(event_type: str) -> Path | None:
    """The schema file that governs `event_type`, or None when it has none."""
    for folder in _folders():
        path = folder / f"{event_type}{SUFFIX}"
        if path.is_file():
            return path
    return None


def event_types() -> list[str]:
    """Every event type with a schema, sorted."""
    found: set[str] = set()
    for folder in _folders():
        if folder.is_dir():
            found.update(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}"))
    return sorted(found)


def schema_of(event_type: str) -> dict[str, Any] | None:
    """The JSON Schema of `event_type`'s data (parsed), or None when it has none."""
    path = schema_path(event_type)
    return None if path is None else _load(path)[0]


@lru_cache(maxsize=256)
def _load(path: Path) -> tuple[dict[str, Any], Any]:
    # Cached per file for the life of the process: schemas are read once, like the policy file.
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(schema, dict):
            raise ValueError("a schema file holds one JSON object")
        Draft202012Validator.check_schema(schema)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"event schema {path}: cannot be read: {e}", hint="fix or remove the file"
        ) from None
    except SchemaError as e:
        raise ConfigError(
            f"event schema {path}: not a valid JSON Schema (2020-12): {e.message}",
            hint="fix or remove the file",
        ) from None
    return schema, Draft202012Validator(schema)


def _where(error: ValidationError) -> str:
    where = "data"
    for part in error.absolute_path:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    return where if len(where) <= _MAX_MESSAGE else where[: _MAX_MESSAGE - 1] + "…"


def violation(event_type: str, data: Any) -> str | None:
    """Why `data` breaks `event_type`'s schema, in one line naming the field and the schema, or
    None when it does not (or the type has no schema). A broken schema file is a ConfigError."""
    path = schema_path(event_type)
    if path is None:
        return None
    _, validator = _load(path)
    error = best_match(validator.iter_errors(data))
    if error is None:
        return None
    message = " ".join(error.message.split())
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    return f"{_where(error)}: {message} (schema {path.name})"


def check(event: Event) -> None:
    """Raise `SchemaViolationError` when `event.data` breaks its type's schema."""
    why = violation(event.type, event.data)
    if why is not None:
        raise SchemaViolationError(
            f"event {event.type} breaks its schema: {why}",
            hint=f"`mesh schema {event.type}` prints the schema",
        )


def check_all() -> list[str]:
    """Read and check every schema in force; returns their event types. A process that wants a
    broken schema file to stop it at start (not at its first event) calls this when it starts."""
    types = event_types()
    for event_type in types:
        schema_of(event_type)
    return types
