"""A scriptable engine in vLLM's framing, for proving the gateway without a model.

``model.source: fake://`` makes ``bentoml serve`` start this instead of vLLM: it is ready in
a moment, needs no weights and no accelerator, and answers every API the gateway exposes in
vLLM 0.32's shapes (chat and completions chunks ending in ``[DONE]``, usage when asked,
Responses ``event:`` frames with usage in ``response.completed``, Anthropic usage split over
``message_start`` and ``message_delta``) and with vLLM's error bodies. **Its answers are not a
model's**: it says so loudly when it starts.

A request picks its behaviour with directives anywhere in its prompt:

| directive | behaviour |
|---|---|
| (none) | a normal answer of ``DEFAULT_TOKENS`` tokens (or ``max_tokens``, if fewer) |
| ``[[tokens=N]]`` | N tokens (still capped by the request's own output cap) |
| ``[[ms-per-token=N]]`` | N ms between tokens |
| ``[[cached=N]]`` | N of the prompt's tokens reported as found in the prefix cache (at most all of them) |

Without ``[[cached=N]]``, a prompt this engine has already seen with the same ``cache_salt`` is
reported as cached, all but its last token: a prefix cache of its own, as each vLLM engine has
(per process, per salt), so a router's affinity shows in the usage the client gets.
| ``[[hold]]`` | one token, then held open until the client leaves or the server stops (a gate, not a sleep) |
| ``[[gate=NAME]]`` | one token, then held until the file NAME exists in the ``gates`` folder, then the rest |
| ``[[fail-before]]`` | vLLM's 500 before any output |
| ``[[fail-during]]`` | one token, then vLLM's error event (a 500 for a JSON answer) |
| ``[[die]]`` | the engine dies: every answer in flight fails as vLLM's does, readiness goes, the engine restarts |

Source options: ``fake://?gates=DIR`` is the folder of ``[[gate=NAME]]`` files;
``fake://?start_gate=PATH`` makes every (re)start wait until PATH exists, so a test decides
when a dead engine comes back; ``fake://?start_s=S`` makes starting take S s.

Like vLLM, a request's handler runs in its own task and is cancelled exactly when the ASGI
``receive`` reports a disconnect, and ``vllm:*`` series (requests running and waiting,
prompt and generation tokens) are exported under vLLM's names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest
from starlette.types import Message, Receive, Scope, Send

from .request import read_body

logger = logging.getLogger(__name__)

SCHEME = "fake://"
DEFAULT_TOKENS = 8
CACHED_PROMPTS = 10_000  # the prefix cache's size, in prompts (the oldest go first)
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
DIRECTIVE = re.compile(r"\[\[([a-z-]+)(?:=([\w.-]+))?\]\]")
GATE_POLL_S = 0.05
ENGINE_DIED = "EngineCore encountered an issue. See stack trace (above) for the root cause."
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def is_fake(source: str) -> bool:
    return source.startswith(SCHEME)


@dataclass(frozen=True)
class Options:
    gates: Path | None = None
    start_gate: Path | None = None
    start_s: float = 0.0

    @classmethod
    def parse(cls, source: str) -> Options:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(source).query)
        gates, gate = query.get("gates", [""])[0], query.get("start_gate", [""])[0]
        start_s = float(query.get("start_s", ["0"])[0])
        return cls(Path(gates) if gates else None, Path(gate) if gate else None, start_s)


@dataclass(frozen=True)
class Script:
    """What one request asked the engine to do, from the directives in its prompt."""

    tokens: int = DEFAULT_TOKENS
    ms_per_token: int = 0
    cached: int = 0
    hold: bool = False
    gate: str | None = None
    fail_before: bool = False
    fail_during: bool = False
    die: bool = False

    @classmethod
    def read(cls, text: str, cap: int | None) -> Script:
        found = dict(DIRECTIVE.findall(text))
        tokens = _number(found.get("tokens"), DEFAULT_TOKENS)
        return cls(
            tokens=max(1, min(tokens, cap) if cap else tokens),
            ms_per_token=_number(found.get("ms-per-token"), 0),
            cached=_number(found.get("cached"), 0),
            hold="hold" in found,
            gate=found.get("gate") or None,
            fail_before="fail-before" in found,
            fail_during="fail-during" in found,
            die="die" in found,
        )


class _Metrics:
    """vLLM's series names, so dashboards and tests read the fake as they read vLLM."""

    def __init__(self) -> None:
        self.running = Gauge("vllm:num_requests_running", "Requests running.", multiprocess_mode="livesum")
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", multiprocess_mode="livesum")
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.requests = Counter("vllm:request_success", "Requests answered.")
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.")


