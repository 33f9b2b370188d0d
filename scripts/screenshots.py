"""Screenshots of ``vggnet serve``'s web page after a real prediction: docs/img/web-desktop.png (1280×800) and
docs/img/web-phone.png (390×844), shown in the README's Serving section.

    .venv/bin/python scripts/screenshots.py                      # the CIFAR-10 runs of benchmarks/compression.py
    .venv/bin/python scripts/screenshots.py --ckpt runs/cifar10 --image cat.jpg --out /tmp/shots

Each ``--ckpt`` (a run folder or .safetensors file) becomes one version of the model ``--name`` (1, 2, ... in
the order given), so two of them show the version picker. The server is the real one (uvicorn on 127.0.0.1, a
free port), the browser Debian's Chromium (``apt-get install chromium``) driven by Playwright's Python package
(``pip install playwright``; no ``playwright install``: the system browser is used).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


def _serve(app):  # noqa: ANN001, ANN202 - uvicorn in a thread, on a free port
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/", server, thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", metavar="RUN",
                   help="run folder or .safetensors, repeatable (default: runs/compression/base and pruned-50)")
    p.add_argument("--name", default="cifar10", help="the served model's name (default: cifar10)")
    p.add_argument("--image", default="data/cifar10/train/cat/0001.jpg", help="the image to upload")
    p.add_argument("--phone-image", help="the image uploaded on the phone (default: --image)")
    p.add_argument("--layer", default="pool3", help="the page's Grad-CAM layer choice (default: pool3, 4×4 on "
                   "a 32-px model, where the last conv's map is 2×2; '' for the server's default)")
    p.add_argument("--out", default="docs/img", help="folder for web-desktop.png and web-phone.png")
    p.add_argument("--chromium", default=CHROMIUM, help=f"the browser binary (default: {CHROMIUM})")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from vggnet.serve import ModelRepository, ServeSettings, create_app

    ckpts = [Path(c) for c in (args.ckpt or ["runs/compression/base", "runs/compression/pruned-50"])]
    image = Path(args.image)
    images = {"desktop": image, "phone": Path(args.phone_image or args.image)}
    for path in [*ckpts, *images.values()]:
        if not path.exists():
            raise SystemExit(f"not found: {path}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.name
        for i, ckpt in enumerate(ckpts, 1):
            version = model_dir / str(i)
            version.mkdir(parents=True)
            file = ckpt if ckpt.is_file() else next(f for f in (ckpt / "best.safetensors", ckpt / "last.safetensors")
                                                    if f.exists())
            (version / "best.safetensors").symlink_to(file.resolve())
            for extra in ("ood.json", "recipe.yaml"):  # the page's out-of-domain reference, stored or computed
                if (file.parent / extra).exists():
                    (version / extra).symlink_to((file.parent / extra).resolve())
        app = create_app(ModelRepository.from_dir(tmp), ServeSettings(load_in_background=False, access_log=False))
        url, server, thread = _serve(app)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                for kind, (width, height) in SIZES.items():
                    phone = kind == "phone"  # a touch phone: "Choose a photo" and the camera button
                    page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1,
                                            is_mobile=phone, has_touch=phone)
                    page.goto(url)
                    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
                    page.select_option("#layer", args.layer)
                    page.wait_for_selector("#model-state:not([hidden])")
                    page.set_input_files("#file", str(images[kind]))
                    page.wait_for_selector("#overlay:not([hidden])")
                    page.wait_for_function("() => document.getElementById('overlay').complete")
                    page.wait_for_timeout(400)  # the bars' width transition
                    shot = out / f"web-{kind}.png"
                    if phone:  # the whole page, by a viewport as tall as it: Chromium's full-page capture drops the
                        # touch emulation while it shoots, and the page (listening) would switch back to "Drop"
                        page.evaluate("() => window.scrollTo(0, 0)")
                        tall = page.evaluate("() => document.documentElement.scrollHeight")
                        page.set_viewport_size({"width": width, "height": tall})
                        page.wait_for_timeout(200)
                    page.screenshot(path=str(shot))
                    print(f"wrote {shot} ({width}×{height}{', full page' if kind == 'phone' else ''})")
                    page.close()
                browser.close()
        finally:
            server.should_exit = True
            thread.join(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
