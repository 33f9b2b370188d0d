"""``vggnet monitor``: what the prediction store says about the live versions (issue 30).

Nothing heavy at the top: ``--help`` imports neither SQLAlchemy nor scipy; ``report`` imports them when it runs.
"""

from __future__ import annotations

import argparse

from vggnet.errors import UsageError

REPORT_EPILOG = """\
what 'reviewed' means:
  A prediction is reviewed when its request is in the uniform random review sample (the server flags a
  fixed share of requests, chosen at random) and a person labelled it from the review queue; the latest
  label per request and image wins. Accuracy is correct / reviewed on that sample only, with its Wilson
  interval at 1 - alpha. Reviews of requests outside the sample and the clients' own reports ("user
  reports", counted apart with how many say the answer was right) are a biased sample: never in the
  accuracy. A "none of these" label counts as wrong for every version.

how the verdict is made:
  Per model the champion is the version that answered the most requests (a shadow version answers none);
  every other version is a challenger. When both predicted mostly the same reviewed requests (shadow
  mode), McNemar's exact mid-p test compares them on the requests exactly one got right; otherwise (a
  weighted split) a two-proportion z test compares each version's own reviewed sample. p < alpha
  (two-sided): better or worse; else not yet known, with about how many more reviews at the rates seen
  so far would decide it (none: no difference seen, more of the same never decides).

examples:
  vggnet monitor report --store sqlite:///runs/serve/predictions.db
  vggnet monitor report --store postgresql://monitor@db/vggnet --model digits --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor", help="live accuracy per model version from the prediction store, and A/B verdicts",
        description="Read the prediction store that `vggnet serve` writes: live accuracy per model version on "
        "the random review sample, user reports apart, and whether a challenger version is better or worse.",
    )
    p.set_defaults(func=lambda args: _help(p))
    actions = p.add_subparsers(dest="monitor_command", metavar="ACTION")
    report = actions.add_parser(
        "report", help="per version: requests, reviewed, accuracy with its interval, user reports, verdict",
        description="Per model and version: requests answered (shadow predictions apart), reviewed predictions, "
        "accuracy with its Wilson interval, user reports, and each challenger's verdict against the champion.",
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("--store", required=True, metavar="URL",
                        help="the store's SQLAlchemy URL, e.g. sqlite:///predictions.db or postgresql://...")
    report.add_argument("--model", metavar="M", help="only this model (default: every model in the store)")
    report.add_argument("--json", action="store_true", help="print JSON (one object per version) instead of a table")
    report.add_argument("--alpha", type=float, default=0.05,
                        help="two-sided significance level of the verdicts; intervals are at 1 - alpha (default 0.05)")
    report.set_defaults(func=run_report)

    from vggnet.cli import monitor_reference  # a module of its own: drift.json and ood.json beside a checkpoint

    monitor_reference.register(actions)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def run_report(args: argparse.Namespace) -> int:
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must lie strictly between 0 and 1, got {args.alpha}")
    from vggnet.monitor import markdown_report, report_json, version_report
    from vggnet.store import connect

    rows = version_report(connect(args.store, create=False), model=args.model, alpha=args.alpha)
    if not rows:
        print("no predictions in the store" + (f" for model {args.model}" if args.model else "") + " yet")
        return 0
    print(report_json(rows) if args.json else markdown_report(rows).rstrip("\n"))
    return 0
