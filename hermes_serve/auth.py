"""Who is calling: named API keys, stored as SHA-256 digests, compared in constant time.

``python -m hermes_serve.auth new NAME`` prints a new key and the stanza to paste.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from . import errors
from .config import ApiKey, AuthSettings
from .windows import Span, Unit, Window

logger = logging.getLogger(__name__)

KEY_PREFIX = "hs-"


# A key's windows, from its settings: (setting, unit, span).
WINDOWS: tuple[tuple[str, Unit, Span], ...] = (
    ("requests_per_minute", "requests", "minute"),
    ("tokens_per_minute", "tokens", "minute"),
    ("requests_per_day", "requests", "day"),
    ("tokens_per_day", "tokens", "day"),
    ("tokens_per_month", "tokens", "month"),
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and everything the gateway enforces for it."""

    name: str
    windows: tuple[Window, ...] = ()
    max_concurrency: int | None = None
    priority: int = 0
    expires_at: float | None = None
    """Wall-clock seconds (UTC) from which the key is refused."""
    models: frozenset[str] | None = None
    """The models it may use; None: all."""
    cache_group: str | None = None
    admin: bool = False
    """May read every key's usage."""

    @classmethod
    def of(cls, key: ApiKey) -> Principal:
        windows = tuple(
            Window(setting, unit, span, limit)
            for setting, unit, span in WINDOWS
            if (limit := getattr(key, setting)) is not None
        )
        expires = key.expires_at.timestamp() if key.expires_at is not None else None
        models = frozenset(key.models) if key.models is not None else None
        return cls(
            key.name, windows, key.max_concurrency, key.priority, expires, models, key.share_cache_with, key.admin
        )

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def limit(self, setting: str) -> int | None:
        return next((w.limit for w in self.windows if w.setting == setting), None)


ANONYMOUS = Principal("anonymous")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_stanza(name: str, key: str) -> str:
    return (
        f"    - name: {name}\n"
        f'      sha256: "{hash_key(key)}"\n'
        "      # requests_per_minute: 60\n"
        "      # tokens_per_minute: 100000\n"
        "      # tokens_per_day: 2000000\n"
        "      # expires_at: 2027-01-01T00:00:00Z\n"
        "      # max_concurrency: 8\n"
        "      # priority: 0\n"
    )


class KeyRing:
    def __init__(self, entries: list[tuple[bytes, Principal]], enabled: bool = True, generated_key: str | None = None):
        self._entries = entries
        self.enabled = enabled
        self.generated_key = generated_key
        """Set when no key was configured: printed once at start-up, the only key accepted."""

    @classmethod
    def from_settings(cls, auth: AuthSettings, environ: Mapping[str, str], reloading: KeyRing | None = None) -> KeyRing:
        """The keys of ``auth``. With none usable, a key is generated at start-up; a reload
        (``reloading`` the running ring) keeps the generated key, or generates none."""
        if not auth.enabled:
            return cls([], enabled=False)
        entries = []
        for key in auth.keys:
            if not key.enabled:
                continue
            if key.sha256 is not None:
                digest = key.sha256
            elif environ.get(key.key_env or ""):
                digest = hash_key(environ[key.key_env or ""])
            else:
                # A secret that is not provided is a key nobody can use; say so, do not fail.
                logger.warning("key %r skipped: environment variable %s is not set", key.name, key.key_env)
                continue
            entries.append((bytes.fromhex(digest), Principal.of(key)))
        if entries:
            return cls(entries)
        generated = reloading.generated_key if reloading is not None else new_key()
        if generated is None:
            return cls([])
        # The operator's own key on a fresh install: it may read all usage there is.
        return cls([(bytes.fromhex(hash_key(generated)), Principal("generated", admin=True))], generated_key=generated)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def principals(self) -> list[Principal]:
        return [principal for _, principal in self._entries]

    def unknown_models(self, served: frozenset[str]) -> dict[str, list[str]]:
        """Model names keys list that nothing serves: adapters come and go while keys stay."""
        unknown = {p.name: sorted(p.models - served) for _, p in self._entries if p.models is not None}
        return {name: models for name, models in unknown.items() if models}

    def revoked_by(self, new: KeyRing) -> set[str]:
        """Names of keys that ``new`` no longer accepts as they are: removed, disabled, or
        given another secret."""
        if not new.enabled:
            return set()
        still = {(principal.name, digest) for digest, principal in new._entries}
        return {principal.name for digest, principal in self._entries if (principal.name, digest) not in still}

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal | None:
        """The key's principal, from ``Authorization: Bearer KEY`` (OpenAI's SDK) or
        ``x-api-key: KEY`` (Anthropic's SDK); raises ``OpenAIError`` (401) for a request that
        sends two different keys."""
        if not self.enabled:
            return ANONYMOUS
        token = presented_key(authorization, api_key)
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, principal in self._entries:
            # Every digest is compared, so timing says nothing about which one matched.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The one key a request presents. Some SDK set-ups send the same key in both headers;
    two different keys are refused, not guessed between: serving the first would let whatever
    adds a header (a proxy, a default client setting) pick which key pays."""
    scheme, _, bearer = (authorization or "").partition(" ")
    bearer = bearer.strip() if scheme.lower() == "bearer" else ""
    other = (api_key or "").strip()
    if bearer and other and bearer != other:
        raise errors.conflicting_keys()
    return bearer or other or None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "new":
        print("usage: python -m hermes_serve.auth new NAME [--key-only]", file=sys.stderr)
        return 2
    name, key = argv[1], new_key()
    if "--key-only" in argv:
        print(key)
        return 0
    print(f"New key for {name!r} (shown once; give it to the client, keep it secret):\n\n  {key}\n")
    print("Paste under services.hermes.auth.keys in configuration.yaml (it is read without a restart):\n")
    print(key_stanza(name, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
