"""The engine's answer, relayed by mode: an error or a JSON answer whole, a stream chunk by chunk."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Message

from hermes_serve import errors
from hermes_serve.apis import ChatMeter, Meter
from hermes_serve.record import Record
from hermes_serve.relay import Relay, Transform
from hermes_serve.reply import Reply
from tests.support.asgi import Sent

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def start(status: int = 200, content_type: bytes = b"application/json", length: int | None = None) -> Message:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(chunk: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": more}


def data(value: Any) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def relay_to(
    client: Sent,
    meter: Meter | None = None,
    *,
    transform: Transform | None = None,
    hold_end: bool = False,
    alive: bool = True,
) -> tuple[Relay, Record]:
    record = Record("rid", "POST", "/v1/chat/completions", 0.0)
    relay = Relay(
        Reply(client, record), meter, model="asked", transform=transform, hold_end=hold_end, engine_alive=lambda: alive
    )
    return relay, record


async def answer(relay: Relay, status: int, payload: bytes) -> None:
    await relay.send(start(status, length=len(payload)))
    await relay.send(body(payload))


# --- buffered: an error or a JSON answer, whole ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "alive", "sent", "code"),
    [
        (404, b'{"error":{"message":"No `asked`; served: a, b, c","code":404}}', True, 404, "model_not_found"),
        (422, b'{"detail":[{"loc":["body","x"],"msg":"field required"}]}', True, 400, None),
        (500, b"Traceback (most recent call last): secret internals", True, 500, "internal_error"),
        (500, b'{"error":{"message":"EngineCore encountered an issue."}}', False, 503, "model_not_ready"),
    ],
)
async def test_an_engine_error_is_answered_in_the_apis_words_and_charged_nothing(
    status: int, payload: bytes, alive: bool, sent: int, code: str | None
) -> None:
    client = Sent()
    relay, record = relay_to(client, alive=alive)
    await answer(relay, status, payload)
    error = json.loads(client.body)["error"]
    assert (client.status, error["code"]) == (sent, code) and record.status == sent
    assert b"secret" not in client.body and b"a, b, c" not in client.body, "only the model asked for is named"
    assert relay.refused


async def test_a_json_answer_passes_whole_and_its_usage_is_read() -> None:
    client, meter = Sent(), Meter()
    relay, _ = relay_to(client, meter)
    payload = json.dumps({"choices": [], "usage": USAGE}).encode()
    await relay.send(start(length=len(payload)))
    assert client.messages == [], "the start waits for the body"
    await relay.send(body(payload[:10], more=True))
    await relay.send(body(payload[10:]))
    assert client.status == 200 and client.body == payload and client.headers["x-request-id"] == "rid"
    assert meter.tokens == 15 and not relay.refused


async def test_a_transform_rewrites_the_answer_and_its_length_or_answers_its_error() -> None:
    client = Sent()
    relay, _ = relay_to(client, transform=lambda answer: {"kept": answer["data"][:1]})
    await answer(relay, 200, json.dumps({"data": [1, 2, 3]}).encode())
    assert json.loads(client.body) == {"kept": [1]} and client.headers["content-length"] == str(len(client.body))

    def missing(answer: Any) -> Any:
        raise errors.model_not_found("other")

    refused = Sent()
    relay, record = relay_to(refused, transform=missing)
    await answer(relay, 200, b'{"data": []}')
    assert refused.status == 404 and record.outcome == "model_not_found" and not relay.refused


# --- streamed: chunk by chunk, past the meter --------------------------------------------------


async def test_a_stream_passes_chunk_by_chunk_and_a_usage_event_nobody_asked_for_is_kept() -> None:
    client, meter = Sent(), ChatMeter(hide_usage_event=True)
    relay, _ = relay_to(client, meter)
    await relay.send(start(content_type=b"text/event-stream"))
    assert client.status == 200, "a stream's start goes out at once"
    for i in range(3):
        await relay.send(body(data({"choices": [{"delta": {"content": f"t{i}"}}]}), more=True))
        assert client.body.count(b"data: ") == i + 1, "each chunk as it comes"
    await relay.send(body(data({"choices": [], "usage": USAGE}), more=True))
    await relay.send(body(b"data: [DONE]\n\n", more=True))
    await relay.send(body(b""))
    assert b'"usage"' not in client.body and client.body.endswith(b"data: [DONE]\n\n")
    assert meter.tokens == 15 and meter.token_events == 4 and client.messages[-1]["more_body"] is False


async def test_the_engines_error_event_mid_stream_becomes_ours_and_ends_the_stream() -> None:
    client = Sent()
    relay, record = relay_to(client)
    await relay.send(start(content_type=b"text/event-stream"))
    await relay.send(body(data({"choices": [{"delta": {"content": "t0"}}]}), more=True))
    await relay.send(body(data({"error": {"message": "EngineCore encountered an issue. See stack trace"}}), more=True))
    await relay.send(body(b"data: [DONE]\n\n", more=True))
    await relay.send(body(b""))
    frames = client.body.decode().strip().split("\n\n")
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "engine_failed"
    assert frames[-1] == "data: [DONE]" and client.body.count(b"[DONE]") == 1 and "stack trace" not in frames[-2]
    assert record.outcome == "engine_failed" and not relay.refused


# --- the end held until the tokens are settled; late output dropped ----------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_the_last_message_waits_for_release(stream: bool) -> None:
    client = Sent()
    relay, _ = relay_to(client, ChatMeter(hide_usage_event=False), hold_end=True)
    if stream:
        await relay.send(start(content_type=b"text/event-stream"))
        await relay.send(body(data({"choices": [], "usage": USAGE}), more=True))
        await relay.send(body(b"data: [DONE]\n\n", more=True))
        await relay.send(body(b""))
        assert [m.get("more_body") for m in client.messages] == [None, True, True], "all but the end"
    else:
        await answer(relay, 200, b"{}")
        assert client.messages == [], "a JSON answer is its own end: all of it waits"
    await relay.release()
    assert client.status == 200 and client.body.endswith(b"data: [DONE]\n\n" if stream else b"{}")
    assert client.messages[-1]["type"] == "http.response.body" and not client.messages[-1].get("more_body")


async def test_a_failure_before_release_ends_the_answer_instead() -> None:
    client = Sent()
    record = Record("rid", "POST", "/v1/chat/completions", 0.0)
    reply = Reply(client, record)
    relay = Relay(reply, ChatMeter(hide_usage_event=False), hold_end=True)
    await relay.send(start(content_type=b"text/event-stream"))
    await relay.send(body(data({"choices": [{"delta": {"content": "t0"}}]}), more=True))
    await relay.send(body(data({"choices": [], "usage": USAGE}), more=True))
    await relay.send(body(b""))
    await reply.fail(errors.internal_error())
    await relay.release()
    assert json.loads(client.body.split(b"\n\n")[2].removeprefix(b"data: "))["error"]["code"] == "internal_error"
    assert client.messages[-1]["more_body"] is False and record.outcome == "internal_error"
    assert len(client.messages) == 4, "the held end is not sent after the error's"


async def test_a_stream_that_ends_without_its_usage_was_cut_and_ends_with_the_engine_failing() -> None:
    client = Sent()
    relay, record = relay_to(client, ChatMeter(hide_usage_event=False))
    await relay.send(start(content_type=b"text/event-stream"))
    await relay.send(body(data({"choices": [{"delta": {"content": "t0"}}]}), more=True))
    await relay.send(body(b""))  # closed cleanly, by a router whose engine died
    frames = client.body.decode().strip().split("\n\n")
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "engine_failed"
    assert frames[-1] == "data: [DONE]" and record.outcome == "engine_failed"


async def test_once_detached_the_engines_late_output_is_dropped() -> None:
    client = Sent()
    relay, _ = relay_to(client)
    await relay.send(start(content_type=b"text/event-stream"))
    relay.detach()
    await relay.send(body(data({"late": True}), more=True))
    await relay.send(body(b""))
    assert len(client.messages) == 1
