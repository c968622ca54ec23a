"""The web console in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

from typing import Any

from tests.support.browser import ARTIFACTS, until
from tests.support.servers import Server


def test_a_wrong_key_shows_the_401_message(server: Server, page: Any) -> None:
    page.goto(f"{server.url}/")
    page.fill("#key", "hs-not-a-key")
    page.click("#connect")
    until(page, "document.getElementById('status').classList.contains('error')")
    assert "Incorrect or missing API key" in page.text_content("#status")
    assert page.is_disabled("#send")


def test_a_right_key_streams_an_answer_token_by_token_and_the_standing_updates(server: Server, page: Any) -> None:
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if "Refused to" in message.text else None)
    page.goto(f"{server.url}/")
    page.fill("#key", server.keys["console"])
    page.click("#connect")
    until(page, "document.querySelectorAll('#model option').length > 0")
    until(page, "document.querySelectorAll('#standing tbody tr').length > 0")
    used_before = int(page.text_content("#standing tbody tr td:nth-child(2)") or "0")
    # Record every length the answer takes as it grows, from inside the page.
    page.evaluate(
        "window.lengths = []; new MutationObserver(() => window.lengths.push("
        "document.getElementById('answer').textContent.length)).observe("
        "document.getElementById('answer'), {childList: true, characterData: true, subtree: true})"
    )
    page.fill("#prompt", "Write a long story about the sea.")
    page.click("#send")
    until(page, "document.getElementById('speed').textContent.includes('tokens/s')", timeout=120)
    lengths = page.evaluate("window.lengths")
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 10, f"the answer should appear piece by piece, saw lengths {lengths[:20]}"
    speed = page.text_content("#speed") or ""
    assert speed.startswith("TTFT ") and " tokens/s" in speed
    until(page, f"parseInt(document.querySelector('#standing tbody tr td:nth-child(2)').textContent) > {used_before}")
    assert page.evaluate("sessionStorage.getItem('hermes-serve-key')") == server.keys["console"]
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    assert not refused, f"Content-Security-Policy blocked: {refused}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
