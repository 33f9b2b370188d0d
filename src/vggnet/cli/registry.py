"""``vggnet registry``: model versions in the MLflow Model Registry (issue 31): register, list, promote, rollback.

Nothing heavy at the top: ``--help`` imports neither MLflow nor SQLAlchemy. ``promote`` takes its evidence from
the prediction store through :mod:`vggnet.monitor` (the registry room imports no other room; this command joins
them): the version must be called 'better' than the current champion, unless ``--force`` with a ``--reason``.
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import Any

from vggnet.errors import UsageError

HELP = "model registry (MLflow): register a run's checkpoint, list versions, promote with evidence, roll back"

EPILOG = """\
the registry:
  The MLflow tracking store: --tracking-uri, else $MLFLOW_TRACKING_URI, else the SQLite store training writes
  beside the runs (runs/mlruns/mlflow.db; for `register`, mlruns/ beside RUN). Aliases: champion (served),
  challenger (may replace it), previous-champion (where rollback goes). The data fingerprint is the sha256 of
  the recipe's data section as canonical JSON: it names the data settings, not the data's bytes.

examples:
  vggnet registry register runs/demo --name digits
  vggnet registry register runs/demo-v2 --name digits --parent 1 --challenger
  vggnet registry list digits
  vggnet registry promote digits --store sqlite:///runs/serve/predictions.db
  vggnet registry promote digits --version 2 --force --reason "hotfix for the 7s"
  vggnet registry rollback digits
  vggnet registry mode digits ab:0.1      # the challenger answers 10 % (default: shadow); `vggnet serve
                                          # --registry --model digits` follows it within a poll
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: _help(p))
    actions = p.add_subparsers(dest="registry_command", metavar="ACTION")

    reg = actions.add_parser("register", help="record a run's best checkpoint as a new version of a model")
    reg.add_argument("run", metavar="RUN", type=Path, help="the run folder (best.safetensors, else last)")
    reg.add_argument("--name", required=True, metavar="M", help="the registered model's name")
    reg.add_argument("--parent", type=int, metavar="N", help="the version this one was trained from (lineage)")
    reg.add_argument("--challenger", action="store_true", help="alias the new version 'challenger'")
    reg.set_defaults(func=run_register)

    ls = actions.add_parser("list", help="a model's versions: aliases, created, val top-1, checkpoint, parent")
    ls.add_argument("name", metavar="M")
    ls.set_defaults(func=run_list)

    pro = actions.add_parser("promote", help="move 'champion' to a version shown better on live reviewed traffic")
    pro.add_argument("name", metavar="M")
    pro.add_argument("--version", type=int, metavar="N", help="the version to promote (default: the challenger)")
    pro.add_argument("--store", metavar="URL", help="the prediction store whose `vggnet monitor report` is the "
                     "evidence: version N must be 'better' than the champion")
    pro.add_argument("--force", action="store_true", help="promote without evidence (needs --reason)")
    pro.add_argument("--reason", metavar="TEXT", help="why a forced promotion (recorded)")
    pro.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict (default 0.05)")
    pro.set_defaults(func=run_promote)

    rb = actions.add_parser("rollback", help="move 'champion' back to the previous champion")
    rb.add_argument("name", metavar="M")
    rb.set_defaults(func=run_rollback)

    mode = _add_mode(actions)
    for action in (reg, ls, pro, rb, mode):
        action.add_argument("--tracking-uri", metavar="URI", help="the MLflow tracking / registry URI "
                            "(default: $MLFLOW_TRACKING_URI, else runs/mlruns/mlflow.db)")
    for action in (pro, rb, mode):
        action.add_argument("--who", metavar="NAME", help="who acts (recorded; default: the OS user)")


