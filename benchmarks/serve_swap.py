"""A swap under load: `vggnet serve --registry URI --model M` while the champion alias moves (issue 31).

Two versions of a small random-weight VGG (by default the ``cifar10`` recipe's network, VGG-16-BN at half width,
GAP head, 32×32, as ``serve_load.py`` and ``serve_store.py`` serve it; two seeds) are registered in an MLflow
registry (SQLite in a temporary folder). One server process follows it (``--registry-poll-s``, default 0.5 s). A
closed-loop load of ``--concurrency`` keep-alive connections (the request and HTTP handling of ``serve_load.py``:
``POST /predict`` with a JPEG) runs for the whole time while this script moves ``champion`` between the two
versions ``--swaps`` times, every ``--every`` seconds. The retired version is closed after each swap, so every
swap loads the new version from its file, warms it up beside the running one, routes to it, then drains the old.

Each answer is kept with its start and end time, status and ``x-model-version``. A **swap window** runs from the
alias change until ``--window`` seconds after the new version's first answer (the old version's drain and close
lie in it); every other measured request is **steady**. A request is in a window if its lifetime overlaps it. The
script reports requests, errors (the issue's bar: 0) and p50 / p99 / max latency for swap windows and steady
windows, and per swap the time from the alias change to the new version's first answer (poll + load + warm-up).

The machine this runs on may be shared (the numbers of a 2-core machine shared with other jobs are noisy; the
error count is not).

    .venv/bin/python benchmarks/serve_swap.py                # writes benchmarks/results/serve_swap.json
    .venv/bin/python benchmarks/serve_swap.py --swaps 2 --every 4 --out /tmp/swap.json   # a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import serve_load as load  # benchmarks/serve_load.py, beside this script: HTTP request, server start / stop
import vggnet
from machine import cpu_name  # benchmarks/machine.py, beside this script
from vggnet.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_swap.json"
MODEL = "bench"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Answer:
    start: float
    end: float
    status: int  # 0: the connection failed
    version: str


def make_run(folder: Path, seed: int, args: argparse.Namespace) -> Path:
    """A run folder with a random-weight checkpoint (``serve_load.make_checkpoint``'s network, seeded)."""
    torch.manual_seed(seed)
    model = vggnet.create_model(args.model, num_classes=10, width=args.width, head="gap")
    meta = {"classes": CLASSES, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
            "image_size": args.image_size}
    vggnet.save_checkpoint(model, folder / "best.safetensors", meta)
    return folder


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, str]:
    """One request on a keep-alive connection: (status, the answering version)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(length.group(1)))
    version = re.search(rb"(?i)\r\nx-model-version:\s*([^\r]+)", head)
    return int(head.split(b" ", 2)[1]), version.group(1).decode() if version else ""


async def _client(port: int, request: bytes, answers: list[Answer], stop_at: float) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, version = await _one(reader, writer, request)
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError) as exc:
            answers.append(Answer(start, time.perf_counter(), 0, repr(exc)))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
            continue
        answers.append(Answer(start, time.perf_counter(), status, version))
    if writer is not None:
        writer.close()


def flip_champion(uri: str, versions: tuple[str, str], swaps: int, first_at: float, every: float,
                  flips: list[tuple[float, str]]) -> None:
    """Move ``champion`` to the other version ``swaps`` times (a thread beside the load); the times kept."""
    from vggnet.registry import open_registry

    client = open_registry(uri)
    target = versions[1]
    for i in range(swaps):
        time.sleep(max(0.0, first_at + i * every - time.perf_counter()))
        client.set_registered_model_alias(MODEL, "champion", target)
        flips.append((time.perf_counter(), target))
        target = versions[0] if target == versions[1] else versions[1]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile in ms (serve_load.Cell's rule)."""
    values = sorted(values)
    if not values:
        return None
    return 1000 * values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def stats(answers: list[Answer]) -> dict:
    ok = [a.end - a.start for a in answers if a.status == 200]
    return {"requests": len(answers), "errors": sum(a.status != 200 for a in answers),
            "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99), "max_ms": 1000 * max(ok) if ok else None,
            "mean_ms": 1000 * statistics.fmean(ok) if ok else None,
            "error_samples": sorted({f"{a.status} {a.version}" for a in answers if a.status != 200})[:3]}


def windows(answers: list[Answer], flips: list[tuple[float, str]], window_s: float) -> list[dict]:
    """Each swap: from the alias change to ``window_s`` after the new version's first answer."""
    out = []
    for i, (at, target) in enumerate(flips):
        nxt = flips[i + 1][0] if i + 1 < len(flips) else math.inf
        first_new = min((a.end for a in answers if a.end > at and a.version == target and a.status == 200),
                        default=None)
        last_old = max((a.end for a in answers if at < a.end < nxt and a.status == 200 and a.version != target),
                       default=None)
        end = (first_new if first_new is not None else at) + window_s
        out.append({"swap": i + 1, "to_version": target, "start": at, "end": end,
                    "alias_to_first_new_answer_s": None if first_new is None else first_new - at,
                    "alias_to_last_old_answer_s": None if last_old is None else last_old - at})
    return out


