"""What every `mesh` command shares: the consoles, the exit codes, and turning mesh errors into
one line, a hint and the exit code that says what kind of failure it was (never a traceback).

Exit codes (docs/cli.md lists them; scripts may rely on them):

    0  ok
    1  any other failure at run time (a demo outcome not as expected, a folder in use)
    2  usage: an unknown option, a missing argument (click's own)
    3  configuration or input: a bad setting, file, card, argument value, or a refusal
    4  not found: no such dead letter, decision, identity…
    5  unavailable: no NATS server, or nothing answered (no coordinator, no live agent)
    6  verification failed: a forged decision, an audit trail that does not verify
  130  interrupted (Ctrl-C, SIGTERM)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mesh.errors import ConfigError, MeshError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_VERIFY = 6
EXIT_INTERRUPTED = 130

# Piped output is for other programs: as wide as each line is (rich would cut tables at 80
# columns, and URLs with them). COLUMNS, when set, still wins.
PIPED_WIDTH = 1_000_000


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console


out = _console()
err = _console(stderr=True)

T = TypeVar("T")


def exit_code(e: MeshError) -> int:
    """The one place a mesh error becomes an exit code (see the module docstring); the
    long-running processes use the same (`mesh.errors.exit_code`)."""
    from mesh.errors import exit_code as code

    return code(e)


def settings_error(e: Exception) -> str | None:
    """A `MESH_*` variable that does not parse, as one line naming it and what it expects
    (pydantic's report is a traceback's worth); None for any other validation error."""
    from mesh.errors import settings_problem

    return settings_problem(e)


JsonOption = Annotated[bool, typer.Option("--json", help="Print it as JSON (for scripts).")]


def print_json(value: Any) -> None:
    """What `--json` prints: one JSON document on stdout, nothing else there."""
    print(json.dumps(value, indent=2, ensure_ascii=False))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Mesh errors become a message and their exit code (`exit_code`), as does a `MESH_*`
    variable that does not parse (`settings_error`); Ctrl-C exit code 130."""
    try:
        yield
    except MeshError as e:
        from mesh.bus import redact  # the error path only: `mesh --help` stays light

        # Escaped: messages quote TOML ("[[agents]]") and JSON, which is not rich markup.
        # Soft-wrapped: one line each, whatever the terminal's width. Redacted: no URL's
        # password reaches the terminal, whoever raised the error.
        err.print(f"[red]error:[/red] {escape(redact(e.message))}", soft_wrap=True)
        if e.hint:
            err.print(f"  → {escape(redact(e.hint))}", soft_wrap=True)
        raise typer.Exit(exit_code(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:
        line = settings_error(e)
        if line is None:
            raise
        err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; mesh errors become a message and their exit code."""
    with user_errors():
        return asyncio.run(coro)


def command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """An `async def` command, run to completion by `run`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(fn(*args, **kwargs))

    return wrapper


def setup_logging(quiet: bool = True) -> None:
    from mesh._internal.logs import configure

    configure(level="WARNING" if quiet else None)


def read_body_bytes(body: str) -> bytes:
    """An argument given inline, or as @path/to/file (read as bytes: any bytes may be sent)."""
    if body.startswith("@"):
        path = Path(body[1:])
        try:
            return path.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"cannot read {path}: {e.strerror}", hint="give JSON inline or @path/to/file.json"
            ) from None
    return body.encode("utf-8", errors="surrogateescape")


def read_body(body: str) -> str:
    """An argument given inline, or as @path/to/file, as text (UTF-8)."""
    raw = read_body_bytes(body)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{body if body.startswith('@') else 'the argument'} is not UTF-8 text "
            f"(byte {e.start})",
            hint="give JSON or text in UTF-8",
        ) from None
