"""The web page of ``vggnet serve`` end to end: a real headless Chromium (Debian's ``chromium`` package, driven by
Playwright's Python package) against a real server (uvicorn on 127.0.0.1, a free port) with a tiny 10-class model.

Upload / drop / paste an image, see five bars and the Grad-CAM overlay, click another class and see the overlay
change, pick a version, and see the server's errors (not an image, too large, busy) and a timeout in words with no
spinner left turning; on a phone-sized window nothing overflows. One browser per module. Skipped, with the
reason, where playwright or the browser is missing; CI installs both (.ci/run, the dev extra) and sets
VGGNET_REQUIRE_BROWSER=1, which turns that skip into a failure.

    .venv/bin/pytest tests/test_web_page.py        # about 15 s
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vggnet
from serve_helpers import hold_explanations, live_server
from vggnet.serve import ModelRepository, ServeSettings, create_app

CHROMIUM = os.environ.get("VGGNET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# .ci/run installs the browser and sets this, so in CI a missing browser fails instead of skipping silently.
REQUIRED = os.environ.get("VGGNET_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"VGGNET_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    _missing("playwright is not installed (pip install playwright; it is in the dev extra)")
if not os.path.exists(CHROMIUM):
    _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VGGNET_CHROMIUM)")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_BODY = 200 * 1024


def picture(size=(64, 48), seed: int = 0) -> bytes:
    """A PNG with a gradient, a disc and a bar: something for the network to find edges in."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.array([0.9, 0.5, 0.2], dtype=np.float32)
    image = Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(8, w - 24), rng.integers(6, h - 22)
    draw.ellipse((x, y, x + 18, y + 16), fill=(30, 200, 90))
    draw.rectangle((2, h - 10, w // 2, h - 4), fill=(240, 240, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A repository with one model in two versions (the picker shows), served for real."""
    root = tmp_path_factory.mktemp("web")
    meta = {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    for version, seed in (("1", 11), ("2", 12)):
        torch.manual_seed(seed)
        model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap")
        vggnet.save_checkpoint(model, root / "repo" / "tiny" / version / "best.safetensors", meta)
    files = {}
    for name, data in {"photo.png": picture(seed=1), "other.png": picture((80, 60), seed=2)}.items():
        files[name] = root / name
        files[name].write_bytes(data)
    files["corrupt.png"] = root / "corrupt.png"
    files["corrupt.png"].write_bytes(picture()[:120] + b"\x00" * 64)  # a PNG cut short
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    files["huge.png"] = root / "huge.png"
    Image.fromarray(noise).save(files["huge.png"])  # ~270 KB of incompressible noise > MAX_BODY
    assert files["huge.png"].stat().st_size > MAX_BODY
    app = create_app(ModelRepository.from_dir(root / "repo"),
                     ServeSettings(load_in_background=False, access_log=False, max_body_bytes=MAX_BODY,
                                   max_explain_jobs=1))
    with live_server(app) as (url, _):
        yield url + "/", files


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    url, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(15_000)
    yield page
    page.close()
    assert not errors, errors  # no uncaught JavaScript error
    outside = [u for u in requests if not u.startswith((url, "blob:", "data:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"


# wait_for_function gets functions ("() => ..."), not expressions: the page's Content-Security-Policy forbids
# eval, which Playwright's polling of an expression string needs.


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => document.querySelectorAll('#version option').length > 1")  # the index is in


def wait_overlay(page) -> None:
    page.wait_for_selector("#overlay:not([hidden])")
    page.wait_for_function("() => { const i = document.getElementById('overlay'); "
                           "return i.complete && i.naturalWidth > 0; }")


def overlay_checksum(page) -> int:
    return page.evaluate("""() => {
        const img = document.getElementById("overlay");
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const g = canvas.getContext("2d");
        g.drawImage(img, 0, 0);
        const data = g.getImageData(0, 0, canvas.width, canvas.height).data;
        let h = 0;
        for (let i = 0; i < data.length; i++) h = (Math.imul(h, 31) + data[i]) >>> 0;
        return h;
    }""")


def spinners_stopped(page) -> bool:
    return page.evaluate("document.getElementById('busy').hidden && document.getElementById('cam-busy').hidden")


def test_upload_shows_five_bars_and_the_overlay_then_another_class(page, site):
    url, files = site
    open_page(page, url)
    assert page.is_visible("#version") and not page.is_visible("#model")  # one model, two versions
    page.set_input_files("#file", str(files["photo.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    bars = page.locator("#bars .bar")
    assert bars.count() == 5
    labels = [t.strip() for t in page.locator(".bar-label").all_inner_texts()]
    values = [float(t.strip("%<")) for t in page.locator(".bar-value").all_inner_texts()]
    assert set(labels) <= set(CLASSES) and len(set(labels)) == 5 and values == sorted(values, reverse=True)
    wait_overlay(page)
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 224
    assert bars.nth(0).get_attribute("aria-pressed") == "true"
    assert page.inner_text("#meta-model") == "tiny" and page.inner_text("#meta-version").startswith(("1", "2"))
    assert page.inner_text("#meta-time").endswith(("ms", " s"))
    assert labels[0] in page.inner_text("#cam-caption") and "block5_relu2 (2×2)" in page.inner_text("#cam-caption")
    first = overlay_checksum(page)
    explained = page.get_attribute("#overlay", "data-explained")

    bars.nth(2).click()
    other = bars.nth(2).get_attribute("data-index")
    page.wait_for_function(f"() => document.getElementById('overlay').dataset.explained === '{other}'")
    wait_overlay(page)
    assert other != explained and bars.nth(2).get_attribute("aria-pressed") == "true"
    assert labels[2] in page.inner_text("#cam-caption")
    assert overlay_checksum(page) != first  # another class, another heat map

    page.select_option("#layer", "pool3")  # another layer, same class
    page.wait_for_function("() => document.getElementById('cam-caption').textContent.includes('block3_pool (4×4)')")
    wait_overlay(page)

    page.select_option("#version", "1")  # a pinned version: asked again, answered by that version
    page.wait_for_function("() => document.getElementById('meta-version').textContent === '1'")
    wait_overlay(page)
    assert page.locator("#bars .bar").count() == 5 and page.is_hidden("#error") and spinners_stopped(page)


def test_drop_and_paste_an_image(page, site):
    url, files = site
    open_page(page, url)
    data = list(files["other.png"].read_bytes())
    transfer = page.evaluate_handle("""(bytes) => {
        const t = new DataTransfer();
        t.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        return t;
    }""", data)
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#bars .bar >> nth=4")
    wait_overlay(page)
    assert "dropped.png" in page.inner_text("#file-name")
    page.evaluate("""(bytes) => {
        const t = new DataTransfer();
        t.items.add(new File([new Uint8Array(bytes)], "image.png", {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: t}));
    }""", data)
    page.wait_for_function("() => document.getElementById('file-name').textContent.startsWith('image.png')")
    page.wait_for_selector("#bars .bar >> nth=4")
    wait_overlay(page)


def test_server_errors_are_shown_in_words(page, site):
    url, files = site
    open_page(page, url)
    page.set_input_files("#file", str(files["corrupt.png"]))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image the server can read" in page.inner_text("#error")
    assert page.locator("#bars .bar").count() == 0 and spinners_stopped(page)

    page.set_input_files("#file", str(files["huge.png"]))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('too large')")
    assert spinners_stopped(page)

    page.set_input_files("#file", str(files["photo.png"]))  # a good image clears the error
    page.wait_for_selector("#bars .bar >> nth=4")
    assert page.is_hidden("#error")


def test_busy_and_timeout_end_in_words_without_a_spinner(browser, site, monkeypatch):
    """An explanation held on the server: the page gives up after its timeout (1.5 s here) and says so; the
    next one finds the version's one explain slot taken (503) and says the server is busy."""
    url, files = site
    entered, release = hold_explanations(monkeypatch, 20)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(15_000)
    page.add_init_script("window.vggnetTimeoutMs = 1500;")
    try:
        open_page(page, url)
        page.set_input_files("#file", str(files["photo.png"]))
        page.wait_for_selector("#bars .bar >> nth=4")
        assert entered.wait(10)
        page.wait_for_function("() => document.getElementById('cam-empty').textContent.includes('No answer')")
        assert "within 1.5 s" in page.inner_text("#cam-empty") and spinners_stopped(page)
        page.locator("#bars .bar").nth(1).click()
        page.wait_for_function("() => document.getElementById('cam-empty').textContent.includes('busy')")
        assert "The server is busy right now" in page.inner_text("#cam-empty") and spinners_stopped(page)
        assert page.is_hidden("#overlay")
    finally:
        release.set()
        page.close()


def test_phone_sized_window(browser, site):
    url, files = site
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.set_default_timeout(15_000)
    try:
        open_page(page, url)
        page.set_input_files("#file", str(files["photo.png"]))
        page.wait_for_selector("#bars .bar >> nth=4")
        wait_overlay(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
        boxes = [page.locator(f"main > section >> nth={i}").bounding_box() for i in range(3)]
        assert len({round(b["x"]) for b in boxes}) == 1  # one column
        assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]
        assert all(b["width"] <= 390 for b in boxes)
    finally:
        page.close()
