"""What of an engine request belongs to the gateway, not to the client.

vLLM 0.32 reads these from a request; on a shared engine each lets one key reach into
another's, so the gateway owns them:

| what vLLM reads | from the client | what the engine gets |
|---|---|---|
| body ``cache_salt`` (prefix-cache isolation) | dropped | an HMAC of the key's name, or of its ``share_cache_with`` group |
| header ``X-Vllm-Priority``, body ``priority`` (scheduling order) | dropped | the key's ``priority``, sign flipped (vLLM runs lower first) |
| header ``X-Request-Id``, body ``request_id`` (the engine request's name) | dropped | the gateway's request id |
| body ``kv_transfer_params`` (disaggregated prefill: fetch KV blocks from another host) | dropped | nothing |
| header ``X-data-parallel-rank`` (which engine replica) | dropped | nothing |
| header ``X-Session-ID``, body ``session_id`` (published in KV-cache events) | dropped | nothing |
| body ``vllm_xargs`` (arguments for custom logits processors, a session id too; none are loaded) | dropped | nothing |
| header ``X-Client-Request-Id`` (not read by vLLM: the client's own id, for the gateway's log) | dropped | nothing |
| headers ``X-Tenant-ID`` (vLLM's router: ``consistent_hash``), ``x-llm-d-inference-fairness-id`` (llm-d's fairness), ``X-User-ID`` (vLLM's router, before the tenant) | dropped | the key's tenant: an HMAC of its name, or of its ``share_cache_with`` group (as the salt), so a router keeps a key where its cached prefixes are |
| headers ``Authorization``, ``x-api-key`` (the client's key) | checked | nothing: a key never travels past the gateway |
| body ``model`` | checked against the key's ``models`` | as sent |

Everything else a request carries reaches vLLM as the client sent it, to be validated there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from .auth import Principal

CLIENT_FIELDS = ("cache_salt", "priority", "request_id", "kv_transfer_params", "session_id", "vllm_xargs")
# The client's credentials never travel past the gateway either: the engine needs none.
CLIENT_HEADERS = (
    "x-vllm-priority",
    "x-request-id",
    "x-data-parallel-rank",
    "x-session-id",
    "x-client-request-id",
    "x-tenant-id",
    "x-user-id",
    "x-llm-d-inference-fairness-id",
    "authorization",
    "x-api-key",
)
TENANT_HEADERS = ("x-tenant-id", "x-llm-d-inference-fairness-id")


class Tenancy:
    def __init__(self, secret: bytes | None = None) -> None:
        # A secret of this process: salts need to be stable only as long as the engine's
        # cache lives, and nobody (operators included) can derive another key's salt.
        self._secret = secret or secrets.token_bytes(32)

    def salt(self, principal: Principal) -> str:
        """Keys of one group share cached prefixes; every other key has its own."""
        return self._keyed("salt", principal)

    def tenant(self, principal: Principal) -> str:
        """The key's name toward a router, revealing neither the key nor its name: keys that
        share cached prefixes are one tenant."""
        return self._keyed("tenant", principal)[:32]

    def _keyed(self, purpose: str, principal: Principal) -> str:
        owner = f"group:{principal.cache_group}" if principal.cache_group else f"key:{principal.name}"
        label = owner if purpose == "salt" else f"{purpose}:{owner}"  # the salt as it always was
        return hmac.new(self._secret, label.encode(), hashlib.sha256).hexdigest()

    def claim(self, body: dict[str, Any], principal: Principal) -> None:
        """Replace what the client may not choose in a generation request's body."""
        for field in CLIENT_FIELDS:
            body.pop(field, None)
        body["cache_salt"] = self.salt(principal)

    def headers(self, principal: Principal, request_id: str) -> dict[str, str]:
        """The engine-facing headers the gateway sets; the client's ``CLIENT_HEADERS`` go.
        The priority travels as a header, which vLLM reads for every API (Anthropic's
        request has no priority field); the tenant, for a router in front of several engines."""
        tenant = self.tenant(principal)
        return {"x-request-id": request_id, "x-vllm-priority": str(-principal.priority)} | dict.fromkeys(
            TENANT_HEADERS, tenant
        )
