"""What the browser tests share: the console under test, signing in, screenshots."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.identity import IdentityDir, load_identity

ROOT = Path(__file__).resolve().parents[2]
DOC_SHOTS = ROOT / "docs" / "console"
# docs/console/*.png are rewritten only when asked (UPDATE_SCREENSHOTS=1): a plain `make test`
# leaves the git tree clean, its screenshots going to a temporary folder (kept, to look at).
SHOTS = (
    DOC_SHOTS
    if os.environ.get("UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "mesh-console-screenshots"
)
CHROMIUM = os.environ.get("MESH_TEST_CHROMIUM") or shutil.which("chromium") or ""


@dataclass
class Console:
    url: str
    mesh: Any  # mesh.testing.MeshHarness
    ids: IdentityDir

    def token(self, role: str = "operator", name: str = "", tenant: str = "") -> str:
        """A bearer token as `mesh creds` issues it (the operator's: the run's own)."""
        if role == "operator":
            return load_identity(self.ids.operator_path).token
        if role == "human":  # issued before the mesh started (with its roles): read it
            path = self.ids.path / IdentityDir.file_name("human", name, tenant)
            return load_identity(path).token
        path = self.ids.issue(role, name, tenant=tenant)  # type: ignore[arg-type]
        return load_identity(path).token


async def sign_in(browser: Any, console: Console, token: str) -> Any:
    """A fresh browser context signed in with `token`; its page is on /decisions."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(30_000)
    await page.goto(f"{console.url}/decisions")
    assert "/signin" in page.url  # no anonymous access
    await page.fill("#token", token)
    await page.click("#signin")
    await page.wait_for_url(f"{console.url}/decisions")
    return page


async def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
