"""The routes a shared service exposes, as a table; everything else is a 404.

vLLM's admin routes (sleep, cache reset, LoRA loading, SageMaker's /invocations...) are not
in it, so they stay unreachable. A route with an ``api`` is metered generation: it goes
through limits and admission. The others are forwarded to the engine after the key check
(``engine_path`` where vLLM's path differs, ``answer`` to rewrite its JSON), answered by the
gateway itself (``local``), or refused (``refusal``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import compile_path

from . import errors
from .apis import CHAT, COMPLETIONS, MESSAGES, RESPONSES, Api
from .auth import Principal
from .errors import ANTHROPIC, OPENAI, Dialect, OpenAIError
from .errors import RESPONSES as RESPONSES_DIALECT

GET, POST = frozenset({"GET"}), frozenset({"POST"})

Answer = Callable[[Any, dict[str, str], Principal], Any]
"""Rewrites the engine's JSON answer, given the route's path parameters and the caller."""


def model_list(answer: Any, params: dict[str, str], principal: Principal) -> Any:
    """The models the key may use. vLLM names the weights' directory as ``root``: a server
    path, replaced by the model's name."""
    if not isinstance(answer, dict):
        return answer
    answer["data"] = [m for m in answer.get("data", []) if principal.may_use(str(m.get("id")))]
    for model in answer["data"]:
        model["root"] = model.get("id")
    return answer


def one_model(answer: Any, params: dict[str, str], principal: Principal) -> Any:
    for model in model_list(answer, params, principal).get("data", []):
        if model.get("id") == params["model"]:
            return model
    raise errors.model_not_found(params["model"])


@dataclass(frozen=True)
class Route:
    path: str
    """A Starlette path pattern; also the route's label in metrics and the log."""
    methods: frozenset[str]
    api: Api | None = None
    dialect: Dialect = OPENAI
    engine_path: str | None = None
    answer: Answer | None = None
    refusal: Callable[[], OpenAIError] | None = None
    local: str | None = None
    """Answered by the gateway itself, by this handler (the engine is not asked)."""
    open: bool = False
    """Answered without a key."""
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_path(self.path)[0])

    def match(self, path: str) -> dict[str, str] | None:
        found = self._regex.match(path)
        return found.groupdict() if found else None


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", POST, api=CHAT),
    Route("/v1/completions", POST, api=COMPLETIONS),
    Route("/v1/responses", POST, api=RESPONSES, dialect=RESPONSES_DIALECT),
    Route("/v1/messages", POST, api=MESSAGES, dialect=ANTHROPIC),
    Route("/v1/messages/count_tokens", POST, dialect=ANTHROPIC),
    Route("/v1/models", GET, answer=model_list),
    Route("/v1/models/{model:path}", GET, engine_path="/v1/models", answer=one_model),
    Route("/v1/responses/{id:path}", frozenset({"GET", "DELETE", "POST"}), refusal=errors.response_not_stored),
    Route("/tokenize", POST),
    Route("/detokenize", POST),
    Route("/version", GET),
    Route("/v1/usage", GET, local="usage"),
    Route("/v1/organization/usage/completions", GET, local="organization_usage"),
    Route("/health", GET, local="health", open=True),
    Route("/openapi.json", GET, local="openapi", open=True),
    Route("/", GET, local="console", open=True),
    Route("/console/{file}", GET, local="console", open=True),
)


# BentoML's own routes: probes and Prometheus. Every other path is the gateway's.
BENTOML_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


def label(route: Route | None) -> str:
    """A request's name in metrics and logs: its route's pattern, or "other" (a bounded set,
    whatever paths clients make up)."""
    return route.path if route is not None else "other"


def find(path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        params = route.match(path)
        if params is not None:
            return route, params
    return None
