"""`mesh creds revoke`: a leaked key verifies nothing any more; a rotated one (`--retire`) keeps
what it signed before and signs nothing new."""

from __future__ import annotations

import time
from pathlib import Path

from typer.testing import CliRunner

from mesh.cli import app
from mesh.identity import IdentityDir, load_identity


def _issue_coordinator(folder: Path, name: str) -> Path:
    ran = CliRunner().invoke(app, ["creds", "coordinator", name, "--dir", str(folder)])
    assert ran.exit_code == 0, ran.output
    return folder / IdentityDir.file_name("coordinator", name)


def test_retire_keeps_the_past_and_revoke_keeps_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "identity"
    rotated, leaked = _issue_coordinator(folder, "c1"), _issue_coordinator(folder, "c2")
    signed_at = time.time() - 60
    old, bad = load_identity(rotated).signer(), load_identity(leaked).signer()
    record, forged = old.sign("audit", b"r"), bad.sign("audit", b"r")

    retired = CliRunner().invoke(
        app, ["creds", "revoke", str(rotated), "--retire", "--dir", str(folder)]
    )
    assert retired.exit_code == 0 and "retired coordinator:c1" in retired.output
    revoked = CliRunner().invoke(app, ["creds", "revoke", str(leaked), "--dir", str(folder)])
    assert revoked.exit_code == 0 and "revoked coordinator:c2" in revoked.output

    trust = IdentityDir(folder).trust()
    assert trust.refusal(old.kid, "audit", b"r", record, at=signed_at) is None
    assert "retired" in str(trust.refusal(old.kid, "audit", b"r", record, at=time.time() + 1))
    assert "revoked" in str(trust.refusal(bad.kid, "audit", b"r", forged, at=signed_at))
    nkeys = {u.nkey for u in IdentityDir(folder).users()}
    assert load_identity(rotated).nats_public_key() not in nkeys
    assert load_identity(leaked).nats_public_key() not in nkeys
