"""`mesh audit ls|verify` and `mesh status` through the real CLI entry point."""

import asyncio

import msgspec
import pytest
from typer.testing import CliRunner

from mesh.audit import AuditLog, subject
from mesh.bus import Bus
from mesh.cli import app
from mesh.server import EmbeddedServer

pytestmark = pytest.mark.integration


async def _seed(url: str, forge: bool) -> None:
    async with await Bus.connect(url) as bus:
        await bus.ensure()
        log = AuditLog(bus, actor="test")
        for i in range(3):
            await log.append("acme", "decision", f"e{i}", {"outcome": "approved"})
        if forge:
            # A genuine record changed and re-published (what a tampering client could publish,
            # since the stream refuses only delete and purge): verify must name it.
            record = await log.append("acme", "decision", "e3", {"outcome": "approved"})
            fake = msgspec.structs.replace(record, ref="e4", prev="f" * 64)
            await bus.publish(subject("acme", "decision"), msgspec.json.encode(fake))


@pytest.mark.parametrize("forge", [False, True])
def test_audit_verify_and_ls(forge: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedServer() as server:
        monkeypatch.setenv("MESH_NATS_URL", server.url)
        asyncio.run(_seed(server.url, forge))
        runner = CliRunner()
        verified = runner.invoke(app, ["audit", "verify"])
        listed = runner.invoke(app, ["audit", "ls", "--json", "--tenant", "acme"])
        table = runner.invoke(app, ["audit", "ls", "--tenant", "acme"], terminal_width=250)
    assert listed.exit_code == 0
    refs = [r["ref"] for r in msgspec.json.decode(listed.stdout)]
    if forge:
        assert verified.exit_code == 6
        assert "record 5 was altered: its content does not match its hash" in verified.output
        assert "does NOT verify" in verified.output
        assert refs == ["e0", "e1", "e2", "e3", "e4"]
        assert "ALTERED" in table.output
    else:
        assert verified.exit_code == 0, verified.output
        assert "verified 3 records" in verified.output
        assert refs == ["e0", "e1", "e2"]
        assert "ALTERED" not in table.output and "FOREIGN" not in table.output


def test_status_without_a_coordinator_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedServer() as server:
        monkeypatch.setenv("MESH_NATS_URL", server.url)
        result = CliRunner().invoke(app, ["status", "--wait", "0.2"])
    assert result.exit_code == 5
    assert "no coordinator answered" in result.output and "mesh up" in result.output
    assert "Traceback" not in result.output
