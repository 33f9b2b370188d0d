"""Serving load test: `vggnet serve` with dynamic batching on and off vs the naive one-forward-per-request server.

Three servers on 127.0.0.1, each a separate process serving the same checkpoint
(by default the previous ``cifar10`` recipe's network — VGG-16-BN at half width, GAP head, 10 classes, 32×32 —
with random weights, which do not change the speed):

* ``naive``: the seeds' pattern — a minimal FastAPI app whose handler decodes the upload and runs
  ``Predictor.predict`` on it, one forward pass per request, in the threadpool (as a threaded Flask app
  would): concurrent requests run concurrent forward passes that share the cores;
* ``vggnet, batching off``: ``vggnet serve --no-batching``: one worker per model, one request per pass;
* ``vggnet, batching on``: ``vggnet serve`` with dynamic batching (``--max-batch-size``, ``--max-delay-ms``).

Every arm gets the same request: ``POST /predict`` with a JPEG (32×32 by default) as the raw body, top-5
labels back. The load generator keeps ``C`` keep-alive connections busy (closed loop, concurrency 1, 4, 16)
for ``--duration`` seconds after ``--warmup``, with a minimal HTTP/1.1 client on asyncio so it takes little
CPU from the servers. All three servers are up at once (an idle one takes no CPU) and the cells are
interleaved: ``--repeats`` rounds, each running every (concurrency, server) cell once with the servers' order
rotated from round to round, so a drift of the shared machine lands on every arm alike. It reports, per
cell, the median and range over the rounds of throughput and p50/p99 latency, errors, the mean batch size
(from the server's /metrics) and the throughput ratio to the naive server — computed per round from the
adjacent naive cell, then summarised, since absolute numbers on a shared machine drift.

The storm scenario (``--storm-repeats``, 0 to skip) then runs ``serve_storm.py``'s measurement: 64 uploads
of a 30 MiB JPEG at once against ``vggnet serve`` without admission and at ``--max-concurrency`` 16 and 4,
each arm ``--storm-repeats`` times, interleaved, a fresh server per run (peak RSS is a lifetime peak).

Every server gets the same OpenMP settings, ``OMP_WAIT_POLICY=PASSIVE`` by default as in
``deploy/Dockerfile`` (libgomp's spinning made the single-worker servers' forwards 20-50x slower on a
2-core machine shared with another CPU job). The
throughput part is bounded by ``--budget`` seconds: the plan is checked up front and cells stop at the deadline.

    .venv/bin/python benchmarks/serve_load.py                       # the full run (~7 min), writes the JSON
    .venv/bin/python benchmarks/serve_load.py --duration 1 --warmup 0.3 --repeats 1 --concurrency 1 16 \
        --storm-repeats 0 --out /tmp/x.json                         # a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Request  # at module level: FastAPI resolves the handler's postponed annotations here
from PIL import Image

import serve_storm  # benchmarks/serve_storm.py, beside this script
import vggnet
from machine import cpu_name  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
STARTUP_ESTIMATE_S = 5.0  # import torch + fastapi, load, warm up: what the plan check assumes per server
ARMS = ("naive", "batching-off", "batching-on")
LABELS = {"naive": "naive (1 forward / request, threadpool)", "batching-off": "vggnet serve, batching off",
          "batching-on": "vggnet serve, batching on"}


# --- the naive server (this script, run with --naive-server) ------------------------------------------------


def naive_app(ckpt: str):
    """The seeds' pattern: decode, preprocess and one forward pass per request, in a sync handler."""
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from vggnet.infer import Predictor

    predictor = Predictor.from_checkpoint(ckpt)
    app = FastAPI()

    def handle(data: bytes, topk: int) -> dict:
        image = Image.open(io.BytesIO(data))
        top = predictor.predict([image], topk=topk)[0]
        return {"predictions": [{"label": label, "probability": p} for label, p in top]}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        return await run_in_threadpool(handle, await request.body(), int(request.query_params.get("topk", 5)))

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def run_naive_server(ckpt: str, port: int, threads: int | None) -> None:
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    uvicorn.run(naive_app(ckpt), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- load generation ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    arm: str
    concurrency: int
    repeat: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    completed: int = 0  # every answer, warm-up included: what a server's CPU time over the whole cell served

    def row(self) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return 1000 * lat[min(len(lat) - 1, max(0, math.ceil(q / 100 * len(lat)) - 1))]  # nearest rank

        return {"arm": self.arm, "label": LABELS[self.arm], "concurrency": self.concurrency, "repeat": self.repeat,
                "requests": len(lat), "errors": self.errors, "seconds": round(self.seconds, 3),
                "req_per_s": len(lat) / self.seconds if self.seconds else 0.0,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "mean_ms": 1000 * statistics.fmean(lat) if lat else None, "error_samples": self.error_samples[:3]}


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(match.group(1)))
    return status


