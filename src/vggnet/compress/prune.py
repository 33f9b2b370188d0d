"""Filter pruning: drop whole conv filters and get back an ordinary, smaller VGG.

A VGG is a chain, so pruning is bookkeeping, not graph surgery: removing filter ``k`` of a conv removes
channel ``k`` of its BN and input channel ``k`` of the next conv (or, after the last conv, the ``k``-th
slice of fc6's inputs). The result is a :class:`~vggnet.models.VGG` whose config records every conv's width
(``VGGConfig.channels``), so it saves, loads, evaluates, exports and serves like any other checkpoint.
That is why this is ~150 lines here instead of a dependency on Torch-Pruning, whose dependency graph earns
its keep on branching networks (residuals, concatenations) that a VGG does not have.

Criteria (scores per filter; the lowest go):

* ``l1``: the L1 norm of the filter's weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
* ``bn``: |γ| of the filter's batch-norm scale (Liu et al. 2017, "Network Slimming"). After a BN layer the
  conv's own weight norm says little — BN divides it out — while γ scales what the channel passes on.

Scopes: ``layer`` removes the same fraction from every conv (Li et al.); ``global`` ranks every filter of
the network together, each layer's scores divided by their mean so that layers of different scale compare,
and keeps at least ``min_keep`` of each layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnet.atomic import write_json
from vggnet.errors import UsageError
from vggnet.models import VGG, count_macs, count_params
from vggnet.models.configs import FC_INPUT_GRID

CRITERIA = ("l1", "bn")
SCOPES = ("layer", "global")


def convs(model: VGG) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]


def filter_scores(model: VGG, criterion: str = "l1") -> dict[str, torch.Tensor]:
    """The importance of every filter of every conv, by name (``block3_conv2``: a vector of its widths)."""
    if criterion not in CRITERIA:
        raise UsageError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "bn" and not model.config.batch_norm:
        raise UsageError(f"criterion 'bn' ranks filters by their batch-norm scale, and {model.config.name} has no "
                         "batch norm; use criterion 'l1'")
    layers = dict(model.features.named_children())
    out = {}
    for name, conv in convs(model):
        if criterion == "l1":
            out[name] = conv.weight.detach().abs().flatten(1).sum(1).float()
        else:
            out[name] = layers[name.replace("_conv", "_bn")].weight.detach().abs().float()
    return out


def _check_ratio(ratio: float, what: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise UsageError(f"{what} must be in [0, 1) — the fraction of filters to remove — got {ratio!r}")


def plan(model: VGG, ratio: float | Mapping[str, float], *, criterion: str = "l1", scope: str = "layer",
         min_keep: float = 0.1) -> dict[str, torch.Tensor]:
    """Which filters each conv keeps (sorted indices), removing ``ratio`` of them.

    ``ratio`` is one fraction, or a mapping from conv name to its own fraction (convs not named keep all;
    ``scope`` must then be ``layer``). A ratio that would remove every filter of a layer is an error.
    """
    if scope not in SCOPES:
        raise UsageError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    scores = filter_scores(model, criterion)
    if isinstance(ratio, Mapping):
        if scope != "layer":
            raise UsageError("per-layer ratios need scope 'layer'")
        unknown = sorted(set(ratio) - set(scores))
        if unknown:
            raise UsageError(f"unknown conv layer(s) {unknown}; the convs are {', '.join(scores)}")
        ratios = {name: float(ratio.get(name, 0.0)) for name in scores}
    else:
        ratios = {name: ratio for name in scores}
    for name, r in ratios.items():
        _check_ratio(r, f"the pruning ratio of {name}")
    if scope == "layer":
        keep = {}
        for name, s in scores.items():
            n = len(s) - round(ratios[name] * len(s))
            if n < 1:
                raise UsageError(f"ratio {ratios[name]:g} would remove all {len(s)} filters of {name}; "
                                 "use a smaller ratio")
            keep[name] = torch.topk(s, n).indices.sort().values
        return keep
    if not 0 < min_keep <= 1:
        raise UsageError(f"min_keep must be in (0, 1], got {min_keep}")
    normalised = {name: s / s.mean().clamp(min=1e-12) for name, s in scores.items()}
    everything = torch.cat(list(normalised.values()))
    remove = round(float(ratio) * len(everything))
    threshold = everything.sort().values[remove - 1] if remove else -torch.inf
    keep = {}
    for name, s in normalised.items():
        floor = max(1, round(min_keep * len(s)))
        n = max(floor, int((s > threshold).sum()))
        keep[name] = torch.topk(s, n).indices.sort().values
    return keep


def apply(model: VGG, keep: Mapping[str, torch.Tensor]) -> VGG:
    """A new VGG holding only the kept filters (``keep``: conv name → indices); ``model`` is left as it was."""
    layers = convs(model)
    missing = [n for n, _ in layers if n not in keep]
    if missing:
        raise UsageError(f"no kept filters given for {', '.join(missing)}")
    widths = tuple(len(keep[n]) for n, _ in layers)
    config = dataclasses.replace(model.config, channels=widths)
    pruned = VGG(config).to(next(model.parameters()).device)
    old, new = dict(model.features.named_children()), dict(pruned.features.named_children())
    previous = None  # the kept output channels of the conv before: this conv's kept inputs
    with torch.no_grad():
        for name, conv in layers:
            out_idx = keep[name].to(conv.weight.device)
            weight = conv.weight[out_idx]
            if previous is not None:
                weight = weight[:, previous]
            new[name].weight.copy_(weight)
            new[name].bias.copy_(conv.bias[out_idx])
            bn_name = name.replace("_conv", "_bn")
            if bn_name in old:
                src, dst = old[bn_name], new[bn_name]
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst, attr).copy_(getattr(src, attr)[out_idx])
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
            previous = out_idx
        head_state = copy.deepcopy(model.head.state_dict())
        first = _first_head_weight(model)
        w = head_state[first]
        if w.dim() == 4:  # conv head: fc6 is a 7x7 conv
            head_state[first] = w[:, previous]
        elif model.config.head == "fc":  # Linear over a C x 7 x 7 map flattened channel-major
            g = FC_INPUT_GRID ** 2
            head_state[first] = w.view(w.shape[0], -1, g)[:, previous].reshape(w.shape[0], -1)
        else:  # gap: Linear over C
            head_state[first] = w[:, previous]
        pruned.head.load_state_dict(head_state)
    return pruned.train(model.training)


def _first_head_weight(model: VGG) -> str:
    return "fc6.weight" if model.config.head in ("fc", "conv") else f"{model.head.classifier}.weight"


def prune(model: VGG, ratio: float | Mapping[str, float] = 0.0, *, criterion: str = "l1", scope: str = "layer",
          min_keep: float = 0.1) -> VGG:
    """``model`` with ``ratio`` of its conv filters removed (see :func:`plan`); ratio 0 gives an equal copy."""
    return apply(model, plan(model, ratio, criterion=criterion, scope=scope, min_keep=min_keep))


def ratio_for_macs(model: VGG, reduction: float, input_size: int, *, criterion: str = "l1", scope: str = "layer",
                   min_keep: float = 0.1, tolerance: float = 0.005) -> float:
    """The smallest pruning ratio whose network has at most ``1 - reduction`` of the MACs (bisection)."""
    if not 0 < reduction < 1:
        raise UsageError(f"the MACs reduction must be in (0, 1), got {reduction}")
    base = count_macs(model.config, input_size)
    narrowest = min(m.out_channels for _, m in convs(model))
    lo, hi = 0.0, 0.99 if scope == "global" else min(0.99, (narrowest - 1) / narrowest)  # one filter left at most
    if hi <= 0 or _macs_after(model, hi, input_size, criterion, scope, min_keep) > (1 - reduction) * base:
        raise UsageError(f"no ratio removes {100 * reduction:g} % of the MACs with scope {scope!r}"
                         + (f" and min_keep {min_keep}" if scope == "global" else "") + " without emptying a layer")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if _macs_after(model, mid, input_size, criterion, scope, min_keep) <= (1 - reduction) * base:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def _macs_after(model: VGG, ratio: float, input_size: int, criterion: str, scope: str, min_keep: float) -> int:
    keep = plan(model, ratio, criterion=criterion, scope=scope, min_keep=min_keep)
    config = dataclasses.replace(model.config, channels=tuple(len(keep[n]) for n, _ in convs(model)))
    return count_macs(config, input_size)


def summary(before: VGG, after: VGG, input_size: int) -> dict[str, Any]:
    """What pruning bought: parameters and MACs before and after, and every conv's width."""
    macs0, macs1 = count_macs(before.config, input_size), count_macs(after.config, input_size)
    params0, params1 = count_params(before), count_params(after)
    return {"input_size": input_size, "params": [params0, params1], "macs": [macs0, macs1],
            "macs_kept": macs1 / macs0, "params_kept": params1 / params0,
            "widths": {name: [b.out_channels, a.out_channels]
                       for (name, b), (_, a) in zip(convs(before), convs(after), strict=True)}}


