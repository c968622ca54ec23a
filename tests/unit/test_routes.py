from __future__ import annotations

import pytest

from hermes_serve import routes
from hermes_serve.auth import Principal
from hermes_serve.errors import OpenAIError


@pytest.mark.parametrize(
    ("path", "pattern", "params"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", {}),
        ("/v1/responses", "/v1/responses", {}),
        ("/v1/responses/resp_1/cancel", "/v1/responses/{id:path}", {"id": "resp_1/cancel"}),
        ("/v1/messages", "/v1/messages", {}),
        ("/v1/messages/count_tokens", "/v1/messages/count_tokens", {}),
        ("/v1/models/org/name", "/v1/models/{model:path}", {"model": "org/name"}),
        ("/health", "/health", {}),
    ],
)
def test_routes_match(path: str, pattern: str, params: dict[str, str]) -> None:
    found = routes.find(path)
    assert found is not None and found[0].path == pattern and found[1] == params


@pytest.mark.parametrize(
    "path",
    ["/sleep", "/invocations", "/v1/load_lora_adapter", "/collective_rpc", "/ping", "/v1/chat/completions/batch"],
)
def test_vllm_admin_routes_are_not_exposed(path: str) -> None:
    assert routes.find(path) is None


def test_generation_routes_are_exactly_the_metered_apis() -> None:
    metered = {route.path: route.api.name for route in routes.ROUTES if route.api is not None}
    assert metered == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completions",
        "/v1/responses": "responses",
        "/v1/messages": "messages",
    }


def listing() -> dict[str, list[dict[str, str]]]:
    return {"data": [{"id": "a", "root": "/srv/a"}, {"id": "b", "root": "/srv/b"}]}


def test_one_model_picks_by_id_and_hides_roots() -> None:
    assert routes.one_model(listing(), {"model": "b"}, Principal("all")) == {"id": "b", "root": "b"}
    with pytest.raises(OpenAIError) as missing:
        routes.one_model(listing(), {"model": "c"}, Principal("all"))
    assert missing.value.status == 404


def test_a_key_sees_only_the_models_it_may_use() -> None:
    only_a = Principal("only-a", models=frozenset({"a"}))
    assert [m["id"] for m in routes.model_list(listing(), {}, only_a)["data"]] == ["a"]
    with pytest.raises(OpenAIError) as hidden:
        routes.one_model(listing(), {"model": "b"}, only_a)
    with pytest.raises(OpenAIError) as missing:
        routes.one_model(listing(), {"model": "zzz"}, only_a)
    assert hidden.value.body() == {
        **missing.value.body(),
        "error": {**missing.value.body()["error"], "message": hidden.value.message},
    }
    assert hidden.value.message == missing.value.message.replace("zzz", "b")