async def _client(port: int, request: bytes, cell: Cell, measure_from: float, stop_at: float) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.perf_counter()
            status = await _one(reader, writer, request)
            end = time.perf_counter()
            cell.completed += 1
            if measure_from <= end <= stop_at:  # completions inside the window: throughput and latency
                if status == 200:
                    cell.latencies.append(end - start)
                else:
                    cell.errors += 1
                    cell.error_samples.append(f"HTTP {status}")
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError) as exc:
            if time.perf_counter() >= measure_from:
                cell.errors += 1
                cell.error_samples.append(repr(exc))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def run_cell(arm: str, port: int, request: bytes, concurrency: int, warmup: float, duration: float,
             repeat: int = 0) -> Cell:
    cell = Cell(arm, concurrency, repeat)

    async def main() -> None:
        t0 = time.perf_counter()
        measure_from, stop_at = t0 + warmup, t0 + warmup + duration
        await asyncio.gather(*(_client(port, request, cell, measure_from, stop_at) for _ in range(concurrency)))

    asyncio.run(main())
    cell.seconds = duration
    return cell


def http_request(path: str, body: bytes, content_type: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram, all models."""
    status, body = get(port, "/metrics")
    if status != 200:
        return 0.0, 0.0
    text = body.decode()
    total = sum(float(v) for v in re.findall(r"^vggnet_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^vggnet_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


# --- servers ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(arm: str, ckpt: Path, port: int, args: argparse.Namespace) -> list[str]:
    if arm == "naive":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-server", "--ckpt", str(ckpt),
               "--port", str(port)]
        return cmd + (["--threads", str(args.threads)] if args.threads else [])
    cmd = [sys.executable, "-m", "vggnet", "serve", "--ckpt", str(ckpt), "--name", "bench", "--port", str(port),
           "--no-access-log", "--log-level", "warning", "--runtime", args.runtime,
           "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return cmd + (["--no-batching"] if arm == "batching-off" else [])


def start_server(cmd: list[str], port: int, deadline: float, env: dict[str, str]) -> subprocess.Popen:
    """Start a server process (stderr to a temporary file: a pipe nobody reads could fill and block it)."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read()[-2000:]}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError("server did not become ready before the time budget ran out")
        try:
            if get(port, "/v2/health/ready")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- main ---------------------------------------------------------------------------------------------------


def make_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    model = vggnet.create_model(args.model, num_classes=10, width=args.width, head="gap")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"classes": classes, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
            "image_size": args.image_size}
    return vggnet.save_checkpoint(model, folder / "bench" / "best.safetensors", meta)


