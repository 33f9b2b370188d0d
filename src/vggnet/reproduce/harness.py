"""Run the study: train every net of ``study.yaml``, evaluate it with the paper's protocols, keep every result.

Everything lands in one folder and every step is skipped when its result is already there, so a killed
run continues where it stopped: training resumes from the run's newest checkpoint (the engine's own
resume), and each evaluation's class probabilities are saved as ``eval/<run>/<protocol>.npy`` the moment
they are computed. Combinations (dense+multi-crop, ensembles) are averages of saved probabilities,
exactly what :func:`vggnet.evaluate.predict_proba` computes, so they cost nothing extra.

Every evaluation row of ``results.json`` also keeps which images it got right (``top1_correct``, one bit
per image, packed and base64-encoded; see :mod:`vggnet.reproduce.paired`), so that the report compares
two nets image by image. It is rebuilt from the saved probabilities, so rerunning an older study folder
adds it without retraining or re-evaluating.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vggnet.atomic import atomic_path, write_json
from vggnet.engine.recipe import Recipe
from vggnet.engine.trainer import train
from vggnet.errors import UsageError
from vggnet.evaluate import eval_images, load_models, parse_protocol, predict_proba, summarize
from vggnet.models import NAME_TO_CONFIG

from .paired import pack_bits

__all__ = ["Study", "load_study", "model_name", "run_study"]

CONFIG_TO_NAME = {config: name for name, config in NAME_TO_CONFIG.items()}
Log = Callable[[str], None]


@dataclass
class Study:
    """The plan: runs (name -> configuration + training scale), test scales, multi-crop runs, ensembles."""

    runs: dict[str, dict[str, str]]
    train_scales: dict[str, Any]
    paper_train_scales: dict[str, Any]
    test_scales: dict[str, dict[str, list[float]]]
    multicrop: list[str] = field(default_factory=list)
    ensembles: dict[str, list[str]] = field(default_factory=dict)

    def only(self, names: list[str]) -> Study:
        """The sub-study of ``names`` (runs a multi-crop row or an ensemble needs are not added)."""
        unknown = [n for n in names if n not in self.runs]
        if unknown:
            raise UsageError(f"unknown run(s) {', '.join(unknown)}; the study has {', '.join(self.runs)}")
        return Study({n: self.runs[n] for n in self.runs if n in names}, self.train_scales, self.paper_train_scales,
                     self.test_scales, [n for n in self.multicrop if n in names],
                     {k: v for k, v in self.ensembles.items() if all(m in names for m in v)})

    def protocols(self, run: str) -> dict[str, str]:
        """Table key -> protocol text for one run (the scales follow its training scale, as in the paper)."""
        scale = self.runs[run]["scale"]
        single = ",".join(f"{q:g}" for q in self.test_scales[scale]["single"])
        multi = ",".join(f"{q:g}" for q in self.test_scales[scale]["multi"])
        out = {"centre": f"single@{single}", "table3": f"dense@{single}", "table4": f"dense@{multi}"}
        if run in self.multicrop:  # Table 5: dense and multi-crop on the same (possibly fewer) images
            out["dense"] = f"dense@{multi}"
            out["multicrop"] = f"multicrop@{multi}"
        return out


def load_study(path: str | Path | None = None) -> Study:
    text = Path(path).read_text() if path else resources.files("vggnet.reproduce").joinpath("study.yaml").read_text()
    raw = yaml.safe_load(text)
    study = Study(runs=raw["runs"], train_scales=raw["train_scales"], paper_train_scales=raw["paper_train_scales"],
                  test_scales=raw["test_scales"], multicrop=list(raw.get("multicrop") or []),
                  ensembles=dict(raw.get("ensembles") or {}))
    for name, run in study.runs.items():
        if run["config"] not in CONFIG_TO_NAME or run["scale"] not in study.train_scales:
            raise UsageError(f"study run {name}: unknown config {run['config']!r} or scale {run['scale']!r}")
    for name, members in study.ensembles.items():
        if any(m not in study.runs for m in members):
            raise UsageError(f"ensemble {name} names a run the study lacks: {members}")
    return study


def model_name(config: str, bn: bool) -> str:
    return CONFIG_TO_NAME[config] + ("_bn" if bn else "")


def run_recipe(study: Study, run: str, base: Recipe, data: str | None, bn: bool = True) -> Recipe:
    """The training recipe of one run: the shared recipe with this run's model and training scale."""
    spec = study.runs[run]
    where = "data.dataset=digits" if data is None else f"data.path={json.dumps(str(data))}"
    return base.override(f"model.name={model_name(spec['config'], bn)}",
                         f"data.scale={json.dumps(study.train_scales[spec['scale']])}", where)


