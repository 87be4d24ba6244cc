"""A real browser for the tests: Debian's chromium, driven by Playwright.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(``scripts/install`` installs it with apt). Missing, it skips the test on a
laptop and fails it in CI (:func:`tests.support.require`). Screenshots go to
``TASKSTACK_SCREENSHOTS`` when it names a folder (``scripts/screenshots`` sets
it to the README's images), else next to the test's own files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

from tests.support import require

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS_VARIABLE = "TASKSTACK_SCREENSHOTS"
VIEWPORT = {"width": 1280, "height": 900}


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None


@contextmanager
def browser() -> Iterator[Browser]:
    """Headless chromium for one test or module; closed afterwards."""
    require(chromium_available(), f"chromium ({CHROMIUM})")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def page(browser: Browser, basic_auth: str | None = None) -> Iterator[Page]:
    """A fresh page, sending ``user:password`` basic auth when given."""
    credentials = None
    if basic_auth is not None:
        user, _, password = basic_auth.partition(":")
        credentials = {"username": user, "password": password}
    context = browser.new_context(viewport=VIEWPORT, http_credentials=credentials)  # type: ignore[arg-type]
    try:
        yield context.new_page()
    finally:
        context.close()


def screenshot(page: Page, name: str, fallback: Path) -> Path:
    """Save the page as ``name``.png in the screenshots folder, or in ``fallback``."""
    folder = Path(os.environ.get(SCREENSHOTS_VARIABLE) or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
