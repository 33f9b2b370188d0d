"""`vggnet monitor report` on planted stores: accuracy on the random review sample only, and fair A/B verdicts.

Every store is SQLite in tmp_path with rows whose truth is known: the verdicts, counts and intervals below are
what the planted data must give, checked by hand where a number is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

import vggnet.store  # noqa: E402
from vggnet.monitor import BETTER, UNKNOWN, WORSE, markdown_report, report_json, version_report  # noqa: E402
from vggnet.stats import (  # noqa: E402
    mcnemar_midp,
    paired_reviews_needed,
    two_proportion_reviews_needed,
    two_proportion_z,
    wilson_interval,
)
from vggnet.store import schema  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TRUE, WRONG = "cat", "dog"


class Store:
    """A planted store: predictions and labels added by helper calls, inserted in one go."""

    def __init__(self, tmp_path):
        self.url = f"sqlite:///{tmp_path / 'predictions.db'}"
        connect = getattr(vggnet.store, "connect", None)  # the store's own (it migrates), once it has landed
        if connect is not None:
            self.engine = connect(self.url)
        else:
            self.engine = sqlalchemy.create_engine(self.url)
            schema.metadata.create_all(self.engine)
        self.preds: list[dict] = []
        self.labs: list[dict] = []

    def predict(self, rid: str, version: str, right: bool, *, role: str = "served", sampled: bool = True,
                model: str = "digits") -> None:
        self.preds.append({"request_id": rid, "item": 0, "created_at": T0, "model": model, "version": version,
                           "role": role, "route": "/v2", "predicted": TRUE if right else WRONG, "confidence": 0.9,
                           "topk": [], "sampled": sampled})

    def label(self, rid: str, label: str | None = TRUE, *, source: str = "review", minutes: int = 0,
              model: str = "digits") -> None:
        self.labs.append({"request_id": rid, "item": 0, "model": model, "label": label, "source": source,
                          "who": "ann", "created_at": T0 + timedelta(minutes=minutes)})

    def paired(self, prefix: str, both: int, only_old: int, only_new: int, neither: int) -> None:
        """Reviewed sampled requests answered by v1 (served) and run by v2 in shadow: the four cells given."""
        cells = [(True, True)] * both + [(True, False)] * only_old + [(False, True)] * only_new
        for i, (old, new) in enumerate(cells + [(False, False)] * neither):
            self.predict(f"{prefix}{i}", "v1", old)
            self.predict(f"{prefix}{i}", "v2", new, role="shadow")
            self.label(f"{prefix}{i}")

    def report(self, **kwargs) -> dict[str, dict]:
        with self.engine.begin() as conn:
            if self.preds:
                conn.execute(sqlalchemy.insert(schema.predictions), self.preds)
            if self.labs:
                conn.execute(sqlalchemy.insert(schema.labels), self.labs)
        self.preds, self.labs = [], []
        return {row["version"]: row for row in version_report(self.engine, **kwargs)}


# --- the statistics -------------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_hand_computed_value():
    # 80 of 100, z = 1.959964: centre (0.8 + z²/200) / (1 + z²/100) = 0.788902, half-width
    # z sqrt(0.8 * 0.2 / 100 + z² / 40000) / (1 + z²/100) = 0.077731  ->  [0.711171, 0.866633]
    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.711171, abs=2e-6) and high == pytest.approx(0.866633, abs=2e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)  # stays inside [0, 1], unlike Wald's
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z²/(n+z²)
    assert wilson_interval(80, 100, alpha=0.01)[0] < 0.711171  # a higher level, a wider interval


def test_reproduce_uses_the_one_mcnemar_test():
    from vggnet.reproduce import paired

    assert paired.mcnemar_midp is mcnemar_midp


def test_two_proportion_z_is_the_pooled_textbook_test():
    z, p = two_proportion_z(225, 300, 85, 100)
    pooled = 310 / 400
    assert z == pytest.approx((0.85 - 0.75) / math.sqrt(pooled * (1 - pooled) * (1 / 300 + 1 / 100)))
    assert p == pytest.approx(2 * (1 - NormalDist().cdf(z)))
    assert two_proportion_z(85, 100, 225, 300)[0] == pytest.approx(-z)  # sign: the second sample higher
    assert two_proportion_z(5, 5, 7, 7) == (0.0, 1.0) and two_proportion_z(0, 0, 3, 4) == (0.0, 1.0)


def test_projection_of_more_paired_reviews():
    assert paired_reviews_needed(60, 20, 400) == 0  # already decided
    assert paired_reviews_needed(25, 25, 400) is None  # no difference seen: never
    more = paired_reviews_needed(28, 22, 400)
    assert more is not None and more > 0
    total = 400 + more  # at the observed rates the mid-p falls below 0.05 there, and not one review earlier
    assert mcnemar_midp(round(28 * total / 400), round(22 * total / 400)) < 0.05
    assert mcnemar_midp(round(28 * (total - 1) / 400), round(22 * (total - 1) / 400)) >= 0.05
    # unpaired: z grows as the square root of the total, the split kept
    more = two_proportion_reviews_needed(75, 100, 80, 100)
    scale = (200 + more) / 200
    assert two_proportion_z(round(75 * scale), round(100 * scale), round(80 * scale), round(100 * scale))[1] < 0.051
    assert two_proportion_reviews_needed(75, 100, 75, 100) is None


# --- the report -----------------------------------------------------------------------------------------------


def test_a_challenger_ten_points_better_in_shadow_mode_is_better(tmp_path):
    """(a) 400 paired reviews: v1 right on 300 (75 %), v2 on 340 (85 %): 280 both, 20 only v1, 60 only v2."""
    store = Store(tmp_path)
    store.paired("r", both=280, only_old=20, only_new=60, neither=40)
    for i in range(600):  # traffic outside the review sample: counted as requests, never as reviews
        store.predict(f"u{i}", "v1", True, sampled=False)
        store.predict(f"u{i}", "v2", True, role="shadow", sampled=False)
    rows = store.report()
    old, new = rows["v1"], rows["v2"]
    assert old["champion"] and old["verdict"] is None and not new["champion"]
    assert (old["requests"], old["shadow"], new["requests"], new["shadow"]) == (1000, 0, 0, 1000)
    assert (old["reviewed"], old["correct"], new["reviewed"], new["correct"]) == (400, 300, 400, 340)
    assert old["accuracy"] == 0.75 and new["accuracy"] == 0.85
    v = new["verdict"]
    assert (v["verdict"], v["test"], v["n"], v["b"], v["c"]) == (BETTER, "mcnemar-midp", 400, 60, 20)
    assert v["p"] == pytest.approx(mcnemar_midp(60, 20)) and v["p"] < 1e-5


def test_the_same_evidence_the_other_way_round_is_worse(tmp_path):
    """The direction matters: v2 served and v1 in shadow, so v1 (the 10-points-better one) is now challenger."""
    store = Store(tmp_path)
    for i, (old, new) in enumerate([(True, True)] * 280 + [(True, False)] * 20 + [(False, True)] * 60
                                   + [(False, False)] * 40):
        store.predict(f"r{i}", "v2", new)  # v2 (85 %) answers, v1 (75 %) runs in shadow
        store.predict(f"r{i}", "v1", old, role="shadow")
        store.label(f"r{i}")
    rows = store.report()
    assert rows["v2"]["champion"] and rows["v1"]["verdict"]["verdict"] == WORSE
    assert (rows["v1"]["verdict"]["b"], rows["v1"]["verdict"]["c"]) == (20, 60)


def test_two_equal_versions_are_not_called_different(tmp_path):
    """(b) both right on 300 of 400, 25 discordant pairs each way: not yet known, and more reviews never decide."""
    store = Store(tmp_path)
    store.paired("r", both=275, only_old=25, only_new=25, neither=75)
    v = store.report()["v2"]["verdict"]
    assert (v["verdict"], v["test"], v["b"], v["c"], v["p"]) == (UNKNOWN, "mcnemar-midp", 25, 25, 1.0)
    assert v["more_reviews"] is None
    store.paired("s", both=0, only_old=0, only_new=4, neither=0)  # now 29 vs 25: still not known, a finite number
    v = store.report()["v2"]["verdict"]
    assert v["verdict"] == UNKNOWN and v["more_reviews"] == paired_reviews_needed(29, 25, 404) > 0


def test_a_weighted_split_uses_the_two_proportion_test(tmp_path):
    """(c) no shared requests: v1 answers 900 (300 reviewed, 225 right), v2 answers 100 (all reviewed, 85 right)."""
    store = Store(tmp_path)
    for i in range(900):
        store.predict(f"a{i}", "v1", i < 225 or i >= 300, sampled=i < 300)
        if i < 300:
            store.label(f"a{i}")
    for i in range(100):
        store.predict(f"b{i}", "v2", i < 85)
        store.label(f"b{i}")
    rows = store.report()
    assert rows["v1"]["champion"] and (rows["v1"]["reviewed"], rows["v1"]["correct"]) == (300, 225)
    v = rows["v2"]["verdict"]
    assert v["test"] == "two-proportion-z" and "b" not in v
    z, p = two_proportion_z(225, 300, 85, 100)  # z = 2.07, p = 0.038: the ten points are significant
    assert v["z"] == pytest.approx(z) and v["p"] == pytest.approx(p) and v["verdict"] == BETTER
    assert store.report(alpha=0.01)["v2"]["verdict"]["verdict"] == UNKNOWN


def test_accuracy_counts_only_reviewed_rows_of_the_random_sample(tmp_path):
    """(d) 100 sampled requests, 80 right by their latest review label; nothing else moves the accuracy."""
    store = Store(tmp_path)
    for i in range(100):
        store.predict(f"s{i}", "v1", i < 80)
        store.label(f"s{i}", None if i >= 95 else TRUE)  # "none of these": wrong, whatever was predicted
        store.label(f"s{i}", TRUE if i < 80 else None, source="user", minutes=5)  # user reports: biased, apart
    for i in range(10):  # a reviewer changed their mind: the later label wins
        store.label(f"s{i}", WRONG, minutes=-10)
    for i in range(50):  # reviewed outside the random sample (e.g. from a complaint), all wrong
        store.predict(f"x{i}", "v1", False, sampled=False)
        store.label(f"x{i}")
        store.label(f"x{i}", source="user")
    row = store.report()["v1"]
    assert (row["reviewed"], row["correct"], row["accuracy"]) == (100, 80, 0.8)
    assert row["interval"] == pytest.approx([0.711171, 0.866633], abs=2e-6)  # (e) Wilson, as computed by hand
    assert row["reviewed_outside_sample"] == 50
    assert (row["user_reports"], row["user_reports_right"]) == (150, 80)


def test_none_of_these_is_wrong_for_every_version(tmp_path):
    store = Store(tmp_path)
    store.predict("r0", "v1", True)
    store.predict("r0", "v2", False, role="shadow")
    store.label("r0", None)
    rows = store.report()
    assert rows["v1"]["correct"] == rows["v2"]["correct"] == 0 and rows["v2"]["verdict"]["b"] == 0


def test_a_shadow_row_is_in_the_sample_when_its_request_is(tmp_path):
    """The sample draws requests: a shadow row not flagged itself still counts when the served row is."""
    store = Store(tmp_path)
    store.predict("r0", "v1", True)
    store.predict("r0", "v2", True, role="shadow", sampled=False)
    store.label("r0")
    assert store.report()["v2"]["reviewed"] == 1


def test_no_reviews_yet_and_models_apart(tmp_path):
    store = Store(tmp_path)
    store.predict("r0", "v1", True, sampled=False)
    store.predict("r0", "v2", True, role="shadow", sampled=False)
    store.predict("q0", "v7", True, model="other")
    assert version_report(store.engine) == []  # an empty store (the helper inserts on report())
    rows = store.report()
    assert rows["v2"]["verdict"]["verdict"] == UNKNOWN and rows["v2"]["verdict"]["test"] is None
    assert rows["v1"]["accuracy"] is None and rows["v1"]["interval"] is None
    assert set(store.report(model="other")) == {"v7"} and store.report(model="nope") == {}


def test_markdown_and_json_forms(tmp_path):
    store = Store(tmp_path)
    store.paired("r", both=280, only_old=20, only_new=60, neither=40)
    store.report()
    rows = version_report(store.engine)
    text = markdown_report(rows)
    assert "| digits | v1 | champion | 400 | 0 | 400 | 75.0 % [70.5, 79.0] |" in text
    assert "digits v2 vs v1: better (McNemar mid-p on 400 paired reviews: 60 only v2 right, 20 only v1 right" in text
    assert json.loads(report_json(rows)) == rows


# --- the command line -----------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    """Run `vggnet ...`, skipping (with the reason) while a piece it needs has not landed yet."""
    from vggnet import store
    from vggnet.cli import SUBCOMMAND_HELP, main

    if not hasattr(store, "connect"):
        pytest.skip("vggnet.store.connect does not exist yet (the prediction store is another change)")
    if "monitor" not in SUBCOMMAND_HELP:
        pytest.skip("'monitor' is not registered in vggnet.cli.SUBCOMMAND_HELP yet")
    return main(argv)


def test_cli_prints_the_table_and_json(tmp_path, capsys):
    """(f)"""
    store = Store(tmp_path)
    store.paired("r", both=280, only_old=20, only_new=60, neither=40)
    store.report()
    assert _cli(["monitor", "report", "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert "| digits | v2 | challenger | 0 | 400 | 400 | 85.0 %" in out and "v2 vs v1: better" in out
    assert _cli(["monitor", "report", "--store", store.url, "--json", "--model", "digits"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["v1", "v2"] and rows[1]["verdict"]["verdict"] == BETTER


def test_cli_empty_store_and_bad_url(tmp_path, capsys):
    from vggnet.store import connect

    connect(f"sqlite:///{tmp_path / 'empty.db'}").dispose()  # what a server started with --store creates
    assert _cli(["monitor", "report", "--store", f"sqlite:///{tmp_path / 'empty.db'}"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "no predictions in the store yet"
    typo = tmp_path / "typo" / "serve.db"  # a mistyped path is an error, not a new empty database
    assert _cli(["monitor", "report", "--store", f"sqlite:///{typo}"]) == 2
    assert f"no such database file {typo}" in capsys.readouterr().err and not typo.parent.exists()
    assert _cli(["monitor", "report", "--store", "not a url"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggnet monitor: error:") and len(err.strip().splitlines()) == 1
    assert _cli(["monitor", "report", "--store", "sqlite://", "--alpha", "1.5"]) == 2


def test_report_help_says_what_reviewed_means_and_how_the_verdict_is_made():
    from vggnet.cli import monitor

    parser = argparse.ArgumentParser(prog="vggnet")
    monitor.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["monitor"]
    text = sub._subparsers._group_actions[0].choices["report"].format_help()
    for phrase in ("uniform random review sample", "Wilson", "McNemar", "two-proportion", "not yet known",
                   "never in the\n  accuracy"):
        assert phrase in text, phrase
