"""The JSON Schemas of the event types the shipped agents read and write, made from their msgspec
types so the two cannot drift: `python -m agents.schemas` writes them into `mesh/schemas/`, and
`tests/unit/test_contracts.py` fails when a shipped file differs from what this makes.

Every object allows properties it does not list (`additionalProperties: true`): producers may add
fields (the structs ignore unknown fields for the same reason).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from agents.release import ReleaseProposal
from agents.tickets import TicketCreated, TicketTriaged
from mesh import contracts

# Event type -> the msgspec type of its `data`.
EVENT_TYPES: dict[str, type[msgspec.Struct]] = {
    "release.proposed": ReleaseProposal,
    "release.hotfix": ReleaseProposal,
    "ticket.created": TicketCreated,
    "ticket.triaged": TicketTriaged,
}


def _open(node: Any) -> None:
    # JSON Schema allows extra properties by default; saying so in every object makes the promise
    # visible to whoever reads the file (and keeps a generator change from closing them).
    if isinstance(node, dict):
        if node.get("type") == "object":
            node.setdefault("additionalProperties", True)
        for value in node.values():
            _open(value)
    elif isinstance(node, list):
        for value in node:
            _open(value)


def schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of `event_type`'s data."""
    generated = msgspec.json.schema(EVENT_TYPES[event_type])
    _open(generated)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:quorum-mesh:event:{event_type}",
        "title": f"data of a {event_type} event",
        **generated,
    }


def render(event_type: str) -> str:
    return json.dumps(schema(event_type), indent=2, ensure_ascii=False) + "\n"


def write(folder: Path = contracts.SHIPPED_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type in EVENT_TYPES:
        path = folder / f"{event_type}{contracts.SUFFIX}"
        path.write_text(render(event_type), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else contracts.SHIPPED_DIR):
        sys.stdout.write(f"{path}\n")
