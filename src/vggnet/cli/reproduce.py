"""``vggnet reproduce``: train the paper's six configurations, test them as the paper did, compare."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
import time
from pathlib import Path

from vggnet.atomic import write_text
from vggnet.errors import UsageError

EPILOG = """\
what it does:
  1. trains one net per study run (A, A-LRN, B, C, D, E with the jittered training scale, and D at a
     fixed scale as the control for "scale jitter helps") with recipes/reproduce.yaml, into OUT/runs/NAME
  2. evaluates each with the paper's protocols: dense at one test scale (Table 3), dense at three
     (Table 4), and for D and E multi-crop and dense+multi-crop (Table 5), plus the D+E ensemble (Table 6)
  3. writes OUT/results.md (our tables beside the paper's; per conclusion a verdict, holds, inconclusive or
     contradicted, from McNemar's paired test on the same images), OUT/results.json (errors, and which
     images each row got right) and OUT/error_per_config.png

  Run it again with the same --out to continue: finished nets and saved evaluations are skipped, an
  interrupted training resumes from its last checkpoint. Scales are the paper's relative to its 224 crop
  (S in [256, 512] -> [1.143, 2.286] x the crop), so CIFAR-10's 32-px images are upscaled, as the issue asks.

examples:
  vggnet reproduce --out runs/reproduce-smoke --epochs 1 --width 0.125 --limit 200    # smoke test, digits
  vggnet reproduce --data data/cifar10 --out runs/reproduce                            # the committed study
  vggnet reproduce --data data/cifar10 --out runs/reproduce --runs A,D --epochs 4
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the paper's ablations: train A..E, evaluate every protocol, table beside the paper's",
        description=textwrap.fill(
            "Reproduce the VGG paper's Tables 3-6 at a small scale: the six configurations trained with one "
            "recipe (small width, jittered training scale), evaluated with single-scale, multi-scale, dense, "
            "multi-crop and ensemble protocols, printed beside the paper's numbers with a verdict on each of "
            "its conclusions. Resumable.", width=100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="ImageFolder tree, e.g. data/cifar10 (default: the embedded digits)")
    p.add_argument("--out", default="runs/reproduce", help="study folder (default: runs/reproduce)")
    p.add_argument("--runs", help="comma-separated subset of the study's runs, e.g. A,D,E (default: all)")
    p.add_argument("--epochs", type=int, help="override schedule.epochs of the recipe")
    p.add_argument("--width", type=float, help="override model.width (conv width multiplier; recipe: 0.25)")
    p.add_argument("--no-bn", action="store_true", help="the paper's nets without batch norm (harder to train)")
    p.add_argument("--limit", type=int, help="evaluate on N validation images, evenly spread (default: all)")
    p.add_argument("--multicrop-limit", type=int,
                   help="images for the multi-crop rows (150 crops each; default: --limit)")
    p.add_argument("--recipe", default="reproduce", help="training recipe (default: reproduce)")
    p.add_argument("--study", help="a study YAML in place of the built-in one (see vggnet/reproduce/study.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (as in train)")
    p.add_argument("--batch-size", type=int, default=128, help="network inputs per forward pass when evaluating")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal, otherwise (a log, a pipe) a line every 30 s with the "
                   "time left, once a loop has run 30 s (the default); --no-progress: neither")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vggnet.data import DataError
    from vggnet.reproduce import load_study, markdown_report, plot_errors, run_study

    start = time.perf_counter()
    for name in ("limit", "multicrop_limit", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.data is not None and not Path(args.data).is_dir():
        raise DataError(f"--data {args.data}: no such folder")
    study = load_study(args.study)
    if args.runs:
        study = study.only([r.strip() for r in args.runs.split(",") if r.strip()])
    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    if args.width is not None:
        overrides.append(f"model.width={args.width}")
    results = run_study(study, args.out, args.data, recipe=args.recipe, overrides=overrides, bn=not args.no_bn,
                        limit=args.limit, multicrop_limit=args.multicrop_limit, batch_size=args.batch_size,
                        progress=args.progress)
    out = Path(args.out)
    plot_errors(study, results, out / "error_per_config.png")
    command = "vggnet reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == [
        "reproduce"] else None
    report = markdown_report(study, results, command=command, wall_seconds=time.perf_counter() - start)
    write_text(out / "results.md", report)
    print(report)
    return 0
