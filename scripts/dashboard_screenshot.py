"""A picture of deploy/grafana-dashboard.json under real traffic: docs/img/dashboard.png.

This is the project's own rendering (matplotlib) of the dashboard JSON's own queries, answered by a real
Prometheus scraping a real `vggnet serve`: not Grafana's rendering (Grafana is not in Debian's archive). Each panel
is drawn where its ``gridPos`` puts it, with its title, unit, thresholds, stacking and dashed overrides, from
Prometheus' ``query_range`` answer to each target's PromQL, Grafana's variables substituted as Grafana would
(``$model``: All; ``$__rate_interval``: max(4 × scrape interval, step + scrape interval)).

The traffic: a demo run (``--run``, with drift.json and ood.json beside best.safetensors; without it a small one
is trained first) answers as version 1, its epoch-1 weights run beside it as a shadow version 2, with the
prediction store on and a 30 % review sample. First the run's validation digits, then foreign images (CIFAR-10
photos from ../shared/data when there, else noise) so the drift score rises, then digits again; meanwhile a
reviewer labels the random sample through the review API with the true class (none of these for the foreign
images). Prometheus is Debian's (scripts/prometheus.sh, with deploy/prometheus-rules.yaml loaded).

    .venv/bin/python scripts/dashboard_screenshot.py --run runs/demo      # a run of `vggnet train --recipe demo`
    .venv/bin/python scripts/dashboard_screenshot.py                      # trains a small demo run first (~1 min)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from screenshots import _serve  # scripts/screenshots.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
KEY = "dashboard-key-0123456789"
SCRAPE_S = 2
ROW_IN = 0.25  # one Grafana grid row (30 px there), in inches of the figure
# Grafana's dark theme and its classic palette
BG, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#bf8f6a", "#56c2b4",
           "#ff99c2", "#a0a0a0", "#37872d", "#c4162a", "#1f60c4", "#8f3bb8", "#e0b400"]
COLOURS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c", "yellow": "#fade2a"}


# ---- the served model and the traffic -------------------------------------------------------------------------------

def _demo_run(run: str | None, tmp: Path) -> Path:
    """The run folder: ``run``, or a demo trained now (3 epochs, tiny width) with its references written."""
    if run:
        folder = Path(run)
        for name in ("best.safetensors", "drift.json", "ood.json", "checkpoints/epoch-0001/model.safetensors"):
            if not (folder / name).exists():
                raise SystemExit(f"{folder}: needs {name} (a run of `vggnet train --recipe demo`)")
        return folder
    from vggnet.cli import main as cli

    folder = tmp / "demo"
    print("training a small demo run (3 epochs) ...", flush=True)
    if cli(["train", "--recipe", "demo", "--out", str(folder), "--epochs", "3", "--set", "model.width=0.25",
            "train.tracking=none", "train.keep=0"]) != 0:
        raise SystemExit("training the demo run failed")
    return folder


def _repository(run: Path, tmp: Path) -> Path:
    """Version 1: the run's best weights with its drift and out-of-domain references; version 2: epoch 1, shadow."""
    model = tmp / "repo" / "digits"
    (model / "1").mkdir(parents=True)
    (model / "2").mkdir()
    for name in ("best.safetensors", "drift.json", "ood.json"):
        shutil.copy(run / name, model / "1" / name)
    shutil.copy(run / "checkpoints" / "epoch-0001" / "model.safetensors", model / "2" / "model.safetensors")
    (model / "config.yaml").write_text('default_version: "1"\nshadow: ["2"]\n')
    return model.parent


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _images(run: Path, foreign: int) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, None]]]:
    """(PNG bytes, true class) of the run's validation digits, and ``foreign`` images of no class."""
    import yaml

    from vggnet.data import digits_tensors

    data = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    x, y = digits_tensors("val", size=int(data["image_size"]), val_fraction=float(data["val_fraction"]),
                          seed=int(data["split_seed"]))
    digits = [(_png(t.permute(1, 2, 0).numpy()), str(int(label))) for t, label in zip(x, y, strict=True)]
    others: list[tuple[bytes, None]] = []
    if CIFAR.exists():
        with tarfile.open(CIFAR) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    others.append((tar.extractfile(member).read(), None))
                    if len(others) == foreign // 2:
                        break
    rng = np.random.default_rng(0)
    while len(others) < foreign:
        others.append((_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), None))
    return digits, others


