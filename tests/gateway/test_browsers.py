"""Browsers stay out by default; a listed origin gets a correct preflight and CORS headers."""

from __future__ import annotations

import httpx

from tests.gateway.conftest import SCRIPTED
from tests.support.fleet import APP_ORIGIN
from tests.support.servers import Server

PREFLIGHT = {
    "Origin": APP_ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def test_cors_is_closed_by_default(server: Server) -> None:
    preflight = httpx.options(f"{server.url}/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    with server.http() as http:
        reply = http.get("/v1/models", headers={"Origin": APP_ORIGIN})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_a_listed_origin_may_call_from_a_browser(front: tuple[Server, Server]) -> None:
    server = front[1]  # its environment lists APP_ORIGIN
    preflight = httpx.options(f"{server.url}/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    with server.http("tester") as http:
        body = {"model": SCRIPTED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        reply = http.post("/v1/chat/completions", json=body, headers={"Origin": APP_ORIGIN})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in reply.headers["access-control-expose-headers"]
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
