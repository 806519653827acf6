"""The console in a real headless Chromium (Playwright driving Debian's `chromium`; Playwright's
own browser download is never used). Without a chromium binary every test here skips, saying
so; `make test` runs them wherever `chromium` is on PATH (or MESH_TEST_CHROMIUM names one).

Each test gets a whole mesh (`MeshHarness`: NATS, the three reviewers, a coordinator) and the
console served by uvicorn on 127.0.0.1 in the test's event loop, connected as the run's
operator like `mesh console` next to `mesh up`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.identity import IdentityDir, load_trust
from tests.browser.support import CHROMIUM, Console


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives the console in headless Chromium (skipped without one)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM:
        return
    skip = pytest.mark.skip(
        reason="no chromium binary (apt-get install chromium, or set MESH_TEST_CHROMIUM); "
        "Playwright's own browser download is not used"
    )
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(skip)


@pytest.fixture
async def console(identities: IdentityDir) -> AsyncIterator[Console]:
    from agents.compliance_review.agent import agent as compliance
    from agents.quality_review.agent import agent as quality
    from agents.security_review.agent import agent as security
    from coordinator.policy import DEFAULT_FILE
    from mesh.console import create_app, serving
    from mesh.settings import Settings
    from mesh.testing import MeshHarness

    settings = Settings(heartbeat_s=0.3, card_ttl_s=1.5, no_agent_wait_s=1.0, http_port=0)
    async with MeshHarness(
        security, compliance, quality, policies=DEFAULT_FILE, settings=settings, timeout=30
    ) as mesh:
        app = create_app(
            trust=load_trust(identities.trust_path),
            trust_path=identities.trust_path,
            settings=Settings(nats_url=mesh.url),
        )
        async with serving(app, port=0) as url:
            yield Console(url, mesh, identities)


APPROVER_ROLE = "release-manager"


@pytest.fixture
async def approvals_console(identities: IdentityDir) -> AsyncIterator[Console]:
    """A mesh whose `release.proposed` waits for a person (a release manager) after its three
    reviewers, and the console run as its own `console` identity, as beside `mesh up` (not as
    the operator): what it signs on a person's behalf must pass the desk as a console's. The
    console's and the people's identities are issued before the server starts (it admits
    the identities it knows then)."""
    import tomllib

    from agents.compliance_review.agent import agent as compliance
    from agents.quality_review.agent import agent as quality
    from agents.security_review.agent import agent as security
    from coordinator.policy import DEFAULT_FILE
    from mesh.console import create_app, serving
    from mesh.settings import Settings
    from mesh.testing import MeshHarness

    console_id = identities.issue("console", "browser-console")
    identities.issue("human", "rita", tenant="acme", claims=[APPROVER_ROLE])
    identities.issue("human", "nick", tenant="acme", claims=["nurse"])
    policies = tomllib.loads(DEFAULT_FILE.read_text())
    policies["release.proposed"] |= {"humans": [{"role": APPROVER_ROLE, "wait_s": 600}]}
    settings = Settings(heartbeat_s=0.3, card_ttl_s=1.5, no_agent_wait_s=1.0, http_port=0)
    async with MeshHarness(
        security, compliance, quality, policies=policies, settings=settings, timeout=30
    ) as mesh:
        app = create_app(
            trust=load_trust(identities.trust_path),
            trust_path=identities.trust_path,
            settings=Settings(nats_url=mesh.url, identity=console_id),
        )
        async with serving(app, port=0) as url:
            yield Console(url, mesh, identities)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        # --no-sandbox: these machines run the tests as root, where Chromium's sandbox refuses.
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()
