"""Keys that change without a restart, budgets shared by replicas, and each key's own view
(the gateway tier: the "front" pair of replicas over the scripted engine).

Both servers read one configuration file: editing it reaches both, as a ConfigMap would.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
from typing import Any

import openai
import pytest

from hermes_serve.apis import CHAT
from tests.gateway.conftest import SCRIPTED
from tests.support.reloading import RELOAD_WAIT_S, edited, reloads
from tests.support.servers import Server, process_tree, wait_until
from tests.support.streams import Held

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


def held_stream(server: Server, gate: str) -> Held:
    """A stream that must run, uncut, through every change: its first token, then held by the
    scripted engine until the test opens ``gate``, then the rest."""
    body = {"model": SCRIPTED, "messages": [{"role": "user", "content": f"Hello. [[gate={gate}]]"}], "max_tokens": 4}
    held = Held(server, body)
    held.event()
    return held


def ended_well(server: Server, held: Held, gate: str) -> list[str]:
    """Open the gate; the stream's last two events (it must have run to its end)."""
    assert held.status == 200
    server.open_gate(gate)
    lines = [line for line in held.rest() if line.startswith("data: ")]
    held.leave()
    return lines[-2:]


def test_keys_added_and_removed_in_the_file_apply_to_both_servers_with_a_stream_running(
    front: tuple[Server, Server], record_property: Any
) -> None:
    first, second = front
    servers_pair = front
    secret = "hs-added-" + secrets.token_urlsafe(12)
    gate = "reload-" + secrets.token_hex(4)
    held = held_stream(first, gate)
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
    end = ended_well(first, held, gate)
    assert '"finish_reason":"length"' in end[0] and end[1] == "data: [DONE]", "the stream ran through both changes"
    second.client().models.list()


def test_a_broken_file_changes_nothing(front: tuple[Server, Server]) -> None:
    servers_pair = front

    def break_it(section: dict[str, Any]) -> None:
        section["auth"]["keys"][0]["sha256"] = "not-a-digest"

    with edited(servers_pair, break_it, result="error"):
        for server in servers_pair:
            server.client().models.list()  # the running keys stay
            assert "not-a-digest" not in server.log.read_text()


def test_an_expired_key_is_refused(front: tuple[Server, Server]) -> None:
    servers_pair = front
    secret = "hs-old-" + secrets.token_urlsafe(12)
    with edited(servers_pair, add_key("old", secret, expires_at="2020-01-01T00:00:00Z")):
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{servers_pair[0].url}/v1", api_key=secret, max_retries=0).models.list()
        assert "expired" in refused.value.message


def test_sighup_reloads_without_restarting_the_worker_or_cutting_a_stream(server: Server) -> None:
    workers = {p.pid for p in process_tree(server)}
    gate = "sighup-" + secrets.token_hex(4)
    held = held_stream(server, gate)
    assert wait_until(lambda: server.metric("hermes_running_requests") >= 1)
    before = reloads(server)
    server.process.send_signal(signal.SIGHUP)  # to `bentoml serve`, as `kill -HUP` would
    assert wait_until(lambda: reloads(server) == before + 1, RELOAD_WAIT_S)
    end = ended_well(server, held, gate)
    assert end[1] == "data: [DONE]", end
    assert "error" not in end[0] and '"finish_reason":"length"' in end[0], "the stream ran through the reload"
    assert {p.pid for p in process_tree(server)} == workers, "no process was restarted"
    assert server.http(key=None).get("/readyz").status_code == 200


def test_two_servers_share_a_day_budget_and_usage_shows_what_was_charged(front: tuple[Server, Server]) -> None:
    first, second = servers_pair = front

    def charged() -> float:
        return sum(server.metric("hermes_tokens_total", key="daily") for server in servers_pair)

    charged_before = charged()
    reply = first.client("daily").chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=5)
    used = reply.usage.total_tokens  # type: ignore[union-attr]
    # Within the whole budget (200), but more than the other server's usage left free.
    body = {"model": SCRIPTED, "messages": HELLO}
    max_tokens = 200 - CHAT.prompt_tokens(body, 2048) - used + 1
    with pytest.raises(openai.RateLimitError) as refused:
        second.client("daily").chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=max_tokens)
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


def test_adapters_in_the_file_reload_where_the_environment_does_not_fix_them(front: tuple[Server, Server]) -> None:
    first, second = front

    def served(server: Server) -> set[str]:
        return {m.id for m in server.client().models.list().data}

    def add(section: dict[str, Any]) -> None:
        section["model"]["adapters"] = [{"name": "tiny-late", "source": "fake://tiny-late"}]

    with edited(front, add):
        assert "tiny-late" in served(first)
        reply = first.client().chat.completions.create(model="tiny-late", messages=HELLO, max_tokens=2)
        assert reply.model == "tiny-late"
        assert "tiny-late" not in served(second), "its environment says no adapters"
    assert served(first) == {SCRIPTED}