_metrics: _Metrics | None = None


def _shared_metrics() -> _Metrics:
    # A Prometheus series is registered once per process, however often the engine restarts.
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


class FakeClient:
    """Stands where vLLM's engine client stands: ``errored`` once the engine has died."""

    def __init__(self) -> None:
        self.errored = False
        self.died = asyncio.Event()
        self.closing = asyncio.Event()

    def die(self) -> None:
        logger.critical("fake engine: [[die]] asked for; the engine is dead")
        self.errored = True
        self.died.set()

    def shutdown(self) -> None:
        self.closing.set()


async def start(source: str, served: Callable[[], frozenset[str]], max_model_len: int) -> tuple[FakeClient, FakeApp]:
    """Start (or restart) the fake engine; waits for its start gate, if it has one."""
    options = Options.parse(source)
    while options.start_gate is not None and not options.start_gate.exists():
        await asyncio.sleep(0.1)
    if options.start_s:
        await asyncio.sleep(options.start_s)
    logger.warning(
        "\n  *** model.source is %s: a SCRIPTED FAKE ENGINE answers every request. ***\n"
        "  *** Its answers are not a model's; use it to test the gateway only.     ***",
        source,
    )
    client = FakeClient()
    return client, FakeApp(client, served, max_model_len, options.gates)


