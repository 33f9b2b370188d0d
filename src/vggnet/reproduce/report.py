"""Our tables beside the paper's, a verdict on each of its conclusions, and a plot of error per configuration.

A verdict compares two top-1 errors measured on the same validation images. The difference is called
out as noise when it is within two standard errors of a difference of two error rates,
sqrt((p1(1-p1) + p2(1-p2)) / n): with 5,000 images and errors near 20 % that is about 1.6 points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vggnet.evaluate.paper import paper_results
from vggnet.plots import save_figure

from .harness import Study

__all__ = ["conclusions", "markdown_report", "plot_errors"]


def _paper_row(table: str, config: str, protocol: str, train_scale: Any) -> tuple[dict[str, Any] | None, bool]:
    """The paper's row for (config, protocol, training scale); else its S = 256 row, flagged as a stand-in."""
    rows = [r for r in paper_results()[table] if r["config"] == config and r["protocol"] == protocol]
    exact = [r for r in rows if r["train_scale"] == train_scale]
    if exact:
        return exact[0], False
    fallback = [r for r in rows if r["train_scale"] == 256]
    return (fallback[0], True) if fallback else (None, False)


def _err(row: dict[str, Any] | None) -> str:
    if not row or row.get("top1_err") is None:
        return "–"
    return f"{row['top1_err']:.1f} / {row['top5_err']:.1f}"


def _paper(row: dict[str, Any] | None, standin: bool) -> str:
    if row is None:
        return "–"
    return f"{row['top1']:.1f} / {row['top5']:.1f}" + (" †" if standin else "")


def _px(scales: Any, crop: int) -> str:
    values = scales if isinstance(scales, list) else [scales]
    return ",".join(str(round(v * crop)) for v in values)


def _train_scale_text(study: Study, run: str, crop: int) -> str:
    key = study.runs[run]["scale"]
    paper, ours = study.paper_train_scales[key], study.train_scales[key]
    if isinstance(paper, list):
        return f"[{paper[0]};{paper[1]}] → [{round(ours[0] * crop)};{round(ours[1] * crop)}] px"
    return f"{paper} → {round(ours * crop)} px"


def _test_scale_text(study: Study, run: str, which: str, crop: int) -> str:
    scales = study.test_scales[study.runs[run]["scale"]][which]
    paper = ",".join(str(round(q * 224)) for q in scales)
    return f"{{{paper}}} → {{{_px(scales, crop)}}} px"


def _se_diff(a: float, b: float, n: int) -> float:
    p, q = a / 100, b / 100
    return 100 * math.sqrt(max(p * (1 - p) + q * (1 - q), 1e-12) / max(n, 1))


def _verdict(worse: float | None, better: float | None, n: int, expect_no_gain: bool = False) -> str:
    """``worse`` should exceed ``better`` if the conclusion holds (for ``expect_no_gain``: not fall below it)."""
    if worse is None or better is None:
        return "not measured"
    diff, se = worse - better, _se_diff(worse, better, n)
    if expect_no_gain:
        return "holds" if diff >= -2 * se else "does not hold"
    if diff > 2 * se:
        return "holds"
    return "holds, within noise" if diff > 0 else "does not hold"


def _top1(ev: dict[str, Any], run: str, key: str) -> float | None:
    return (ev.get(run) or {}).get(key, {}).get("top1_err")


