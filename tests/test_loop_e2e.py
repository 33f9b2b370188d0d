"""Issue #31 end to end on the digits: one turn of the production loop, every step through the command or the
HTTP API a user would use (benchmarks/loop.py runs it; this test checks each step).

v1 is trained weak on purpose (20 images per class), registered in a real MLflow registry (SQLite) and served from
it by a real `vggnet serve --registry` process with a SQLite prediction store; a background client sends requests
throughout. The traffic's random sample and every mistake are reviewed through the API with the true labels;
`vggnet retrain` produces v2, which passes the gate and becomes challenger; the server loads it in shadow without a
restart; after fresh traffic and reviews `vggnet monitor report` calls v2 better; `promote` makes it champion and
the server switches; `rollback` restores v1; the background client saw no error. A second retrain from the same
store with every reviewed label moved to the wrong class fails the gate and aliases nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import loop  # noqa: E402  benchmarks/loop.py: the turn the benchmark measures is the one tested here


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    return loop.turn(tmp_path_factory.mktemp("loop"), seed=0, original_per_class=20, epochs=6)


def test_retrained_version_passes_the_gate_and_becomes_challenger(seen):
    assert seen["reviewed_mistakes_a"] > 20 and seen["reviewed_queue_a"] > 100
    assert seen["retrain_exit"] == 0 and seen["gate"]["passed"], seen["gate"]["reason"]
    assert seen["registered"] == {**seen["registered"], "version": "2", "parent": "1", "alias": "challenger"}
    assert seen["aliases_after_retrain"] == {"champion": "1", "challenger": "2"}


def test_server_follows_the_registry_without_a_restart_or_a_failed_request(seen):
    background = seen["background"]
    assert background["errors"] == [] and background["sent"] > 200
    assert background["versions"] == ["1", "2"]  # it was answered by both champions in turn
    assert seen["shadow_ready_s"] < 60 and seen["switch_to_v2_s"] < 60 and seen["switch_to_v1_s"] < 60


def test_live_report_calls_v2_better_and_promotion_then_rollback_move_champion(seen):
    v1, v2 = seen["report"]["1"], seen["report"]["2"]
    assert v1["champion"] and v2["shadow"] > 0 and v2["reviewed"] > 100
    assert v2["verdict"]["verdict"] == "better", v2["verdict"]
    assert seen["promote_exit"] == 0 and seen["aliases_after_promote"] == {"champion": "2", "previous-champion": "1"}
    assert seen["rollback_exit"] == 0 and seen["aliases_after_rollback"] == {"champion": "1"}
    # the offline truth on the fresh traffic agrees with the verdict
    assert seen["accuracy_b"]["v2"] > seen["accuracy_b"]["v1"]


def test_mislabelled_reviews_fail_the_gate_and_alias_nothing(seen):
    assert seen["mislabelled_reviews"] > 100
    assert seen["mislabelled_exit"] == 3 and not seen["mislabelled_gate"]["passed"]
    assert not seen["mislabelled_gate"]["original_val"]["passed"]  # caught on the champion's own validation split
    assert seen["registered_mislabelled"]["alias"] is None and seen["registered_mislabelled"]["version"] == "3"
    assert seen["aliases_after_mislabelled"] == {"champion": "1"}