class FakeApp:
    """The ASGI app vLLM's OpenAI server would be, scripted."""

    def __init__(
        self, client: FakeClient, served: Callable[[], frozenset[str]], max_model_len: int, gates: Path | None = None
    ) -> None:
        self._client = client
        self._gates = gates
        self._served = served
        self._max_model_len = max_model_len
        self._metrics = _shared_metrics()
        self._next_id = 0
        self._cached: OrderedDict[tuple[str, str], None] = OrderedDict()

    def openapi(self) -> dict[str, Any]:
        return OPENAPI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            if path == "/v1/models":
                return await _json(send, 200, self._models())
            if path == "/version":
                return await _json(send, 200, {"version": "fake"})
            if path == "/health":
                return await _json(send, 200 if not self._client.errored else 503, None)
            if path == "/metrics":  # served alone; behind the gateway, BentoML's /metrics has these
                payload = generate_latest(REGISTRY)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                    }
                )
                return await send({"type": "http.response.body", "body": payload})
            return await _json(send, 404, {"detail": "Not Found"})
        body = await _read_body(receive)
        if not isinstance(body, dict):
            return await _error(send, 400, "The request body must be a JSON object.")
        if path == "/tokenize":
            return await _json(send, 200, self._tokenize(body))
        if path == "/detokenize":
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                return await _error(send, 400, "tokens: a list of integers is required")
            return await _json(send, 200, {"prompt": " ".join(WORDS[t % len(WORDS)] for t in tokens)})
        if path not in GENERATION and path != "/v1/messages/count_tokens":
            return await _json(send, 404, {"detail": "Not Found"})
        problem = self._invalid(path, body)
        if problem is not None:
            status, message = problem
            return await _error(send, status, message, anthropic=path.startswith("/v1/messages"))
        prompt = _prompt_text(path, body)
        if path == "/v1/messages/count_tokens":
            return await _json(send, 200, {"input_tokens": _count(prompt)})
        if self._client.errored:
            return await _error(send, 500, ENGINE_DIED, kind="InternalServerError")
        self._next_id += 1
        request_id = _header(scope, b"x-request-id") or str(self._next_id)
        script = self._cache(Script.read(prompt, _output_cap(path, body)), body, prompt)
        model = str(body.get("model") or min(self._served()))
        answer = Answer(path, body, request_id, prompt, script, model)
        await self._serve(answer, receive, send)

    def _cache(self, script: Script, body: dict[str, Any], prompt: str) -> Script:
        """This engine's prefix cache: a prompt seen before under the same salt is cached."""
        seen = (str(body.get("cache_salt") or ""), prompt)
        hit = seen in self._cached
        self._cached[seen] = None
        self._cached.move_to_end(seen)
        if len(self._cached) > CACHED_PROMPTS:
            self._cached.popitem(last=False)
        if script.cached or not hit:
            return script
        return replace(script, cached=max(0, _count(prompt) - 1))

    async def _serve(self, answer: Answer, receive: Receive, send: Send) -> None:
        # As in vLLM: the handler runs in its own task, cancelled when the client disconnects.
        handler = asyncio.create_task(self._generate(answer, send))
        listener = asyncio.create_task(_disconnected(receive))
        done, pending = await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if handler in done:
            handler.result()

    async def _generate(self, answer: Answer, send: Send) -> None:
        script = answer.script
        if script.fail_before:
            return await _error(send, 500, "The engine failed (scripted).", kind="InternalServerError")
        if script.die:
            self._client.die()
            return await _error(send, 500, ENGINE_DIED, kind="InternalServerError")
        self._metrics.running.inc()
        self._metrics.prompt_tokens.inc(answer.prompt_tokens)
        self._metrics.requests.inc()
        try:
            if answer.stream:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
                    }
                )
                async for frame in self._frames(answer):
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                async for _ in self._tokens(answer):
                    pass
                if answer.failed:
                    return await _error(send, 500, answer.failed, kind="InternalServerError")
                await _json(send, 200, answer.whole())
        finally:
            self._metrics.running.dec()

    async def _frames(self, answer: Answer) -> AsyncIterator[bytes]:
        for frame in answer.opening():
            yield frame
        async for index in self._tokens(answer):
            yield answer.delta(index)
        if answer.failed:
            yield answer.error_event(answer.failed)
            return
        for frame in answer.closing():
            yield frame

    async def _tokens(self, answer: Answer) -> AsyncIterator[int]:
        """Each token as it is generated; stops early when the script fails or the engine dies."""
        script = answer.script
        for index in range(script.tokens):
            if index and script.ms_per_token:
                await self._pause(script.ms_per_token / 1000)
            if self._client.errored:
                answer.failed = ENGINE_DIED
                return
            answer.generated += 1
            self._metrics.generation_tokens.inc(answer.choices)
            yield index
            if script.fail_during:
                answer.failed = "The engine failed mid-answer (scripted)."
                return
            if script.gate is not None and index == 0:
                await self._open(script.gate)
                if self._client.errored:
                    answer.failed = ENGINE_DIED
                    return
            if script.hold:
                await self._pause(None)
                if self._client.errored:
                    answer.failed = ENGINE_DIED
                else:  # the server stops: vLLM's default shutdown aborts what is running
                    answer.finish_reason = "abort"
                return

    async def _pause(self, seconds: float | None) -> None:
        """Wait ``seconds`` (None: for ever), cut short when the engine dies or stops."""
        waits = [asyncio.ensure_future(self._client.died.wait()), asyncio.ensure_future(self._client.closing.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _open(self, gate: str) -> None:
        """Wait until the gate's file exists (or the engine dies or stops)."""
        path = self._gates / Path(gate).name if self._gates is not None else None  # none: held for good
        while not (path is not None and path.exists()) and not (
            self._client.died.is_set() or self._client.closing.is_set()
        ):
            await self._pause(GATE_POLL_S)

    def _models(self) -> dict[str, Any]:
        names = sorted(self._served())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "vllm",
                    "root": f"/fake/{name}",  # vLLM shows the weights' path here: the gateway hides it
                    "parent": None,
                    "max_model_len": self._max_model_len,
                }
                for name in names
            ],
        }

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        text = _text(body.get("prompt", body.get("messages", "")))
        count = _count(text)
        return {"count": count, "max_model_len": self._max_model_len, "tokens": list(range(count)), "token_strs": None}

    def _invalid(self, path: str, body: dict[str, Any]) -> tuple[int, str] | None:
        """vLLM's checks that a gateway must relay faithfully: the model, types, the context."""
        model = body.get("model")
        if model is not None and model not in self._served():
            return 404, f"The model `{model}` does not exist."
        field = {"/v1/completions": "prompt", "/v1/responses": "input"}.get(path, "messages")
        if field not in body:
            return 400, f"Field required: {field}"
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                return 400, f"{name}: Input should be a valid integer greater than or equal to 1"
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
            return 400, "temperature must be a non-negative number"
        if "stream" in body and not isinstance(body["stream"], bool):
            return 400, "stream: Input should be a valid boolean"
        cap = _output_cap(path, body) or 0
        prompt = _count(_prompt_text(path, body))
        if prompt + cap > self._max_model_len:
            return 400, (
                f"This model's maximum context length is {self._max_model_len} tokens. However, you requested "
                f"{prompt + cap} tokens ({prompt} in the messages, {cap} in the completion)."
            )
        return None


