"""The real engine killed under load (its core process SIGKILLed) and started again in the
same process, leaving no orphan behind. It disturbs the tier's one server, so it runs last."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server, process_tree, wait_until

HI = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def post(server: Server, timeout: float = 60) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/chat/completions", json=HI, timeout=timeout)


def refused_cleanly(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert int(reply.headers["retry-after"]) >= 1


def engine_processes(server: Server) -> list[psutil.Process]:
    """vLLM's engine core and its workers, by the names vLLM gives them."""
    found = []
    for process in process_tree(server):
        try:
            title = process.name() + " " + " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "EngineCore" in title or "VllmWorker" in title or "VLLM::Worker" in title:
            found.append(process)
    return found


@pytest.mark.disruptive
@pytest.mark.timeout(600)
def test_engine_dies_under_load_and_comes_back(server: Server, record_property: Any) -> None:
    assert wait_until(server.idle, 120)
    restarts = server.metric("hermes_engine_restarts_total")
    streaming = threading.Barrier(11)
    ends: dict[int, Any] = {}

    def stream(i: int) -> None:
        body = {**HI, "max_tokens": 400, "ignore_eos": True, "stream": True}
        try:
            with server.http("tester") as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                events = [next(line for line in lines if '"content":"' in line)]
                streaming.wait(timeout=120)
                events += [line for line in lines if line.startswith("data: ")]
            ends[i] = events[-2:]
        except Exception as exc:  # a cut connection lands here
            ends[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    streaming.wait(timeout=180)  # all ten are past their first token
    before = engine_processes(server)
    (core,) = [p for p in before if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    core.kill()
    for thread in threads:
        thread.join(timeout=120)
    for i in range(10):
        assert isinstance(ends[i], list), f"stream {i} was cut: {ends[i]!r}"
        error, done = ends[i]
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == "engine_failed" and done == "data: [DONE]"
    # Until the engine is back, the API answers: requests refused, the process live (the engine
    # starts again off the event loop).
    answered = 0
    with server.http(key=None) as probe:
        while probe.get("/readyz", timeout=60).status_code != 200:
            reply = post(server)
            if reply.status_code == 200:
                break  # back between the two probes
            refused_cleanly(reply, 503, "model_not_ready")
            assert probe.get("/livez", timeout=60).status_code == 200, "the process stays; only the engine restarts"
            answered += 1
            time.sleep(0.5)  # a probe every half second
    assert answered >= 3, f"only {answered} probes while the engine restarted"
    record_property("answered_while_restarting", answered)
    assert post(server).status_code == 200
    assert server.metric("hermes_engine_restarts_total") == restarts + 1
    # The dead engine's processes are gone: none is left holding the model's memory.
    assert wait_until(lambda: not any(p.is_running() for p in before), 60), [p.pid for p in before if p.is_running()]
