"""An attacker's connection: plain nats-py on the server's port, not the mesh's `Bus`.

By default it holds the operator's NATS credentials, the strongest attacker: the server lets it
do anything, so only the signatures can tell what it wrote. What the server itself refuses to
lesser identities is tests/integration/test_nats_auth.py's business."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client

from mesh.identity import Identity, resolve_identity
from mesh.settings import Settings


@contextlib.asynccontextmanager
async def outsider(url: str, identity: Identity | None = None) -> AsyncIterator[Client]:
    """A raw client on `url` as `identity` (default: the run's operator)."""
    identity = identity or resolve_identity(Settings())
    assert identity is not None, "the test run has an operator identity (tests/conftest.py)"
    nc = await nats.connect(
        url,
        connect_timeout=2,
        max_reconnect_attempts=1,
        nkeys_seed_str=identity.nats_seed,
        inbox_prefix=identity.inbox_prefix,
    )
    try:
        yield nc
    finally:
        await nc.close()