class Answer:
    """One request's answer in its API's framing."""

    def __init__(
        self, path: str, body: dict[str, Any], request_id: str, prompt: str, script: Script, model: str
    ) -> None:
        self.path = path
        self.body = body
        self.script = script
        self.model = model
        self.stream = body.get("stream") is True
        n = body.get("n")
        self.choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        self.prompt_tokens = _count(prompt)
        self.cached_tokens = min(script.cached, self.prompt_tokens)
        self.generated = 0
        self.failed: str | None = None
        self.finish_reason = "length"
        self.created = int(time.time())
        prefix = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl", "/v1/responses": "resp"}
        self.id = f"{prefix.get(path, 'msg')}-{request_id}"
        self._sequence = 0

    @property
    def text(self) -> str:
        return "".join(f" {WORDS[i % len(WORDS)]}" for i in range(self.generated))

    def usage(self) -> dict[str, Any]:
        output = self.generated * self.choices
        if self.path == "/v1/messages":
            return self.anthropic_usage(output)
        if self.path == "/v1/responses":
            return {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + output,
            }
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + output,
            "completion_tokens": output,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def anthropic_usage(self, output: int) -> dict[str, Any]:
        """vLLM's Anthropic usage: cached prompt tokens apart from ``input_tokens``."""
        usage = {"input_tokens": self.prompt_tokens - self.cached_tokens, "output_tokens": output}
        return usage | ({"cache_read_input_tokens": self.cached_tokens} if self.cached_tokens else {})

    # --- a whole answer ---------------------------------------------------------------------

    def whole(self) -> dict[str, Any]:
        if self.path == "/v1/chat/completions":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self.text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
                for i in range(self.choices)
            ]
            return self._chunk("chat.completion", choices) | {"usage": self.usage()}
        if self.path == "/v1/completions":
            choices = [
                {"index": i, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
                for i in range(self.choices)
            ]
            return self._chunk("text_completion", choices) | {"usage": self.usage()}
        if self.path == "/v1/responses":
            return self._response("completed")
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": self.usage(),
        }

    # --- a stream ---------------------------------------------------------------------------

    def opening(self) -> list[bytes]:
        if self.path == "/v1/chat/completions":
            role = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.choices)
            ]
            return [_data(self._chunk("chat.completion.chunk", role))]
        if self.path == "/v1/responses":
            return [
                self._event("response.created", {"response": self._response("in_progress", usage=False)}),
                self._event("response.in_progress", {"response": self._response("in_progress", usage=False)}),
                self._event("response.output_item.added", {"output_index": 0, "item": self._item("in_progress", "")}),
                self._event(
                    "response.content_part.added",
                    {"output_index": 0, "content_index": 0, "item_id": self._item_id, "part": _part("")},
                ),
            ]
        if self.path == "/v1/messages":
            message = self.whole() | {
                "content": [],
                "stop_reason": None,
                "usage": self.anthropic_usage(0),
            }
            return [
                _named("message_start", {"type": "message_start", "message": message}),
                _named(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                ),
            ]
        return []

    def delta(self, index: int) -> bytes:
        word = f" {WORDS[index % len(WORDS)]}"
        if self.path == "/v1/chat/completions":
            choices = [
                {"index": i, "delta": {"content": word}, "logprobs": None, "finish_reason": None}
                for i in range(self.choices)
            ]
            return _data(self._chunk("chat.completion.chunk", choices))
        if self.path == "/v1/completions":
            texts: list[dict[str, Any]] = [
                {"index": i, "text": word, "logprobs": None, "finish_reason": None} for i in range(self.choices)
            ]
            return _data(self._chunk("text_completion", texts))
        if self.path == "/v1/responses":
            return self._event(
                "response.output_text.delta",
                {"output_index": 0, "content_index": 0, "item_id": self._item_id, "delta": word, "logprobs": []},
            )
        return _named(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
        )

    def closing(self) -> list[bytes]:
        if self.path in ("/v1/chat/completions", "/v1/completions"):
            kind = "chat.completion.chunk" if self.path == "/v1/chat/completions" else "text_completion"
            last: dict[str, Any] = {"delta": {}} if self.path == "/v1/chat/completions" else {"text": ""}
            choices = [
                {"index": i, **last, "logprobs": None, "finish_reason": self.finish_reason} for i in range(self.choices)
            ]
            frames = [_data(self._chunk(kind, choices))]
            options = self.body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                frames.append(_data(self._chunk(kind, []) | {"usage": self.usage()}))
            return [*frames, b"data: [DONE]\n\n"]
        if self.path == "/v1/responses":
            done = "completed" if self.finish_reason != "abort" else "incomplete"
            return [
                self._event(
                    "response.output_text.done",
                    {
                        "output_index": 0,
                        "content_index": 0,
                        "item_id": self._item_id,
                        "text": self.text,
                        "logprobs": [],
                    },
                ),
                self._event(
                    "response.content_part.done",
                    {"output_index": 0, "content_index": 0, "item_id": self._item_id, "part": _part(self.text)},
                ),
                self._event(
                    "response.output_item.done", {"output_index": 0, "item": self._item("completed", self.text)}
                ),
                self._event(f"response.{done}", {"response": self._response(done)}),
            ]
        return [
            _named("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _named(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": self.anthropic_usage(self.generated),
                },
            ),
            _named("message_stop", {"type": "message_stop"}),
        ]

    def error_event(self, message: str) -> bytes:
        """vLLM's own last words when an answer fails mid-stream."""
        error = {"message": message, "type": "InternalServerError", "param": None, "code": 500}
        if self.path == "/v1/responses":
            return self._event("error", {"code": "500", "message": message, "param": None})
        if self.path == "/v1/messages":
            return _named("error", {"type": "error", "error": {"type": "api_error", "message": message}})
        return _data({"error": error}) + b"data: [DONE]\n\n"

    # --- pieces -----------------------------------------------------------------------------

    @property
    def _item_id(self) -> str:
        return f"msg_{self.id}"

    def _chunk(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _item(self, status: str, text: str) -> dict[str, Any]:
        content = [_part(text)] if text or status == "completed" else []
        return {"id": self._item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _response(self, status: str, usage: bool = True) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": status,
            "output": [self._item("completed", self.text)] if status != "in_progress" else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self.usage() if usage else None,
        }

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        frame = _named(name, {"type": name, **data, "sequence_number": self._sequence})
        self._sequence += 1
        return frame


def _number(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.isdigit() else default


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _data(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _named(name: str, data: Any) -> bytes:
    return f"event: {name}\n".encode() + _data(data)


def _count(text: str) -> int:
    """The fake's tokens: about four bytes each, as for English text."""
    return max(1, len(text.encode()) // 4)


def _text(value: Any) -> str:
    """Every string in a prompt field, joined: message contents, parts, instructions."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(item) for item in value)
    if isinstance(value, dict):
        return " ".join(_text(item) for key, item in value.items() if key not in ("role", "type"))
    return ""


def _prompt_text(path: str, body: dict[str, Any]) -> str:
    fields = {
        "/v1/completions": ("prompt",),
        "/v1/responses": ("instructions", "input"),
        "/v1/messages": ("system", "messages"),
        "/v1/messages/count_tokens": ("system", "messages"),
    }.get(path, ("messages",))
    return " ".join(_text(body.get(field)) for field in fields)


def _output_cap(path: str, body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> Any:
    raw = await read_body(receive)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(send: Send, status: int, data: Any) -> None:
    payload = json.dumps(data, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _error(send: Send, status: int, message: str, kind: str = "BadRequestError", anthropic: bool = False) -> None:
    """vLLM's error bodies: OpenAI's envelope with the class name as type and the status as code;
    its Anthropic router keeps Anthropic's envelope."""
    if status == 404:
        kind = "NotFoundError"
    error = {"message": message, "type": kind, "param": "model" if status == 404 else None, "code": status}
    await _json(send, status, {"type": "error", "error": error} if anthropic else {"error": error})


def _operation(summary: str, schema: dict[str, Any], stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"]}}
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "answered", "content": content}},
    }


_TEXT = {"type": "string", "maxLength": 400}
_CAP = {"type": "integer", "minimum": 1, "maximum": 64}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "maxItems": 4,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": _TEXT},
    },
}


