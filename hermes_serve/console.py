"""The web console: a small page served at ``/`` (a playground and the key's own standing),
plain HTML and JavaScript from ``web/``, no build step. It talks to the public API like any
client, with the key the user types, which stays in the tab's session storage.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

WEB = Path(__file__).with_name("web")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only this origin's own files and API: no inline script or style, no framing, no forms elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@cache
def page(name: str) -> tuple[bytes, str] | None:
    """A console file by its name under ``web/`` (``index.html`` for ``/``), with its type."""
    path = (WEB / name).resolve()
    if path.parent != WEB.resolve() or path.suffix not in TYPES or not path.is_file():
        return None
    return path.read_bytes(), TYPES[path.suffix]
