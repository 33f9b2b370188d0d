"""Our tables beside the paper's, a verdict on each of its conclusions, and a plot of error per configuration.

A verdict compares two nets image by image on the same validation images (:mod:`vggnet.reproduce.paired`:
McNemar's exact mid-p test on the images exactly one of them gets right) and is one of **holds**,
**inconclusive** or **contradicted**; the table shows the difference, the discordant counts b/c and the
p-value. Results files written before per-image results were kept give "inconclusive (no per-image
results)"; a missing row gives "not measured".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vggnet.evaluate.paper import paper_results
from vggnet.plots import save_figure

from .harness import Study
from .paired import ALPHA, CONTRADICTED, HOLDS, INCONCLUSIVE, MARGIN, Paired, compare, verdict

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


def _row(ev: dict[str, Any], run: str, key: str) -> dict[str, Any] | None:
    return (ev.get(run) or {}).get(key)


def _top1(ev: dict[str, Any], run: str, key: str) -> float | None:
    return (_row(ev, run, key) or {}).get("top1_err")


def _test(worse: dict[str, Any] | None, better: dict[str, Any] | None,
          expect_no_gain: bool = False) -> tuple[str, str, Paired | None]:
    """(verdict, the paired evidence as text, the comparison) for "``worse`` has the higher error"."""
    pair = compare(worse, better)
    if isinstance(pair, str):
        return verdict(pair, expect_no_gain), "–", None
    return verdict(pair, expect_no_gain), pair.text(expect_no_gain), pair


def _outcome(v: str) -> str:
    return v.split(" (")[0]


def _combine(named: list[tuple[str, str]]) -> str:
    """One verdict from per-net verdicts: agreeing ones stand; one side significant and the other not: that
    side, with the per-net outcomes; significant both ways: inconclusive."""
    if not named:
        return "not measured"
    if len({v for _, v in named}) == 1:
        return named[0][1]
    outcomes = {_outcome(v) for _, v in named}
    detail = ", ".join(f"{run} {v}" for run, v in named)
    if HOLDS in outcomes and CONTRADICTED in outcomes:
        return f"{INCONCLUSIVE} ({detail})"
    for outcome in (CONTRADICTED, HOLDS):
        if outcome in outcomes:
            return f"{outcome} ({detail})"
    return f"{INCONCLUSIVE} ({detail})"


def conclusions(results: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's seven conclusions, each with our evidence (top-1 error, %), the paired test, a verdict."""
    ev = results["evaluations"]
    out = []

    def add(claim: str, evidence: str, test: tuple[str, str, Any]) -> None:
        out.append({"conclusion": claim, "evidence": evidence, "test": test[1], "verdict": test[0]})

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    a, b, d = _top1(ev, "A", "table3"), _top1(ev, "B", "table3"), _top1(ev, "D", "table3")
    mono = "" if None in (a, b, d) else (" (A > B > D: monotone)" if a > b > d else " (not monotone in A, B, D)")
    add("Depth helps from A (11 layers) to D (16)", f"A {f(a)}, B {f(b)}, D {f(d)}{mono}",
        _test(_row(ev, "A", "table3"), _row(ev, "D", "table3")))
    lrn = _top1(ev, "A-LRN", "table3")
    add("LRN does not help (A-LRN is no better than A)", f"A {f(a)}, A-LRN {f(lrn)}",
        _test(_row(ev, "A-LRN", "table3"), _row(ev, "A", "table3"), expect_no_gain=True))
    c = _top1(ev, "C", "table3")
    add("C (with 1×1 convs) is worse than D (all 3×3)", f"C {f(c)}, D {f(d)}",
        _test(_row(ev, "C", "table3"), _row(ev, "D", "table3")))
    fixed = _top1(ev, "D-fixed", "table3")
    add("Scale jitter at training helps (D, S ∈ [256;512] vs S = 256)", f"fixed {f(fixed)}, jittered {f(d)}",
        _test(_row(ev, "D-fixed", "table3"), _row(ev, "D", "table3")))
    gains = [(_row(ev, run, "table3"), _row(ev, run, "table4")) for run in results["runs"]]
    gains = [(s, m) for s, m in gains if s and m and s.get("top1_err") is not None and m.get("top1_err") is not None]
    better = sum(1 for s, m in gains if m["top1_err"] < s["top1_err"])
    significant = sum(1 for s, m in gains if _outcome(_test(s, m)[0]) == HOLDS)
    paired = all(_test(s, m)[2] is not None for s, m in gains)
    d_multi = _top1(ev, "D", "table4")
    add("Multi-scale testing helps (D; dense at 3 scales vs 1)",
        f"D {f(d)} → {f(d_multi)}; better at multi-scale for {better} of {len(gains)} nets"
        + (f" (significantly for {significant})" if gains and paired else ""),
        _test(_row(ev, "D", "table3"), _row(ev, "D", "table4")))
    parts, tests, named = [], [], []
    for run in ("D", "E"):
        dense, crops, both = (_row(ev, run, k) or {} for k in ("dense", "multicrop", "both"))
        if any(r.get("top1_err") is None for r in (dense, crops, both)):
            continue
        parts.append(f"{run}: dense {f(dense['top1_err'])}, multi-crop {f(crops['top1_err'])}, "
                     f"both {f(both['top1_err'])}")
        v, text, _ = _test(min(dense, crops, key=lambda r: r["top1_err"]), both)
        named.append((run, v))
        tests.append(f"{run}: {text}")
    add("Dense and multi-crop evaluation are complementary (both < either)", "; ".join(parts) or "–",
        (_combine(named), "; ".join(tests) or "–", None))
    ens = _row(ev, "D+E", "both")
    singles = [r for r in (_row(ev, "D", "both"), _row(ev, "E", "both")) if r and r.get("top1_err") is not None]
    best_single = min(singles, key=lambda r: r["top1_err"]) if singles else None
    add("An ensemble (D+E) beats one net (dense + multi-crop)",
        f"D+E {f(_top1(ev, 'D+E', 'both'))}, best single {f(best_single['top1_err'] if best_single else None)}",
        _test(best_single, ens))
    return out


VERDICT_RULE = (
    "Verdicts come from a paired test on the same validation images, McNemar's exact test (two-sided mid-p): "
    "b counts the images only the net the paper expects to be better gets right, c those only the other net "
    "gets right, and Δ = (b − c) / n is the other net's top-1 error minus the expected-better one's, in points "
    "(> 0: the paper's way). **holds**: Δ > 0 with p < {alpha:g}; **contradicted**: Δ < 0 with p < {alpha:g}; "
    "**inconclusive**: p ≥ {alpha:g}. \"No gain\" (LRN): contradicted when A-LRN is significantly better, "
    "holds when the 95 % lower bound of Δ (Agresti–Min) is above −{margin:g} point, else inconclusive. "
    "Complementary evaluation is tested for D and for E (both against the better of dense and multi-crop); "
    "one net significant and the other not gives that net's outcome, significant both ways inconclusive. "
    "Multi-crop rows, D+E included, are on {n} images.")


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
    lines += ["", "## The paper's conclusions, here", "",
              "| conclusion | ours (top-1 err %) | paired test (Δ points, b/c, p) | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['conclusion']} | {c['evidence']} | {c['test']} | {c['verdict']} |" for c in conclusions(results)]
    lines += ["", VERDICT_RULE.format(alpha=ALPHA, margin=MARGIN, n=n), "",
              "![top-1 error per configuration](error_per_config.png)", ""]
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
