"""``vggnet probe``: linear models on saved features (the paper's Appendix B)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

TEST_SPLITS = ("all", "train", "val")  # vggnet.transfer.probe.TEST_SPLITS, spelled out: --help imports no numpy

EPILOG = """\
files:
  A features file is the .npz written by `vggnet features`: one L2-normalised descriptor per image, its
  label, the class names, a train/val split per image and the extraction settings (network, layer,
  scales). One file with both splits is enough: train rows fit the model, val rows test it. With --test,
  the train file's train rows (all rows if it has none) fit and EVERY row of the test file is tested,
  whatever train/val split `vggnet features` gave it (a plain test folder gets a 10 % val split by
  default, which means nothing here). --test-split val (or train) scores only those rows of the test
  file, e.g. when it holds both splits of a folder whose train images also went into --train; a file
  given as both --train and --test is always train rows vs val rows. The table, probe.json and probe.md
  say how many rows of which split were fitted and tested. Both files must come from the same network,
  layer, scales and class list.

protocol (the paper's Appendix B):
  a linear SVM (scikit-learn LinearSVC) on the descriptors, its C chosen by stratified k-fold
  cross-validation on the TRAINING features only (grid 1e-3 ... 1e3); the test features are used once.
  --model logreg fits a logistic regression the same way. A class with fewer than 2 training images
  makes cross-validation impossible: C = 1 is used and the report says so.

reported (percent):
  test accuracy, per-class accuracy, and mAP: the mean over classes of the one-vs-rest average
  precision of the model's scores, as the paper reports for VOC; also the chosen C and its CV accuracy.
  --out writes probe.json (everything, incl. confusion matrices), probe.md and confusion_<model>.png.

examples:
  vggnet features --ckpt runs/demo --out runs/demo/feats.npz
  vggnet probe --train runs/demo/feats.npz --out runs/demo/probe
  vggnet probe --train voc_train.npz --test voc_test.npz --model svm --folds 3 --json   # all of voc_test
  vggnet probe --train photos.npz --test more.npz --test-split val        # only the val rows of more.npz
"""


def _c_grid(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear SVM / logistic regression on saved features, C by cross-validation (the paper's App. B)",
        description=textwrap.fill(
            "Fit linear models on features saved by `vggnet features` and score them on held-out features, "
            "as the paper transfers VGG to other data sets: a linear SVM on the L2-normalised descriptors, "
            "C chosen by cross-validation on the training features. Prints a Markdown table (C, CV accuracy, "
            "test accuracy, mAP) and the features it used.", width=100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--train", required=True, metavar="NPZ", help="features file to fit on (`vggnet features`)")
    p.add_argument("--test", metavar="NPZ",
                   help="features file to test on, every row of it (default: the val rows of --train)")
    p.add_argument("--test-split", choices=TEST_SPLITS, default=None,
                   help="rows of --test to score: all, or only those `vggnet features` marked train or val "
                        "(default: all; without --test, the val rows of --train)")
    p.add_argument("--model", choices=("svm", "logreg", "both"), default="both",
                   help="linear SVM, logistic regression or both (default: both)")
    p.add_argument("--folds", type=int, default=5,
                   help="cross-validation folds for C, capped by the smallest class (default: 5)")
    p.add_argument("--c-grid", type=_c_grid, metavar="C,C,...",
                   help="values of C to cross-validate (default: 0.001,0.01,0.1,1,10,100,1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold shuffle and solvers (default: 0)")
    p.add_argument("--out", metavar="DIR", help="folder for probe.json, probe.md and confusion_<model>.png")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vggnet.transfer.probe import MODELS, markdown_table, probe_files, write_report

    models = MODELS if args.model == "both" else (args.model,)
    report, _, _ = probe_files(args.train, args.test, args.test_split, models=models, c_grid=args.c_grid,
                               folds=args.folds, seed=args.seed)
    if args.out:  # before printing: output piped into `head` must not cost the files
        write_report(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"features: {report['features']}, {len(report['classes'])} classes (train: {report['train_file']}, "
              f"{report['train_rows']}; test: {report['test_file']}, {report['test_rows']})\n")
        print(markdown_table(report))
    if report["shared_paths"]:  # likely the same images on both sides: say so rather than refuse a deliberate run
        print(f"vggnet probe: warning: {report['shared_paths']} tested images are also training images (same file "
              f"paths); the scores are not on held-out images (--test-split val tests only the val rows of --test)",
              file=sys.stderr)
    for r in report["results"].values():
        for note in r["warnings"]:
            print(f"vggnet probe: warning: {r['model']}: {note}", file=sys.stderr)
    return 0
