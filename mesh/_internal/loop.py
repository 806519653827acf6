"""The event loop of a mesh process (an agent's `Agent.main`, `python -m coordinator`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    """`asyncio.run(main)`, on uvloop when it is installed and `uvloop` (MESH_UVLOOP) is on: the
    event loop and nats-py's socket I/O are a large share of an agent's CPU per request and of
    the coordinator's per decision (bench/README.md). Only a process's own entry point calls
    this: a library never swaps the loop of an application that embeds it."""
    factory = None
    if uvloop:
        try:
            import uvloop as _uvloop  # optional: not every install has it
        except ImportError:
            log.debug("uvloop not installed: asyncio's own event loop")
        else:
            factory = _uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