def _finished(run_dir: Path, epochs: int) -> bool:
    final = run_dir / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("epoch") == epochs


def _slug(protocol: str) -> str:
    return protocol.replace("@", "_at_").replace(",", "_").replace(":", "_").replace("+", "_and_")


def run_study(study: Study, out: str | Path, data: str | None, *, recipe: str = "reproduce",
              overrides: list[str] | None = None, bn: bool = True, limit: int | None = None,
              multicrop_limit: int | None = None, batch_size: int = 128, progress: bool | None = None,
              log: Log = print) -> dict[str, Any]:
    """Train and evaluate every run of ``study`` into ``out``; returns the results (also ``results.json``).

    ``limit`` evaluates that many validation images (evenly spread); ``multicrop_limit`` caps the
    expensive multi-crop rows further (the dense rows they are combined with use the same images).
    """
    base = Recipe.load(recipe, overrides)  # a bad recipe or override fails before the study folder exists
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = base.schedule.epochs
    timings = _read_json(out / "timings.json")
    for i, run in enumerate(study.runs, 1):
        run_dir = out / "runs" / run
        if _finished(run_dir, epochs):
            log(f"[train {i}/{len(study.runs)}] {run}: done already ({epochs} epochs)")
            continue
        r = run_recipe(study, run, base, data, bn)
        log(f"[train {i}/{len(study.runs)}] {run}: {r.model.name} width {r.model.width}, "
            f"S = {study.train_scales[study.runs[run]['scale']]} x crop, {epochs} epochs -> {run_dir}"
            f"{_training_left(study, out, epochs, timings)}")
        start = time.perf_counter()
        try:
            train(r, run_dir, resume=True, progress=progress)
        finally:  # an interrupted attempt's time counts too: the total is what the study really cost
            _add_time(timings, f"train/{run}", time.perf_counter() - start, out)
    evaluations = _evaluate_all(study, out, data, limit, multicrop_limit, batch_size, progress, timings, log)
    results = {"data": str(data) if data is not None else "the embedded digits (scikit-learn)",
               "runs": {run: {**study.runs[run], "model": model_name(study.runs[run]["config"], bn)}
                        for run in study.runs},
               "recipe": base.to_dict(), "bn": bn, "limit": limit,
               "multicrop_limit": multicrop_limit, "evaluations": evaluations, "timings": timings,
               "train_seconds": sum(v for k, v in timings.items() if k.startswith("train/")),
               "eval_seconds": sum(v for k, v in timings.items() if k.startswith("eval/"))}
    write_json(out / "results.json", results)
    return results


def _training_left(study: Study, out: Path, epochs: int, timings: dict[str, float]) -> str:
    """The study's training time left at the mean pace of its finished runs (deeper nets take longer, so a
    rough figure); the engine's lines estimate each run's own. Empty before any run has finished."""
    done = [timings[f"train/{r}"] for r in study.runs
            if f"train/{r}" in timings and _finished(out / "runs" / r, epochs)]
    left = sum(not _finished(out / "runs" / r, epochs) for r in study.runs)
    if not done or not left:
        return ""
    runs = f"{left} run{'s' if left > 1 else ''}"
    return f" (training: about {tqdm.format_interval(left * sum(done) / len(done))} left for {runs})"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _add_time(timings: dict[str, float], key: str, seconds: float, out: Path) -> None:
    timings[key] = timings.get(key, 0.0) + seconds
    write_json(out / "timings.json", timings)


