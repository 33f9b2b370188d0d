"""``--engine ray`` for ``vggnet predict`` and ``vggnet features``: the flags and the driver's side.

The single-process commands load, check and print; this module only swaps how the rows are computed (a Ray Data
actor pool: :mod:`vggnet.infer.raydata`, :mod:`vggnet.transfer.ray_features`), so both engines take the same
arguments and print the same table or JSON document.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from vggnet.errors import UsageError

RAY_EPILOG = """\
engines (--engine):
  local           this process (default)
  ray             a Ray Data actor pool: --concurrency actors, each with one model, --actor-cpus cores and
                  --actor-gpus GPUs, --batch-size images per call; on a local Ray (this machine's cores) or the
                  cluster --ray-address names (ray://HEAD:10001, e.g. a KubeRay head service; or auto). Inputs
                  must be readable by every node (a shared file system, or s3:// / gs:// URIs for predict).
                  Needs the ray extra: pip install 'vggnet[ray]'.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags both commands share for choosing and sizing the engine."""
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: a Ray Data actor pool (see engines below)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N",
                   help="--engine ray: actors in the pool, one model each (default: 2)")
    p.add_argument("--actor-cpus", type=float, default=1, metavar="C",
                   help="--engine ray: CPU cores per actor, also its torch threads (default: 1)")
    p.add_argument("--actor-gpus", type=float, default=0, metavar="G",
                   help="--engine ray: GPUs per actor, e.g. 1 (with --device cuda), or 0.5 to share one (default: 0)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="--engine ray: the cluster to join (ray://HEAD:10001, auto); default: start a local Ray")


def check(args: argparse.Namespace) -> None:
    """Ray flags without --engine ray are mistakes, not silently ignored; with it, Ray must be installed."""
    if args.engine != "ray":
        given = [flag for flag, value, default in (("--concurrency", args.concurrency, 2),
                                                   ("--actor-cpus", args.actor_cpus, 1),
                                                   ("--actor-gpus", args.actor_gpus, 0),
                                                   ("--ray-address", args.ray_address, None)) if value != default]
        if given:
            raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to --engine ray")
        return
    from vggnet.infer.raydata import require_ray

    require_ray()
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")


def connect(args: argparse.Namespace) -> None:
    from vggnet.infer.raydata import connect as ray_connect

    ray_connect(args.ray_address)


def sizing(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "concurrency": args.concurrency, "num_cpus": args.actor_cpus,
            "num_gpus": args.actor_gpus}


def exported_predictor(path: str, max_batch: int) -> Any:
    """An actor's predictor for a file from ``vggnet export`` (read on the actor's node)."""
    from vggnet.export import load_exported

    return load_exported(path).predictor(max_batch=max_batch)


def _predictor_factory(args: argparse.Namespace, predictor: Any) -> Any:
    """What each actor builds: the same runtime as ``predictor`` (``auto``'s pick, not a new search), the model
    sent once through the object store, the calibration batch re-read by the rule the driver used."""
    import ray

    from vggnet.cli.predict import _CALIBRATED, _calibration_source
    from vggnet.infer import read_calibration
    from vggnet.infer.raydata import predictor_from_model

    if predictor.model is None:  # an exported file
        return functools.partial(exported_predictor, str(Path(args.ckpt).resolve()), args.batch_size)
    runtime = getattr(predictor.runtime, "chosen", predictor.runtime).name
    calib = None
    if runtime in _CALIBRATED:
        source = _calibration_source(args, predictor.source, runtime)
        calib = None if source is None else read_calibration(source, args.calib_n, predictor.prep)
    options = {"device": args.device, "precision": args.precision} if runtime == "eager" else {}
    return functools.partial(predictor_from_model, [ray.put(predictor.model)], predictor.prep, runtime, calib,
                             args.batch_size, options)


def predict_rows(args: argparse.Namespace, predictor: Any, paths: list[Any], topk: int) -> list[dict[str, Any]]:
    """``vggnet predict``'s rows from the actor pool, in input order. Without --skip-unreadable an unreadable image
    stops the command as in one process: each is named on stderr, then the first is the error."""
    from vggnet.infer import ImageLoadError
    from vggnet.infer.raydata import collect, predict_dataset, rows_from_table

    connect(args)
    dataset, _ = predict_dataset([str(p) for p in paths], _predictor_factory(args, predictor), topk=topk,
                                 **sizing(args))
    rows = rows_from_table(collect(dataset))
    failed = [r for r in rows if "error" in r]
    if failed and not args.skip_unreadable:
        for r in failed[1:]:
            print(f"vggnet predict: {r['image']}: {r['error']}", file=sys.stderr)
        raise ImageLoadError(failed[0]["image"], failed[0]["error"])
    return rows


def features(args: argparse.Namespace, model: Any, images: Any, **options: Any) -> Any:
    """``vggnet features``' (descriptors, readable mask) from the actor pool."""
    from vggnet.transfer.ray_features import features_ray

    connect(args)
    options.pop("batch_size", None)  # --batch-size: images per actor call (sizing)
    if args.device is None:  # the default follows the actors' GPUs, not the driver's
        options["device"] = "cuda" if args.actor_gpus > 0 else "cpu"
    return features_ray(model, images, **sizing(args), **options)