class Traffic:
    """Sends images at a steady rate in phases, and reviews the random sample as a person would."""

    def __init__(self, base: str, rate: float) -> None:
        import httpx

        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        self.reviewer = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        self.interval = 1.0 / rate
        self.truth: dict[str, str | None] = {}
        self.sending = True
        self.reviewed = 0

    def phase(self, images: list[tuple[bytes, Any]], seconds: float) -> None:
        order = random.Random(len(images))
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < end:
            data, truth = images[order.randrange(len(images))]
            media = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            r = self.client.post("/predict", content=data, headers={"Content-Type": media})
            if r.status_code == 200:
                self.truth[r.json()["id"]] = truth
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def review(self) -> None:
        """Every second, label the queued random-sample images whose truth is known (at most a few a second)."""
        while self.sending:
            time.sleep(1.0)
            queue = self.reviewer.get("/v2/review/queue", params={"model": "digits", "limit": 8})
            if queue.status_code != 200:
                continue
            for entry in queue.json()["items"]:
                if "random" not in entry["reasons"] or entry["id"] not in self.truth:
                    continue
                r = self.reviewer.post("/v2/review/label", json={"id": entry["id"], "item": entry["item"],
                                                                 "model": "digits",
                                                                 "label": self.truth[entry["id"]]})
                self.reviewed += r.status_code == 201


# ---- Prometheus' answers to the dashboard's queries ---------------------------------------------------------------

def _queries(dashboard: dict, rate_interval: str) -> list[tuple[dict, dict, str]]:
    """(panel, target, PromQL) with $model = All (the variable's allValue) and $__rate_interval substituted."""
    model = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$model", model["allValue"])
            out.append((panel, target, expr))
    return out


def _query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    import httpx

    answer = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                             "step": step}, timeout=30).json()
    if answer["status"] != "success":
        raise SystemExit(f"Prometheus refused {expr}: {answer.get('error')}")
    return answer["data"]["result"]


def _legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt or "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


# ---- drawing ------------------------------------------------------------------------------------------------------

def _formatter(unit: str | None, decimals: int | None) -> Any:
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: Any = None) -> str:
        if unit == "percentunit":
            return f"{100 * v:.0f} %" if abs(v) >= 0.1 or v == 0 else f"{100 * v:.1f} %"
        if unit == "s":
            return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.2g} s"
        if unit == "reqps":
            return f"{v:.3g} req/s"
        if abs(v) >= 1000:
            return f"{v / 1000:.3g} K"
        if decimals == 0:
            return f"{v:.0f}"
        return f"{v:.3g}"

    return FuncFormatter(fmt)


def _draw_text(ax: Any, panel: dict) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    content = panel["options"]["content"]
    prose, _, rest = content.partition("```")
    code = rest.partition("```")[0].strip()
    import textwrap

    ax.text(0.04, 0.93, textwrap.fill(" ".join(prose.split()), 40), va="top", ha="left", color=TEXT,
            fontsize=7.5, transform=ax.transAxes, linespacing=1.35)
    if code:
        ax.text(0.04, 0.1, textwrap.fill(code, 32, subsequent_indent="  "), va="bottom", ha="left",
                color=COLOURS["orange"], fontsize=7.5,
                family="monospace", transform=ax.transAxes,
                bbox={"boxstyle": "round,pad=0.5", "facecolor": BG, "edgecolor": GRID})


