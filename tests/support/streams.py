"""A streamed request the test holds open: read as far as it likes, then let it end or leave.

Closing it before the answer has ended is the client leaving: its connection is shut, as a
user closing a tab or an SDK cancelling does. No thread is needed: the test itself reads.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import urllib.parse
from types import TracebackType
from typing import Any

from tests.support.servers import Server

READ_TIMEOUT_S = 120  # a hang ends here (and at the test's own timeout), never a verdict


class Held:
    def __init__(
        self,
        server: Server,
        body: dict[str, Any],
        key: str = "tester",
        path: str = "/v1/chat/completions",
        wait_for_answer: bool = True,
    ) -> None:
        """Send ``body`` as a stream. ``wait_for_answer``: wait until the answer starts (a
        request that waits in the queue has not started: leave it False)."""
        url = urllib.parse.urlsplit(server.url)
        self._connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=READ_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {server.keys[key]}", "Content-Type": "application/json"}
        self._connection.request("POST", path, json.dumps({**body, "stream": True}), headers)
        self.response: http.client.HTTPResponse | None = None
        if wait_for_answer:
            self.answer()

    def answer(self) -> http.client.HTTPResponse:
        if self.response is None:
            self.response = self._connection.getresponse()
        return self.response

    @property
    def status(self) -> int:
        return self.answer().status

    def event(self) -> str:
        """The next ``data:`` line."""
        while line := self.answer().readline():
            text = line.decode().rstrip("\r\n")
            if text.startswith("data: "):
                return text
        raise EOFError("the stream ended")

    def rest(self) -> list[str]:
        """Every line left, to the end of the answer (blank lines dropped)."""
        return [text for line in self.answer() if (text := line.decode().rstrip("\r\n"))]

    def leave(self) -> None:
        """The client goes away: its connection is shut under the answer."""
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._connection.close()

    def __enter__(self) -> Held:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.leave()
