"""BentoML's traffic metrics (``bentoml_service_request_*``) labelled by route, not by path.

BentoML's outermost middleware labels each request with its raw path, so every distinct path
(a response id, a mistyped URL, a scanner's probes, a fuzzer) adds series: ``/metrics`` and
the worker's memory grow without bound, anyone can make them grow without a key, and
whatever a client writes in a path is shown there (after the e2e contract tests, a test
server's ``/metrics`` had grown to 1 MB, 235 endpoints). Here BentoML labels a request with its
route's template (``/v1/responses/{id:path}``; ``other`` for a path no route has, as the
gateway's own metrics do), and everything inside it sees the real path again.
"""

from __future__ import annotations

from typing import Any

from bentoml._internal.server.http import instruments
from starlette.types import ASGIApp, Receive, Scope, Send

from . import routes

REAL_PATH = "hermes.real_path"


def endpoint_label(path: str) -> str:
    if path in routes.BENTOML_PATHS:
        return path
    found = routes.find(path)
    return routes.label(found[0] if found else None)


class _RealPath:
    """Inside BentoML's metrics middleware: the request's own path back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if REAL_PATH in scope:
            scope = {**scope, "path": scope[REAL_PATH]}
        await self.app(scope, receive, send)


class RouteLabelledTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    def __init__(self, app: ASGIApp, **options: Any) -> None:
        super().__init__(_RealPath(app), **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            label = endpoint_label(scope["path"])
            if label != scope["path"]:
                scope = {**scope, "path": label, REAL_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


# Registered in patches.py as "bentoml-route-labels": the versions it was written for, and why.
def label_traffic_metrics_by_route() -> None:
    """BentoML imports its middleware from this module when it builds the app: call before."""
    setattr(instruments, "RunnerTrafficMetricsMiddleware", RouteLabelledTrafficMetrics)  # noqa: B010 (BentoML's)
