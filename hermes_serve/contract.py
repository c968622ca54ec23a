"""The service's OpenAPI document: its public routes as they behave behind the gateway.

Request bodies are vLLM's own schemas (from vLLM's app); what is ours is added on top: the
two ways to send a key, the error envelope of each API, the status codes the gateway answers
with, the routes it serves itself, and nothing of vLLM's routes that the gateway does not
expose. Served at ``GET /openapi.json`` (no key: it is a contract, not data) and used to
fuzz the real server (``tests/e2e/test_contract.py``).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from . import errors, routes
from .errors import ANTHROPIC

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
USAGE = {
    "type": "object",
    "required": ["object", "key", "expires_at", "limits"],
    "properties": {
        "object": {"const": "usage"},
        "key": {"type": "string"},
        "expires_at": {"type": ["string", "null"]},
        "limits": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["limit", "used", "reserved", "remaining", "window", "resets_at"],
                "properties": {
                    "limit": {"type": "integer"},
                    "used": {"type": "integer"},
                    "reserved": {"type": "integer"},
                    "remaining": {"type": "integer"},
                    "window": {"type": "string"},
                    "resets_at": {"type": ["string", "null"]},
                },
            },
        },
    },
}
# One server-sent event, as a client parses it: a JSON ``data`` (or chat's ``[DONE]``), and
# the event's name where the API sends one (Responses, Anthropic).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
HEALTH = {
    "type": "object",
    "required": ["status", "model"],
    "properties": {"status": {"const": "ok"}, "model": {"type": "string"}},
}

WHEN = {status: errors.when(status) for status in sorted({row.status for row in errors.CODES.values()})}
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def document(engine_openapi: dict[str, Any], title: str = "hermes-serve", version: str = "1") -> dict[str, Any]:
    """The contract, from vLLM's own OpenAPI document (its schemas) and the route table."""
    engine_paths = engine_openapi.get("paths", {})
    paths: dict[str, Any] = {}
    for route in routes.ROUTES:
        path = re.sub(r"\{(\w+):path\}", r"{\1}", route.path)
        for method in sorted(route.methods):
            engine_operation = engine_paths.get(route.engine_path or path, {}).get(method.lower(), {})
            paths.setdefault(path, {})[method.lower()] = _operation(route, method, copy.deepcopy(engine_operation))
    paths["/openapi.json"] = {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
    components = copy.deepcopy(engine_openapi.get("components", {}))
    components.setdefault("schemas", {}).update(
        {"OpenAIError": OPENAI_ERROR, "AnthropicError": ANTHROPIC_ERROR, "KeyUsage": USAGE, "Health": HEALTH}
    )
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY (OpenAI's SDK)"},
        "apiKey": {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "x-api-key: KEY (Anthropic's SDK)",
        },
    }
    return {
        "openapi": engine_openapi.get("openapi", "3.1.0"),
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": components,
    }


def _operation(route: routes.Route, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    statuses = sorted({*_statuses(route, method), 400})  # 400 on any route: a bad X-Client-Request-Id
    error = {"$ref": "#/components/schemas/" + ("AnthropicError" if route.dialect is ANTHROPIC else "OpenAIError")}
    responses: dict[str, Any] = {}
    for status in statuses:
        if status == 200:
            responses["200"] = _success(route, operation)
        else:
            responses[str(status)] = {"description": WHEN[status], "content": {"application/json": {"schema": error}}}
    operation["responses"] = responses
    operation.setdefault("summary", route.path)
    names = re.findall(r"\{(\w+)(?::path)?\}", route.path)
    if names and not operation.get("parameters"):
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names
        ]
    operation.pop("operationId", None)
    if not route.open:
        operation["security"] = SECURITY
    else:
        operation["security"] = []
    return operation


def _statuses(route: routes.Route, method: str) -> list[int]:
    if route.local == "health":
        return [200, 503]
    if route.local == "usage":
        return [200, 401, 503]
    if route.refusal is not None:
        return [401, 404]
    if route.api is not None:
        return [200, 400, 401, 404, 413, 429, 503, 504]
    if method == "POST":
        return [200, 400, 401, 404, 413, 503]
    return [200, 401, 404, 503] if "{" in route.path else [200, 401, 503]


def _success(route: routes.Route, operation: dict[str, Any]) -> dict[str, Any]:
    if route.local == "usage":
        return {
            "description": "the calling key's standing",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/KeyUsage"}}},
        }
    if route.local == "health":
        return {
            "description": "ready",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
        }
    success: dict[str, Any] = operation.get("responses", {}).get("200") or {"description": "answered"}
    success.setdefault("description", "answered")
    if route.api is not None:
        success.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}
    return success
