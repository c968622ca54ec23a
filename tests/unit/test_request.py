"""Reading a request: its body's bounds and the client's own request id."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hermes_serve.errors import CODES, OpenAIError
from hermes_serve.request import CLIENT_REQUEST_ID_MAX, MAX_JSON_DEPTH, Incoming, nested_deeper_than


def nested(depth: int) -> Any:
    """A JSON value ``depth`` deep, alternating arrays and objects."""
    value: Any = []
    for level in range(depth - 1):
        value = {"k": value} if level % 2 else [1, value, "[[[["]
    return value


@pytest.mark.parametrize("depth", [1, 2, 63, 64, 65, 500])
def test_depth_is_counted_exactly_around_the_bound(depth: int) -> None:
    value = nested(depth)
    assert nested_deeper_than(value, MAX_JSON_DEPTH) is (depth > MAX_JSON_DEPTH)
    assert nested_deeper_than(json.loads(json.dumps(value)), depth) is False
    assert nested_deeper_than(value, depth - 1) is True


def test_scalars_and_wide_shallow_bodies_are_not_deep() -> None:
    assert not nested_deeper_than("[[[[[[", 1)
    assert not nested_deeper_than(None, 0)
    wide = {"messages": [{"role": "user", "content": "x"}] * 10_000, "tools": [{"a": [1, 2]}] * 1000}
    assert not nested_deeper_than(wide, 4) and nested_deeper_than(wide, 3)


def incoming(*headers: tuple[str, str], body: bytes = b"{}") -> Incoming:
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}
    return Incoming(scope, receive)


async def test_a_body_deeper_than_the_bound_is_refused_before_anything_walks_it() -> None:
    request = incoming(body=b"[" * 100_000 + b"]" * 100_000)  # json alone would raise RecursionError
    with pytest.raises(OpenAIError) as refused:
        await request.read_json(limit=1_000_000)
    assert (refused.value.status, refused.value.code) == (400, "nesting_too_deep")
    assert str(MAX_JSON_DEPTH) in refused.value.message
    deep = incoming(body=json.dumps(nested(MAX_JSON_DEPTH + 1)).encode())
    with pytest.raises(OpenAIError, match="levels deep"):
        await deep.read_json(limit=1_000_000)
    at_the_bound = incoming(body=json.dumps(nested(MAX_JSON_DEPTH)).encode())
    assert await at_the_bound.read_json(limit=1_000_000)
    at_the_bound.close()


@pytest.mark.parametrize("value", ["a", "trace 42: ~!", "x" * 512, "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_a_client_request_id_of_printable_ascii_is_taken_as_sent(value: str) -> None:
    assert incoming(("x-client-request-id", value)).client_request_id() == value


@pytest.mark.parametrize("value", ["", "x" * 513, "caf\xe9", "a\tb", "line\x7f", "a\x00b"])
def test_any_other_client_request_id_is_a_400(value: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        incoming(("x-client-request-id", value)).client_request_id()
    assert (refused.value.status, refused.value.code) == (400, "invalid_client_request_id")


def test_two_client_request_ids_are_a_400_and_none_is_none() -> None:
    with pytest.raises(OpenAIError):
        incoming(("x-client-request-id", "a"), ("x-client-request-id", "b")).client_request_id()
    assert incoming().client_request_id() is None


def test_the_errors_table_states_these_bounds() -> None:
    assert f"over {MAX_JSON_DEPTH} levels" in CODES["nesting_too_deep"].when
    assert f"1 to {CLIENT_REQUEST_ID_MAX} printable ASCII" in CODES["invalid_client_request_id"].when
