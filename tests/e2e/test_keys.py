"""Keys that change without a restart, budgets shared by replicas, and each key's own view.

Both servers read one configuration file: editing it reaches both, as a ConfigMap would.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import threading
from typing import Any

import openai
import pytest

from hermes_serve.apis import CHAT
from tests.e2e.conftest import SERVED_NAME
from tests.support.reloading import RELOAD_WAIT_S, edited, reloads
from tests.support.servers import Server, process_tree, wait_until

HELLO = [{"role": "user", "content": "Say hello."}]


def add_key(name: str, secret: str, **settings: Any) -> Any:
    def change(section: dict[str, Any]) -> None:
        section["auth"]["keys"].append(
            {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), **settings}
        )

    return change


def remove_key(name: str) -> Any:
    def change(section: dict[str, Any]) -> None:
        section["auth"]["keys"] = [k for k in section["auth"]["keys"] if k["name"] != name]

    return change


def stream_through(server: Server, max_tokens: int, done: threading.Event, result: dict[str, Any]) -> None:
    """A long stream that must run, uncut, through every change."""
    body = {"model": SERVED_NAME, "messages": HELLO, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    result["status"], result["end"] = response.status_code, lines[-2:]
    done.set()


@pytest.mark.usefixtures("slot_free")
def test_keys_added_and_removed_in_the_file_apply_to_both_servers_with_a_stream_running(
    servers_pair: tuple[Server, Server], record_property: Any
) -> None:
    first, second = servers_pair
    secret = "hs-added-" + secrets.token_urlsafe(12)
    done, result = threading.Event(), {}
    # So long that only the server's request_timeout_s (25 s) ends it, whatever the machine's speed.
    streamer = threading.Thread(target=stream_through, args=(first, 1900, done, result))
    streamer.start()
    assert wait_until(lambda: first.metric("hermes_running_requests") == 1)
    for server in servers_pair:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0).models.list()
    with edited(servers_pair, add_key("added", secret)) as took:
        record_property("reload_s", round(took, 1))  # a figure, not a timed assertion
        for server in servers_pair:
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0).models.list()
        with edited(servers_pair, remove_key("added")):
            for server in servers_pair:
                with pytest.raises(openai.AuthenticationError):
                    openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0).models.list()
    assert not done.is_set(), "the stream runs through both changes"
    streamer.join(timeout=120)
    assert result["status"] == 200, result
    assert '"request_timeout"' in result["end"][0] and result["end"][1] == "data: [DONE]", (
        "ended by its time limit, not a reload"
    )
    second.client().models.list()


def test_a_broken_file_changes_nothing(servers_pair: tuple[Server, Server]) -> None:
    def break_it(section: dict[str, Any]) -> None:
        section["auth"]["keys"][0]["sha256"] = "not-a-digest"

    with edited(servers_pair, break_it, result="error"):
        for server in servers_pair:
            server.client().models.list()  # the running keys stay
            assert "not-a-digest" not in server.log.read_text()


def test_an_expired_key_is_refused(servers_pair: tuple[Server, Server]) -> None:
    secret = "hs-old-" + secrets.token_urlsafe(12)
    with edited(servers_pair, add_key("old", secret, expires_at="2020-01-01T00:00:00Z")):
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{servers_pair[0].url}/v1", api_key=secret, max_retries=0).models.list()
        assert "expired" in refused.value.message


@pytest.mark.usefixtures("slot_free")
def test_sighup_reloads_without_restarting_the_worker_or_cutting_a_stream(server: Server) -> None:
    workers = {p.pid for p in process_tree(server)}
    done, result = threading.Event(), {}
    # As long as the server lets a request run (request_timeout_s, 25 s): the reload has that
    # long to be seen, however slow the machine.
    streamer = threading.Thread(target=stream_through, args=(server, 1900, done, result))
    streamer.start()
    assert wait_until(lambda: server.metric("hermes_running_requests") == 1)
    before = reloads(server)
    server.process.send_signal(signal.SIGHUP)  # to `bentoml serve`, as `kill -HUP` would
    assert wait_until(lambda: reloads(server) == before + 1, RELOAD_WAIT_S)
    assert not done.is_set(), "the stream runs through the reload"
    streamer.join(timeout=120)
    assert result["status"] == 200 and result["end"][1] == "data: [DONE]", result
    # Ended well, or by its time limit on a slower machine: never by another error.
    assert "error" not in result["end"][0] or '"request_timeout"' in result["end"][0], result
    assert {p.pid for p in process_tree(server)} == workers, "no process was restarted"
    assert server.http(key=None).get("/readyz").status_code == 200


def test_two_servers_share_a_day_budget_and_usage_shows_what_was_charged(servers_pair: tuple[Server, Server]) -> None:
    first, second = servers_pair

    def charged() -> float:
        return sum(server.metric("hermes_tokens_total", key="daily") for server in servers_pair)

    charged_before = charged()
    reply = first.client("daily").chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=5)
    used = reply.usage.total_tokens  # type: ignore[union-attr]
    # Within the whole budget (200), but more than the other server's usage left free.
    body = {"model": SERVED_NAME, "messages": HELLO}
    max_tokens = 200 - CHAT.prompt_tokens(body, 2048) - used + 1
    with pytest.raises(openai.RateLimitError) as refused:
        second.client("daily").chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=max_tokens)
    assert refused.value.code == "insufficient_quota" and "tokens_per_day" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
    for server in servers_pair:
        with server.http("daily") as http:
            standing = http.get("/v1/usage").json()
        assert standing["key"] == "daily"
        day = standing["limits"]["tokens_per_day"]
        assert (day["used"], day["remaining"], day["reserved"]) == (used, 200 - used, 0)
        assert day["resets_at"].endswith("T00:00:00Z")
    # Metrics are counted as a request's record closes, just after its answer has gone out.
    assert wait_until(lambda: charged() - charged_before == used)
