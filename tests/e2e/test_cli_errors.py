"""User mistakes at the `mesh` command line: what to do next, never a traceback, and the exit
code of their kind (docs/cli.md): 2 usage, 3 configuration or input, 4 not found, 5 unavailable."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import envelope
from mesh.server import EmbeddedServer
from tests.e2e.procs import Ran, mesh_env, run_mesh

pytestmark = pytest.mark.e2e


@pytest.fixture
def no_mesh(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder with no `mesh up` state and no MESH_NATS_URL."""
    assert not (tmp_path / ".mesh").exists()
    yield tmp_path
    assert not (tmp_path / ".mesh" / "nats.json").exists()


USAGE, CONFIG, NOT_FOUND, UNAVAILABLE = 2, 3, 4, 5


def _usage_error(ran: Ran, code: int = CONFIG) -> None:
    assert ran.returncode == code, str(ran)
    assert "Traceback" not in ran.stdout + ran.stderr, str(ran)
    assert "error" in ran.stderr, str(ran)


@pytest.mark.parametrize(
    "args",
    [
        ["agents"],
        ["decisions"],
        ["decisions", "--json"],
        ["dlq"],
        ["dlq", "ls", "--json"],
        ["publish", "release.proposed", "{}"],
    ],
    ids=" ".join,
)
def test_no_server_says_what_to_do(no_mesh: Path, args: list[str]) -> None:
    ran = run_mesh(args, cwd=no_mesh, env=mesh_env(no_mesh))
    _usage_error(ran, UNAVAILABLE)
    assert "no NATS server" in ran.stderr, str(ran)
    assert "mesh up" in ran.stderr or "MESH_NATS_URL" in ran.stderr, str(ran)
    assert ran.stdout.strip() == "", str(ran)  # no half output, no event id


def test_publish_bad_event_type(no_mesh: Path) -> None:
    ran = run_mesh(["publish", "bad type!", "{}"], cwd=no_mesh, env=mesh_env(no_mesh))
    _usage_error(ran)
    assert "'bad type!' is not an event type" in ran.stderr, str(ran)
    assert "release.proposed" in ran.stderr, str(ran)  # an example of a valid one


def test_publish_missing_file(no_mesh: Path) -> None:
    ran = run_mesh(
        ["publish", "release.proposed", "@missing.json"], cwd=no_mesh, env=mesh_env(no_mesh)
    )
    _usage_error(ran)
    assert "missing.json" in ran.stderr, str(ran)
    assert "cannot read" in ran.stderr, str(ran)


def test_run_unknown_agent_module(no_mesh: Path) -> None:
    ran = run_mesh(["run", "agents.nope"], cwd=no_mesh, env=mesh_env(no_mesh))
    _usage_error(ran, NOT_FOUND)
    assert "agents.nope" in ran.stderr, str(ran)
    assert "mesh run agents.security_review" in ran.stderr, str(ran)


def test_nothing_listening_at_mesh_nats_url(no_mesh: Path) -> None:
    # An identity to connect as (the folder's operator, as `mesh up` would make it), so what
    # fails is the connection.
    made = run_mesh(["creds", "operator"], cwd=no_mesh, env=mesh_env(no_mesh))
    assert made.returncode == 0 and "operator.json" in made.stdout, str(made)
    # A port bound but never listened on, held while the command runs: nothing can accept there
    # and no other process can take the port meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{held.getsockname()[1]}"
        ran = run_mesh(["agents"], cwd=no_mesh, env=mesh_env(no_mesh, MESH_NATS_URL=url))
    _usage_error(ran, UNAVAILABLE)
    assert "cannot connect" in ran.stderr, str(ran)
    assert url in ran.stderr, str(ran)
    assert "MESH_NATS_URL" in ran.stderr or "mesh up" in ran.stderr, str(ran)


def test_no_identity_says_what_to_do(no_mesh: Path) -> None:
    """A NATS URL but no identity to connect as: refused before connecting, never anonymous."""
    env = mesh_env(no_mesh, MESH_NATS_URL="nats://127.0.0.1:4222")
    ran = run_mesh(["agents"], cwd=no_mesh, env=env)
    _usage_error(ran)
    assert "no NATS identity" in ran.stderr, str(ran)
    assert "MESH_IDENTITY" in ran.stderr and "mesh creds" in ran.stderr, str(ran)


