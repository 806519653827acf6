"""An agent instance's composite version: what its behaviour is made of, named.

    version = "<label>+<hash12>"      e.g. "2.0+3f9a1c0b7d22"

`hash12` is the first 12 hex digits of a SHA-256 over a canonical JSON document of:
- `code`: the agent's own source files (the handler's module file; every `*.py` of its package
  when that module sits in one), by relative path and content;
- `prompt`: the system prompt text (None: none);
- `model`: the brain chain as configured (each brain's kind, provider, model, max tokens,
  timeout; a chain's per-brain timeouts), never a key or an endpoint's secret;
- `tools`: the tool definitions a model brain is given (name, description, input schema);
- `policy`: the policy the agent votes under, when the agent knows it ("" when it does not:
  policies live with the coordinator, and the decision names the rule).

`label` is the human part: `Agent(version=...)`, else MESH_AGENT_VERSION, else the card's own
`version`. Same inputs, same version: a restart of the same code, prompt and configuration
gives the same string; changing any one of them gives another (tests/unit/test_versions.py).

Where it goes: the live card's `version` field (signed with the card, so a reader believes it
as it believes the card), `Registration.version` (checked against the signed card), every
answer's artifact metadata (`VERSION_KEY`, informational), and every vote the coordinator
records (taken from the signing instance's verified card, never from the answer).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from mesh.settings import Settings, get_settings

VERSION_KEY = "meshVersion"  # the artifact metadata entry that carries it
HASH_LEN = 12
_enc = msgspec.json.Encoder(order="sorted")


def composite(
    label: str,
    *,
    code: dict[str, str],
    prompt: str | None,
    model: Any,
    tools: list[Any],
    policy: str = "",
) -> str:
    """`label+hash12` of these inputs (see the module docstring)."""
    doc = {"code": code, "prompt": prompt, "model": model, "tools": tools, "policy": policy}
    digest = hashlib.sha256(_enc.encode(msgspec.to_builtins(doc))).hexdigest()[:HASH_LEN]
    return f"{label or '0'}+{digest}"


def label_of(explicit: str | None, card_version: str, settings: Settings | None = None) -> str:
    """The human label: explicit, else MESH_AGENT_VERSION (`Settings.agent_version`), else the
    card's version."""
    configured = (settings or get_settings()).agent_version.strip()
    return explicit or configured or card_version


def code_of(fn: Callable[..., Any] | None) -> dict[str, str]:
    """The source files behind `fn`, by path relative to their folder, and their text."""
    if fn is None:
        return {}
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin: no file of ours
        return {}
    if source is None:
        return {}
    path = Path(source)
    root = path.parent
    files = sorted(root.rglob("*.py")) if (root / "__init__.py").exists() else [path]
    out = {}
    for f in files:
        if "__pycache__" in f.parts:
            continue
        try:
            out[f.relative_to(root).as_posix()] = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    return out


def brain_config(brain: Any) -> Any:
    """A brain chain as data: what its configuration says, no secrets, no clients."""
    if brain is None:
        return None
    inner = getattr(brain, "brains", None)
    if inner is not None:  # ChainBrain
        return {
            "chain": [brain_config(b) for b in inner],
            "timeouts": list(getattr(brain, "timeouts", [])),
        }
    if hasattr(brain, "model"):  # ClaudeBrain (any provider)
        return {
            "kind": "model",
            "provider": getattr(brain, "provider", ""),
            "model": brain.model,
            "max_tokens": getattr(brain, "max_tokens", 0),
            "timeout_s": getattr(brain, "timeout_s", 0.0),
        }
    return {"kind": str(getattr(brain, "name", type(brain).__name__))}


def tools_of(brain: Any) -> list[Any]:
    """The tool definitions the brain's models are given."""
    if brain is None:
        return []
    inner = getattr(brain, "brains", None)
    if inner is not None:
        return [t for b in inner for t in tools_of(b)]
    tools = getattr(brain, "tools", None)  # a model brain: its answer tool and the agent's
    if isinstance(tools, list):
        return list(tools)
    tool = getattr(brain, "tool", None)
    return [tool] if tool is not None else []


def split(version: str) -> tuple[str, str]:
    """(label, hash) of a composite version ("", version) when it is not one."""
    label, plus, digest = version.rpartition("+")
    return (label, digest) if plus else ("", version)
