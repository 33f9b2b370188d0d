"""The production loop on the digits, end to end and measured: accuracy before and after one turn of it.

One turn (issue 31), every step through the command or the HTTP API a user would use:

1. **v1, weak on purpose**: `vggnet train --recipe demo --data ORIG` on ``--original-per-class`` images per class
   (half of them its validation split), registered in a fresh MLflow registry (SQLite): the champion.
2. **served from the registry**: `vggnet serve --registry URI --model digits --store sqlite:///... --keep-inputs
   DIR --keep-all-inputs` in its own process; a background client sends requests the whole time and counts
   every answer that is not 200.
3. **traffic A** (the first part of the digits v1 never saw) is sent; a person's work is played by the script:
   the review queue's random sample and every mistake are labelled with the true class through the API.
4. **`vggnet retrain --from digits@champion`** fine-tunes v1 on its data plus the reviewed images and gates it
   (paired tests); passed, it is registered as v2, the challenger, and the server loads it in shadow without a
   restart.
5. **traffic B** (digits neither version saw) is sent and its random sample reviewed: `vggnet monitor report`
   compares the versions on the same reviewed images; `vggnet registry promote digits --store URL` makes v2 the
   champion only on a 'better' verdict; the server follows; `vggnet registry rollback digits` returns v1.
6. **a second retrain with mislabelled reviews** (every reviewed label moved to the next class, in a copy of the
   store) must fail the gate and alias nothing.

The accuracy of v1 and v2 is measured offline on traffic B (every image, through the same decode and
preprocessing), beside what the gate and the live report saw. ``tests/test_loop_e2e.py`` runs one turn and checks
each step; this script runs ``--seeds`` turns and writes benchmarks/results/loop.json.

    .venv/bin/python benchmarks/loop.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from machine import cpu_name  # benchmarks/machine.py, beside this script
from vggnet.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "loop.json"
KEY = "loop-reviewer-key-0123456789"
MODEL = "digits"
FAST = ["train.threads=2", "train.deterministic=true", "train.precision=fp32", "train.channels_last=false",
        "train.tracking=none", "data.val_fraction=0.5", "optim.batch_size=32"]


@dataclass
class Digit:
    png: bytes
    label: str


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def split_digits(seed: int, original_per_class: int, share_a: float) -> tuple[list[Digit], list[Digit], list[Digit]]:
    """All 1,797 digits at 32 px, per class: ``original_per_class`` for v1's folder, then traffic A, then B."""
    from vggnet.data import digits_tensors

    parts = [digits_tensors(s, size=32, val_fraction=0.2) for s in ("train", "val")]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rng = np.random.default_rng(seed)
    original, a, b = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        rest = idx[original_per_class:]
        cut = int(round(len(rest) * share_a))
        for bucket, chosen in ((original, idx[:original_per_class]), (a, rest[:cut]), (b, rest[cut:])):
            bucket += [Digit(png(images[i]), str(c)) for i in chosen]
    order = rng.permutation(len(a)).tolist(), rng.permutation(len(b)).tolist()
    return original, [a[i] for i in order[0]], [b[i] for i in order[1]]


def write_folder(folder: Path, digits: list[Digit]) -> Path:
    for i, d in enumerate(digits):
        (folder / d.label).mkdir(parents=True, exist_ok=True)
        (folder / d.label / f"{i:05d}.png").write_bytes(d.png)
    return folder


