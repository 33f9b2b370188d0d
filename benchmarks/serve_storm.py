"""Upload storm: many concurrent uploads of a large JPEG against `vggnet serve`, with and without admission.

Each arm starts `vggnet serve` in its own process on 127.0.0.1 with a tiny model (the storm is about
receiving and decoding bodies, not about the network), then sends `--uploads` concurrent POST /predict
requests of one large noise JPEG while a separate process polls GET /v2/health/live every 50 ms. It
records every status code, the liveness latencies and the server's peak resident memory (VmHWM from
/proc). The anchor is `--max-concurrency 0` (no admission: every body is read and decoded at once, the
server's behaviour before admission existed), run in the same invocation.

    .venv/bin/python benchmarks/serve_storm.py [--uploads 64] [--arms 0,16,4] [--megapixels 27]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from machine import write_results  # benchmarks/machine.py, beside this script

HERE = Path(__file__).resolve().parent


def big_jpeg(megapixels: float, seed: int = 0) -> bytes:
    """Noise compresses badly, so a noise JPEG at quality 95 is about as large as a photo can get per pixel."""
    side = int((megapixels * 1e6) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def poll_liveness(url: str, stop: mp.Event, out: mp.Queue) -> None:
    """In its own process, so the uploading threads cannot delay the probe on the client side."""
    latencies, failures = [], 0
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = http.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            failures += not ok
            time.sleep(0.05)
    out.put((latencies, failures))


def run_arm(ckpt: Path, image: bytes, uploads: int, concurrency: int, max_body_mb: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vggnet", "serve", "--ckpt", str(ckpt), "--port", str(port), "--no-access-log",
           "--max-concurrency", str(concurrency), "--max-body-mb", str(max_body_mb), "--max-queue", "1024",
           "--log-level", "warning"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("vggnet serve did not become ready")
            time.sleep(0.2)
        base_rss = peak_rss_mb(server.pid)
        stop, results = mp.Event(), mp.Queue()
        poller = mp.Process(target=poll_liveness, args=(url, stop, results))
        poller.start()
        time.sleep(0.5)

        def upload(_: int) -> int:
            try:
                with httpx.Client(timeout=120) as http:
                    reply = http.post(f"{url}/predict", content=image, headers={"content-type": "image/jpeg"})
                    return reply.status_code
            except httpx.HTTPError:
                return -1  # connection error: neither an answer nor a refusal

        start = time.perf_counter()
        with ThreadPoolExecutor(uploads) as pool:
            statuses = list(pool.map(upload, range(uploads)))
        wall = time.perf_counter() - start
        time.sleep(0.3)
        stop.set()
        latencies, failures = results.get(timeout=30)
        poller.join(10)
        peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    lat_ms = np.array(latencies) * 1000
    counts = {str(code): statuses.count(code) for code in sorted(set(statuses))}
    return {"max_concurrency": concurrency, "statuses": counts, "peak_rss_mb": peak, "idle_rss_mb": base_rss,
            "live_probes": len(lat_ms), "live_failures": failures, "live_p50_ms": float(np.median(lat_ms)),
            "live_p99_ms": float(np.percentile(lat_ms, 99)), "live_max_ms": float(lat_ms.max()),
            "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=64)
    ap.add_argument("--arms", default="0,16,4", help="--max-concurrency of each arm; 0 = no admission (anchor)")
    ap.add_argument("--megapixels", type=float, default=27.0)
    ap.add_argument("--max-body-mb", type=float, default=32.0)
    ap.add_argument("--out", default=str(HERE / "results" / "serve_storm.json"))
    args = ap.parse_args()
    import torch  # noqa: F401  (imported here so `--help` is fast)

    import vggnet

    image = big_jpeg(args.megapixels)
    print(f"upload: {len(image) / 2**20:.1f} MiB JPEG of {args.megapixels:g} MP, {args.uploads} at once", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap")
        ckpt = vggnet.save_checkpoint(model, Path(tmp) / "best.safetensors",
                                      {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3,
                                       "image_size": 32})
        arms = [run_arm(ckpt, image, args.uploads, int(c), args.max_body_mb) for c in args.arms.split(",")]
    print("| max_concurrency | statuses | peak RSS (MiB) | idle RSS | liveness p50 / p99 / max (ms) | probe failures "
          "| wall (s) |\n|---|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['max_concurrency'] or 'none (anchor)'} | {json.dumps(a['statuses'])} | {a['peak_rss_mb']:.0f} "
              f"| {a['idle_rss_mb']:.0f} | {a['live_p50_ms']:.1f} / {a['live_p99_ms']:.1f} / {a['live_max_ms']:.1f} "
              f"| {a['live_failures']} | {a['wall_s']:.1f} |")
    write_results(Path(args.out), "serve_storm", args, upload_bytes=len(image), arms=arms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
