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
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vggnet
from browser_helpers import VIEWPORTS, playwright_or_skip, watched_page
from serve_helpers import hold_explanations, live_server
from vggnet.serve import ModelRepository, ServeSettings, create_app

playwright_or_skip()  # skips (or, in CI, fails) this module without playwright or Chromium

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
    # version 1 has an out-of-domain reference no image can pass (threshold 1.0): its every answer is flagged
    (root / "repo" / "tiny" / "1" / "ood.json").write_text(json.dumps(
        {"signal": "max_softmax", "false_alarm": 0.05, "threshold": 1.0, "images": 100}))
    files = {}
    for name, data in {"photo.png": picture(seed=1), "other.png": picture((80, 60), seed=2)}.items():
        files[name] = root / name
        files[name].write_bytes(data)
    files["dot.png"] = root / "dot.png"
    Image.new("RGB", (1, 1), (200, 30, 60)).save(files["dot.png"])  # a few dozen bytes
    files["corrupt.png"] = root / "corrupt.png"
    files["corrupt.png"].write_bytes(picture()[:120] + b"\x00" * 64)  # a PNG cut short
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    files["huge.png"] = root / "huge.png"
    Image.fromarray(noise).save(files["huge.png"])  # ~270 KB of incompressible noise > MAX_BODY
    assert files["huge.png"].stat().st_size > MAX_BODY
    files["store"] = f"sqlite:///{root / 'serve.db'}"  # "Is this right?" stores its labels here
    app = create_app(ModelRepository.from_dir(root / "repo"),
                     ServeSettings(load_in_background=False, access_log=False, max_body_bytes=MAX_BODY,
                                   max_explain_jobs=1, store=files["store"], prediction_log=False))
    with live_server(app) as (url, _):
        yield url + "/", files


@pytest.fixture(params=list(VIEWPORTS))
def page(browser, site, request):
    """Each test that takes it runs twice: a desktop window and a touch phone (390×844)."""
    url, _ = site
    with watched_page(browser, request.param, url) as page:
        yield page


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
    assert labels[0] in page.inner_text("#cam-caption") and "block4_relu2 (4×4)" in page.inner_text("#cam-caption")
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


