"""The review page (GET /review) end to end: a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real server with API keys and a real SQLite store holding planted predictions.

The reviewer enters the key, labels the first queued input with a class key and the next with ``n`` ("none of
these"), and the store then holds exactly those two review labels; ``s`` skips without storing; on a phone-sized
window nothing overflows. Skipped, with the reason, where playwright or the browser is missing, unless
VGGNET_REQUIRE_BROWSER=1 (CI sets it), which turns that skip into a failure.

    .venv/bin/pytest tests/test_review_page.py        # about 10 s
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from browser_helpers import VIEWPORTS, playwright_or_skip, watched_page
from serve_helpers import live_server, tiny_checkpoint

playwright_or_skip()  # skips (or, in CI, fails) this module without playwright or Chromium

store = pytest.importorskip("vggnet.store")

from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402
from vggnet.store.schema import predictions  # noqa: E402

KEY = "review-page-key-0123456789abcdef"
WHO = "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def row(request_id: str, minute: int, **values) -> dict:
    base = {"request_id": request_id, "item": 0, "created_at": T0 + timedelta(minutes=minute), "model": "m",
            "version": "1", "role": "served", "route": "/predict", "predicted": "a", "confidence": 0.9,
            "topk": [["a", 0.9], ["b", 0.07], ["c", 0.03]], "sampled": False}
    return {**base, **values}


@pytest.fixture
def site(tmp_path):
    """A served tiny model (classes a, b, c) with keys, over a store with three queued predictions."""
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    engine = store.connect(url)
    with engine.begin() as connection:
        connection.execute(predictions.insert(), [
            row("first", 0, sampled=True), row("second", 1, sampled=True),
            row("third", 2, confidence=0.3), row("third", 2, version="2", role="shadow", predicted="c"),
            row("confident", 3)])  # not queued
    ckpt = tiny_checkpoint(tmp_path / "run" / "best.safetensors", seed=3)
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, access_log=False, store=url, api_keys=(KEY,)))
    with live_server(app) as (base, _):
        yield base + "/review", engine
    engine.dispose()


@pytest.fixture(params=list(VIEWPORTS))
def page(browser, site, request):
    url, _ = site
    with watched_page(browser, request.param, url.removesuffix("/review")) as page:
        yield page


def reviews(engine) -> list[tuple]:
    return [(lab["request_id"], lab["label"], lab["who"]) for lab in store.read_labels(engine)
            if lab["source"] == "review"]


def start(page, url: str) -> None:
    page.goto(url)
    page.fill("#api-key", KEY)
    page.fill("#reviewer", "Ana")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#item:not([hidden])")


def test_a_reviewer_labels_two_inputs_with_the_keyboard(page, site):
    url, engine = site
    start(page, url)
    assert page.text_content("#item-id") == "first" and "random sample" in page.text_content("#reasons")
    assert page.text_content("#queued").strip() == "3"
    buttons = page.locator("#classes button")
    assert buttons.all_text_contents() == ["1 a", "2 b", "3 c"]  # one key per class, shown on the button
    assert page.get_by_role("button", name="2 b").get_attribute("aria-keyshortcuts") == "2"
    page.keyboard.press("2")  # "first" is class b
    page.wait_for_function("() => document.getElementById('item-id').textContent === 'second'")
    assert page.text_content("#reviewed") == "1" and "Stored b for request first" in page.text_content("#status")
    page.keyboard.press("n")  # "second" is none of these
    page.wait_for_function("() => document.getElementById('item-id').textContent === 'third'")
    assert page.text_content("#reviewed") == "2" and page.text_content("#queued").strip() == "1"
    # both versions' answers to the third input are shown, with why it is queued
    assert page.locator(".version h3").all_text_contents() == ["Version 1 · served: a", "Version 2 · shadow: c"]
    assert page.text_content("#reasons") == "low confidence versions disagree"
    page.keyboard.press("s")  # a skip stores nothing and leaves the queue empty for this tab
    page.wait_for_selector("#empty:not([hidden])")
    assert reviews(engine) == [("first", "b", f"Ana ({WHO})"), ("second", None, f"Ana ({WHO})")]
    if page.viewport_size["width"] <= 390:
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways


def test_a_wrong_key_is_said_in_words_and_nothing_is_stored(page, site):
    url, engine = site
    page.goto(url)
    page.fill("#api-key", "not-the-key-0123456789")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key was not accepted" in page.text_content("#error")
    assert page.is_hidden("#item") and page.is_visible("#auth")
    page.keyboard.press("1")
    assert reviews(engine) == []


def test_a_server_without_keys_says_how_to_turn_review_on(browser, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run" / "best.safetensors", seed=3)
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, access_log=False, store=f"sqlite:///{tmp_path}/s.db"))
    with live_server(app) as (base, _):
        page = browser.new_page()
        try:
            page.goto(base + "/review")
            page.wait_for_selector("#error:not([hidden])")
            assert "--api-key-file" in page.text_content("#error") and page.is_hidden("#auth")
        finally:
            page.close()