def _request(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": {"model": {"type": "string"}, **properties}}


# The request schemas the fake checks, in OpenAPI: the gateway's contract is built on them as
# it is on vLLM's own when a real engine runs.
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "hermes-serve fake engine", "version": "1"},
    "paths": {
        "/v1/chat/completions": {
            "post": _operation(
                "Chat",
                _request(
                    ["messages"],
                    messages=_MESSAGES,
                    max_tokens=_CAP,
                    stream={"type": "boolean"},
                    n={"type": "integer", "minimum": 1, "maximum": 2},
                ),
                True,
            )
        },
        "/v1/completions": {
            "post": _operation(
                "Completions", _request(["prompt"], prompt=_TEXT, max_tokens=_CAP, stream={"type": "boolean"}), True
            )
        },
        "/v1/responses": {
            "post": _operation(
                "Responses", _request(["input"], input=_TEXT, max_output_tokens=_CAP, stream={"type": "boolean"}), True
            )
        },
        "/v1/messages": {
            "post": _operation(
                "Messages",
                _request(["messages", "max_tokens"], messages=_MESSAGES, max_tokens=_CAP, stream={"type": "boolean"}),
                True,
            )
        },
        "/v1/messages/count_tokens": {
            "post": _operation("Count tokens", _request(["messages"], messages=_MESSAGES), False)
        },
        "/tokenize": {"post": _operation("Tokenize", _request(["prompt"], prompt=_TEXT), False)},
        "/detokenize": {
            "post": _operation(
                "Detokenize",
                _request(["tokens"], tokens={"type": "array", "items": {"type": "integer", "minimum": 0}}),
                False,
            )
        },
        "/v1/models": {"get": {"summary": "Models", "responses": {"200": {"description": "the models"}}}},
        "/version": {"get": {"summary": "Version", "responses": {"200": {"description": "the version"}}}},
    },
    "components": {"schemas": {}},
}