def _add_mode(actions: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``vggnet registry mode M [shadow|ab:W]``: how a server following the registry serves the challenger."""
    from vggnet.registry.serving import MODE_HELP

    mode = actions.add_parser("mode", help="how `vggnet serve --registry` serves the challenger: shadow or an A/B "
                              "share (without a value: show it)")
    mode.add_argument("name", metavar="M")
    mode.add_argument("mode", metavar="MODE", nargs="?", help=f"{MODE_HELP}; default shadow; stored on the "
                      "registered model (tag vggnet.challenger_mode) and recorded as an event")
    mode.set_defaults(func=run_mode)
    return mode


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _client(args: argparse.Namespace, runs_dir: Path | None = None, create: bool = False) -> Any:
    from vggnet.registry import open_registry, resolve_uri

    return open_registry(resolve_uri(args.tracking_uri, runs_dir, create=create))


def run_register(args: argparse.Namespace) -> int:
    from vggnet.registry import register_run

    client = _client(args, runs_dir=args.run.resolve().parent, create=True)
    mv = register_run(client, args.name, args.run, parent=args.parent, challenger=args.challenger)
    aliases = ", ".join(sorted(a for a, v in client.get_registered_model(args.name).aliases.items()
                               if str(v) == str(mv.version)))
    print(f"registered {args.name} version {mv.version}" + (f" ({aliases})" if aliases else "")
          + f" from {mv.tags['checkpoint']}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from vggnet.registry import list_versions

    rows = list_versions(_client(args), args.name)
    head = ("version", "aliases", "created (UTC)", "val top-1", "checkpoint", "parent")
    table = [head] + [(r.version, ",".join(r.aliases) or "-", r.created, r.val_top1 or "-", r.checkpoint,
                       r.parent or "-") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def evidence_from_store(store: str, model: str, version: str, champion: str, alpha: float) -> dict[str, Any]:
    """The monitor's verdict on ``version`` against ``champion``; refused (UsageError) unless it is 'better'."""
    from vggnet.monitor import BETTER, version_report
    from vggnet.store import connect, safe_url

    rows = version_report(connect(store, create=False), model=model, alpha=alpha)
    row = next((r for r in rows if r["version"] == version), None)
    if row is None:
        raise UsageError(f"no evidence: the store has no predictions of {model} version {version}")
    verdict = row["verdict"]
    if verdict is None or verdict.get("against") != champion:
        against = row["version"] if verdict is None else verdict.get("against")
        raise UsageError(f"no evidence: the store judges {model} against version {against}, not the champion "
                         f"{champion}")
    if verdict["verdict"] != BETTER:
        raise UsageError(f"no evidence: the monitor calls version {version} '{verdict['verdict']}' against "
                         f"champion {champion} (p={verdict.get('p')})")
    keep = ("verdict", "against", "test", "p", "alpha", "n", "b", "c")
    return {**{k: verdict[k] for k in keep if k in verdict}, "store": safe_url(store),
            "reviewed": row["reviewed"], "accuracy": row["accuracy"]}


def run_promote(args: argparse.Namespace) -> int:
    from vggnet.registry import challenger_of, champion_of, promote

    if args.force and not args.reason:
        raise UsageError("--force needs --reason TEXT (it is recorded with the promotion)")
    if not args.force and not args.store:
        raise UsageError("no evidence: pass --store URL (the monitor must call the version better than the "
                         "champion), or --force with --reason")
    client = _client(args)
    version = str(args.version) if args.version is not None else challenger_of(client, args.name)
    if version is None:
        raise UsageError(f"{args.name} has no challenger: pass --version N")
    evidence = None
    if not args.force:
        champion = champion_of(client, args.name)
        if champion is None:
            raise UsageError(f"{args.name} has no champion to compare against: use --force with --reason")
        evidence = evidence_from_store(args.store, args.name, version, champion, args.alpha)
    event = promote(client, args.name, version, who=args.who or getpass.getuser(), evidence=evidence,
                    reason=args.reason if args.force else None)
    why = f"forced: {event['reason']}" if event["forced"] else (
        f"{evidence['verdict']} than {evidence['against']}, {evidence['test']} p={evidence['p']:.3g}")
    print(f"{args.name}: champion is now version {event['version']} (was {event['previous']}; {why})")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from vggnet.registry import rollback

    event = rollback(_client(args), args.name, who=args.who or getpass.getuser())
    print(f"{args.name}: champion rolled back to version {event['version']} (was {event['previous']})")
    return 0


def run_mode(args: argparse.Namespace) -> int:
    from vggnet.registry.serving import get_mode, set_mode

    client = _client(args)
    if args.mode is None:
        print(f"{args.name}: challenger mode {get_mode(client, args.name)}")
        return 0
    event = set_mode(client, args.name, args.mode, who=args.who or getpass.getuser())
    print(f"{args.name}: challenger mode {event['mode']} (was {event['previous']})")
    return 0
