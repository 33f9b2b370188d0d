"""``vggnet robustness``: accuracy under FGSM and PGD at several ε, and how often the feature-squeezing detector
(:mod:`vggnet.infer.squeeze`) flags the adversarial images at its threshold.

The threshold is set on the run's clean validation images (or ``--data``) at a stated false-alarm rate and written to
``adversarial.json`` beside the checkpoint, where ``vggnet serve --adversarial-guard`` reads it. The false-alarm rate
is reported twice: on the images the threshold was set on (equal to the target by construction) and held out (the
threshold of one half measured on the other, both ways): the figure a new clean image meets.

Detection is reported on the adversarial images that fool the model (correct when clean, wrong when attacked: the
paper's convention, the ones that matter) and, as ``flagged``, on every attacked image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnet.errors import UsageError
from vggnet.evaluate import eval_images
from vggnet.infer import Preprocessing, preprocess
from vggnet.infer import squeeze as sq
from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

from .attacks import ATTACKS, PGD_STEPS, attack

__all__ = ["DEFAULT_EPS", "RobustnessSettings", "markdown", "run_robustness"]

DEFAULT_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)


@dataclass(frozen=True)
class RobustnessSettings:
    ckpt: str
    data: str | None = None
    limit: int | None = None
    eps: tuple[float, ...] = DEFAULT_EPS
    attacks: tuple[str, ...] = ATTACKS
    false_alarm: float = sq.FALSE_ALARM
    bits: int = sq.DEFAULT_BITS
    batch_size: int = 64
    device: str = "cpu"
    eps_text: tuple[str, ...] = field(default=())  # how ε was written (1/255), for the table


def _clean_inputs(settings: RobustnessSettings, prep: Preprocessing) -> tuple[torch.Tensor, list[int]]:
    """The validation images preprocessed as ``/predict`` preprocesses an upload; unreadable ones left out."""
    images, labels, _ = eval_images(settings.ckpt, settings.data, "val", classes=prep.classes, limit=settings.limit)
    xs, ys = [], []
    for index in range(len(labels)):
        image = images[index]
        if image is not None:
            xs.append(preprocess([image], prep))
            ys.append(int(labels[index]))
    if not xs:
        raise UsageError("no readable validation images")
    return torch.cat(xs), ys


def _batched(fn: Any, x: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(chunk) for chunk in x.split(size)])


def _heldout_false_alarm(scores: np.ndarray, false_alarm: float) -> float:
    """The threshold of the even-indexed images measured on the odd ones and back: a clean image it never saw."""
    halves = scores[0::2], scores[1::2]
    if min(len(h) for h in halves) < 2:
        return float("nan")
    rates = [float((b > sq.threshold(a, false_alarm)).mean()) for a, b in (halves, halves[::-1])]
    return float(np.mean(rates))


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def run_robustness(settings: RobustnessSettings, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Attack, score, set the threshold; write ``adversarial.json`` beside the checkpoint and, with ``out``,
    ``robustness.json`` and ``robustness.md`` there. Returns the results."""
    file = checkpoint_file(settings.ckpt)
    model, extra = load_checkpoint(file)
    model = model.eval().to(settings.device)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    squeezer = sq.Squeezer(prep, settings.bits)
    x, labels = _clean_inputs(settings, prep)
    y = np.asarray(labels)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(settings.device)).float().cpu()

    def scored(inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out_logits = _batched(logits, inputs, settings.batch_size)
        scores = _batched(lambda b: sq.squeeze_score(logits, b, squeezer), inputs, settings.batch_size)
        return out_logits.argmax(1).numpy(), scores.numpy()

    clean_pred, clean_scores = scored(x)
    limit = sq.threshold(clean_scores, settings.false_alarm)
    correct = clean_pred == y
    rows: list[dict[str, Any]] = []
    pixels = squeezer.to_pixels(x).clamp(0, 1)
    texts = settings.eps_text or tuple(f"{e * 255:g}/255" for e in settings.eps)
    for kind in settings.attacks:
        for eps, text in zip(settings.eps, texts, strict=True):
            adversarial = squeezer.to_input(attack(model, prep, pixels, labels, kind, eps, settings.batch_size,
                                                   settings.device))
            pred, scores = scored(adversarial)
            flagged = scores > limit
            fooled = correct & (pred != y)
            rows.append({"attack": kind, "eps": eps, "eps_text": text, "accuracy": float((pred == y).mean()),
                         "fooled": int(fooled.sum()), "detection": _share(flagged[fooled]),
                         "flagged": float(flagged.mean()), "mean_score": float(scores.mean())})
    results = {
        "checkpoint": str(file), "images": len(labels), "clean_accuracy": float(correct.mean()),
        "detector": {"name": "feature_squeezing", "bits": settings.bits, "median": 2, "threshold": limit,
                     "false_alarm_target": settings.false_alarm,
                     "false_alarm": float((clean_scores > limit).mean()),
                     "false_alarm_heldout": _heldout_false_alarm(clean_scores, settings.false_alarm)},
        "attacks": rows, "pgd_steps": PGD_STEPS,
        "data": settings.data or "the run's validation split",
    }
    reference = {"detector": "feature_squeezing", "bits": settings.bits, "median": 2, "threshold": limit,
                 "false_alarm": settings.false_alarm, "images": len(labels), "source": results["data"],
                 "measured": {"false_alarm": results["detector"]["false_alarm"],
                              "false_alarm_heldout": results["detector"]["false_alarm_heldout"],
                              "clean_accuracy": results["clean_accuracy"], "attacks": rows},
                 "command": f"vggnet robustness --ckpt {settings.ckpt}"}
    results["reference"] = str(sq.write_reference(file, reference))
    if out is not None:
        from vggnet.atomic import write_json, write_text

        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "robustness.json", {**results, **_provenance(settings, out)})
        write_text(Path(out) / "robustness.md", markdown(results) + "\n")
    return results


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f} %"


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per attack and ε, the clean images first."""
    d = results["detector"]
    lines = [f"{results['images']} images of {results['data']}; feature squeezing ({d['bits']}-bit depth, 2×2 "
             f"median), threshold {d['threshold']:.4f} for {_pct(d['false_alarm_target'])} false alarms "
             f"(measured: {_pct(d['false_alarm'])} on these images, {_pct(d['false_alarm_heldout'])} held out)",
             "",
             "| attack | ε | accuracy | fooled | detected (of fooled) | flagged (of all) |",
             "|---|---|---|---|---|---|",
             f"| none (clean) | 0 | {_pct(results['clean_accuracy'])} | – | – | {_pct(d['false_alarm'])} |"]
    for row in results["attacks"]:
        name = "FGSM" if row["attack"] == "fgsm" else f"PGD-{results['pgd_steps']}"
        lines.append(f"| {name} | {row['eps_text']} | {_pct(row['accuracy'])} | {row['fooled']} | "
                     f"{_pct(row['detection'])} | {_pct(row['flagged'])} |")
    return "\n".join(lines)


def parse_eps(text: str) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """``1/255,2/255,0.01`` → the values in [0, 1] pixel units, and each as written."""
    values, texts = [], []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            num, _, den = item.partition("/")
            value = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--eps: {item!r} is not a number or a fraction such as 8/255") from None
        if not 0 < value < 1:
            raise UsageError(f"--eps: {item!r} is not in (0, 1): ε is in pixel units of [0, 1] images")
        values.append(value)
        texts.append(item)
    if not values:
        raise UsageError("--eps names no ε")
    return tuple(values), tuple(texts)


def check_attacks(names: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        raise UsageError(f"--attacks: unknown {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    return tuple(names)


def _provenance(settings: RobustnessSettings, out: str | os.PathLike) -> dict[str, Any]:
    """When, where and how a results file was made (a committed measurement says its machine and command)."""
    import datetime
    import platform
    import sys

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "vggnet " + " ".join(sys.argv[1:]) if sys.argv[1:] else f"vggnet robustness --ckpt "
                       f"{settings.ckpt} --out {out}",
            "machine": {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()}}
