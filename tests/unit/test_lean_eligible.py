"""Which SendMessage requests the lean path takes (mesh.a2a.lean.LeanSend.eligible), rule by
rule: a request that is eligible stops being so when any one rule is broken. And the agent
process's event loop (uvloop unless MESH_UVLOOP=0)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import msgspec
import pytest
import uvloop
from a2a.helpers import new_data_part
from a2a.server.context import ServerCallContext
from a2a.types import SendMessageRequest
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import ParseDict
from hypothesis import HealthCheck, given, settings

from mesh.a2a.handler import MeshRequestHandler
from mesh.a2a.lean import LeanMessage, LeanSend, Outcome, _required_fields_set
from mesh.agent import _data_part, _order_free, _run
from tests.support import strategies


class _Handler:
    validates_input_modes = False


class _Answerer:
    def __init__(self, immediate: bool = True) -> None:
        self._immediate = immediate

    def immediate(self, metadata: Mapping[str, Any]) -> bool:
        return self._immediate

    async def answer(self, message: LeanMessage, context: ServerCallContext) -> Outcome:
        raise AssertionError("not called here")


def _lean(*, immediate: bool = True, input_modes: bool = False) -> LeanSend:
    handler = _Handler()
    handler.validates_input_modes = input_modes
    return LeanSend(cast("MeshRequestHandler", handler), _Answerer(immediate))


def _params(message: dict[str, Any] | None = None, **fields: Any) -> SendMessageRequest:
    doc = {
        "message": {
            "role": "ROLE_USER",
            "messageId": "m-1",
            "parts": [{"data": {"x": 1}}],
            **(message or {}),
        },
        **fields,
    }
    params: SendMessageRequest = ParseDict(doc, SendMessageRequest())
    return params


def test_a_new_blocking_message_is_eligible() -> None:
    assert _lean().eligible(_params())
    assert _lean().eligible(_params({"contextId": "c-1", "metadata": {"tenant": "t"}}))
    assert _lean().eligible(_params({"parts": [{"text": "{}"}, {"data": {}}]}))


@pytest.mark.parametrize(
    "params",
    [
        _params(configuration={"returnImmediately": True}),
        _params(configuration={"historyLength": 3}),
        _params(configuration={"acceptedOutputModes": ["application/json"]}),
        _params(configuration={"taskPushNotificationConfig": {"url": "https://example.com"}}),
        _params(configuration={}),
        _params(metadata={"a": 1}),
        _params(tenant="t-1"),
        _params({"taskId": "t-1"}),
        _params({"referenceTaskIds": ["t-0"]}),
        _params({"extensions": ["https://example.com/ext"]}),
        _params({"role": "ROLE_AGENT"}),
        _params({"role": "ROLE_UNSPECIFIED"}),
        _params({"parts": []}),
        _params({"parts": [{"data": {}}, {"text": ""}]}),
    ],
    ids=[
        "return-immediately",
        "history-length",
        "output-modes",
        "push-config",
        "empty-configuration",
        "request-metadata",
        "tenant",
        "follow-up",
        "reference-tasks",
        "extensions",
        "agent-role",
        "no-role",
        "no-parts",
        "empty-text-part",
    ],
)
def test_anything_the_sdk_must_handle_is_not(params: SendMessageRequest) -> None:
    assert not _lean().eligible(params)


def test_not_when_the_answer_is_not_immediate_or_input_modes_are_checked() -> None:
    assert not _lean(immediate=False).eligible(_params())
    assert not _lean(input_modes=True).eligible(_params())


def test_agent_process_runs_on_uvloop_unless_turned_off() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())

    _run(main(), uvloop=True)
    _run(main(), uvloop=False)
    assert isinstance(loops[0], uvloop.Loop)
    assert not isinstance(loops[1], uvloop.Loop)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"messageId": ""},
        {"parts": [{}]},
        {"parts": [{"data": {"deep": [{"x": None}, {"y": {"z": []}}]}}]},
        {"parts": [{"url": "https://example.com/x"}, {"raw": "AAEC"}]},
        {"parts": [{"text": "t", "metadata": {"k": "v"}}]},
        {"metadata": {"tenant": "t"}, "contextId": "c"},
    ],
    ids=["complete", "no-message-id", "empty-part", "deep-data", "url-raw", "part-meta", "meta"],
)
def test_required_field_check_agrees_with_the_sdk(message: dict[str, Any]) -> None:
    """The lean path's cached check (lean._required_fields_set) finds a missing REQUIRED field
    exactly when a2a-sdk's validator does (which then raises its own error for it)."""
    params = _params(message)
    try:
        validate_proto_required_fields(params)
    except InvalidParamsError:
        sdk_ok = False
    else:
        sdk_ok = True
    assert _required_fields_set(params) is sdk_ok


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategies.json_values(strategies.json_scalars(int_bits=64, text=12), key=8, width=4, leaves=20)
)
def test_vote_data_part_is_the_sdk_helpers(value: Any) -> None:
    """The runtime's data part (mesh.agent._data_part, on every vote of both paths) is the
    Part a2a-sdk's `new_data_part` builds, for any JSON value (`==` on protobuf messages
    compares presence too: `[]` and `{}` are set values, not an empty Value)."""
    assert _data_part(value) == new_data_part(value, media_type="application/json")


class _Inner(msgspec.Struct):
    n: int
    tags: list[str]


class _Free(msgspec.Struct):
    a: str
    inner: _Inner | None = None
    many: list[_Inner] = []


class _Mapped(msgspec.Struct):
    a: str
    labels: dict[str, str] = {}


class _Deep(msgspec.Struct):
    inner: list[_Mapped] = []


def test_order_free_input_types() -> None:
    """Input types whose decoded value cannot depend on a JSON object's member order (the lean
    path decodes those straight from the request's JSON) and those that can (a dict, Any)."""

    def free(t: Any) -> bool:
        return _order_free(msgspec.inspect.type_info(t), set())

    assert free(_Free) and free(list[_Free]) and free(str)
    assert not free(_Mapped) and not free(_Deep) and not free(dict) and not free(Any)
