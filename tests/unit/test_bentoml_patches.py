"""BentoML's traffic metrics, labelled by route: a path cannot add series or show in /metrics."""

from __future__ import annotations

import functools
import re
from typing import Any

import prometheus_client
from bentoml._internal.server.http import instruments
from prometheus_client import CollectorRegistry

from hermes_serve.bentoml_patches import RouteLabelledTrafficMetrics, endpoint_label, label_traffic_metrics_by_route


def test_a_path_is_labelled_by_its_route_and_one_no_route_has_is_other() -> None:
    assert endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_label("/v1/responses/resp_123") == "/v1/responses/{id:path}"
    assert endpoint_label("/console/x.js") == "/console/{file}"
    assert endpoint_label("/wp-login.php") == "other"
    assert endpoint_label("/readyz") == "/readyz" and endpoint_label("/metrics") == "/metrics"


async def test_bentoml_counts_the_route_and_the_app_inside_sees_the_real_path() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    class Client:  # BentoML's metrics client, on a registry of this test's own
        registry = CollectorRegistry()

        def __getattr__(self, kind: str) -> Any:
            return functools.partial(getattr(prometheus_client, kind), registry=self.registry)

    client = Client()
    middleware = RouteLabelledTrafficMetrics(app, namespace="hermes_patch_test")
    middleware._setup(metrics_client=client, duration_buckets=(0.1, 1.0))
    paths = ["/v1/responses/resp_a1b2c3", "/scanner-a1b2c3/admin", "/v1/models", "/readyz"]
    for path in paths:
        await middleware({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    assert seen == paths
    text = prometheus_client.generate_latest(client.registry).decode()
    assert "a1b2c3" not in text
    counted = set(re.findall(r'hermes_patch_test_request_total\{endpoint="([^"]*)"', text))
    assert {"/v1/responses/{id:path}", "other", "/v1/models"} <= counted


def test_bentoml_builds_its_app_with_ours() -> None:
    original = instruments.RunnerTrafficMetricsMiddleware
    try:
        label_traffic_metrics_by_route()
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware  # as BentoML does

        assert RunnerTrafficMetricsMiddleware is RouteLabelledTrafficMetrics
    finally:
        setattr(instruments, "RunnerTrafficMetricsMiddleware", original)  # noqa: B010