def classify(answers: list[Answer], wins: list[dict], measure_from: float) -> tuple[list[Answer], list[Answer]]:
    """(in a swap window, steady): a request whose lifetime overlaps a window is in it."""
    swap, steady = [], []
    for a in answers:
        if a.end < measure_from:
            continue
        (swap if any(a.start < w["end"] and a.end > w["start"] for w in wins) else steady).append(a)
    return swap, steady


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def table(summary: dict, wins: list[dict]) -> str:
    lines = ["| windows | requests | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for kind in ("swap", "steady", "all"):
        s = summary[kind]
        lines.append(f"| {kind} | {s['requests']} | {s['errors']} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} "
                     f"| {fmt(s['max_ms'])} |")
    lines += ["", "| swap | to version | alias → first answer of the new version (s) | alias → last answer of the "
              "old (s) | requests in window | errors | p99 ms |", "|---|---|---|---|---|---|---|"]
    for w in wins:
        lines.append(f"| {w['swap']} | {w['to_version']} | {fmt(w['alias_to_first_new_answer_s'], '.2f')} "
                     f"| {fmt(w['alias_to_last_old_answer_s'], '.2f')} | {w['requests']} | {w['errors']} "
                     f"| {fmt(w['p99_ms'])} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Answer], list[tuple[float, str]], float, str]:
    """Register two versions, start the following server, load it while the champion moves."""
    from vggnet.registry import open_registry, register_run

    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir()
    client = open_registry(uri)
    versions = tuple(str(register_run(client, MODEL, make_run(tmp / f"v{seed}", seed, args)).version)
                     for seed in (0, 1))
    port = load.free_port()
    cmd = [sys.executable, "-m", "vggnet", "serve", "--registry", uri, "--model", MODEL, "--registry-poll-s",
           str(args.poll_s), "--port", str(port), "--no-access-log", "--no-prediction-log", "--log-level", "info",
           "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # as serve_load.py and deploy/Dockerfile
    request = load.http_request("/predict?topk=5", load.test_image(args.image_size), "image/jpeg")
    answers: list[Answer] = []
    flips: list[tuple[float, str]] = []
    proc = load.start_server(cmd, port, time.monotonic() + 300, env)
    try:
        t0 = time.perf_counter()
        measure_from = t0 + args.warmup
        first_at = measure_from + args.every
        stop_at = first_at + args.swaps * args.every
        flipper = threading.Thread(target=flip_champion, args=(uri, versions, args.swaps, first_at, args.every,
                                                               flips), daemon=True)
        flipper.start()

        async def main() -> None:
            await asyncio.gather(*(_client(port, request, answers, stop_at) for _ in range(args.concurrency)))

        asyncio.run(main())
        flipper.join(30)
    finally:
        load.stop_server(proc)
    return answers, flips, measure_from, " ".join(shlex.quote(c) for c in cmd[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16, help="keep-alive connections, closed loop (default 16)")
    p.add_argument("--swaps", type=int, default=6, help="champion alias changes (default 6)")
    p.add_argument("--every", type=float, default=6.0, help="seconds between alias changes (default 6)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load first (default 3)")
    p.add_argument("--window", type=float, default=2.0,
                   help="a swap window ends this long after the new version's first answer (default 2 s)")
    p.add_argument("--poll-s", type=float, default=0.5, help="the server's --registry-poll-s (default 0.5)")
    p.add_argument("--threads", type=int, help="torch threads of the server (default: torch's)")
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()
    if args.swaps < 1 or args.every <= args.window:
        p.error("--swaps must be >= 1 and --every longer than --window")
    started = time.monotonic()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        answers, flips, measure_from, server = run(args, Path(tmp))
    wins = windows(answers, flips, args.window)
    swap, steady = classify(answers, wins, measure_from)
    for w in wins:
        w.update(stats([a for a in swap if a.start < w["end"] and a.end > w["start"]]))
        w["start"], w["end"] = round(w["start"] - measure_from, 3), round(w["end"] - measure_from, 3)
    summary = {"swap": stats(swap), "steady": stats(steady), "all": stats(swap + steady)}
    served = dict(sorted(Counter(a.version for a in answers if a.status == 200 and a.end >= measure_from).items()))
    result = {
        "benchmark": "champion alias moved under load: vggnet serve --registry, POST /predict with a JPEG, closed "
                     f"loop at concurrency {args.concurrency}, keep-alive, 127.0.0.1",
        "command": command, "server": server,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform(),
                    "note": "shared with other jobs while it ran: latencies are noisy, the error count is not"},
        "model": f"{args.model}, width {args.width}, gap head, 10 classes, random weights (seeds 0 and 1), "
                 f"{args.image_size} px",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary, "swaps": wins, "answers_by_version": served,
        "target": {"what": "no failed request during a swap", "errors": summary["all"]["errors"],
                   "met": summary["all"]["errors"] == 0 and all(w["alias_to_first_new_answer_s"] is not None
                                                                 for w in wins)},
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(table(summary, wins))
    print(f"errors: {summary['all']['errors']} of {summary['all']['requests']} measured requests; "
          f"{len(flips)} swaps; answers by version {served}")
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
