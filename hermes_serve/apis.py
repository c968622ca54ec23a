"""The generation APIs the gateway meters, as data: one adapter per API.

An adapter says what a request must hold beyond what vLLM checks, how many tokens it may
use (reserved before it runs), how many sequences it asks for (its weight in admission), and
where the engine reports what it really used: in a JSON answer, and in a stream, read by a
``Meter`` one event at a time. The gateway knows none of the APIs' field names. Adding an API is one adapter and one line in ``routes.ROUTES``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from . import errors

BYTES_PER_TOKEN = 4  # a deliberate over-estimate of tokens for English-like text


@dataclass(frozen=True)
class Usage:
    """Tokens one request used: its prompt (``cached`` of them found in the prefix cache) and
    its output."""

    input: int = 0
    cached: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def openai_usage(usage: Any, prompt: str = "prompt_tokens", output: str = "completion_tokens") -> Usage | None:
    """OpenAI's usage object (chat, completions; the Responses API names its fields apart)."""
    if not isinstance(usage, dict):
        return None
    got_input, got_output = _int(usage.get(prompt)), _int(usage.get(output))
    if got_input is None or got_output is None:
        total = _int(usage.get("total_tokens"))
        return None if total is None else Usage(input=total)
    details = usage.get(f"{prompt}_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(got_input, cached or 0, got_output)


class Meter:
    """What the engine reports one request used, read from its answer as it passes.

    ``feed`` sees each stream chunk once (one SSE event: vLLM sends one per body message) and
    says whether to pass it on; a few substring tests per chunk, no parsing but of the event
    that carries usage.
    """

    token_event: ClassVar[bytes] = b"data: "
    """What starts an event that carries (about) one generated token."""
    error_event: ClassVar[bytes] = b'data: {"error"'
    """What starts the engine's own error event in a stream (it failed mid-answer)."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.token_events = 0

    @property
    def tokens(self) -> int | None:
        """All the tokens the engine reported (None until it has)."""
        return None if self.usage is None else self.usage.total

    def feed(self, chunk: bytes) -> bool:
        self.token_events += chunk.count(self.token_event)
        return True

    def read_json(self, payload: bytes) -> None:
        try:
            answer = json.loads(payload)
        except ValueError:
            return
        if isinstance(answer, dict):
            self.usage = self.parse(answer.get("usage"))

    @staticmethod
    def parse(usage: Any) -> Usage | None:
        return openai_usage(usage)


class ChatMeter(Meter):
    """vLLM's last chunk before ``[DONE]`` carries usage when asked: no choices, a usage object."""

    def __init__(self, hide_usage_event: bool) -> None:
        super().__init__()
        self._hide = hide_usage_event

    def feed(self, chunk: bytes) -> bool:
        if b'"usage":{' in chunk and b'"choices":[]' in chunk and chunk.startswith(b"data: "):
            self.read_json(chunk[len(b"data: ") :].strip())
            if self.tokens is not None:
                return not self._hide
        return super().feed(chunk)


class ResponsesMeter(Meter):
    """Responses API streams report usage in their last event (``response.completed``, or
    ``.incomplete`` / ``.failed``), inside the response object; there is no [DONE]."""

    token_event = b"delta\ndata: "  # event: response.output_text.delta (and other deltas)
    error_event = b"event: error"
    _last = (b"event: response.completed", b"event: response.incomplete", b"event: response.failed")

    def feed(self, chunk: bytes) -> bool:
        if chunk.startswith(self._last):
            data = _event_data(chunk)
            response = data.get("response") if isinstance(data, dict) else None
            if isinstance(response, dict):
                self.usage = self.parse(response.get("usage"))
        return super().feed(chunk)

    @staticmethod
    def parse(usage: Any) -> Usage | None:
        return openai_usage(usage, "input_tokens", "output_tokens")


class MessagesMeter(Meter):
    """Anthropic streams: input tokens in ``message_start``, output in ``message_delta``."""

    token_event = b"delta\ndata: "  # event: content_block_delta
    error_event = b"event: error"
    _prompt = Usage()

    def feed(self, chunk: bytes) -> bool:
        if chunk.startswith(b"event: message_start"):
            message = _event_data(chunk).get("message")
            self._prompt = _anthropic_prompt(message.get("usage") if isinstance(message, dict) else None) or Usage()
        elif chunk.startswith(b"event: message_delta"):
            usage = _event_data(chunk).get("usage")
            output = _int(usage.get("output_tokens")) if isinstance(usage, dict) else None
            if output is not None:
                self.usage = Usage(self._prompt.input, self._prompt.cached, output)
        return super().feed(chunk)

    @staticmethod
    def parse(usage: Any) -> Usage | None:
        prompt = _anthropic_prompt(usage)
        output = _int(usage.get("output_tokens")) if isinstance(usage, dict) else None
        return None if prompt is None or output is None else Usage(prompt.input, prompt.cached, output)


def _anthropic_prompt(usage: Any) -> Usage | None:
    """Anthropic counts cached prompt tokens apart from ``input_tokens``: all are prompt."""
    if not isinstance(usage, dict) or _int(usage.get("input_tokens")) is None:
        return None
    fields = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    prompt = sum(value for name in fields if (value := _int(usage.get(name))) is not None)
    return Usage(input=prompt, cached=_int(usage.get("cache_read_input_tokens")) or 0)


def _event_data(chunk: bytes) -> Any:
    """The JSON of an ``event: NAME\ndata: JSON`` frame ({} if it has none)."""
    _, found, data = chunk.partition(b"\ndata: ")
    try:
        return json.loads(data) if found else {}
    except ValueError:
        return {}


class Api:
    """A generation API: its request's prompt and output fields, and its usage."""

    name: ClassVar[str]
    prompt_fields: ClassVar[tuple[str, ...]]
    output_fields: ClassVar[tuple[str, ...]]
    """Where the request caps its output, first found wins."""
    choices_field: ClassVar[str | None] = None
    sequence_fields: ClassVar[tuple[str, ...]] = ()
    """Where the request asks for several sequences at once (each one the engine's work)."""

    def validate(self, body: Any) -> None:
        """The checks vLLM does not make; raise a 400 before admission."""
        if not isinstance(body, dict):
            raise errors.invalid_body()

    def sequences(self, body: dict[str, Any], max_n: int) -> int:
        """How many sequences the request asks the engine for (at least 1), each field at most
        ``max_n``. Only a JSON integer passes: vLLM's lax parsing would take "256" or 256.0
        as 256, past the cap."""
        count = 1
        for field in self.sequence_fields:
            value = body.get(field)
            if value is None:
                continue
            if type(value) is not int:
                raise errors.invalid_type(field, "an integer", value)
            if value > max_n:
                raise errors.integer_above_max(field, max_n, value)
            count = max(count, value)
        return count

    def prompt_tokens(self, body: dict[str, Any], max_model_len: int) -> int:
        prompt = [body[field] for field in self.prompt_fields if field in body]
        size = len(json.dumps(prompt[0] if len(prompt) == 1 else prompt, ensure_ascii=False).encode())
        return min(size // BYTES_PER_TOKEN + 1, max_model_len)

    def estimate(self, body: dict[str, Any], max_model_len: int) -> int:
        """Upper-bound guess of prompt + output tokens, reserved against the key's budgets."""
        prompt = self.prompt_tokens(body, max_model_len)
        output = next((body[f] for f in self.output_fields if body.get(f)), None)
        if not isinstance(output, int) or isinstance(output, bool) or output <= 0:
            output = max_model_len - prompt
        choices = body.get(self.choices_field) if self.choices_field else None
        if not isinstance(choices, int) or isinstance(choices, bool) or choices <= 0:
            choices = 1
        return prompt + max(output, 1) * choices

    def meter(self, body: dict[str, Any]) -> Meter:
        """The meter for this request's answer; may change ``body`` so the engine reports usage."""
        return Meter()

    def end_user(self, body: dict[str, Any]) -> str | None:
        """The app's own id for the person behind the request, where it names one (OpenAI's
        ``safety_identifier``, or the older ``user``)."""
        for field in ("safety_identifier", "user"):
            value = body.get(field)
            if isinstance(value, str) and value:
                return value
        return None


class ChatCompletions(Api):
    name = "chat"
    prompt_fields: ClassVar[tuple[str, ...]] = ("messages", "tools")
    output_fields = ("max_completion_tokens", "max_tokens")
    choices_field = "n"
    # best_of: OpenAI's legacy completions field (that many generated, n returned); vLLM 0.32
    # takes it only in batch chat, but a field the cap skips is one a later vLLM may honour.
    sequence_fields = ("n", "best_of")
    roles = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

    def validate(self, body: Any) -> None:
        super().validate(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.OpenAIError(400, "'messages' must be a non-empty array.", param="messages")
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if not isinstance(role, str) or role not in self.roles:
                raise errors.OpenAIError(
                    400,
                    f"Invalid role {role!r} in messages[{i}]; expected one of {sorted(self.roles)}.",
                    param=f"messages[{i}].role",
                )

    def meter(self, body: dict[str, Any]) -> Meter:
        if not body.get("stream"):
            return Meter()
        # Ask vLLM for its usage chunk so tokens can be settled; hide it if the client did not.
        options = body.get("stream_options")
        client_asked = isinstance(options, dict) and bool(options.get("include_usage"))
        if not client_asked:
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return ChatMeter(hide_usage_event=not client_asked)


class Completions(ChatCompletions):
    name = "completions"
    prompt_fields = ("prompt",)

    def validate(self, body: Any) -> None:
        Api.validate(self, body)


class Responses(Api):
    """OpenAI's Responses API. vLLM keeps stored responses in one in-memory map shared by
    every caller, so one key could read another's: nothing is stored, nothing retrieved."""

    name = "responses"
    prompt_fields = ("instructions", "input", "tools")
    output_fields = ("max_output_tokens",)

    def validate(self, body: Any) -> None:
        super().validate(body)
        if body.get("previous_response_id") is not None:
            raise errors.previous_response_unsupported()

    def meter(self, body: dict[str, Any]) -> Meter:
        body["store"] = False
        return ResponsesMeter()  # its usage fields, in a stream's last event or the whole answer


class Messages(Api):
    """Anthropic's Messages API, as vLLM serves it."""

    name = "messages"
    prompt_fields = ("system", "messages", "tools")
    output_fields = ("max_tokens",)

    def meter(self, body: dict[str, Any]) -> Meter:
        return MessagesMeter()

    def end_user(self, body: dict[str, Any]) -> str | None:
        metadata = body.get("metadata")
        value = metadata.get("user_id") if isinstance(metadata, dict) else None
        return value if isinstance(value, str) and value else None


CHAT = ChatCompletions()
COMPLETIONS = Completions()
RESPONSES = Responses()
MESSAGES = Messages()