class Recorder:
    """Appends every request it passes on (method, path, headers, body) as a JSON line: what
    a test reads to prove what reached the engine, and what never did."""

    def __init__(self, app: Any, path: Path) -> None:
        self._app = app
        self._path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []

        def write() -> None:
            entry = {
                "method": scope["method"],
                "path": scope["path"],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "body": b"".join(chunks).decode("utf-8", "replace"),
            }
            with self._path.open("a") as file:
                file.write(json.dumps(entry) + "\n")

        async def recording() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    write()
            return message

        if scope["method"] == "GET":
            write()
        await self._app(scope, recording, send)


def main(argv: list[str] | None = None) -> int:
    """``python -m hermes_serve.fake_engine --port 8100``: the scripted engine alone, as an
    OpenAI-compatible server of its own (no gateway): a baseline for the gateway's cost, or an
    upstream for a router."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m hermes_serve.fake_engine")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--served-name", default="scripted")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--source", default=SCHEME, help="fake://?gates=DIR...: the options above")
    parser.add_argument("--record", type=Path, help="append every request received to this file (JSON lines)")
    options = parser.parse_args(argv)
    served = frozenset({options.served_name})

    async def serve() -> None:
        _, engine = await start(options.source, lambda: served, options.max_model_len)
        app = Recorder(engine, options.record) if options.record else engine
        config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
        await uvicorn.Server(config).serve()

    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