def _save_probs(path: Path, probs: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:  # np.save appends .npy to a name without it
        np.save(tmp, probs, allow_pickle=False)


def _evaluate_all(study: Study, out: Path, data: str | None, limit: int | None, multicrop_limit: int | None,
                  batch_size: int, progress: bool | None, timings: dict[str, float], log: Log) -> dict[str, Any]:
    """Per run and table key: protocol, images, top-1/top-5 error. Probabilities are cached as .npy."""
    cache: dict[int | None, tuple[list[Any], list[int], list[str]]] = {}
    results: dict[str, dict[str, Any]] = {}
    probs: dict[tuple[str, str], np.ndarray] = {}
    for run in study.runs:
        run_dir = out / "runs" / run
        models, meta = load_models(run_dir / "last.safetensors")
        results[run] = {}
        for key, text in study.protocols(run).items():
            n = multicrop_limit if key in ("dense", "multicrop") and multicrop_limit else limit
            if n not in cache:  # decode the validation images once; every protocol and run reuses them
                images, labels, classes = eval_images(run_dir, data, "val", classes=meta["classes"], limit=n)
                cache[n] = ([images[j] for j in range(len(labels))], labels, classes)  # None: unreadable
            images, labels, classes = cache[n]
            file = out / "eval" / run / f"{_slug(text)}-n{len(labels)}.npy"
            if file.is_file():
                p = np.load(file, allow_pickle=False)
            else:
                log(f"[eval] {run}: {text} on {len(labels)} images")
                start = time.perf_counter()
                p = predict_proba(models, images, parse_protocol(text), crop=meta["image_size"], mean=meta["mean"],
                                  std=meta["std"], batch_size=batch_size, progress=progress).numpy()
                _save_probs(file, p)
                _add_time(timings, f"eval/{run}/{text}", time.perf_counter() - start, out)
            probs[run, key] = p
            results[run][key] = _row(text, p, labels, classes)
        if run in study.multicrop:  # dense + multi-crop: the two softmaxes averaged, on the same images
            probs[run, "both"] = (probs[run, "dense"] + probs[run, "multicrop"]) / 2
            text = study.protocols(run)["multicrop"].replace("multicrop@", "dense+multicrop@")
            results[run]["both"] = _row(text, probs[run, "both"], cache[multicrop_limit or limit][1], classes)
    for name, members in study.ensembles.items():
        results[name] = {}
        for key in ("dense", "multicrop", "both"):
            if all((m, key) in probs for m in members):
                p = np.mean([probs[m, key] for m in members], axis=0)
                text = results[members[0]][key]["protocol"]
                results[name][key] = _row(text, p, cache[multicrop_limit or limit][1], classes)
    return results


def _row(protocol: str, p: np.ndarray, labels: list[int], classes: list[str]) -> dict[str, Any]:
    """One table cell's numbers, plus which images it got right (top-1) for the paired verdicts."""
    probs = torch.from_numpy(p).to(torch.float64)
    s = summarize(probs, labels, classes)
    valid = torch.isfinite(probs).all(dim=1)  # as summarize: unreadable images (NaN rows) are left out
    correct = probs[valid].topk(1, dim=1).indices[:, 0] == torch.as_tensor(labels, dtype=torch.long)[valid]
    return {"protocol": protocol, "n": s["n"], "top1_err": s["top1_err"], "top5_err": s["top5_err"],
            "top5_k": s["top5_k"], "top1_correct": pack_bits(correct.numpy())}
