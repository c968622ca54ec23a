"""The web console in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.servers import REPO, Server, wait_until

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def until(page: Any, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression from outside the page: Playwright's own wait_for_function
    evaluates strings in the page, which the console's Content-Security-Policy forbids."""
    assert wait_until(lambda: bool(page.evaluate(expression)), timeout), expression


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download cannot be reached here: Debian's, without the
        # sandbox that needs a non-root user.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A tab closed after its test, passed or not, so no answer is left streaming into the
    shared server (it has room for one request at a time)."""
    tab = browser.new_page()
    yield tab
    tab.close()


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
