"""``vggnet retrain``: reviewed mistakes back into training, behind a gate (issue 31).

This command joins two rooms: it resolves ``--from`` in the registry (:mod:`vggnet.registry`), runs the retrain
room (:mod:`vggnet.retrain`: export, split, data, train, evaluate, gate) and registers the result back in the
registry: ``challenger`` when the gate passes, no alias and the reason as the ``gate`` tag when it fails. Nothing
heavy at the top: ``--help`` imports neither torch, MLflow nor SQLAlchemy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vggnet.errors import UsageError

HELP = "fine-tune a registered model on the reviewed samples of the prediction store, gate it, register it"

#: exit codes besides 0 (passed, registered as challenger) and 2 (a usage error, as every command)
GATE_FAILED, NOT_ENOUGH = 3, 4

EPILOG = f"""\
steps (each written atomically under RUN and skipped when done, so a rerun resumes):
  1 export   RUN/reviewed/<class>/<sha256>.png + manifest.json: one image per distinct input (by hash) that a
             person labelled, with the latest reviewer label (never the model's answer); "none of these",
             classes the model does not know and inputs whose crop was not kept are left out and counted
  2 split    RUN/split.json: a stratified, seeded --holdout part of them, held out for the gate
  3 data     RUN/data/train + RUN/data/val (links) and RUN/data.json: the champion's training split plus the
             reviewed training part, each reviewed image --reviewed-weight times; val/ is the champion's own
             validation split, rebuilt from its recipe.yaml, never trained on
  4 train    RUN/train: the `finetune` recipe from the champion's checkpoint (the engine resumes it)
  5 evaluate RUN/answers.json: both models' answers, image by image
  6 gate     RUN/gate.json: on the validation split the candidate may not be worse by --margin points (one-
             sided non-inferiority, Tango's score test), on the held-out reviewed samples it must be better
             (McNemar mid-p < --alpha); both paired, on the same images
  7 register RUN/registered.json: a new version (parent: the --from version, tag gate=passed|failed: ...),
             aliased challenger only when the gate passed; a rerun never registers twice

exit status: 0 the gate passed (registered as challenger), {GATE_FAILED} it failed (registered, no alias),
{NOT_ENOUGH} too few reviewed samples (nothing trained or registered), 2 a usage error.

the kept images:
  The server keeps the crops with --keep-inputs DIR (and --keep-all-inputs for every request) and records
  DIR in the store when it starts; --inputs names it when the store's record is not this machine's path.

examples:
  vggnet retrain --from digits@champion --store sqlite:///runs/serve/predictions.db --data data/digits \\
      --out runs/retrain-2025-06
  vggnet retrain --from digits@3 --store postgresql+psycopg://vggnet@db/vggnet --data /data/digits \\
      --out /runs/retrain-$(date +%Y-%m) --tracking-uri http://mlflow:5000 --epochs 5
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="M@champion",
                   help="the registered version to retrain: M@champion, M@challenger (any alias) or M@N")
    p.add_argument("--store", required=True, metavar="URL", help="the prediction store the server writes "
                   "(sqlite:///... or postgresql+psycopg://...)")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="the original training data, as "
                   "`vggnet train --data` took it (an ImageFolder tree); split as the champion's recipe.yaml says")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="the run folder (created; a rerun "
                   "with the same flags resumes it); use a new one per retrain, e.g. runs/retrain-2025-06")
    p.add_argument("--tracking-uri", metavar="URI", help="the MLflow tracking / registry URI "
                   "(default: $MLFLOW_TRACKING_URI, else runs/mlruns/mlflow.db)")
    p.add_argument("--inputs", type=Path, metavar="DIR", help="the server's --keep-inputs folder (default: the "
                   "one the server recorded in the store)")
    p.add_argument("--store-model", metavar="NAME", help="the model's name in the store (default: the "
                   "registered name, as `vggnet serve --registry` serves it)")
    p.add_argument("--holdout", type=float, default=0.3, help="share of the reviewed samples held out for the "
                   "gate, stratified by label (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split and of training (default 0)")
    p.add_argument("--reviewed-weight", type=int, default=3, metavar="W", help="each reviewed training image "
                   "is used W times per epoch (repetition, each copy augmented on its own; default 3)")
    p.add_argument("--include-user-reports", action="store_true", help="also use clients' own reports where no "
                   "reviewer labelled the image (off: they are biased towards answers users disliked)")
    p.add_argument("--min-reviewed", type=int, default=10, metavar="N", help="fewer usable reviewed samples "
                   f"than this: train nothing, exit {NOT_ENOUGH} (default 10)")
    p.add_argument("--margin", type=float, default=1.0, metavar="POINTS", help="the most accuracy (points) the "
                   "candidate may lose on the original validation split, shown by a one-sided test (default 1)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of both gate tests "
                   "(default 0.05)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the finetune recipe's, at least "
                   "300 steps)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="finetune recipe overrides, e.g. "
                   "optim.lr=0.001 model.freeze=block3 (not the data, split or starting weights)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on a terminal, else a line every 30 s (default); --no-progress: none")
    p.set_defaults(func=run)


