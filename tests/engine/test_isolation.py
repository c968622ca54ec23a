"""Keys isolated inside the engine: prefix cache, models and adapters. (The priority experiment
under a flood is a benchmark: ./scripts/bench priority.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.lora import write_adapter
from tests.support.reloading import edited
from tests.support.servers import Server
from tests.support.usage import arrived, store_of

# About 900 tokens, the same for every key: a long shared prefix is what a cache would reuse.
LONG_PROMPT = " ".join(f"Fact {i}: the river number {i} flows into lake {i * 7 % 13}." for i in range(60))


def cached_tokens(server: Server, key: str, **extra: Any) -> int:
    with server.http(key) as http:
        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1, **extra}
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > 800
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_a_key_reuses_its_own_cached_prefix_and_never_anothers(server: Server) -> None:
    cached_tokens(server, "cache-a")
    assert cached_tokens(server, "cache-a") > 800, "a key's repeated prompt is served from its cache"
    assert cached_tokens(server, "cache-b") == 0, "the same prompt from another key is not"
    # A client's own cache_salt changes nothing: the gateway's replaces it.
    assert cached_tokens(server, "cache-a", cache_salt="anything") > 800
    assert cached_tokens(server, "tester", cache_salt="anything") == 0


def test_the_ledger_keeps_the_cached_tokens_vllm_reported(server: Server) -> None:
    answers = []
    with server.http("cache-a") as http:
        for _ in range(2):
            body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 2}
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            answers.append((reply.headers["x-request-id"], reply.json()["usage"]))
    store = store_of(server)
    found = arrived(store, [request_id for request_id, _ in answers])
    store.close()
    for request_id, usage in answers:
        row = found[request_id]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (
            usage["prompt_tokens"],
            cached,
            usage["completion_tokens"],
        )
    assert found[answers[1][0]].cached_input_tokens > 800  # the second found the first's prefix


def test_a_key_without_access_gets_404_like_a_model_that_does_not_exist(server: Server) -> None:
    isolated = server
    base_only = isolated.client("base-only")
    assert [m.id for m in base_only.models.list().data] == [SERVED_NAME]
    assert {m.id for m in isolated.client().models.list().data} == {SERVED_NAME, "tiny-zero", "tiny-random"}
    with pytest.raises(openai.NotFoundError) as hidden:
        base_only.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
    with pytest.raises(openai.NotFoundError) as missing:
        base_only.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
    assert hidden.value.body == {
        **missing.value.body,
        "message": missing.value.body["message"].replace("no-such-model", "tiny-random"),
    }  # type: ignore[index]
    assert "tiny" not in missing.value.message, "vLLM's own 404 lists every served model: ours does not"
    with pytest.raises(openai.NotFoundError):
        base_only.models.retrieve("tiny-random")


def greedy(server: Server, model: str) -> str:
    reply = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=24,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_adapters_zero_b_is_the_base_model_and_random_b_is_not(server: Server) -> None:
    isolated = server
    base = greedy(isolated, SERVED_NAME)
    assert base
    assert greedy(isolated, "tiny-zero") == base
    assert greedy(isolated, "tiny-random") != base


def test_adapters_reload_with_the_keys(server: Server, tmp_path: Path) -> None:
    isolated = server
    assert server.model_dir is not None
    late = write_adapter(server.model_dir, tmp_path / "tiny-late", b_scale=0.0)

    def add(section: dict[str, Any]) -> None:
        section["model"]["adapters"].append({"name": "tiny-late", "source": str(late)})

    with edited((server,), add):
        assert "tiny-late" in {m.id for m in isolated.client().models.list().data}
        assert greedy(isolated, "tiny-late") == greedy(isolated, SERVED_NAME)
    with pytest.raises(openai.NotFoundError):
        greedy(isolated, "tiny-late")
    assert {m.id for m in isolated.client().models.list().data} == {SERVED_NAME, "tiny-zero", "tiny-random"}