def test_bars_top_and_explained_stand_out_and_small_files_in_bytes(page, site):
    """Only the most likely class and the explained one are drawn strong (not every bar); a file of a few dozen
    bytes is said in bytes, not "1 KB"."""
    url, files = site
    open_page(page, url)
    page.set_input_files("#file", str(files["photo.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    wait_overlay(page)
    fills = page.evaluate("() => [...document.querySelectorAll('.bar-fill')].map(f => getComputedStyle(f)"
                          ".backgroundColor)")
    assert fills[0] != fills[1] and len(set(fills[1:])) == 1
    page.locator("#bars .bar").nth(3).click()
    page.wait_for_function("() => document.querySelectorAll('.bar.active').length === 1 && "
                           "document.querySelectorAll('.bar')[3].classList.contains('active')")
    fills = page.evaluate("() => [...document.querySelectorAll('.bar-fill')].map(f => getComputedStyle(f)"
                          ".backgroundColor)")
    assert fills[3] == fills[0] != fills[1]
    size = files["dot.png"].stat().st_size
    assert size < 100
    page.set_input_files("#file", str(files["dot.png"]))
    page.wait_for_function("() => document.getElementById('file-name').textContent.startsWith('dot.png')")
    assert page.inner_text("#file-name") == f"dot.png · {size} bytes"


def test_one_request_per_upload_and_refusals_before_uploading(page, site):
    """The image is sent once (predict?explain=1 answers the bars and the map); a file over the byte or pixel
    limit is refused in the browser, in words, with the limits in MB / megapixels, its preview cleared and
    nothing sent."""
    url, files = site
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" and "repository" not in r.url else None)
    open_page(page, url)
    page.wait_for_selector("#limits:not([hidden])")
    assert page.inner_text("#limits") == "JPEG, PNG, WebP, BMP or GIF, up to 200 KB and 36 megapixels."
    page.set_input_files("#file", str(files["photo.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    wait_overlay(page)
    assert len(posts) == 1 and "/predict?" in posts[0] and "explain=1" in posts[0], posts

    posts.clear()
    page.set_input_files("#file", str(files["huge.png"]))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('too large')")
    assert "up to 200 KB" in page.inner_text("#error")
    assert page.is_hidden("#preview") and page.get_attribute("#preview", "src") is None
    assert page.is_hidden("#file-name") and page.locator("#bars .bar").count() == 0 and spinners_stopped(page)

    page.route("**/static/limits.json", lambda route: route.fulfill(
        json={"max_upload_bytes": MAX_BODY, "max_image_pixels": 2000, "image_types": ["image/png"]}))
    page.reload()
    page.wait_for_selector("#limits:not([hidden])")
    page.set_input_files("#file", str(files["photo.png"]))  # 64×48 = 3072 pixels > 2000
    page.wait_for_function("() => document.getElementById('error').textContent.includes('megapixels')")
    assert "64×48" in page.inner_text("#error") and page.is_hidden("#preview")
    page.set_input_files("#file", files={"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    page.wait_for_function("() => document.getElementById('error').textContent.includes('text/plain')")
    assert not posts, posts


@pytest.fixture
def states_site(tmp_path, monkeypatch):
    """Three models: one ready, one whose weights are broken (UNAVAILABLE with a WeightsError), one held in
    LOADING until ``release`` is set."""
    from vggnet.serve.versions import ModelVersion

    meta = {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    for name in ("good", "slow"):
        torch.manual_seed(3)
        model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap")
        vggnet.save_checkpoint(model, tmp_path / "repo" / name / "1" / "best.safetensors", meta)
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "1" / "best.safetensors").write_bytes(b"not weights at all" * 8)
    release = threading.Event()
    real = ModelVersion._load_checkpoint

    def held(self):
        if self.name == "slow":
            release.wait(30)
        return real(self)

    monkeypatch.setattr(ModelVersion, "_load_checkpoint", held)
    app = create_app(ModelRepository.from_dir(tmp_path / "repo"),
                     ServeSettings(load_in_background=True, access_log=False))
    try:
        with live_server(app) as (url, _):
            yield url + "/", release
    finally:
        release.set()


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}],
                         ids=["desktop", "phone"])
def test_each_models_state_is_shown_before_upload(browser, states_site, viewport):
    """Before any upload: a loading model says so (and turns ready by itself), a broken one says it cannot
    answer in a plain sentence with the reason for the operator behind a disclosure; a ready one lists its
    classes."""
    url, release = states_site
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(15_000)
    try:
        page.goto(url)
        page.wait_for_function("() => document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "broken")
        page.wait_for_selector("#model-state[data-state='failed']")
        assert page.inner_text("#state-word") == "Not available."
        assert "failed to load" in page.inner_text("#state-text") and "busy" not in page.inner_text("#model-state")
        assert page.is_hidden("#state-reason")  # behind "Details for the operator"
        assert "Error" in page.text_content("#state-reason") and page.is_hidden("#classes")
        page.click("#state-details summary")
        assert page.is_visible("#state-reason")

        page.select_option("#model", "slow")
        page.wait_for_selector("#model-state[data-state='loading']")
        assert page.inner_text("#state-word") == "Loading…" and "still loading" in page.inner_text("#state-text")
        assert page.is_hidden("#state-details")
        release.set()
        page.wait_for_selector("#model-state[data-state='ready']")  # polled: no reload needed
        page.wait_for_selector("#classes:not([hidden])")
        assert "these 10 classes only: airplane, automobile" in page.inner_text("#classes")

        page.select_option("#model", "broken")
        page.set_input_files("#file", files={"name": "p.png", "mimeType": "image/png", "buffer": picture()})
        page.wait_for_selector("#error:not([hidden])")
        assert "failed to load" in page.inner_text("#error") and "busy" not in page.inner_text("#error")
    finally:
        page.close()


def test_class_list_and_the_small_and_out_of_domain_warnings(page, site):
    """The page says what the model knows before any upload; a 1×1 image is flagged as far smaller than the
    crop; a version with an out-of-domain reference flags an answer below its threshold, one without says
    nothing of the kind."""
    url, files = site
    open_page(page, url)
    page.wait_for_selector("#classes:not([hidden])")
    assert page.inner_text("#classes").startswith("It recognises these 10 classes only: airplane, automobile, bird")
    page.select_option("#version", "2")
    page.set_input_files("#file", str(files["photo.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    assert page.locator("#warnings li").count() == 0  # 64×48 for a 32-px crop, no reference: nothing to say
    page.set_input_files("#file", str(files["dot.png"]))
    page.wait_for_function("() => document.getElementById('warnings').children.length === 1")
    assert "1×1 pixels, far smaller than the 32×32" in page.inner_text("#warnings")
    assert page.get_attribute("#warnings", "aria-live") == "polite"
    page.select_option("#version", "1")  # asked again, answered by the version with a reference
    page.wait_for_function("() => document.getElementById('meta-version').textContent === '1'")
    page.wait_for_function("() => document.getElementById('warnings').children.length === 2")
    text = page.inner_text("#warnings")
    assert "does not look like what the model was trained on" in text and "less than 95 % of the validation" in text


CONTRAST_JS = """([texts, borders]) => {
    const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
    const lum = (c) => { const v = rgb(c).slice(0, 3).map((x) => { x /= 255;
        return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
    const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
    const behind = (el) => { for (let e = el; e; e = e.parentElement) {
        const c = getComputedStyle(e).backgroundColor; const a = rgb(c)[3];
        if (a === undefined || a > 0) return c; } return "rgb(255, 255, 255)"; };
    const out = {};
    for (const sel of texts) { const el = document.querySelector(sel);
        out["text " + sel] = ratio(getComputedStyle(el).color, behind(el)); }
    for (const sel of borders) { const el = document.querySelector(sel);
        out["border " + sel] = ratio(getComputedStyle(el).borderTopColor, behind(el.parentElement)); }
    return out;
}"""


def test_contrast_of_text_and_controls_meets_wcag_aa(page, site):
    """Colours as the browser computes them from page.css: text ≥ 4.5:1 against what is behind it, control
    boundaries ≥ 3:1 (WCAG 2.2 AA 1.4.3 and 1.4.11), the "choose a file" link included while the drop zone
    has the focus (its background changes)."""
    url, files = site
    open_page(page, url)
    page.focus("#file")  # the drop zone's :focus-within background, once its 0.15 s transition is over
    page.wait_for_function("() => getComputedStyle(document.getElementById('drop')).backgroundColor === "
                           "'rgb(227, 236, 252)'")
    texts = [".tagline", ".drop-text strong", ".drop-text > span", "#bars-empty", "#cam-empty",
             ".foot", "#h-image", "#limits", "#classes", "#state-text", ".field", ".cam-tools"]
    touch = page.evaluate("() => matchMedia('(pointer: coarse)').matches")
    texts.append("#camera" if touch else ".drop-text .link")  # a phone offers the camera, not a link to a file
    borders = ["#version", "#layer", "#api-key", "#drop"]
    low = {k: round(v, 2) for k, v in page.evaluate(CONTRAST_JS, [texts, borders]).items()
           if v < (4.5 if k.startswith("text") else 3.0)}
    assert not low, low
    page.evaluate("() => document.activeElement.blur()")
    page.set_input_files("#file", str(files["dot.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    page.wait_for_selector("#warnings li")
    texts = [".bar-label", ".bar-value", "#bars-hint", "#warnings li", "#file-name", "#meta-model", ".facts dt",
             ".feedback-q", ".feedback-no"]
    low = {k: round(v, 2) for k, v in page.evaluate(CONTRAST_JS, [texts, [".bar", "#feedback-label"]]).items()
           if v < (4.5 if k.startswith("text") else 3.0)}
    assert not low, low


def test_keyboard_only_upload_and_the_live_regions(page, site):
    """Tab to the file input, open the chooser with the keyboard, then Tab to another class and press Enter;
    the input keeps its own name after an upload, the spinners have text, the messages are live regions and
    the overlay's alt text says where the heat is."""
    url, files = site
    choosers = []  # listening from the start: the chooser is intercepted well before the key is pressed
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    open_page(page, url)
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "file":
            break
    assert page.evaluate("() => document.activeElement.id") == "file"
    name_before = page.locator("#file").evaluate("(e) => e.getAttribute('aria-label')")
    page.keyboard.press("Space")
    for _ in range(150):
        if choosers:
            break
        page.wait_for_timeout(100)
    assert choosers, "Space on the focused file input opened no file chooser"
    choosers[0].set_files(str(files["photo.png"]))
    page.wait_for_selector("#bars .bar >> nth=4")
    wait_overlay(page)
    alt = page.get_attribute("#overlay", "alt")
    assert alt.startswith("Grad-CAM heat map of ") and "the evidence is strongest " in alt
    assert page.get_by_role("button", name=page.locator(".bar-label").first.inner_text()).count() == 1
    assert page.get_by_label("Choose an image to classify").count() == 1
    assert page.locator("#file").evaluate("(e) => e.getAttribute('aria-label')") == name_before
    assert page.get_attribute("#preview", "alt") == ""  # not the input's name any more
    first = page.get_attribute("#overlay", "data-explained")
    page.locator("#bars .bar").nth(1).focus()
    page.keyboard.press("Enter")
    other = page.locator("#bars .bar").nth(1).get_attribute("data-index")
    page.wait_for_function(f"() => document.getElementById('overlay').dataset.explained === '{other}'")
    assert other != first
    for sel in ("#warnings", "#cam-empty", "#cam-caption", "#model-state", "#bars"):
        assert page.get_attribute(sel, "aria-live") == "polite", sel
    assert page.get_attribute("#error", "role") == "alert"
    for spinner in ("#busy", "#cam-busy"):
        assert page.get_attribute(spinner, "role") == "status" and page.text_content(spinner).strip().endswith("…")
    assert page.get_attribute("#bars .bar >> nth=0", "aria-describedby") == "bars-hint"
    assert "Choose a class" in page.inner_text("#bars-hint")


def test_the_crop_is_outlined_on_the_preview_and_layers_are_in_words(page, site):
    """An 80×60 photo: the network sees its centre 60×60 square, outlined on the preview with a sentence; the
    caption and the picker say what a layer shows in words, with the expert name kept."""
    url, files = site
    open_page(page, url)
    page.wait_for_selector("#classes:not([hidden])")  # the model's crop size is known
    page.set_input_files("#file", str(files["other.png"]))
    page.wait_for_selector("#crop:not([hidden])")
    style = page.evaluate("() => { const s = document.getElementById('crop').style; "
                          "return [s.left, s.top, s.width, s.height].map(parseFloat); }")
    assert [round(v, 1) for v in style] == [12.5, 12.5, 75.0, 75.0]
    drop, crop = page.locator("#drop").bounding_box(), page.locator("#crop").bounding_box()
    assert abs(crop["width"] - crop["height"]) < 1.5 and crop["width"] < 0.8 * drop["width"]
    assert "the part the network sees" in page.inner_text("#crop-note")
    wait_overlay(page)
    caption = page.inner_text("#cam-caption")
    assert "evidence for object parts, a coarse grid · block4_relu2 (4×4)" in caption
    options = page.locator("#layer option").all_inner_texts()
    assert options[0].startswith("Default: the deepest layer whose grid is 4×4")
    assert "pool3" in options[2] and options[2].startswith("Textures")
    page.set_input_files("#file", str(files["dot.png"]))  # square: the network sees all of it, nothing to outline
    page.wait_for_function("() => document.getElementById('file-name').textContent.startsWith('dot.png')")
    page.wait_for_selector("#bars .bar >> nth=4")
    assert page.is_hidden("#crop") and page.is_hidden("#crop-note")


def test_phone_offers_the_camera_and_points_to_the_heat_map(browser, site):
    """On a touch phone: "Choose a photo" and a camera input (capture) instead of "Drop an image here"; after an
    upload the answer is scrolled into view and a link points down to the heat map. A desktop keeps the drop."""
    url, files = site
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.set_default_timeout(15_000)
    try:
        open_page(page, url)
        assert page.inner_text("#drop-title") == "Choose a photo" and "Drop" not in page.inner_text(".top")
        assert page.is_visible("#camera") and page.get_attribute("#camera-input", "capture") == "environment"
        assert page.evaluate("() => window.scrollY") == 0
        page.set_input_files("#camera-input", str(files["photo.png"]))
        page.wait_for_selector("#bars .bar >> nth=4")
        assert page.evaluate("() => window.scrollY") > 100  # the bars brought up from below the photo
        bars_top = page.locator("#h-top").bounding_box()["y"]
        assert 0 <= bars_top < 844
        assert page.is_visible("#to-cam") and "heat map" in page.inner_text("#to-cam")
        wait_overlay(page)
        page.click("#to-cam")
        assert page.evaluate("() => document.activeElement.id") == "h-cam"
        page.wait_for_function("() => { const r = document.getElementById('overlay').getBoundingClientRect(); "
                               "return r.top < innerHeight && r.bottom > 0; }")
    finally:
        page.close()
    desk = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        open_page(desk, url)
        assert desk.inner_text("#drop-title") == "Drop an image here" and desk.is_hidden("#camera")
    finally:
        desk.close()


def test_is_this_right_stores_the_visitors_label(page, site):
    """After an answer: "Yes" stores the top class as the visitor's label, "No, it is" + a class stores that one
    (a user report, through POST v2/models/{name}/feedback); the form says so and is not sent twice."""
    from vggnet import store

    url, files = site
    open_page(page, url)
    page.set_input_files("#file", str(files["photo.png"]))
    page.wait_for_selector("#feedback:not([hidden])")
    first = page.locator(".bar-label").first.inner_text()
    page.click("#feedback-yes")
    page.wait_for_function("() => document.getElementById('feedback-status').textContent.startsWith('Thank you')")
    assert page.inner_text("#feedback-status") == f"Thank you: recorded as {first}."
    assert page.is_disabled("#feedback-send")
    page.set_input_files("#file", str(files["other.png"]))  # a new answer: the form is offered again
    page.wait_for_function("() => !document.getElementById('feedback-send').disabled")
    page.select_option("#feedback-label", "frog")
    page.click("#feedback-send")
    page.wait_for_function("() => document.getElementById('feedback-status').textContent.startsWith('Thank you')")
    engine = store.connect(files["store"])
    try:
        labels = [(r["label"], r["source"]) for r in store.read_labels(engine)]
    finally:
        engine.dispose()
    assert labels[-2:] == [(first, "user"), ("frog", "user")]
