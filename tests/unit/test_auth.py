from __future__ import annotations

import pytest
import yaml

from hermes_serve import auth
from hermes_serve.auth import ANONYMOUS, KeyRing, hash_key, key_stanza, new_key, presented_key
from hermes_serve.config import parse_settings
from hermes_serve.errors import OpenAIError


def ring(keys: list[dict[str, object]], environ: dict[str, str] | None = None, enabled: bool = True) -> KeyRing:
    settings = parse_settings({"auth": {"enabled": enabled, "keys": keys}})
    return KeyRing.from_settings(settings.auth, environ or {})


def test_bearer_key_finds_its_named_principal_with_limits() -> None:
    keys = {"app": new_key(), "svc": new_key()}
    keyring = ring(
        [
            {"name": "app", "sha256": hash_key(keys["app"]), "requests_per_minute": 60, "priority": 2},
            {"name": "svc", "sha256": hash_key(keys["svc"]), "tokens_per_minute": 1000, "max_concurrency": 4},
        ]
    )
    app = keyring.authenticate(f"Bearer {keys['app']}")
    svc = keyring.authenticate(f"bearer {keys['svc']}")
    assert app is not None and (app.name, app.limit("requests_per_minute"), app.priority) == ("app", 60, 2)
    assert svc is not None and (svc.name, svc.limit("tokens_per_minute"), svc.max_concurrency) == ("svc", 1000, 4)
    assert keyring.generated_key is None


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer wrong", "Token KEY"])
def test_missing_malformed_or_wrong_key_is_refused(header: str | None) -> None:
    keyring = ring([{"name": "app", "sha256": hash_key("KEY")}])
    assert keyring.authenticate(header) is None


def test_disabled_keys_are_refused() -> None:
    keyring = ring(
        [{"name": "old", "sha256": hash_key("OLD"), "enabled": False}, {"name": "new", "sha256": hash_key("NEW")}]
    )
    assert keyring.authenticate("Bearer OLD") is None
    assert keyring.authenticate("Bearer NEW") is not None


def test_key_from_environment_for_container_secrets() -> None:
    keyring = ring([{"name": "ci", "key_env": "CI_KEY"}], {"CI_KEY": "s3cret"})
    principal = keyring.authenticate("Bearer s3cret")
    assert principal is not None and principal.name == "ci"


def test_no_usable_key_generates_one_and_accepts_only_it() -> None:
    keyring = ring([{"name": "ci", "key_env": "UNSET_VARIABLE"}])
    key = keyring.generated_key
    assert key is not None and key.startswith("hs-") and len(key) > 40
    assert keyring.authenticate(f"Bearer {key}") is not None
    assert keyring.authenticate("Bearer hs-anything-else") is None
    assert ring([]).generated_key != key  # random each start


def test_auth_switched_off_explicitly_lets_everyone_in() -> None:
    keyring = ring([], enabled=False)
    assert keyring.authenticate(None) is ANONYMOUS and keyring.generated_key is None


def test_new_key_and_stanza_round_trip_through_settings() -> None:
    key = new_key()
    stanza = yaml.safe_load(key_stanza("frontend-app", key))
    keyring = ring(stanza)
    principal = keyring.authenticate(f"Bearer {key}")
    assert principal is not None and principal.name == "frontend-app"
    assert key not in key_stanza("frontend-app", key)


def test_cli_prints_key_and_stanza(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.main(["new", "team"]) == 0
    out = capsys.readouterr().out
    key = next(word for word in out.split() if word.startswith("hs-"))
    assert f'sha256: "{hash_key(key)}"' in out
    assert auth.main(["new", "team", "--key-only"]) == 0
    assert capsys.readouterr().out.strip().startswith("hs-")
    assert auth.main([]) == 2


@pytest.mark.parametrize(
    ("authorization", "api_key", "presented"),
    [
        ("Bearer K", None, "K"),
        (None, "K", "K"),
        ("Bearer K", "K", "K"),  # some SDK set-ups send both: the same key is one key
        ("bearer  K ", " K", "K"),
        ("Basic dXNlcjpwYXNz", "K", "K"),  # not a key: a proxy's, say
        ("Bearer ", "K", "K"),
        (None, "", None),
        (None, None, None),
    ],
)
def test_the_one_key_a_request_presents(authorization: str | None, api_key: str | None, presented: str | None) -> None:
    assert presented_key(authorization, api_key) == presented


def test_two_different_keys_are_refused_not_guessed_between() -> None:
    keyring = ring([{"name": "a", "sha256": hash_key("KEY-A")}, {"name": "b", "sha256": hash_key("KEY-B")}])
    with pytest.raises(OpenAIError) as refused:
        keyring.authenticate("Bearer KEY-A", "KEY-B")
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    same = keyring.authenticate("Bearer KEY-A", "KEY-A")
    assert same is not None and same.name == "a"
    assert ring([], enabled=False).authenticate("Bearer KEY-A", "KEY-B") is ANONYMOUS