def conclusions(results: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's seven conclusions, each with our evidence (top-1 error, %) and a verdict."""
    ev = results["evaluations"]
    n = min((row["n"] for rows in ev.values() for row in rows.values()), default=0)
    out = []

    def add(claim: str, evidence: str, verdict: str) -> None:
        out.append({"conclusion": claim, "evidence": evidence, "verdict": verdict})

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    a, b, d = _top1(ev, "A", "table3"), _top1(ev, "B", "table3"), _top1(ev, "D", "table3")
    mono = "" if None in (a, b, d) else (" (A > B > D: monotone)" if a > b > d else " (not monotone in A, B, D)")
    add("Depth helps from A (11 layers) to D (16)", f"A {f(a)}, B {f(b)}, D {f(d)}{mono}", _verdict(a, d, n))
    lrn = _top1(ev, "A-LRN", "table3")
    add("LRN does not help (A-LRN is no better than A)", f"A {f(a)}, A-LRN {f(lrn)}",
        _verdict(lrn, a, n, expect_no_gain=True))
    c = _top1(ev, "C", "table3")
    add("C (with 1×1 convs) is worse than D (all 3×3)", f"C {f(c)}, D {f(d)}", _verdict(c, d, n))
    fixed = _top1(ev, "D-fixed", "table3")
    add("Scale jitter at training helps (D, S ∈ [256;512] vs S = 256)", f"fixed {f(fixed)}, jittered {f(d)}",
        _verdict(fixed, d, n))
    gains = [(run, _top1(ev, run, "table3"), _top1(ev, run, "table4")) for run in results["runs"]]
    gains = [(r, s, m) for r, s, m in gains if s is not None and m is not None]
    better = sum(1 for _, s, m in gains if m < s)
    d_multi = _top1(ev, "D", "table4")
    add("Multi-scale testing helps (D; dense at 3 scales vs 1)",
        f"D {f(d)} → {f(d_multi)}; better at multi-scale for {better} of {len(gains)} nets", _verdict(d, d_multi, n))
    parts = []
    verdicts = []
    for run in ("D", "E"):
        dense, crops, both = (_top1(ev, run, k) for k in ("dense", "multicrop", "both"))
        if None in (dense, crops, both):
            continue
        parts.append(f"{run}: dense {f(dense)}, multi-crop {f(crops)}, both {f(both)}")
        verdicts.append(_verdict(min(dense, crops), both, n))  # type: ignore[type-var]
    add("Dense and multi-crop evaluation are complementary (both < either)", "; ".join(parts) or "–",
        _combine(verdicts))
    ens = _top1(ev, "D+E", "both")
    singles = [v for v in (_top1(ev, "D", "both"), _top1(ev, "E", "both")) if v is not None]
    add("An ensemble (D+E) beats one net (dense + multi-crop)",
        f"D+E {f(ens)}, best single {f(min(singles) if singles else None)}",
        _verdict(min(singles) if singles else None, ens, n))
    return out


def _combine(verdicts: list[str]) -> str:
    if not verdicts:
        return "not measured"
    if all(v == "holds" for v in verdicts):
        return "holds"
    if all(v != "does not hold" for v in verdicts):
        return "holds, within noise"
    return "does not hold" if all(v == "does not hold" for v in verdicts) else "mixed: " + ", ".join(verdicts)


def markdown_report(study: Study, results: dict[str, Any], command: str | None = None,
                    wall_seconds: float | None = None) -> str:
    ev, recipe = results["evaluations"], results["recipe"]
    crop = int(recipe["data"]["image_size"])
    m, s = recipe["model"], recipe["schedule"]
    n = min((row["n"] for rows in ev.values() for row in rows.values()), default=0)
    lines = ["# The paper's tables, reproduced small", ""]
    if command:
        lines += [f"Command: `{command}`  "]
    lines += [f"Nets: VGG configurations at width {m['width']} ({'with' if results['bn'] else 'without'} batch "
              f"norm), {m['head']} head (fc width {m['fc_width']}, dropout {m['dropout']}), {crop}-px crops, "
              f"{s['epochs']} epochs of {s['name']} {recipe['optim']['name']} (lr {recipe['optim']['lr']}, batch "
              f"{recipe['optim']['batch_size']}).  ",
              f"Data: {results['data']}; validation: "
              f"{ev and next(iter(ev.values()))['table3']['n']} images (multi-crop rows: {n}).  ",
              f"Time: training {results['train_seconds'] / 60:.1f} min, evaluation "
              f"{results['eval_seconds'] / 60:.1f} min"
              + (f", wall {wall_seconds / 60:.1f} min this invocation" if wall_seconds is not None else "") + ".",
              "", "Errors are top-1 / top-5 in %. Scales: the paper's pixels at a 224 crop → ours at a "
              f"{crop}-px crop (same ratio). † the paper trained this net at S = 256 only; its S = 256 row "
              "is shown.", ""]
    lines += ["## Table 3 — one test scale (dense evaluation)", "",
              "| net | train S | test Q | ours: dense | ours: centre crop | paper: dense |",
              "|---|---|---|---|---|---|"]
    for run, spec in study.runs.items():
        key = spec["scale"]
        paper, standin = _paper_row("table3", spec["config"], "dense", study.paper_train_scales[key])
        lines.append(f"| {run} | {_train_scale_text(study, run, crop)} | {_test_scale_text(study, run, 'single', crop)}"
                     f" | {_err(ev[run].get('table3'))} | {_err(ev[run].get('centre'))} | {_paper(paper, standin)} |")
    lines += ["", "## Table 4 — several test scales (dense evaluation)", "",
              "| net | train S | test Q | ours: dense | paper: dense |", "|---|---|---|---|---|"]
    for run, spec in study.runs.items():
        paper, standin = _paper_row("table4", spec["config"], "dense", study.paper_train_scales[spec["scale"]])
        lines.append(f"| {run} | {_train_scale_text(study, run, crop)} | {_test_scale_text(study, run, 'multi', crop)}"
                     f" | {_err(ev[run].get('table4'))} | {_paper(paper, standin)} |")
    lines += ["", "## Tables 5 and 6 — dense vs multi-crop vs both; the ensemble", "",
              "| net | protocol | ours | paper |", "|---|---|---|---|"]
    names = {"dense": "dense", "multicrop": "multicrop", "both": "dense+multicrop"}
    for run in [*study.multicrop, *study.ensembles]:
        config = run if run in study.ensembles else study.runs[run]["config"]
        table = "table6" if run in study.ensembles else "table5"
        for key, protocol in names.items():
            paper, standin = _paper_row(table, config, protocol, study.paper_train_scales["jittered"])
            row = ev.get(run, {}).get(key)
            label = row["protocol"] if row else protocol
            lines.append(f"| {run} | {label} | {_err(row)} | {_paper(paper, standin)} |")
    lines += ["", "## The paper's conclusions, here", "", "| conclusion | ours (top-1 err %) | verdict |",
              "|---|---|---|"]
    lines += [f"| {c['conclusion']} | {c['evidence']} | {c['verdict']} |" for c in conclusions(results)]
    lines += ["", f"\"within noise\": the difference is under two standard errors of a difference of two error "
              f"rates on {n} images.", "", "![top-1 error per configuration](error_per_config.png)", ""]
    return "\n".join(lines)


def plot_errors(study: Study, results: dict[str, Any], path: Path) -> Path:
    """Top-1 error per net, one and three test scales: ours on the left, the paper's on the right."""
    ev = results["evaluations"]
    runs = list(study.runs)
    fig = Figure(figsize=(11, 4))
    ours, theirs = fig.subplots(1, 2)
    width = 0.38
    for offset, key, label in ((-width / 2, "table3", "one test scale"), (width / 2, "table4", "three test scales")):
        values = [_top1(ev, r, key) or math.nan for r in runs]
        ours.bar([i + offset for i in range(len(runs))], values, width, label=label)
        paper = []
        for r in runs:
            row, _ = _paper_row(key, study.runs[r]["config"], "dense", study.paper_train_scales[study.runs[r]["scale"]])
            paper.append(row["top1"] if row else math.nan)
        theirs.bar([i + offset for i in range(len(runs))], paper, width, label=label)
    for ax, title in ((ours, "ours (validation split)"), (theirs, "the paper (ILSVRC-2012 val)")):
        ax.set_xticks(range(len(runs)), runs)
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(title)
        ax.legend(loc="lower left", fontsize=8)
        finite = [p.get_height() for p in ax.patches if math.isfinite(p.get_height())]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 3), max(finite) + 2)
    fig.suptitle("Top-1 error per configuration (lower is better)")
    return save_figure(fig, path)
