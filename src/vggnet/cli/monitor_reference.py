"""``vggnet monitor reference``: what a model's traffic looks like in domain, written once beside a checkpoint for
``vggnet serve``: ``drift.json`` (the drift score's reference, :mod:`vggnet.infer.reference`) and ``ood.json`` (the
web page's out-of-domain threshold, :mod:`vggnet.serve.ood`), both from the run's validation split or a folder.

Registered by ``vggnet monitor`` (:mod:`vggnet.cli.monitor`) on its sub-command parsers; imports nothing heavy
until it runs.
"""

from __future__ import annotations

import argparse

from vggnet.errors import UsageError

EPILOG = """\
what it writes (beside the checkpoint, each atomically; an older one is replaced):
  drift.json   per signal, its distribution on the validation images: the predicted class (counts per class),
               the confidence (max softmax), the mean and std of the normalised input, binned at their own
               deciles. `vggnet serve` compares the last 500 predictions of each version with it
               (population stability index per signal: vggnet_drift_score{model,version,signal}; 0.1 a shift
               to look at, 0.25 an alert: deploy/prometheus-rules.yaml).
  ood.json     the 5th percentile of the confidence: the page's "looks unlike the training data" threshold
               and vggnet_ood_predictions_total.

which images:
  The run's own validation split, split as `vggnet train` split it (its recipe.yaml: the embedded digits, or
  data.path with val_fraction and split_seed), or --data DIR (an ImageFolder tree: its val/ folder, else the
  recipe's split of it). Every image goes through the server's preprocessing, as an upload does.

examples:
  vggnet monitor reference --ckpt runs/demo
  vggnet monitor reference --ckpt runs/cifar10/best.safetensors --data data/cifar10 --limit 2000
"""


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "reference", help="write drift.json and ood.json beside a checkpoint, from its validation split",
        description="Measure what the model's predictions and inputs look like in domain (class distribution, "
        "confidence, input statistics) on its validation split, for the server's drift scores and out-of-domain "
        "flag. Checkpoints trained before this existed need it once.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN",
                   help="run folder (best.safetensors, else last.safetensors) or a .safetensors checkpoint")
    p.add_argument("--data", metavar="DIR", help="ImageFolder tree to use instead of the run's own dataset")
    p.add_argument("--limit", type=int, metavar="N", help="at most N images, evenly spread over the split")
    p.set_defaults(func=run_reference)


def run_reference(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    summary = write_references(args.ckpt, args.data, args.limit)
    print(f"{summary['source']}: top-1 {summary['accuracy']:.1%}")
    print(f"confidence median {summary['confidence_median']:.3f}, out-of-domain threshold {summary['threshold']:.4f}")
    print(f"wrote {summary['drift']}\nwrote {summary['ood']}")
    return 0


def write_references(ckpt: str, data: str | None = None, limit: int | None = None) -> dict:
    """drift.json and ood.json beside ``ckpt`` from its validation split (or ``data``); also what `vggnet train`
    calls when a run ends. Returns what was written and measured."""
    try:
        from vggnet.serve import ood
    except ModuleNotFoundError as exc:
        raise UsageError(f"the references are for `vggnet serve`, which needs the serve extra ({exc.name} is not "
                         "installed): pip install 'vggnet[serve]'") from exc
    import numpy as np

    from vggnet.evaluate.sources import eval_images
    from vggnet.infer import Preprocessing
    from vggnet.infer import reference as drift_reference
    from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    model.eval()
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    images, labels, found = eval_images(file, data, "val", classes=prep.classes, limit=limit)
    kept: list[int] = []  # the labels of the images read (an unreadable file is None, left out)

    def readable():
        for label, image in zip(labels, images, strict=True):
            if image is not None:
                kept.append(label)
                yield image

    values = drift_reference.signals(model, prep, readable())
    if not len(values["class"]):
        raise UsageError(f"no readable images in the validation split of {data or ckpt}")
    accuracy = float(np.mean(values["class"] == np.asarray(kept)))
    source = f"validation split of {data or file.parent.name} ({len(values['class'])} images)"
    classes = list(prep.classes) if prep.classes else found
    ref = drift_reference.build_reference(values, classes, source, accuracy=accuracy)
    drift_file = drift_reference.write_reference(file, ref)
    confidence = values["confidence"]
    threshold = ood.threshold(confidence)
    ood_file = ood.write_reference(file, {"signal": "max_softmax", "false_alarm": ood.FALSE_ALARM,
                                          "threshold": threshold, "images": len(confidence), "source": source})
    return {"source": source, "accuracy": accuracy, "images": len(confidence), "threshold": threshold,
            "confidence_median": float(np.median(confidence)), "drift": drift_file, "ood": ood_file}