def cli(*args: str) -> int:
    """A `vggnet` command in this process (as a user types it); its exit status."""
    from vggnet.cli import main

    return main([str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """HTTP to the server under test, with the reviewer's key."""

    def __init__(self, port: int) -> None:
        import httpx

        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0,
                                 headers={"Authorization": f"Bearer {KEY}"})

    def predict(self, digit: Digit) -> dict[str, Any]:
        r = self.http.post("/predict?topk=1", content=digit.png, headers={"Content-Type": "image/png"})
        r.raise_for_status()
        return r.json()

    def label(self, request_id: str, label: str, item: int = 0) -> None:
        r = self.http.post("/v2/review/label", json={"id": request_id, "item": item, "model": MODEL, "label": label})
        if r.status_code != 201:
            raise RuntimeError(f"review label refused: {r.status_code} {r.text}")

    def review_queue(self, truth: dict[str, str]) -> int:
        """Label everything the review queue offers with the true class; how many labels."""
        done = 0
        while True:
            r = self.http.get(f"/v2/review/queue?model={MODEL}&limit=100")
            r.raise_for_status()
            items = [e for e in r.json()["items"] if e["id"] in truth]
            if not items:
                return done
            for e in items:
                self.label(e["id"], truth[e["id"]], e["item"])
                done += 1

    def wait_version(self, version: str, probe: Digit, timeout: float = 120.0) -> float:
        """Seconds until unversioned requests are answered by ``version`` (the server follows the registry)."""
        start = time.monotonic()
        while self.predict(probe)["model_version"] != version:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the server did not switch to version {version} in {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def wait_shadow(self, version: str, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while True:
            index = self.http.post("/v2/repository/index", json={}).json()
            if any(m.get("version") == version and m.get("state") == "READY" for m in index):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"version {version} never became READY: {index}")
            time.sleep(0.1)


@dataclass
class Background:
    """A client thread sending requests the whole time: every answer that is not 200 is an error."""

    port: int
    digits: list[Digit]
    truth: dict[str, str]
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = Client(self.port)
        i = 0
        while not self._stop.is_set():
            digit = self.digits[i % len(self.digits)]
            i += 1
            try:
                answer = client.predict(digit)
                self.truth[answer["id"]] = digit.label
                self.versions.add(answer["model_version"])
            except Exception as e:  # noqa: BLE001 - any failure during a swap is what this counts
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
            self.sent += 1
            time.sleep(0.02)

    @contextlib.contextmanager
    def running(self) -> Iterator[Background]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(120)


@contextlib.contextmanager
def server(uri: str, url: str, kept: Path, keys: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    cmd = [sys.executable, "-m", "vggnet", "serve", "--registry", uri, "--model", MODEL, "--registry-poll-s", "0.3",
           "--store", url, "--keep-inputs", str(kept), "--keep-all-inputs", "--review-sample", "0.3",
           "--api-key-file", str(keys), "--port", str(port), "--no-access-log", "--no-prediction-log",
           "--log-level", "info", "--threads", "1"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "CI": "true"})
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 180 s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def report(url: str) -> dict[str, dict[str, Any]]:
    """`vggnet monitor report --store URL --json`, by version."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli("monitor", "report", "--store", url, "--model", MODEL, "--json") == 0
    return {row["version"]: row for row in json.loads(out.getvalue())}


def aliases(uri: str) -> dict[str, str]:
    from vggnet.registry import open_registry

    model = open_registry(uri).get_registered_model(MODEL)
    return {alias: str(version) for alias, version in model.aliases.items()}


def checkpoint(uri: str, version: str) -> Path:
    """The checkpoint the registry records for ``version``."""
    from vggnet.registry import open_registry

    return Path(open_registry(uri).get_model_version(MODEL, version).tags["checkpoint"])


def offline_accuracy(checkpoint: Path, digits: list[Digit]) -> float:
    """The version's accuracy on every image, through the same PNG decode and preprocessing as the server."""
    from vggnet.infer import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    images = [Image.open(io.BytesIO(d.png)).convert("RGB") for d in digits]
    top1 = [p[0][0] for p in predictor.predict(images, topk=1)]
    return float(np.mean([t == d.label for t, d in zip(top1, digits, strict=True)]))


def mislabel(url: str, copy_url: str, classes: list[str]) -> int:
    """Copy the store (SQLite) and give every reviewed image a later, wrong label (the next class)."""
    from vggnet import store

    shutil.copy(url.removeprefix("sqlite:///"), copy_url.removeprefix("sqlite:///"))
    engine = store.connect(copy_url)
    try:
        reviewed = [r for r in store.read_labels(engine, MODEL) if r["label"] is not None]
        for r in reviewed:
            wrong = classes[(classes.index(r["label"]) + 1) % len(classes)]
            store.add_label(engine, request_id=r["request_id"], item=r["item"], model=MODEL, label=wrong,
                            source="review", who="mislabeller")
        return len(reviewed)
    finally:
        engine.dispose()


def turn(work: Path, seed: int, original_per_class: int = 20, epochs: int = 6, share_a: float = 0.55) -> dict:
    """One turn of the loop in ``work``; everything observed on the way (the test asserts on it)."""
    original, traffic_a, traffic_b = split_digits(seed, original_per_class, share_a)
    orig = write_folder(work / "orig", original)
    uri, url = f"sqlite:///{work / 'mlflow.db'}", f"sqlite:///{work / 'serve.db'}"
    keys = work / "keys"
    keys.write_text(KEY + "\n")
    seen: dict[str, Any] = {"seed": seed, "original": len(original), "traffic_a": len(traffic_a),
                            "traffic_b": len(traffic_b)}
    t0 = time.monotonic()
    assert cli("train", "--recipe", "demo", "--data", orig, "--out", work / "v1", "--epochs", epochs,
               "--no-progress", "--no-reference", "--set", *FAST, f"train.seed={seed}") == 0
    assert cli("registry", "register", work / "v1", "--name", MODEL, "--tracking-uri", uri) == 0
    port, truth = free_port(), {}
    background = Background(port, original[:20], truth)
    with server(uri, url, work / "kept", keys, port, work / "serve.log"), background.running():
        client = Client(port)
        mistakes = []
        for d in traffic_a:  # the traffic v1 gets; the script plays the reviewer: the random sample, every mistake
            answer = client.predict(d)
            truth[answer["id"]] = d.label
            if answer["predictions"][0]["label"] != d.label:
                mistakes.append(answer["id"])
        time.sleep(1.5)  # the store's writer flushes every 0.5 s: a label needs its prediction's row
        for request_id in mistakes:
            client.label(request_id, truth[request_id])
        seen["reviewed_mistakes_a"], seen["reviewed_queue_a"] = len(mistakes), client.review_queue(truth)
        seen["retrain_exit"] = cli("retrain", "--from", f"{MODEL}@champion", "--store", url, "--data", orig,
                                   "--out", work / "retrain", "--tracking-uri", uri, "--no-progress",
                                   "--seed", seed)
        seen["gate"] = json.loads((work / "retrain" / "gate.json").read_text())
        seen["aliases_after_retrain"] = aliases(uri)
        seen["shadow_ready_s"] = client.wait_shadow("2")
        for d in traffic_b:  # fresh images: v1 answers, v2 in shadow on the same requests
            truth[client.predict(d)["id"]] = d.label
        time.sleep(1.5)
        seen["reviewed_queue_b"] = client.review_queue(truth)
        seen["report"] = report(url)
        seen["promote_exit"] = cli("registry", "promote", MODEL, "--store", url, "--tracking-uri", uri)
        seen["aliases_after_promote"] = aliases(uri)
        seen["switch_to_v2_s"] = client.wait_version("2", original[0])
        seen["rollback_exit"] = cli("registry", "rollback", MODEL, "--tracking-uri", uri)
        seen["aliases_after_rollback"] = aliases(uri)
        seen["switch_to_v1_s"] = client.wait_version("1", original[0])
    seen["background"] = {"sent": background.sent, "errors": background.errors, "versions": sorted(background.versions)}
    copy = f"sqlite:///{work / 'mislabelled.db'}"
    seen["mislabelled_reviews"] = mislabel(url, copy, [str(c) for c in range(10)])
    seen["mislabelled_exit"] = cli("retrain", "--from", f"{MODEL}@champion", "--store", copy, "--data", orig,
                                   "--out", work / "retrain-mislabelled", "--tracking-uri", uri, "--no-progress",
                                   "--seed", seed, "--inputs", work / "kept")
    seen["mislabelled_gate"] = json.loads((work / "retrain-mislabelled" / "gate.json").read_text())
    seen["aliases_after_mislabelled"] = aliases(uri)
    seen["registered"] = json.loads((work / "retrain" / "registered.json").read_text())
    seen["registered_mislabelled"] = json.loads((work / "retrain-mislabelled" / "registered.json").read_text())
    seen["accuracy_b"] = {f"v{v}": offline_accuracy(checkpoint(uri, v), traffic_b) for v in ("1", "2")}
    seen["wall_s"] = round(time.monotonic() - t0, 1)
    return seen


def summary_row(seen: dict) -> dict:
    gate, live = seen["gate"], seen["report"]
    val, held = gate["original_val"], gate["reviewed_holdout"]  # accuracies in percent there
    return {"seed": seed_of(seen), "v1_val": val["champion"]["accuracy"] / 100, "n_val": val["n"],
            "v2_val": val["candidate"]["accuracy"] / 100, "n_reviewed_holdout": held["n"],
            "v1_reviewed_holdout": held["champion"]["accuracy"] / 100,
            "v2_reviewed_holdout": held["candidate"]["accuracy"] / 100, "n_traffic_b": seen["traffic_b"],
            "v1_traffic_b": seen["accuracy_b"]["v1"], "v2_traffic_b": seen["accuracy_b"]["v2"],
            "live_v1": live["1"]["accuracy"], "live_v2": live["2"]["accuracy"], "live_reviewed": live["2"]["reviewed"],
            "verdict_v2": live["2"]["verdict"]["verdict"], "gate": gate["passed"],
            "mislabelled_gate": seen["mislabelled_gate"]["passed"], "swap_errors": len(seen["background"]["errors"]),
            "requests_during_swaps": seen["background"]["sent"]}


def seed_of(seen: dict) -> int:
    return int(seen["seed"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--original-per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=6, help="v1's epochs (weak on purpose)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    cmdline = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    turns = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            turns.append(turn(Path(tmp), seed, args.original_per_class, args.epochs))
        print(json.dumps(summary_row(turns[-1])), file=sys.stderr, flush=True)
    rows = [summary_row(t) for t in turns]
    print("| seed | v1 → v2 val (gate) | v1 → v2 reviewed held-out | v1 → v2 traffic B (all) | live v1 / v2 "
          "| verdict | gate | mislabelled gate | swap errors / requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['v1_val']:.1%} → {r['v2_val']:.1%} | {r['v1_reviewed_holdout']:.1%} → "
              f"{r['v2_reviewed_holdout']:.1%} | {r['v1_traffic_b']:.1%} → {r['v2_traffic_b']:.1%} | "
              f"{r['live_v1']:.1%} / {r['live_v2']:.1%} | {r['verdict_v2']} | {'passed' if r['gate'] else 'failed'} "
              f"| {'passed' if r['mislabelled_gate'] else 'failed'} | {r['swap_errors']} / "
              f"{r['requests_during_swaps']} |")
    write_json(args.out, {
        "benchmark": "the production loop on the digits: v1 (weak), reviewed traffic, retrain + gate, shadow, "
                     "promotion, rollback; accuracy before and after",
        "command": cmdline, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "settings": {"original_per_class": args.original_per_class, "v1_epochs": args.epochs,
                     "traffic_a_share": 0.55, "review_sample": 0.3},
        "rows": rows, "turns": turns})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