def test_image(size: int) -> bytes:
    """A deterministic, textured JPEG of size×size (CIFAR-sized by default)."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def spread(values: list[float | None]) -> dict | None:
    """Median and range: what a few interleaved rounds can honestly say."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict], arms: list[str], concurrency: list[int]) -> list[dict]:
    """One line per (server, concurrency) over the rounds; the ratio to naive is paired within each round."""
    naive = {(r["concurrency"], r["repeat"]): r["req_per_s"] for r in rows if r["arm"] == "naive"}
    out = []
    for arm in arms:
        for c in concurrency:
            cells = [r for r in rows if r["arm"] == arm and r["concurrency"] == c]
            if not cells:
                continue
            ratios = [r["req_per_s"] / naive[c, r["repeat"]] for r in cells if naive.get((c, r["repeat"]))]
            out.append({"arm": arm, "label": LABELS[arm], "concurrency": c, "rounds": len(cells),
                        "requests": sum(r["requests"] for r in cells), "errors": sum(r["errors"] for r in cells),
                        "req_per_s": spread([r["req_per_s"] for r in cells]),
                        "p50_ms": spread([r["p50_ms"] for r in cells]), "p99_ms": spread([r["p99_ms"] for r in cells]),
                        "mean_batch": spread([r.get("mean_batch") for r in cells]),
                        "ratio_vs_naive": spread(ratios)})
    return out


def fmt_spread(s: dict | None, spec: str = ".1f") -> str:
    if s is None:
        return "–"
    if s["min"] == s["max"]:
        return format(s["median"], spec)
    return f"{s['median']:{spec}} [{s['min']:{spec}}–{s['max']:{spec}}]"


