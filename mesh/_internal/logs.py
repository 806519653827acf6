"""Logging for processes we start (CLI, agents, coordinator). Library code never calls this."""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry import trace

from mesh.settings import get_settings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("event_id", "trace_id", "agent", "tenant"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if "trace_id" not in doc:
            # Logged inside a span: the line joins its trace (search logs by trace id).
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                doc["trace_id"] = format(ctx.trace_id, "032x")
                doc["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_process() -> None:
    """`configure()` for a long-running process's `main` (an agent, the coordinator, the
    schedule relay): a `MESH_*` variable that does not parse is one `error:` line and exit
    code 3, as the `mesh` command says it (docs/cli.md), not pydantic's traceback."""
    from mesh.errors import settings_problem

    try:
        get_settings()
    except ValueError as e:
        line = settings_problem(e)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        raise SystemExit(3) from None
    configure()


def configure(fmt: str | None = None, level: str | None = None) -> None:
    settings = get_settings()
    fmt = fmt or settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or settings.log_level).upper())
    # Third-party chatter that says nothing a mesh user acts on.
    for noisy in ("httpx", "uvicorn.access", "a2a"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
