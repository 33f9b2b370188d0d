"""Upload storm: many concurrent uploads of a large JPEG against `vggnet serve`, with and without admission.

Each arm starts `vggnet serve` in its own process on 127.0.0.1 with a tiny model (the storm is about
receiving and decoding bodies, not about the network), then sends `--uploads` concurrent POST /predict
requests of one large noise JPEG while a separate process polls GET /v2/health/live every 50 ms. It
records every status code, the liveness latencies and the server's peak resident memory (VmHWM from
/proc). The anchor is `--max-concurrency 0` (no admission: every body is read and decoded at once, the
server's behaviour before admission existed), run in the same invocation.

Every arm runs ``--repeats`` times, interleaved; the table gives medians and ranges, and the slowest probe
of all runs. ``benchmarks/serve_load.py`` runs this storm as one of its scenarios.

    .venv/bin/python benchmarks/serve_storm.py [--uploads 64] [--arms 0,16,4] [--repeats 3] [--megapixels 27]
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


def storm(ckpt: Path, image: bytes, uploads: int, arms: list[int], repeats: int, max_body_mb: float) -> list[dict]:
    """Every arm ``repeats`` times, interleaved (the order rotates each round, so no arm always runs first or
    right after the heaviest one); one fresh server per run, since peak RSS is a process's lifetime peak."""
    runs = []
    for r in range(repeats):
        for concurrency in arms[r % len(arms):] + arms[:r % len(arms)]:
            run = {"repeat": r, **run_arm(ckpt, image, uploads, concurrency, max_body_mb)}
            print(f"  storm round {r + 1}/{repeats}, max_concurrency {concurrency or 'none'}: "
                  f"{json.dumps(run['statuses'])}, peak RSS {run['peak_rss_mb']:.0f} MiB, "
                  f"liveness max {run['live_max_ms']:.0f} ms", flush=True)
            runs.append(run)
    return runs


def summarise(runs: list[dict]) -> list[dict]:
    """Per arm: statuses summed over its runs; median and range of peak RSS and liveness p99; the slowest
    probe of all its runs (the "throughout" figure)."""
    out = []
    for concurrency in dict.fromkeys(r["max_concurrency"] for r in runs):
        mine = [r for r in runs if r["max_concurrency"] == concurrency]
        statuses: dict[str, int] = {}
        for r in mine:
            for code, n in r["statuses"].items():
                statuses[code] = statuses.get(code, 0) + n

        def spread(key: str, mine: list[dict] = mine) -> dict:
            values = [r[key] for r in mine]
            return {"median": float(np.median(values)), "min": min(values), "max": max(values)}

        out.append({"max_concurrency": concurrency, "runs": len(mine), "statuses": dict(sorted(statuses.items())),
                    "peak_rss_mb": spread("peak_rss_mb"), "idle_rss_mb": spread("idle_rss_mb"),
                    "live_p99_ms": spread("live_p99_ms"), "live_max_ms": max(r["live_max_ms"] for r in mine),
                    "live_probes": sum(r["live_probes"] for r in mine),
                    "live_failures": sum(r["live_failures"] for r in mine), "wall_s": spread("wall_s")})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| max_concurrency | runs | statuses (all runs) | peak RSS MiB, median [min–max] | idle RSS "
             "| liveness p99 ms, median [min–max] | slowest probe ms | probe failures |",
             "|---|---|---|---|---|---|---|---|"]
    for a in summary:
        rss, p99 = a["peak_rss_mb"], a["live_p99_ms"]
        lines.append(f"| {a['max_concurrency'] or 'none (anchor)'} | {a['runs']} | {json.dumps(a['statuses'])} "
                     f"| {rss['median']:.0f} [{rss['min']:.0f}–{rss['max']:.0f}] | {a['idle_rss_mb']['median']:.0f} "
                     f"| {p99['median']:.0f} [{p99['min']:.0f}–{p99['max']:.0f}] | {a['live_max_ms']:.0f} "
                     f"| {a['live_failures']} |")
    return "\n".join(lines)


def tiny_checkpoint(folder: Path) -> Path:
    """The storm is about receiving and decoding bodies, not the network: a tiny model keeps inference out."""
    import vggnet

    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap")
    return vggnet.save_checkpoint(model, folder / "best.safetensors",
                                  {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=64)
    ap.add_argument("--arms", default="0,16,4", help="--max-concurrency of each arm; 0 = no admission (anchor)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every arm, interleaved")
    ap.add_argument("--megapixels", type=float, default=27.0)
    ap.add_argument("--max-body-mb", type=float, default=32.0)
    ap.add_argument("--out", default=str(HERE / "results" / "serve_storm.json"))
    args = ap.parse_args()
    import torch  # noqa: F401  (imported here so `--help` is fast)

    image = big_jpeg(args.megapixels)
    print(f"upload: {len(image) / 2**20:.1f} MiB JPEG of {args.megapixels:g} MP, {args.uploads} at once", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = storm(tiny_checkpoint(Path(tmp)), image, args.uploads, [int(c) for c in args.arms.split(",")],
                     args.repeats, args.max_body_mb)
    summary = summarise(runs)
    print(table(summary))
    write_results(Path(args.out), "serve_storm", args, upload_bytes=len(image), summary=summary, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
