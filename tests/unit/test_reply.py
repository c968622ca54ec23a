"""What a client is sent: errors in the API's shape before and after the first byte, one answer
only, and the record of the status sent and the error it ended with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Message

from hermes_serve import errors
from hermes_serve.errors import ANTHROPIC, OPENAI, RESPONSES, Dialect
from hermes_serve.record import Record
from hermes_serve.reply import Reply
from tests.support.asgi import Sent

STREAM_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def event(data: str, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": more}


def reply_to(client: Sent, dialect: Dialect = OPENAI) -> tuple[Reply, Record]:
    record = Record("rid", "POST", "/v1/chat/completions", 0.0)
    return Reply(client, record, dialect), record


async def test_an_error_before_the_first_byte_is_a_whole_answer_with_the_replys_headers() -> None:
    client = Sent()
    reply, record = reply_to(client)
    reply.add_headers({"x-ratelimit-remaining-requests": "9"})
    await reply.fail(errors.queue_timeout(3, retry_after_s=2))
    assert client.status == 504 and json.loads(client.body)["error"]["code"] == "queue_timeout"
    assert client.headers["x-request-id"] == "rid" and client.headers["x-ratelimit-remaining-requests"] == "9"
    assert client.headers["retry-after"] == "2"
    assert reply.started and reply.over
    assert (record.status, record.outcome) == (504, "queue_timeout")


@pytest.mark.parametrize(
    ("dialect", "last"),
    [
        (OPENAI, b'data: {"error":{"message":"The request did not finish'),
        (RESPONSES, b'event: error\ndata: {"type":"error","code":"request_timeout"'),
        (ANTHROPIC, b'event: error\ndata: {"type":"error","error":{"type":"timeout_error"'),
    ],
)
async def test_an_error_after_the_first_byte_is_the_last_frame_of_the_apis_stream(
    dialect: Dialect, last: bytes
) -> None:
    client = Sent()
    reply, record = reply_to(client, dialect)
    await reply.send(STREAM_START)
    await reply.send(event('{"n":1}'))
    await reply.send(event('{"n":2}'))
    await reply.fail(errors.request_timeout(1))
    frames = [m["body"] for m in client.messages[1:]]
    assert frames[-1].startswith(last) and client.messages[-1]["more_body"] is False
    if dialect is RESPONSES:
        assert json.loads(frames[-1].split(b"data: ")[1])["sequence_number"] == 2, "numbered after what was sent"
    assert (record.status, record.outcome) == (200, "request_timeout")


async def test_once_the_answer_is_over_nothing_more_is_sent_and_its_outcome_stands() -> None:
    client = Sent()
    reply, record = reply_to(client)
    await reply.respond(200, {"ok": True})
    sent = len(client.messages)
    await reply.fail(errors.internal_error())
    await reply.send(event("late"))
    await reply.finish()
    assert len(client.messages) == sent and reply.over
    assert (record.status, record.outcome) == (200, "ok")
    failed = Sent()
    reply, record = reply_to(failed)
    await reply.fail(errors.engine_failed())
    await reply.fail(errors.internal_error())
    assert len(failed.messages) == 2 and record.outcome == "engine_failed"


async def test_every_request_gets_an_answer_even_one_nobody_reads() -> None:
    client = Sent()
    reply, record = reply_to(client)
    await reply.finish()
    assert client.status == 499 and json.loads(client.body)["error"]["code"] == "client_closed_request"
    assert record.outcome == "client_closed_request"


async def test_the_gateways_own_answer_has_its_length_and_the_replys_headers() -> None:
    client = Sent()
    reply, record = reply_to(client)
    await reply.respond_raw(200, b"<html></html>", {"content-type": "text/html"})
    headers: dict[str, Any] = client.headers
    assert headers["content-length"] == "13" and headers["content-type"] == "text/html"
    assert headers["x-request-id"] == "rid" and client.body == b"<html></html>"
    assert record.status == 200
