"""Many clients at once, and every outcome counted: the fault tests and the soak use it."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from tests.support.servers import Server

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}
REFUSALS = {429, 503, 504}


@dataclass
class Outcome:
    key: str
    status: int
    complete: bool
    """A 200 whose answer ended well (JSON with choices, or a stream through [DONE]), or a
    refusal in OpenAI's shape with Retry-After."""
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def by_status(self) -> dict[int, int]:
        return dict(Counter(o.status for o in self.outcomes))

    def ok_by_key(self) -> dict[str, int]:
        return dict(Counter(o.key for o in self.outcomes if o.status == 200))

    def broken(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.complete]


def _well_refused(response: httpx.Response, body: bytes) -> tuple[bool, str]:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False, f"not an OpenAI error: {body[:200]!r}"
    if set(error) != OPENAI_ERROR_FIELDS:
        return False, f"error fields {sorted(error)}"
    if "retry-after" not in response.headers:
        return False, f"{response.status_code} {error.get('code')} without Retry-After"
    return True, str(error.get("code"))


async def one_request(http: httpx.AsyncClient, key: str, secret: str, body: dict[str, Any]) -> Outcome:
    """One chat request by the key named ``key``; outcomes name keys, never hold their secrets."""
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        if body.get("stream"):
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                raw = b"".join([chunk async for chunk in response.aiter_bytes()])
        else:
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            raw = response.content
    except httpx.HTTPError as exc:
        return Outcome(key, 0, False, f"{type(exc).__name__}: {exc}")
    if response.status_code in REFUSALS:
        ok, detail = _well_refused(response, raw)
        return Outcome(key, response.status_code, ok, detail)
    if response.status_code != 200:
        return Outcome(key, response.status_code, False, raw[:200].decode(errors="replace"))
    if body.get("stream"):
        events = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
        ended = bool(events) and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
        return Outcome(key, 200, ended, "" if ended else "stream did not end well")
    return Outcome(key, 200, bool(json.loads(raw).get("choices")), "")


async def crowd(server: Server, keys: list[str], clients: int, body: dict[str, Any], timeout_s: float = 300) -> Tally:
    """``clients`` requests at once, from ``keys`` in turn, half of them streamed."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout_s, limits=limits) as http:
        jobs = [
            one_request(http, keys[i % len(keys)], server.keys[keys[i % len(keys)]], {**body, "stream": i % 2 == 0})
            for i in range(clients)
        ]
        return Tally(list(await asyncio.gather(*jobs)))


def worker_process(server: Server) -> psutil.Process:
    """The BentoML worker: the API process (the gateway, vLLM's API side)."""
    root = psutil.Process(server.process.pid)
    for process in root.children(recursive=True):
        if any("_bentoml_impl.worker" in part for part in process.cmdline()):
            return process
    raise LookupError("no BentoML worker under the server process")


def series_count(server: Server) -> int:
    return sum(1 for line in server.metrics_text().splitlines() if line and not line.startswith("#"))


async def mixed_load(server: Server, key: str, limited_key: str, seconds: float, rate_per_s: float) -> Tally:
    """Steady mixed traffic at a bounded rate: answers, streams, clients that leave mid-stream,
    bad requests, and a key kept over its limit."""
    tally = Tally()
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pending: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

        async def one(kind: str) -> None:
            body: dict[str, Any] = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            }
            if kind == "stream":
                tally.outcomes.append(await one_request(http, key, server.keys[key], {**body, "stream": True}))
            elif kind == "leave":
                headers = {"Authorization": f"Bearer {server.keys[key]}"}
                async with http.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 64}, headers=headers
                ) as r:
                    async for _ in r.aiter_lines():
                        break  # the client leaves after the first line
                tally.outcomes.append(Outcome(key, r.status_code, r.status_code == 200, "left"))
            elif kind == "bad":
                r = await http.post(
                    "/v1/chat/completions",
                    content=b"{not json",
                    headers={"Authorization": f"Bearer {server.keys[key]}"},
                )
                tally.outcomes.append(Outcome(key, r.status_code, r.status_code == 400, "bad"))
            elif kind == "limited":
                tally.outcomes.append(await one_request(http, limited_key, server.keys[limited_key], body))
            else:
                tally.outcomes.append(await one_request(http, key, server.keys[key], body))

        kinds = ["plain", "stream", "leave", "bad", "limited"]
        while loop.time() < deadline:
            task = asyncio.create_task(one(rng.choice(kinds)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / rate_per_s)
        await asyncio.gather(*pending)
    return tally
