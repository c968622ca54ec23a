"""The routes a shared service exposes, as a table; everything else is a 404.

vLLM's admin routes (sleep, cache reset, LoRA loading, SageMaker's /invocations...) are not
in it, so they stay unreachable. A route with an ``api`` is metered generation: it goes
through limits and admission. The rest are forwarded to the engine after the key check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from starlette.routing import compile_path

from .apis import CHAT, COMPLETIONS, Api

GET, POST = frozenset({"GET"}), frozenset({"POST"})


@dataclass(frozen=True)
class Route:
    path: str
    """A Starlette path pattern; also the route's label in metrics."""
    methods: frozenset[str]
    api: Api | None = None
    open: bool = False
    """Answered without a key (health)."""
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_path(self.path)[0])

    def match(self, path: str) -> dict[str, str] | None:
        found = self._regex.match(path)
        return found.groupdict() if found else None


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", POST, api=CHAT),
    Route("/v1/completions", POST, api=COMPLETIONS),
    Route("/v1/models", GET),
    Route("/tokenize", POST),
    Route("/detokenize", POST),
    Route("/version", GET),
    Route("/health", GET, open=True),
)


def find(path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        params = route.match(path)
        if params is not None:
            return route, params
    return None
