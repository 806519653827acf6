"""`python -m bench.agent_lean`: `agents.security_review` with the `anthropic` SDK never imported.

A what-if for memory only: `mesh.models` imports `anthropic` at module level (~40 MB of RSS and
~3,000 modules) even when no API key is set and the rules answer. Here a stub stands in for the
package, so the RSS of this process is what a lazy import (inside `ClaudeBrain`) would give.
Serves the rules brain only (run it with ANTHROPIC_API_KEY empty). Bench-only.
"""

from __future__ import annotations

import sys
import types


class _Stub(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Exception,), {})


for _name in ("anthropic", "anthropic.types"):
    sys.modules[_name] = _Stub(_name)

if __name__ == "__main__":
    from agents.security_review.agent import agent

    agent.main()
