"""`Registry._keys`: "no keys" from nats-py's listing is believed only when the bucket's stream
holds no message; a stale listing on a clustered bucket is tried again (bounded)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from nats.js.errors import NoKeysError

from mesh.registry import Registry
from mesh.settings import Settings


class _Kv:
    def __init__(self, answers: list[list[str] | None]) -> None:
        self.answers = answers
        self.calls = 0

    async def keys(self) -> list[str]:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            raise NoKeysError
        return answer


def _registry(messages: int) -> Registry:
    async def stream_info(name: str) -> Any:
        assert name == "KV_mesh_cards"
        return SimpleNamespace(state=SimpleNamespace(messages=messages))

    bus = SimpleNamespace(settings=Settings(), js=SimpleNamespace(stream_info=stream_info))
    return Registry(bus)  # type: ignore[arg-type]


async def test_a_stale_empty_listing_is_tried_again() -> None:
    kv = _Kv([None, None, ["a.1", "b.2"]])
    assert await _registry(messages=2)._keys(kv) == ["a.1", "b.2"]  # type: ignore[arg-type]
    assert kv.calls == 3


async def test_an_empty_bucket_is_believed_at_once() -> None:
    kv = _Kv([None])
    assert await _registry(messages=0)._keys(kv) == []  # type: ignore[arg-type]
    assert kv.calls == 1


async def test_only_deleted_cards_end_as_no_keys_after_a_bounded_retry() -> None:
    kv = _Kv([])  # always "no keys", though tombstones keep the stream non-empty
    assert await _registry(messages=5)._keys(kv) == []  # type: ignore[arg-type]
    assert kv.calls == 4  # the retry policy's attempts
