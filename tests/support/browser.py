"""A real browser for the web console's tests: Debian's chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.servers import REPO, wait_until

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