@dataclass(frozen=True)
class PruneSettings:
    """How a pruning run cut its source; recorded in ``prune.json`` so a rerun resumes only the same cut."""

    source: str
    ratio: float | None = None  # fraction of filters removed (per layer, or of all filters with scope global)
    macs_reduction: float | None = None  # or: the smallest ratio that removes this fraction of the MACs
    criterion: str = "l1"
    scope: str = "layer"
    min_keep: float = 0.1

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.macs_reduction is None):
            raise UsageError("give a pruning ratio or a MACs reduction target (one of them)")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UsageError(f"the pruning ratio must be in (0, 1), got {self.ratio}")
        if self.macs_reduction is not None and not 0 < self.macs_reduction < 1:
            raise UsageError(f"the MACs reduction must be in (0, 1), got {self.macs_reduction}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown pruning criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown pruning scope {self.scope!r}; choose one of {', '.join(SCOPES)}")


def prune_run(settings: PruneSettings, out_dir: str | os.PathLike, *, epochs: int, lr: float | None = None,
              overrides: Sequence[str] = (), recipe: str | None = None, progress: bool | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune ``settings.source`` into ``out_dir/pruned.safetensors`` and fine-tune it there for ``epochs``
    with the source run's own recipe (or ``recipe``), its learning rate × 0.1 unless ``lr`` is given.

    ``out_dir`` is then an ordinary run folder (``best.safetensors``, curves, metrics) plus ``prune.json``
    (the cut: settings, widths, parameters and MACs before and after). A rerun resumes the fine-tuning; a
    rerun with other settings is refused. With ``epochs`` 0 only the pruned checkpoint is written.
    """
    from vggnet.engine.recipe import Recipe
    from vggnet.engine.trainer import train
    from vggnet.evaluate.sources import find_recipe  # the run folder's recipe.yaml, as eval finds it
    from vggnet.models import checkpoint_file, load_checkpoint, save_checkpoint

    if epochs < 0:
        raise UsageError(f"epochs must be >= 0, got {epochs}")
    out = Path(out_dir)
    record, pruned_file = out / "prune.json", out / "pruned.safetensors"
    wanted = asdict(settings)
    file = checkpoint_file(settings.source)
    recipe_file = recipe or find_recipe(file)
    if epochs and recipe_file is None:
        raise UsageError(f"{file} has no recipe.yaml beside it to fine-tune with: pass --recipe (the one it was "
                         "trained with), or --epochs 0 to prune only")
    if epochs and recipe_file is not None:
        Recipe.load(recipe_file, overrides)  # a bad --set fails here, before anything is written
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") != wanted:
            raise UsageError(f"{out} holds a pruning with {saved.get('settings')}; now asked for {wanted}: "
                             "use a new --out folder")
        if not pruned_file.is_file():
            raise UsageError(f"{out}: prune.json without pruned.safetensors; remove the folder and rerun")
        log(f"{out}: pruned model found, resuming")
        report = saved
    else:
        model, extra = load_checkpoint(file)
        if model.config.head not in ("fc", "conv", "gap"):
            raise UsageError(f"cannot prune a model with head {model.config.head!r}")
        size = int(extra.get("image_size") or 224)
        ratio = settings.ratio
        if ratio is None:
            ratio = ratio_for_macs(model, float(settings.macs_reduction), size, criterion=settings.criterion,
                                   scope=settings.scope, min_keep=settings.min_keep)
            log(f"ratio {ratio:g} removes {100 * float(settings.macs_reduction):g} % of the MACs at {size} px")
        pruned = prune(model, ratio, criterion=settings.criterion, scope=settings.scope, min_keep=settings.min_keep)
        report = {"settings": wanted, "ratio": ratio, "source_file": str(file), **summary(model, pruned, size)}
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(pruned, pruned_file, {**extra, "pruned": {k: report[k] for k in ("settings", "ratio",
                                                                                        "macs", "params")}})
        write_json(record, report)  # last: a folder with prune.json always has its pruned.safetensors
        macs, params = report["macs"], report["params"]
        log(f"pruned {file}: MACs {macs[0] / 1e6:.1f} M -> {macs[1] / 1e6:.1f} M ({100 * report['macs_kept']:.1f} %), "
            f"parameters {params[0] / 1e6:.2f} M -> {params[1] / 1e6:.2f} M ({100 * report['params_kept']:.1f} %) "
            f"-> {pruned_file}")
    if not epochs:
        return report
    assert recipe_file is not None
    base = Recipe.load(recipe_file)
    widths = [after for _, after in report["widths"].values()]
    tuned = base.override(
        f"model.weights={json.dumps(str(pruned_file))}", f"model.channels={json.dumps(widths)}",
        "model.init_from=null", "model.whiten=false", f"schedule.epochs={epochs}",
        f"optim.lr={lr if lr is not None else 0.1 * float(base.optim.lr)}", *overrides)
    result = train(tuned, out, progress=progress)
    return {**report, "finetune": result}
