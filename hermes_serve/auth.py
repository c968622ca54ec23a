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

from .config import ApiKey, AuthSettings

logger = logging.getLogger(__name__)

KEY_PREFIX = "hs-"


@dataclass(frozen=True)
class Principal:
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    priority: int = 0

    @classmethod
    def of(cls, key: ApiKey) -> Principal:
        return cls(key.name, key.requests_per_minute, key.tokens_per_minute, key.max_concurrency, key.priority)


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
    def from_settings(cls, auth: AuthSettings, environ: Mapping[str, str]) -> KeyRing:
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
        generated = new_key()
        return cls([(bytes.fromhex(hash_key(generated)), Principal("generated"))], generated_key=generated)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal | None:
        """The key's principal, from ``Authorization: Bearer KEY`` (OpenAI's SDK) or, failing
        that, ``x-api-key: KEY`` (Anthropic's SDK)."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = api_key or ""
        if not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, principal in self._entries:
            # Every digest is compared, so timing says nothing about which one matched.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "new":
        print("usage: python -m hermes_serve.auth new NAME [--key-only]", file=sys.stderr)
        return 2
    name, key = argv[1], new_key()
    if "--key-only" in argv:
        print(key)
        return 0
    print(f"New key for {name!r} (shown once; give it to the client, keep it secret):\n\n  {key}\n")
    print("Paste under hermes.auth.keys in configuration.yaml:\n")
    print(key_stanza(name, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
