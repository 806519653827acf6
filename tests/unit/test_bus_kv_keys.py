"""`Bus.kv_keys` follows the server's pages of a long subject list, and raises its API errors
(tests/integration/test_bus.py lists a real bucket)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from mesh.bus import Bus
from mesh.settings import Settings


class _Nc:
    """Answers STREAM.INFO as nats-server does: `limit` subjects per page from `offset`."""

    def __init__(self, subjects: list[str], limit: int, error: dict[str, Any] | None = None):
        self.subjects, self.limit, self.error = subjects, limit, error
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def request(self, subject: str, data: bytes, timeout: float) -> Any:
        req = json.loads(data)
        self.requests.append((subject, req))
        if self.error is not None:
            return SimpleNamespace(data=json.dumps({"error": self.error}).encode())
        offset = req.get("offset", 0)
        page = self.subjects[offset : offset + self.limit]
        body = {
            "state": {"subjects": {s: 1 for s in page}},
            "total": len(self.subjects),
            "offset": offset,
            "limit": self.limit,
        }
        return SimpleNamespace(data=json.dumps(body).encode())


def _bus(nc: _Nc) -> Bus:
    return Bus(nc, Settings())  # type: ignore[arg-type]


async def test_every_page_of_a_long_key_list_is_read() -> None:
    nc = _Nc([f"$KV.b.k{i:02d}" for i in range(7)], limit=3)
    assert await _bus(nc).kv_keys("b") == [f"k{i:02d}" for i in range(7)]
    assert [r.get("offset", 0) for _, r in nc.requests] == [0, 3, 6]
    assert {s for s, _ in nc.requests} == {"$JS.API.STREAM.INFO.KV_b"}
    assert all(r["subjects_filter"] == "$KV.b.>" for _, r in nc.requests)


async def test_an_empty_bucket_is_one_request() -> None:
    nc = _Nc([], limit=3)
    assert await _bus(nc).kv_keys("b") == []
    assert len(nc.requests) == 1


async def test_a_missing_bucket_is_the_servers_error() -> None:
    nc = _Nc([], limit=3, error={"code": 404, "err_code": 10059, "description": "not found"})
    with pytest.raises(NotFoundError):
        await _bus(nc).kv_keys("b")
