"""Fair verdicts for the reproduce report: per-image results, McNemar's paired test, three outcomes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vggnet.cli import main
from vggnet.evaluate import eval_images
from vggnet.reproduce import conclusions
from vggnet.reproduce.paired import (
    Paired,
    compare,
    mcnemar_midp,
    no_gain_bound,
    pack_bits,
    unpack_bits,
    verdict,
)

OUTCOMES = ("holds", "inconclusive", "contradicted")


def _row(correct: np.ndarray, per_image: bool = True) -> dict:
    correct = np.asarray(correct, dtype=bool)
    row = {"protocol": "p", "n": len(correct), "top1_err": 100 * (1 - correct.mean()), "top5_err": 1.0,
           "top5_k": 5}
    return {**row, "top1_correct": pack_bits(correct)} if per_image else row


def _pair(n: int, b: int, c: int) -> tuple[dict, dict]:
    """(worse, better) rows on n images: b images only ``better`` gets right, c only ``worse``, the rest both."""
    better, worse = np.ones(n, bool), np.ones(n, bool)
    worse[:b] = False
    better[b:b + c] = False
    return _row(worse), _row(better)


def test_per_image_results_pack_to_one_bit_each_and_back():
    rng = np.random.default_rng(0)
    for n in (1, 13, 5000):
        correct = rng.random(n) < 0.7
        text = pack_bits(correct)
        assert len(text) == 4 * math.ceil(math.ceil(n / 8) / 3)  # 5,000 images: 836 characters
        assert np.array_equal(unpack_bits(text, n), correct)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(pack_bits(np.ones(16, bool)), 5)


def test_mcnemar_mid_p_is_exact():
    assert mcnemar_midp(0, 0) == 1.0 and mcnemar_midp(7, 7) == 1.0
    assert mcnemar_midp(0, 5) == pytest.approx(1 / 32)  # 2 * P(X = 0) / 2 with X ~ Bin(5, 1/2)
    assert mcnemar_midp(3, 9) == mcnemar_midp(9, 3)
    stats = pytest.importorskip("scipy.stats")  # mid-p = exact two-sided p - P(X = min(b, c))
    for b, c in ((3, 9), (40, 60), (480, 520), (1, 30)):
        exact = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_midp(b, c) == pytest.approx(exact - stats.binom.pmf(min(b, c), b + c, 0.5), rel=1e-9)


def test_paired_verdicts_on_hand_made_vectors():
    same = _row(np.arange(1000) % 3 != 0)
    pair = compare(same, same)
    assert isinstance(pair, Paired) and (pair.b, pair.c, pair.p, pair.diff) == (0, 0, 1.0, 0.0)
    assert verdict(pair) == "inconclusive"
    win = compare(*_pair(1000, 60, 20))  # 4 points better, 80 discordant images
    assert isinstance(win, Paired) and win.diff == pytest.approx(4.0) and win.p < 0.001
    assert verdict(win) == "holds"
    assert verdict(compare(*_pair(1000, 20, 60))) == "contradicted"
    small = compare(*_pair(5000, 520, 480))  # 0.8 points, but 1,000 images on which they disagree
    assert isinstance(small, Paired) and 0.1 < small.p < 0.5 and verdict(small) == "inconclusive"
    assert "b/c 520/480" in small.text() and "Δ +0.80" in small.text()


def test_no_gain_needs_a_gain_ruled_out_not_just_none_seen():
    # identical predictions on 5,000 images rule out a 1-point gain; on 40 images they do not
    assert verdict(compare(*_pair(5000, 0, 0)), expect_no_gain=True) == "holds"
    assert verdict(compare(*_pair(40, 0, 0)), expect_no_gain=True) == "inconclusive"
    # no difference, but so many disagreements that a 1-point gain is still possible
    many = compare(*_pair(5000, 500, 500))
    assert isinstance(many, Paired) and many.lower < -1 and verdict(many, expect_no_gain=True) == "inconclusive"
    # significantly better: the "no gain" conclusion is contradicted; significantly worse: it holds
    assert verdict(compare(*_pair(2000, 20, 80)), expect_no_gain=True) == "contradicted"
    assert verdict(compare(*_pair(2000, 80, 20)), expect_no_gain=True) == "holds"
    assert no_gain_bound(0, 0, 5000) == pytest.approx(-100 * 1.6449 / 5002, rel=1e-4)


def test_missing_per_image_results_fall_back_to_inconclusive():
    worse, better = _pair(100, 10, 0)
    old = {k: v for k, v in worse.items() if k != "top1_correct"}
    assert verdict(compare(old, better)) == "inconclusive (no per-image results)"
    assert verdict(compare(worse, _row(np.ones(99, bool)))) == "inconclusive (not the same images)"
    assert verdict(compare(None, better)) == "not measured"


def _results(wrong: dict[str, dict[str, tuple[int, int]]], n: int = 5000, per_image: bool = True) -> dict:
    """Evaluations where each row is wrong on the images [start, stop) and right on the rest."""
    def row(start: int, stop: int) -> dict:
        correct = np.ones(n, bool)
        correct[start:stop] = False
        return _row(correct, per_image)
    ev = {run: {key: row(*span) for key, span in rows.items()} for run, rows in wrong.items()}
    return {"evaluations": ev, "runs": {r: {} for r in wrong if r != "D+E"}}


def _verdicts(results: dict) -> dict[str, str]:
    return {c["conclusion"].split(" (")[0]: c["verdict"] for c in conclusions(results)}


def test_conclusions_hold_when_the_paper_wins_clearly():
    e = {  # error rates in % of 5,000 images, each net wrong on the first ones: nested, maximally paired
        "A": {"table3": 30, "table4": 29}, "A-LRN": {"table3": 30.2, "table4": 29},
        "B": {"table3": 28, "table4": 27}, "C": {"table3": 27, "table4": 26},
        "D": {"table3": 25, "table4": 23, "dense": 23, "multicrop": 23.5, "both": 20},
        "E": {"table3": 25, "table4": 23, "dense": 23, "multicrop": 23.5, "both": 20},
        "D-fixed": {"table3": 28, "table4": 27}, "D+E": {"both": 17}}
    results = _results({run: {k: (0, round(50 * v)) for k, v in rows.items()} for run, rows in e.items()})
    assert set(_verdicts(results).values()) == {"holds"}, _verdicts(results)
    table = {c["conclusion"].split(" (")[0]: c for c in conclusions(results)}
    assert table["Depth helps from A"]["test"].startswith("Δ +5.00, b/c 250/0, p < 0.001")
    assert "Δ ≥" in table["LRN does not help"]["test"]  # the no-gain bound is shown
    assert "significantly for 7" in table["Multi-scale testing helps"]["evidence"]
    # the same numbers without per-image results (an older results.json): no verdict is guessed
    old = _results({run: {k: (0, round(50 * v)) for k, v in rows.items()} for run, rows in e.items()},
                   per_image=False)
    assert set(_verdicts(old).values()) == {"inconclusive (no per-image results)"}


def test_small_differences_are_inconclusive_and_significant_reversals_contradict():
    results = _results({"A": {"table3": (0, 1275)},  # 25.5 %
                        "D": {"table3": (1000, 2250)},  # 25.0 %, disagreeing with A on 1,975 images
                        "A-LRN": {"table3": (0, 1100)},  # 22.0 %, nested in A's errors: significantly better
                        "C": {"table3": (1000, 2000)},  # 20.0 %, significantly better than D
                        "D-fixed": {"table3": (1000, 2250)}})  # the same errors as D
    v = _verdicts(results)
    assert v["Depth helps from A"] == "inconclusive"
    assert v["LRN does not help"] == "contradicted"
    assert v["C"] == "contradicted"
    assert v["Scale jitter at training helps"] == "inconclusive"
    assert v["An ensemble"] == v["Dense and multi-crop evaluation are complementary"] == "not measured"


def test_complementary_verdict_combines_d_and_e():
    clear = {"dense": (0, 1150), "multicrop": (0, 1175), "both": (0, 1000)}  # both 3 points better: holds
    tie = {"dense": (0, 1150), "multicrop": (0, 1175), "both": (1000, 2150)}  # same error, 2,000 disagreements
    worse = {"dense": (0, 1000), "multicrop": (0, 1175), "both": (0, 1150)}  # both 3 points worse
    v = _verdicts(_results({"D": clear, "E": tie}))
    assert v["Dense and multi-crop evaluation are complementary"] == "holds (D holds, E inconclusive)"
    v = _verdicts(_results({"D": clear, "E": worse}))
    assert v["Dense and multi-crop evaluation are complementary"] == "inconclusive (D holds, E contradicted)"
    v = _verdicts(_results({"D": worse, "E": worse}))
    assert v["Dense and multi-crop evaluation are complementary"] == "contradicted"


# (images A gets wrong, images A-LRN gets wrong, the verdict on "LRN does not help", the paired test's text)
PLANTED = [(12, 0, "contradicted", "Δ -30.00, b/c 0/12"),  # A-LRN significantly better
           (0, 12, "holds", "Δ +30.00, b/c 12/0"),  # A-LRN significantly worse: it does not help
           (0, 0, "inconclusive", "Δ +0.00, b/c 0/0")]  # the same predictions: 40 images cannot rule out a gain


@pytest.mark.slow
def test_smoke_study_from_the_cli_keeps_per_image_results_and_gives_verdicts(tmp_path, capsys):
    """`vggnet reproduce` end to end on the digits, two tiny nets (about 30 s of CPU)."""
    out = tmp_path / "study"
    argv = ["reproduce", "--out", str(out), "--runs", "A,A-LRN", "--epochs", "1", "--width", "0.0625",
            "--limit", "40", "--batch-size", "64", "--no-progress", "--set", "model.fc_width=32", "optim.batch_size=64"]
    assert main(argv) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    for run in ("A", "A-LRN"):
        for key in ("centre", "table3", "table4"):
            row = results["evaluations"][run][key]
            assert row["n"] == 40 and len(unpack_bits(row["top1_correct"], row["n"])) == 40
    measured = [c for c in conclusions(results) if c["verdict"] != "not measured"]  # the rest need B..E
    assert [c["conclusion"] for c in measured] == ["LRN does not help (A-LRN is no better than A)"]
    assert measured[0]["verdict"] in OUTCOMES and "b/c" in measured[0]["test"]
    # the trained nets' verdict is the one their own per-image results give (the direction and flag included)
    rows = {run: results["evaluations"][run]["table3"] for run in ("A", "A-LRN")}
    assert measured[0]["verdict"] == verdict(compare(rows["A-LRN"], rows["A"]), expect_no_gain=True)
    report = (out / "results.md").read_text()
    assert "| conclusion | ours (top-1 err %) | paired test (Δ points, b/c, p) | verdict |" in report
    assert "McNemar" in report
    # planted predictions (the cached probabilities the study reuses): each gives one verdict, and no other
    labels = np.asarray(eval_images(out / "runs" / "A", limit=40)[1])
    for a_wrong, lrn_wrong, expected, test in PLANTED:
        for run, wrong in (("A", a_wrong), ("A-LRN", lrn_wrong)):
            plant_predictions(out, run, results["evaluations"][run]["table3"]["protocol"], labels, wrong)
        assert main(argv) == 0
        capsys.readouterr()
        planted = {c["conclusion"]: c for c in conclusions(json.loads((out / "results.json").read_text()))}
        lrn = planted["LRN does not help (A-LRN is no better than A)"]
        assert lrn["verdict"] == expected and lrn["test"].startswith(test), lrn
        assert f"| {expected} |" in (out / "results.md").read_text()


def plant_predictions(out, run: str, protocol: str, labels: np.ndarray, wrong: int) -> None:
    """Replace a run's cached class probabilities for ``protocol``: right on every image but the first ``wrong``."""
    slug = protocol.replace("@", "_at_").replace(",", "_").replace(":", "_").replace("+", "_and_")
    path = out / "eval" / run / f"{slug}-n{len(labels)}.npy"
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())  # the cache's file naming changed?
    predicted = labels.copy()
    predicted[:wrong] = (labels[:wrong] + 1) % 10
    probs = np.full((len(labels), 10), 0.01, np.float32)
    probs[np.arange(len(labels)), predicted] = 0.91
    np.save(path, probs)
