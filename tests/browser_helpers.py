"""Shared by the browser tests (tests/test_web_page.py, tests/test_review_page.py): Debian's Chromium driven by
Playwright, or a skip with the reason, which becomes a failure when VGGNET_REQUIRE_BROWSER=1 (.ci/run sets it, so
in CI a missing browser fails instead of skipping silently)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("VGGNET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("VGGNET_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"VGGNET_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def playwright_or_skip() -> Any:
    """``sync_playwright`` when playwright and the browser are here; called at a test module's import."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        _missing("playwright is not installed (pip install playwright; it is in the dev extra)")
    if not os.path.exists(CHROMIUM):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VGGNET_CHROMIUM)")
    return sync_playwright


VIEWPORTS = {"desktop": {"viewport": {"width": 1280, "height": 800}},
             "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}}


@contextlib.contextmanager
def watched_page(browser: Any, kind: str, origin: str) -> Iterator[Any]:
    """A page in a ``VIEWPORTS`` window that must raise no JavaScript error and fetch nothing from outside
    ``origin`` (its own blob: and data: URLs aside): both checked when it closes."""
    page = browser.new_page(**VIEWPORTS[kind])
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(15_000)
    yield page
    page.close()
    assert not errors, errors  # no uncaught JavaScript error
    outside = [u for u in requests if not u.startswith((origin, "blob:", "data:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"
