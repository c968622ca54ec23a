"""The client's side of one request: its headers, its body, and whether the client is still there.

The gateway reads the body once (size-capped, parsed, depth-capped), may rewrite it, and hands
the engine a ``receive`` that replays it and then reports a disconnect when the client leaves
or the gateway gives up: vLLM aborts a request exactly when its ``receive`` says so.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.types import Message, Receive, Scope

from . import errors

MAX_JSON_DEPTH = 64
"""Arrays and objects nested deeper are refused: well past any real request (a tool's JSON
schema included), and far short of where re-encoding the body, estimating its tokens or
vLLM's own parsing would recurse past Python's limit."""
CLIENT_REQUEST_ID = "x-client-request-id"
CLIENT_REQUEST_ID_MAX = 512
_CLIENT_REQUEST_ID = re.compile(rf"[\x20-\x7e]{{1,{CLIENT_REQUEST_ID_MAX}}}")  # OpenAI's bound: printable ASCII


class ClientDisconnected(Exception):
    """The client went away before its request was read."""


class Incoming:
    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        """The client's own receive, for routes that pass the request through unread."""
        self.headers = Headers(scope=scope)
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        self.disconnected = asyncio.Event()
        self.delivered = False
        """Whether the engine has read the body: from then on it may be generating."""
        self._engine_cut_off = asyncio.Event()
        self._body: bytes | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def read_json(self, limit: int) -> Any:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.body_too_large(limit)
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            body = json.loads(b"".join(chunks))
        except UnicodeDecodeError:
            raise errors.bad_json("it is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise errors.bad_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:  # json's decoder stops at Python's recursion limit (about 1000)
            raise errors.nesting_too_deep(MAX_JSON_DEPTH) from None
        if nested_deeper_than(body, MAX_JSON_DEPTH):
            raise errors.nesting_too_deep(MAX_JSON_DEPTH)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnect())
        return body

    def query_pairs(self) -> list[tuple[str, str]]:
        """The query string's (name, value) pairs, repeats kept, in order."""
        return QueryParams(self.scope.get("query_string", b"")).multi_items()

    def client_request_id(self) -> str | None:
        """The client's own id for this request (OpenAI's ``X-Client-Request-Id``), if it sent
        one: logged beside ours, never shown to the engine."""
        values = self.headers.getlist(CLIENT_REQUEST_ID)
        if not values:
            return None
        if len(values) > 1 or not _CLIENT_REQUEST_ID.fullmatch(values[0]):
            raise errors.invalid_client_request_id(CLIENT_REQUEST_ID_MAX)
        return values[0]

    def replace_body(self, body: Any) -> None:
        """The body the engine reads instead of the client's."""
        self._body = json.dumps(body, ensure_ascii=False).encode()

    def engine_scope(
        self, path: str | None = None, headers: Mapping[str, str] | None = None, drop: Iterable[str] = ()
    ) -> Scope:
        """The request as the engine sees it: the client's headers less ``drop``, plus
        ``headers``, the rewritten body's length, and the engine's own path where the
        gateway's differs."""
        scope = {
            **self.scope,
            "headers": [(k, v) for k, v in self.scope["headers"] if k.lower().decode("latin-1") not in drop],
        }
        if path is not None:
            scope["path"], scope["raw_path"] = path, path.encode()
        mutable = MutableHeaders(scope=scope)
        for name, value in (headers or {}).items():
            mutable[name] = value
        if self._body is not None:
            mutable["content-length"] = str(len(self._body))
        return scope

    async def engine_receive(self) -> Message:
        if self._body is None:  # not read by the gateway: the engine reads it from the client
            return await self.receive()
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._engine_cut_off.wait()
        return {"type": "http.disconnect"}

    def cut_off(self) -> None:
        """Show the engine its client leaving: vLLM aborts the request."""
        self._engine_cut_off.set()

    async def _watch_disconnect(self) -> None:
        # The body is consumed; the next message the server sends is the disconnect.
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()
        self.cut_off()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


async def read_body(receive: Receive) -> bytes | None:
    """A request's whole body, however many messages it came in; None if the client left."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


_CONTAINERS = (dict, list)  # all json.loads makes; exact types test faster than isinstance


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects more than ``limit`` deep (a top-level
    object is 1). Level by level, not recursively: the point is to be safe from deep input;
    each value is looked at once (a fraction of what parsing it cost)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in _CONTAINERS
        ]
        if not level:
            return False
    return bool(level)