def _legend_columns(names: list[str], width_in: float) -> int:
    """As many columns as fit ``width_in`` inches of 7-pt text (Grafana's legend sits under the graph too)."""
    if not names:
        return 1
    per = (max(len(n) for n in names) + 5) * 7 * 0.6 / 72
    return max(1, min(len(names), int(width_in / per)))


def _draw_series(ax: Any, panel: dict, series: list[tuple[dict, str, np.ndarray, np.ndarray]],
                 legend_at: float, ncol: int) -> None:
    """One timeseries panel: lines (dashed for byFrameRefID overrides), stacked areas, thresholds, the unit, and
    the legend under the graph (``legend_at``: its top, in axes units)."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    dashed = _dashed(panel)
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    colours = iter(PALETTE * 4)
    colour_of: dict[str, str] = {}
    if stacked and series:
        times = series[0][2]
        ys = [np.interp(times, t, np.nan_to_num(v), left=np.nan, right=np.nan) for _, _, t, v in series]
        ax.stackplot(times, ys, colors=[next(colours) for _ in ys], labels=[s[1] for s in series], alpha=0.85,
                     linewidth=0)
    else:
        for target, name, t, v in series:
            family = name.rsplit(" ", 1)[0] if target["refId"] in dashed else name
            colour = colour_of.setdefault(family, next(colours))
            ax.plot(t, v, color=colour, linewidth=1.0 if target["refId"] in dashed else 1.6,
                    linestyle=(0, (4, 3)) if target["refId"] in dashed else "-",
                    label=None if target["refId"] in dashed else name)
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step.get("value") is not None:
            ax.axhline(step["value"], color=COLOURS.get(step["color"], step["color"]), linewidth=0.9,
                       linestyle=(0, (6, 4)), alpha=0.9)
    ax.yaxis.set_major_formatter(_formatter(defaults.get("unit"), defaults.get("decimals")))
    if defaults.get("max") is not None:
        ax.set_ylim(top=defaults["max"] * (1.02 if not stacked else 1.0))
    if defaults.get("min") is not None or stacked or defaults.get("unit") == "percentunit":
        ax.set_ylim(bottom=defaults.get("min", 0))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(0, legend_at), fontsize=7, ncol=ncol,
                  frameon=False, labelcolor=TEXT, handlelength=1.4, columnspacing=1.0, borderaxespad=0,
                  borderpad=0, handletextpad=0.4)
    elif not series:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _dashed(panel: dict) -> set[str]:
    """The refIds a byFrameRefID override draws with a custom.lineStyle (the interval's bounds)."""
    return {o["matcher"]["options"] for o in panel.get("fieldConfig", {}).get("overrides", [])
            if o["matcher"]["id"] == "byFrameRefID" and any(p["id"] == "custom.lineStyle" for p in o["properties"])}


def _style(ax: Any, title: str) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=7.5, length=2)
    ax.grid(True, color=GRID, linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_title(title, color=TEXT, fontsize=9.5, loc="left", fontweight="bold", pad=4)


def render(dashboard: dict, answers: list[dict], phases: list[list], out: Path, caption: str) -> None:
    """Every panel at its gridPos (24 columns; a grid row is ``ROW_IN`` inches), a legend row under the graph per
    few series; ``answers`` as :func:`_collect` gives them, ``phases`` as [start, end, label] in Unix time."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def num(ts: Any) -> Any:
        return mdates.date2num([datetime.fromtimestamp(t) for t in np.atleast_1d(ts)])

    by_panel: dict[int, list] = {}
    for a in answers:
        values = np.array(a["values"], dtype=np.float64).reshape(-1, 2)
        by_panel.setdefault(a["panel"], []).append(({"refId": a["refId"]}, a["name"], num(values[:, 0]),
                                                    values[:, 1]))
    spans = [(num(a)[0], num(b)[0], label) for a, b, label in phases]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    width, head = 10.0, 1.05
    height = rows * ROW_IN + head
    fig = plt.figure(figsize=(width, height), facecolor=BG)
    fig.text(0.01, 1 - 0.15 / height, f"{dashboard['title']}  ·  deploy/grafana-dashboard.json", color=TEXT,
             fontsize=12, fontweight="bold", va="top")
    lines = [textwrap.fill(part, 170) for part in caption.replace("$", r"\$").split("\n")]
    fig.text(0.01, 1 - 0.40 / height, "\n".join(lines), color=MUTED, fontsize=7.5, va="top", linespacing=1.4)
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        x0, top, w = g["x"] / 24 * width, head + g["y"] * ROW_IN, g["w"] / 24 * width
        graph = panel["type"] != "text"
        left, right = (x0 + 0.5, x0 + w - 0.12) if graph else (x0 + 0.06, x0 + w - 0.06)
        series = by_panel.get(panel["id"], [])
        names = [n for t, n, _, _ in series if t["refId"] not in _dashed(panel)]
        ncol = _legend_columns(names, right - left + 0.4)
        legend_h = (-(-len(names) // ncol) * 0.15 + 0.05) if graph and names else 0.0
        bottom = top + g["h"] * ROW_IN - 0.08 - (0.2 + legend_h if graph else 0)
        axes_top = top + 0.3
        ax = fig.add_axes((left / width, 1 - bottom / height, (right - left) / width, (bottom - axes_top) / height))
        _style(ax, panel["title"])
        if not graph:
            _draw_text(ax, panel)
            continue
        for start, end, label in spans:
            if "foreign" in label:
                ax.axvspan(start, end, color="#ffffff", alpha=0.05, linewidth=0)
        _draw_series(ax, panel, series, -0.2 / (bottom - axes_top), ncol)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=2, maxticks=6 if g["w"] > 6 else 3))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        if spans:
            ax.set_xlim(spans[0][0], spans[-1][1])
    out.parent.mkdir(parents=True, exist_ok=True)
    from vggnet.atomic import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=160, facecolor=BG, format="png")
    plt.close(fig)


# ---- the run ------------------------------------------------------------------------------------------------------

def _collect(prom: str, dashboard: dict, start: float, end: float) -> list[dict]:
    """Every series of every target: panel id, refId, legend name and [unix time, value] pairs (JSON-able)."""
    rate_interval = f"{max(4 * SCRAPE_S, SCRAPE_S + SCRAPE_S)}s"  # Grafana's, with step = the scrape interval
    answers = []
    for panel, target, expr in _queries(dashboard, rate_interval):
        for s in _query_range(prom, expr, start, end, SCRAPE_S):
            answers.append({"panel": panel["id"], "refId": target["refId"], "expr": expr,
                            "name": _legend(target.get("legendFormat", ""), s["metric"]),
                            "values": [[float(t), float(v)] for t, v in s["values"]]})
    return sorted(answers, key=lambda a: (a["panel"], a["refId"], a["name"]))


def _prometheus(target: str, folder: Path) -> tuple[str, dict]:
    env = {**os.environ, "VGGNET_PROM_DIR": str(folder), "VGGNET_PROM_SCRAPE": f"{SCRAPE_S}s"}
    started = subprocess.run([str(ROOT / "scripts" / "prometheus.sh"), "start", target], env=env,
                             capture_output=True, text=True, timeout=90)
    if started.returncode != 0:
        raise SystemExit(started.stderr.strip())
    return started.stdout.strip(), env


def _record(args: argparse.Namespace, dashboard: dict, seconds: list[float]) -> dict:
    """Serve, scrape and send the traffic; Prometheus' answers to every panel's queries, the phases, the caption."""
    from vggnet.serve import ModelRepository, ServeSettings, create_app

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = _demo_run(args.run, tmp)
        digits, foreign = _images(run, 400)
        settings = ServeSettings(load_in_background=False, access_log=False, prediction_log=False, api_keys=(KEY,),
                                 store=f"sqlite:///{tmp}/serve.db", review_sample=0.3, drift_window=200,
                                 drift_every=20, drift_min_window=100, live_accuracy_every_s=2.0)
        url, server, thread = _serve(create_app(ModelRepository.from_dir(_repository(run, tmp)), settings))
        env: dict | None = None
        try:
            prom, env = _prometheus(url.removeprefix("http://").rstrip("/"), tmp / "prometheus")
            traffic = Traffic(url, args.rate)
            reviewer = threading.Thread(target=traffic.review, daemon=True)
            reviewer.start()
            phases = []
            for (images, label), length in zip([(digits, "digits"), (foreign, "foreign images"),
                                                (digits, "digits")], seconds, strict=True):
                start = time.time()
                print(f"{label}: {length:g} s at {args.rate:g} requests/s", flush=True)
                traffic.phase(images, length)
                phases.append([start, time.time(), label])
            traffic.sending = False
            time.sleep(3 * SCRAPE_S)
            answers = _collect(prom, dashboard, phases[0][0], phases[-1][1])
            reviewer.join(5)
        finally:
            if env is not None:
                subprocess.run([str(ROOT / "scripts" / "prometheus.sh"), "stop"], env=env, timeout=30)
            server.should_exit = True
            thread.join(20)
    n = len(traffic.truth)
    caption = (f"The project's own rendering (scripts/dashboard_screenshot.py, matplotlib) of the dashboard JSON's "
               f"queries, answered by a real Prometheus {_prom_version()} scraping a real `vggnet serve` every "
               f"{SCRAPE_S} s; not Grafana's.\nTraffic: {n:,} requests at {args.rate:g}/s to a demo model (v1; its "
               f"epoch-1 weights in shadow: v2): digits {seconds[0]:g} s, CIFAR-10 photos and noise {seconds[1]:g} s "
               f"(shaded), digits {seconds[2]:g} s; {traffic.reviewed} reviews of the random sample (foreign: 'none of "
               f"these').\n$model = All; $__rate_interval = {max(4 * SCRAPE_S, 2 * SCRAPE_S)} s; drift window 200 "
               "predictions; live accuracy read from the store every 2 s (default 30 s).")
    return {"answers": answers, "phases": phases, "caption": caption, "requests": n, "reviews": traffic.reviewed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a demo run folder with drift.json, ood.json and checkpoints/epoch-0001 "
                   "(default: train a small one first)")
    p.add_argument("--rate", type=float, default=8.0, help="requests per second sent (default: 8)")
    p.add_argument("--phases", default="80,50,40", help="seconds of digits, foreign images, digits (default: "
                   "80,50,40)")
    p.add_argument("--out", default="docs/img/dashboard.png", help="the PNG written (default: docs/img/dashboard.png)")
    p.add_argument("--answers", metavar="FILE", help="also keep Prometheus' answers (and the phases) in this JSON "
                   "file, to redraw later with --redraw")
    p.add_argument("--redraw", metavar="FILE", help="draw from a file --answers wrote: no server, no traffic")
    args = p.parse_args(argv)
    seconds = [float(s) for s in args.phases.split(",")]
    if len(seconds) != 3:
        raise SystemExit("--phases: three numbers of seconds (digits, foreign images, digits)")
    dashboard = json.loads(DASHBOARD.read_text())
    if args.redraw:
        recorded = json.loads(Path(args.redraw).read_text())
    else:
        recorded = _record(args, dashboard, seconds)
        if args.answers:
            from vggnet.atomic import write_json

            write_json(args.answers, recorded)
    render(dashboard, recorded["answers"], recorded["phases"], Path(args.out), recorded["caption"])
    print(f"wrote {args.out} ({recorded['requests']:,} requests, {recorded['reviews']} reviews)")
    return 0


def _prom_version() -> str:
    line = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return line.split("version ")[1].split()[0] if "version " in line else ""


if __name__ == "__main__":
    sys.exit(main())
