"""What every `mesh` command shares: the consoles, and turning mesh errors into one line, a
hint and exit code 2 (never a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mesh.errors import ConfigError, MeshError

out = Console()
err = Console(stderr=True)

T = TypeVar("T")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Mesh errors become a message and exit code 2; Ctrl-C exit code 130."""
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
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; mesh errors become a message and exit code 2."""
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