def table(summary: list[dict]) -> str:
    lines = ["| server | C | rounds | req/s | p50 ms | p99 ms | errors | mean batch | × naive (paired per round) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['label']} | {r['concurrency']} | {r['rounds']} | {fmt_spread(r['req_per_s'])} "
                     f"| {fmt_spread(r['p50_ms'])} | {fmt_spread(r['p99_ms'])} | {r['errors']} "
                     f"| {fmt_spread(r['mean_batch'], '.2f')} | {fmt_spread(r['ratio_vs_naive'], '.2f')} |")
    return "\n".join(lines) + "\n\nmedian [min–max] over the rounds"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per (server, concurrency) cell")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    p.add_argument("--server-warmup", type=float, default=1.0,
                   help="unmeasured seconds of load at the highest concurrency after each server starts")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every cell (default 3)")
    p.add_argument("--threads", type=int, help="torch threads of every server (default: torch's, = the cores)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "default"),
                   help="OMP_WAIT_POLICY of every server (default: PASSIVE, as deploy/Dockerfile sets it)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--ckpt", help="checkpoint to serve (default: a random-weight model built from --model/--width)")
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--runtime", default="eager", help="runtime of the vggnet arms")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--budget", type=float, default=180.0, help="wall-clock limit of the throughput part in seconds")
    p.add_argument("--storm-repeats", type=int, default=3,
                   help="runs of each storm arm (no admission, --max-concurrency 16 and 4); 0 skips the storm")
    p.add_argument("--storm-uploads", type=int, default=64, help="concurrent uploads of the storm")
    p.add_argument("--storm-megapixels", type=float, default=27.0, help="size of the storm's noise JPEG")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (default: benchmarks/results/serve_load.json)")
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        run_naive_server(args.ckpt, args.port, args.threads)
        return 0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    started = time.monotonic()
    deadline = started + args.budget
    planned = (len(args.arms) * (STARTUP_ESTIMATE_S + args.server_warmup)
               + args.repeats * len(args.arms) * len(args.concurrency) * (args.duration + args.warmup))
    if planned > args.budget:
        p.error(f"the plan needs about {planned:.0f} s, over --budget {args.budget:.0f} s: shorten --duration "
                "or --repeats")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    rows: list[dict] = []
    incomplete = False
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(Path(tmp), args)
        from vggnet.infer import Predictor

        image_size = Predictor.from_checkpoint(ckpt).prep.image_size
        image = test_image(image_size if args.ckpt else args.image_size)
        request = http_request("/predict?topk=5", image, "image/jpeg")
        env = dict(os.environ)  # every arm runs with the same OpenMP settings
        if args.omp_wait_policy == "default":
            env.pop("OMP_WAIT_POLICY", None)
        else:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        ports: dict[str, int] = {}
        procs: list[subprocess.Popen] = []
        try:
            for arm in args.arms:  # all up before the first measured cell; an idle server takes no CPU
                ports[arm] = free_port()
                procs.append(start_server(server_command(arm, ckpt, ports[arm], args), ports[arm], deadline, env))
                if args.server_warmup > 0:  # the first passes after start-up are slow
                    run_cell(arm, ports[arm], request, max(args.concurrency), args.server_warmup, 0.0)
            for r in range(args.repeats):
                for i, c in enumerate(args.concurrency):
                    shift = (r + i) % len(args.arms)  # no server always first, or always after the same one
                    for arm in args.arms[shift:] + args.arms[:shift]:
                        if time.monotonic() + args.warmup + args.duration > deadline:
                            incomplete = True
                            break
                        port = ports[arm]
                        before = batch_stats(port) if arm != "naive" else (0.0, 0.0)
                        row = run_cell(arm, port, request, c, args.warmup, args.duration, r).row()
                        if arm != "naive":
                            after = batch_stats(port)
                            forwards = after[1] - before[1]
                            row["mean_batch"] = (after[0] - before[0]) / forwards if forwards else None
                        rows.append(row)
                        print(f"  round {r + 1}/{args.repeats}  {LABELS[arm]:<42} C={c:<3} {row['req_per_s']:8.1f} "
                              f"req/s  p50 {fmt(row['p50_ms'])} ms  p99 {fmt(row['p99_ms'])} ms  "
                              f"errors {row['errors']}",
                              file=sys.stderr, flush=True)
        finally:
            for proc in procs:
                stop_server(proc)
        throughput_s = time.monotonic() - started
        storm = None
        if args.storm_repeats > 0:
            big = serve_storm.big_jpeg(args.storm_megapixels)
            print(f"storm: {args.storm_uploads} uploads of a {len(big) / 2**20:.1f} MiB JPEG at once", file=sys.stderr,
                  flush=True)
            runs = serve_storm.storm(serve_storm.tiny_checkpoint(Path(tmp)), big, args.storm_uploads, [0, 16, 4],
                                     args.storm_repeats, 32.0)
            storm = {"uploads": args.storm_uploads, "upload_bytes": len(big), "megapixels": args.storm_megapixels,
                     "max_body_mb": 32.0, "model": "vgg11_bn, width 0.125, gap head, 3 classes (inference kept out)",
                     "summary": serve_storm.summarise(runs), "runs": runs}
    summary = summarise(rows, args.arms, args.concurrency)
    top = max(args.concurrency)
    on = next((r for r in summary if r["arm"] == "batching-on" and r["concurrency"] == top), None)
    ratio = on["ratio_vs_naive"] if on else None
    total_errors = sum(r["errors"] for r in rows)
    result = {
        "benchmark": "serving load: POST /predict with a JPEG, closed loop, keep-alive connections, 127.0.0.1",
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "server_torch_threads": args.threads or torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": None if args.omp_wait_policy == "default" else args.omp_wait_policy,
                    "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "model": {"checkpoint": str(args.ckpt) if args.ckpt else f"{args.model}, width {args.width}, gap head, 10 "
                  f"classes, random weights", "image_size": image_size, "request_bytes": len(image)},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "server_warmup_s": args.server_warmup,
                     "repeats": args.repeats, "concurrency": args.concurrency,
                     "runtime": args.runtime, "max_batch_size": args.max_batch_size,
                     "max_delay_ms": args.max_delay_ms, "budget_s": args.budget},
        "summary": summary,
        "rows": rows,
        "target": {"what": f"batching on >= 2x the naive server's throughput at concurrency {top} (median of the "
                           "paired rounds), 0 errors",
                   "ratio": ratio, "errors": total_errors,
                   "met": bool(ratio and ratio["median"] >= 2.0 and total_errors == 0)},
        "storm": storm,
        "incomplete": incomplete,
        "throughput_wall_s": round(throughput_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(table(summary))
    print(f"\nconcurrency {top}: batching on = {fmt_spread(ratio, '.2f')}× naive, errors {total_errors}"
          f"{' (incomplete: time budget reached)' if incomplete else ''}")
    if storm:
        print("\nstorm:\n" + serve_storm.table(storm["summary"]))
    print(f"{result['wall_s']} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
