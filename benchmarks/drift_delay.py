"""How soon the drift alert fires: requests after the traffic changes until a `vggnet_drift_score` passes 0.25.

A demo run (the digits; `--run`, else one is trained here) gets `drift.json` from half of its validation split
(`vggnet monitor reference --limit`); the other half is the in-domain traffic. Each scenario is served in process
by the real app (`/predict` with PNG or JPEG bytes, the server's own 500-prediction window, rescored every 50):
first 600 in-domain requests (the window full of normal traffic), then the shift, with `/metrics` read every 10
requests until any signal's PSI passes the alert threshold or `--max-after` requests have gone by. The in-domain
scenario keeps sending digits instead, and counts false alerts. Shifts: uniform noise, CIFAR-10 photos (the shared
archive), the digits inverted (white background), and a 25 % mix of CIFAR photos into the digits.

    .venv/bin/python benchmarks/drift_delay.py                     # writes benchmarks/results/drift_delay.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import os
import platform
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from machine import cpu_name  # benchmarks/machine.py, beside this script
from vggnet.atomic import write_json
from vggnet.cli import main as cli
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.evaluate.sources import eval_images
from vggnet.infer.reference import ALERT
from vggnet.serve import ModelRepository, ServeSettings, create_app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "drift_delay.json"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
WARM = 600  # in-domain requests before the shift: more than the 500-prediction window


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def cifar(n: int) -> list[bytes]:
    out = []
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(tar.extractfile(member).read())
                if len(out) == n:
                    break
    return out


def scores(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.labels["signal"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "vggnet_drift_score"}


def scenario(ckpt: Path, before: list[bytes], after, max_after: int, poll: int) -> dict:
    """Requests after the shift until any score > ALERT (None: not within max_after), and the scores then."""
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["digits"]),
                     ServeSettings(load_in_background=False, access_log=False, prediction_log=False))
    with TestClient(app) as client:
        def send(data: bytes) -> None:
            media = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            assert client.post("/predict", content=data, headers={"Content-Type": media}).status_code == 200

        for i in range(WARM):
            send(before[i % len(before)])
        at_shift = scores(client)
        for n in range(1, max_after + 1):
            send(after(n - 1))
            if n % poll == 0:
                now = scores(client)
                if max(now.values(), default=0.0) > ALERT:
                    return {"requests_until_alert": n, "scores_at_alert": now, "scores_at_shift": at_shift}
        return {"requests_until_alert": None, "scores_at_end": scores(client), "scores_at_shift": at_shift}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a demo run folder (default: train one here, 12 epochs)")
    p.add_argument("--max-after", type=int, default=1500, help="requests after the shift at most (default 1500)")
    p.add_argument("--poll", type=int, default=10, help="read /metrics every this many requests (default 10)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()
    started = time.monotonic()
    cmdline = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if not args.run:
            train(load_recipe("demo", ["train.tracking=none"]), run, progress=False)
        val, _, _ = eval_images(run, None, "val")
        half = len(val) // 2
        assert cli(["monitor", "reference", "--ckpt", str(run), "--limit", str(half)]) == 0
        used = {hashlib.sha256(t.numpy().tobytes()).digest() for t in eval_images(run, None, "val", limit=half)[0]}
        held = [t.permute(1, 2, 0).numpy() for t in val if hashlib.sha256(t.numpy().tobytes()).digest() not in used]
        digits = [png(x) for x in held]
        rng = np.random.default_rng(0)
        noise = [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(args.max_after)]
        photos = cifar(args.max_after)
        inverted = [png(255 - x) for x in held]
        ckpt = run / "best.safetensors"
        shifts = {
            "none (digits keep coming)": lambda i: digits[(WARM + i) % len(digits)],
            "uniform noise": lambda i: noise[i],
            "CIFAR-10 photos": lambda i: photos[i % len(photos)],
            "digits inverted": lambda i: inverted[(WARM + i) % len(inverted)],
            "25 % CIFAR-10 photos in the digits": lambda i: photos[i // 4 % len(photos)] if i % 4 == 3
            else digits[(WARM + i) % len(digits)],
        }
        results = {}
        for name, after in shifts.items():
            results[name] = scenario(ckpt, digits, after, args.max_after, args.poll)
            print(f"{name:<38} alert after {results[name]['requests_until_alert']} requests", flush=True)
    lines = ["| traffic after the shift | requests until a drift score > 0.25 | the scores then |", "|---|---|---|"]
    for name, r in results.items():
        shown = r.get("scores_at_alert") or r.get("scores_at_end") or {}
        n = r["requests_until_alert"]
        lines.append(f"| {name} | {n if n is not None else f'none within {args.max_after}'} | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()) + " |")
    table = "\n".join(lines)
    print(table)
    write_json(Path(args.out), {
        "benchmark": "drift detection delay: requests after a traffic shift until vggnet_drift_score > 0.25",
        "command": cmdline, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "settings": {"window": 500, "rescored_every": 50, "poll_every": args.poll, "in_domain_before": WARM,
                     "max_after": args.max_after, "alert": ALERT, "run": args.run or "demo, trained here"},
        "results": results, "table": table, "wall_s": round(time.monotonic() - started, 1)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
