"""The reproduce harness: the study plan and a tiny end-to-end run that resumes (verdicts: test_reproduce_verdicts)."""

from __future__ import annotations

import json
import re

import pytest

from vggnet.cli import main
from vggnet.reproduce import conclusions, load_study, markdown_report, plot_errors, run_study
from vggnet.reproduce.paired import unpack_bits


def test_study_covers_the_six_configurations_and_the_papers_scales():
    study = load_study()
    assert sorted({r["config"] for r in study.runs.values()}) == ["A", "A-LRN", "B", "C", "D", "E"]
    assert study.runs["D-fixed"] == {"config": "D", "scale": "fixed"}
    # the paper's pixels over its 224 crop: S in [256, 512], Q in {256, 384, 512}; Q in {S-32, S, S+32}
    assert study.train_scales["jittered"] == pytest.approx([256 / 224, 512 / 224], abs=1e-3)
    assert study.protocols("D") == {"centre": "single@1.714", "table3": "dense@1.714",
                                    "table4": "dense@1.143,1.714,2.286", "dense": "dense@1.143,1.714,2.286",
                                    "multicrop": "multicrop@1.143,1.714,2.286"}
    assert study.protocols("D-fixed")["table4"] == "dense@1,1.143,1.286"
    assert "multicrop" not in study.protocols("A")
    sub = study.only(["A", "D"])
    assert list(sub.runs) == ["A", "D"] and sub.multicrop == ["D"] and sub.ensembles == {}
    with pytest.raises(ValueError, match="unknown run"):
        study.only(["F"])


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    study = load_study().only(["A", "D", "E"])
    logs: list[str] = []
    kwargs = dict(overrides=["schedule.epochs=1", "model.width=0.0625", "model.fc_width=32", "optim.batch_size=64"],
                  limit=40, multicrop_limit=12, batch_size=64, progress=False, log=logs.append)
    results = run_study(study, out, None, **kwargs)
    return study, out, results, logs, kwargs


def test_tiny_study_trains_evaluates_and_writes_everything(tiny_study):
    study, out, results, logs, _ = tiny_study
    assert [line.split("]")[1].split(":")[0].strip() for line in logs if line.startswith("[train")] == ["A", "D", "E"]
    # the study's training time left, at the pace of the runs finished so far (none before the first)
    train_lines = [line for line in logs if line.startswith("[train")]
    assert "left" not in train_lines[0]
    assert re.search(r" \(training: about \d\d:\d\d left for 2 runs\)$", train_lines[1]), train_lines[1]
    assert train_lines[2].endswith(" left for 1 run)"), train_lines[2]
    for run in ("A", "D", "E"):
        assert (out / "runs" / run / "last.safetensors").is_file()
        assert json.loads((out / "runs" / run / "final.json").read_text())["epoch"] == 1
    ev = results["evaluations"]
    assert ev["A"]["table3"]["n"] == 40 and ev["A"]["table3"]["protocol"] == "dense@1.714"
    assert ev["D"]["multicrop"]["n"] == 12 and ev["D"]["both"]["protocol"] == "dense+multicrop@1.143,1.714,2.286"
    assert set(ev["D+E"]) == {"dense", "multicrop", "both"}
    assert len(list((out / "eval").rglob("*.npy"))) == 3 * 3 + 2 * 2  # centre/table3/table4 + dense/multicrop
    assert json.loads((out / "results.json").read_text())["evaluations"] == json.loads(json.dumps(ev))
    for rows in ev.values():  # every row keeps which images it got right, for the paired verdicts
        for row in rows.values():
            correct = unpack_bits(row["top1_correct"], row["n"])
            assert 100 * (1 - correct.mean()) == pytest.approx(row["top1_err"])
    verdicts = {c["conclusion"].split(" (")[0]: c for c in conclusions(results)}
    for claim in ("Depth helps from A", "Multi-scale testing helps", "An ensemble"):  # A, D, E: paired tests
        assert verdicts[claim]["verdict"] in ("holds", "inconclusive", "contradicted"), verdicts[claim]
        assert "b/c" in verdicts[claim]["test"]
    assert verdicts["Dense and multi-crop evaluation are complementary"]["verdict"].split(" (")[0] in (
        "holds", "inconclusive", "contradicted")
    assert verdicts["LRN does not help"]["verdict"] == "not measured"
    report = markdown_report(study, results)
    assert "| D | dense+multicrop@1.143,1.714,2.286 |" in report
    assert "24.4 / 7.2" in report and "23.7 / 6.8" in report  # the paper's Table 5 and 6 figures beside ours
    assert "29.6 / 10.4 †" in report  # A: the paper trained it at S = 256 only
    png = plot_errors(study, results, out / "error_per_config.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_study_resumes_without_redoing_work(tiny_study):
    study, out, results, _, kwargs = tiny_study
    logs: list[str] = []
    again = run_study(study, out, None, **{**kwargs, "log": logs.append})
    assert all("done already" in line for line in logs if line.startswith("[train"))
    assert not [line for line in logs if line.startswith("[eval")]
    assert again["evaluations"] == results["evaluations"]


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path), "--runs", "A,Z"]) == 2
    assert "unknown run(s) Z" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path), "--limit", "0"]) == 2
    assert main(["reproduce", "--out", str(tmp_path), "--data", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
