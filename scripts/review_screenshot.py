"""A screenshot of `vggnet serve`'s review page with real traffic: docs/img/review-desktop.png (1280×800).

A trained demo run answers as version 1 with its epoch-1 weights as a shadow version 2, the prediction store and
kept inputs on; a few of the digits' validation images are sent through /predict, then Chromium opens /review,
the reviewer types the key, and the first queued input is shot (the crop the network saw, both versions' answers,
the class keys).

    .venv/bin/python scripts/review_screenshot.py --run runs/demo      # a run of `vggnet train --recipe demo`
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image
from screenshots import CHROMIUM, _serve  # scripts/screenshots.py, beside this script

KEY = "screenshot-key-0123456789"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a demo run folder (with checkpoints/epoch-0001)")
    p.add_argument("--images", type=int, default=12, help="validation images sent (default: 12)")
    p.add_argument("--out", default="docs/img", help="folder for review-desktop.png")
    args = p.parse_args(argv)

    from fastapi.testclient import TestClient
    from playwright.sync_api import sync_playwright

    from vggnet.data import digits_tensors
    from vggnet.serve import ModelRepository, ServeSettings, create_app

    run = Path(args.run)
    first = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    if not (run / "best.safetensors").exists() or not first.exists():
        raise SystemExit(f"{run}: needs best.safetensors and checkpoints/epoch-0001 (train with --set train.keep=0)")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo" / "digits"
        for version, file in (("1", run / "best.safetensors"), ("2", first)):
            (repo / version).mkdir(parents=True)
            (repo / version / "best.safetensors").symlink_to(file.resolve())
        (repo / "config.yaml").write_text('default_version: "1"\nshadow: ["2"]\n')
        settings = ServeSettings(load_in_background=False, access_log=False, prediction_log=False, api_keys=(KEY,),
                                 store=f"sqlite:///{tmp}/serve.db", keep_inputs=f"{tmp}/kept", review_sample=0.5)
        images, _ = digits_tensors("val", size=32, val_fraction=0.1)
        with TestClient(create_app(ModelRepository.from_dir(repo.parent), settings)) as client:
            for image in images[: args.images]:
                buffer = io.BytesIO()
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
                client.post("/predict", content=buffer.getvalue(),
                            headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"})
        url, server, thread = _serve(create_app(ModelRepository.from_dir(repo.parent), settings))
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
                page.goto(url + "review")
                page.fill("#api-key", KEY)
                page.keyboard.press("Enter")
                page.wait_for_selector("#item:not([hidden])")
                page.wait_for_selector("#input-image:not([hidden])")
                page.wait_for_timeout(400)
                shot = Path(args.out) / "review-desktop.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot))
                print(f"wrote {shot}")
                browser.close()
        finally:
            server.should_exit = True
            thread.join(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