def _champion(client: Any, ref: str) -> Any:
    from vggnet.registry.mlflow_registry import model_version
    from vggnet.retrain import Champion

    mv = model_version(client, ref)
    tags = mv.tags
    if not tags.get("checkpoint") or not tags.get("checkpoint_sha256"):
        raise UsageError(f"{ref} (version {mv.version}) has no checkpoint tags: was it registered by "
                         "`vggnet registry register`?")
    run = Path(tags["run"]) if tags.get("run") else None
    return Champion(mv.name, str(mv.version), Path(tags["checkpoint"]), tags["checkpoint_sha256"], run)


def _gate_tags(gate: dict[str, Any], source: str) -> dict[str, str]:
    summary = {k: v for k, v in gate.items() if k not in ("champion", "candidate")}
    return {"gate": gate["reason"][:5000], "gate_json": json.dumps(summary, sort_keys=True, default=str),
            "retrained_from": source, "retrain_run": str(Path(gate["candidate"]["run"]).parent)}


def _register(client: Any, champion: Any, result: Any, source: str) -> dict[str, Any]:
    """Step 7: register once (a version of the same run and checkpoint is reused), write RUN/registered.json."""
    from mlflow.exceptions import MlflowException

    from vggnet.atomic import write_json
    from vggnet.registry.mlflow_registry import CHALLENGER, register_run

    file = result.out / "registered.json"
    passed = bool(result.gate["passed"])
    if file.is_file():
        done = json.loads(file.read_text())
        try:
            mv = client.get_model_version(done["name"], str(done["version"]))
            if mv.tags.get("checkpoint_sha256") == result.gate["candidate"]["sha256"]:
                return {**done, "again": True}
        except MlflowException:
            pass  # the version was deleted: register again
    mv = register_run(client, champion.name, result.candidate_run, parent=champion.version, challenger=passed,
                      tags=_gate_tags(result.gate, source), alias=passed, once=True)
    done = {"name": champion.name, "version": str(mv.version), "alias": CHALLENGER if passed else None,
            "parent": champion.version, "gate": "passed" if passed else "failed",
            "checkpoint_sha256": mv.tags.get("checkpoint_sha256")}
    write_json(file, done)
    return done


def _references(run: Path) -> None:
    """drift.json and ood.json beside the candidate's checkpoint, as `vggnet train` writes them, so the server
    watches a retrained version as it watches any other; never a failed retrain (one line says why not)."""
    if (run / "drift.json").is_file() and (run / "ood.json").is_file():
        return
    from vggnet.cli.monitor_reference import write_references
    from vggnet.cli.train import REFERENCE_LIMIT
    from vggnet.errors import VggnetError

    try:
        write_references(str(run), limit=REFERENCE_LIMIT)
        print(f"  wrote drift.json and ood.json beside the candidate's checkpoint ({run})")
    except (VggnetError, OSError) as exc:
        print(f"  no drift.json / ood.json ({str(exc).splitlines()[0]}); `vggnet monitor reference --ckpt {run}` "
              "writes them later")


def run(args: argparse.Namespace) -> int:
    from vggnet.registry import open_registry, resolve_uri
    from vggnet.retrain import NotEnoughReviewed, RetrainSettings, gate_table, retrain

    for flag, value in (("--reviewed-weight", args.reviewed_weight), ("--min-reviewed", args.min_reviewed)):
        if value < (1 if flag == "--reviewed-weight" else 0):
            raise UsageError(f"{flag} must be a whole number >= {1 if flag == '--reviewed-weight' else 0}, "
                             f"got {value}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    client = open_registry(resolve_uri(args.tracking_uri))
    champion = _champion(client, args.source)
    settings = RetrainSettings(
        store=args.store, data=args.data, out=args.out, inputs=args.inputs, store_model=args.store_model,
        holdout=args.holdout, seed=args.seed, reviewed_weight=args.reviewed_weight,
        include_user=args.include_user_reports, min_reviewed=args.min_reviewed, margin=args.margin,
        alpha=args.alpha, epochs=args.epochs, overrides=list(args.set), progress=args.progress)
    try:
        result = retrain(champion, settings, say=lambda line: print(line, flush=True))
    except NotEnoughReviewed as exc:
        print(f"vggnet retrain: {exc}", flush=True)
        return NOT_ENOUGH
    print(gate_table(result.gate))
    _references(result.candidate_run)
    done = _register(client, champion, result, args.source)
    what = f"as {done['alias']}" if done["alias"] else "without an alias (the gate failed)"
    again = "already " if done.get("again") else ""
    print(f"7 register: {again}registered {done['name']} version {done['version']} {what}, parent version "
          f"{done['parent']} -> {result.out / 'registered.json'}")
    return 0 if result.gate["passed"] else GATE_FAILED