def test_creds_never_prints_a_secret(no_mesh: Path) -> None:
    from mesh.identity import load_identity

    env = mesh_env(no_mesh)
    ran = run_mesh(["creds", "publisher", "billing", "--tenant", "acme"], cwd=no_mesh, env=env)
    assert ran.returncode == 0, str(ran)
    path = no_mesh / ".mesh" / "identity" / "publisher-billing-acme.json"
    identity = load_identity(path)  # refuses a file others may read
    for secret in (identity.nats_seed, identity.signing_seed, identity.token):
        assert secret not in ran.stdout + ran.stderr
    again = run_mesh(["creds", "publisher", "billing", "--tenant", "acme"], cwd=no_mesh, env=env)
    _usage_error(again)
    assert "already exists" in again.stderr and "mesh creds revoke" in again.stderr, str(again)
    bad = run_mesh(["creds", "reader", "r"], cwd=no_mesh, env=env)
    assert bad.returncode == USAGE and "--tenant" in bad.stderr, str(bad)
    revoked = run_mesh(["creds", "revoke", str(path)], cwd=no_mesh, env=env)
    assert revoked.returncode == 0 and "revoked publisher:billing" in revoked.stdout, str(revoked)
    listed = run_mesh(["creds", "list"], cwd=no_mesh, env=env)
    assert listed.returncode == 0 and "billing" not in listed.stdout, str(listed)


def _one_line_error(ran: Ran) -> str:
    """Exit 3, no traceback, and the error on one line (with at most a hint line)."""
    _usage_error(ran)
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:"), str(ran)
    assert ran.stdout.strip() == "", str(ran)  # nothing was published: no event id
    return lines[0]


def test_publish_refuses_what_the_mesh_cannot_carry(no_mesh: Path) -> None:
    """Too large for the server's max_payload, or nested deeper than the mesh carries: refused
    with one line that names the limit. Bytes that are merely not JSON (or not UTF-8) go out
    as they are, to be dead-lettered with the reason."""
    with EmbeddedServer() as server:
        env = mesh_env(
            no_mesh,
            MESH_NATS_URL=server.url,
            MESH_IDENTITY=os.environ["MESH_IDENTITY"],
            MESH_TRUST=os.environ["MESH_TRUST"],
        )

        def publish(name: str, body: bytes) -> Ran:
            (no_mesh / name).write_bytes(body)
            return run_mesh(["publish", "release.proposed", f"@{name}"], cwd=no_mesh, env=env)

        line = _one_line_error(publish("big.json", b'{"pad": "' + b"x" * 1_100_000 + b'"}'))
        assert "max_payload" in line and "1,048,576 bytes" in line, line
        line = _one_line_error(publish("huge.bin", b"<" * 1_100_000))  # not JSON, too large
        assert "max_payload" in line, line

        line = _one_line_error(publish("deep.json", b"[" * 10_000 + b"]" * 10_000))
        assert f"at most {envelope.MAX_DATA_DEPTH} levels" in line, line
        line = _one_line_error(publish("deep33.json", b"[" * 33 + b"]" * 33))
        assert "33 levels" in line, line
        cloud = b'{"specversion":"1.0","id":"x","source":"s","type":"a.b","data":'
        line = _one_line_error(publish("deepce.json", cloud + b"[" * 10_000 + b"]" * 10_000 + b"}"))
        assert "too deep to parse" in line, line

        for name, body in (("bad-utf8.bin", b"\xc3\x28\xff" * 40), ("near.bin", b"<" * 900_000)):
            ran = publish(name, body)
            assert ran.returncode == 0, str(ran)
            assert "Traceback" not in ran.stderr and "published as-is" in ran.stderr, str(ran)
            assert ran.stdout.strip(), str(ran)  # the event id


def test_call_with_a_file_that_is_not_utf8(no_mesh: Path) -> None:
    bad = no_mesh / "latin1.json"
    bad.write_bytes(b'{"note": "caf\xe9"}')
    ran = run_mesh(["call", "security-review", f"@{bad}"], cwd=no_mesh, env=mesh_env(no_mesh))
    _usage_error(ran)
    assert "is not UTF-8 text" in ran.stderr, str(ran)
