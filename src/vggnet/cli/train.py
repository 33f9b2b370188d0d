"""``vggnet train``: train a VGG from a recipe; resumable, DDP-ready under torchrun."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vggnet.recipes import names as recipe_names

if TYPE_CHECKING:
    from vggnet.engine.recipe import Recipe


ELASTIC = """\
elastic training (a lost worker restarts the group, which resumes from the newest complete checkpoint):
  torchrun --nnodes 1:2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
           --max-restarts 3 -m vggnet train --recipe demo --out runs/elastic
  When a process dies (SIGKILL, an out-of-memory kill, a crash), torchrun stops the others and starts the group
  again, up to --max-restarts times, and every rank reloads --out's newest complete checkpoint: the partial epoch
  is redone, and a checkpoint that was being written when a process died is never used. Only rank 0 writes. With
  the same number of processes the run ends where an uninterrupted one would (tested bit for bit: CPU, gloo,
  train.deterministic). On several nodes run the same command on each, with --out on a filesystem they all share
  (the ranks check that they see the same newest checkpoint, and refuse together if not); a node that vanishes
  without closing its connections is noticed when the collectives time out (30 min on gloo, 10 on nccl). With
  --nnodes MIN:MAX the rendezvous waits last_call_timeout (30 s; --rdzv-conf last_call_timeout=5) for more nodes.
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each flag's help; a text with line breaks of its own (the epilog's command) keeps them, the
    one-paragraph description is wrapped to the terminal as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def register(sub: argparse._SubParsersAction) -> None:
    builtin = ", ".join(recipe_names())  # read from the packaged recipes folder, so the help cannot drift from it
    p = sub.add_parser(
        "train",
        help="train a VGG from a recipe (a built-in one or a YAML file)",
        description=f"Train a VGG network. Settings come from a recipe (built-in: {builtin}; or a YAML "
        "path), then any --set section.key=value overrides, then the flags below (a flag wins over --set). The "
        "resolved recipe, "
        "metrics (jsonl/csv), curves.png, confusion.png and checkpoints go to --out; running again with the "
        "same --out resumes from the newest complete checkpoint. For several processes use torchrun, e.g. "
        "`torchrun --nproc_per_node 2 -m vggnet train ...` (gloo on CPU, nccl on GPU). To fine-tune, use "
        "`--recipe finetune --weights FILE` (a vggnet checkpoint or run folder, or a torchvision / timm VGG state "
        "dict, read with weights_only=True): the architecture and preprocessing follow the weights, the classifier "
        "is re-initialised for new classes; `--set model.freeze=block3 optim.lr_mult.features=0.1` freezes or "
        "slows parts of the network.",
        epilog=ELASTIC,
        formatter_class=_Formatter,
    )
    p.add_argument("--recipe", default="demo", help=f"built-in recipe name ({builtin}) or YAML file")
    p.add_argument("--data", help="dataset folder (ImageFolder tree: class folders, or train/ and val/)")
    p.add_argument("--model", help="model name, e.g. vgg16_bn (see `vggnet models`)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="run folder (created; resumed when it holds checkpoints) "
                   "(default: runs/<recipe name>, e.g. runs/cifar10 or runs/my for my.yaml)")
    p.add_argument("--epochs", type=int, help="override schedule.epochs")
    p.add_argument("--batch-size", type=int, help="override optim.batch_size (global, split across processes)")
    p.add_argument("--lr", type=float, help="override optim.lr")
    p.add_argument("--width", type=float, help="override model.width (conv width multiplier)")
    p.add_argument("--init-from", help="vggnet checkpoint of a trained shallower net (the paper's warm start)")
    p.add_argument("--weights", help="start from these weights (model.weights): a vggnet checkpoint or run folder, or "
                   "torchvision / timm VGG weights (.pth / .safetensors); see --recipe finetune")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides, e.g. optim.name=adamw train.ema=0.999")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress: a bar when stderr is a terminal, otherwise (a log, a pipe) a line every 30 s "
                   "with the time left (the default, shown as %(default)s); --no-progress: neither")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--no-reference", action="store_true",
                   help="do not write drift.json and ood.json beside the checkpoint when the run ends (vggnet "
                   f"serve's drift and out-of-domain baselines, from up to {REFERENCE_LIMIT} validation images; "
                   "`vggnet monitor reference` writes them later)")
    p.set_defaults(func=run)


FLAG_KEYS = (("data", "data.path"), ("model", "model.name"), ("epochs", "schedule.epochs"),
             ("batch_size", "optim.batch_size"), ("lr", "optim.lr"), ("width", "model.width"),
             ("init_from", "model.init_from"), ("weights", "model.weights"))


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """``--recipe`` ← ``--set`` ← the flags of :data:`FLAG_KEYS` a subcommand defines (shared with
    ``vggnet compress distill``, whose student is trained like any run). ``--data`` on the digits recipe
    switches it to a folder. Every value is checked here, before anything is written."""
    from vggnet.engine.recipe import Recipe

    overrides = []
    for flag, key in FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:  # a string flag quoted, so a path such as `null` or `2024` stays a string
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    recipe = Recipe.load(args.recipe, [*args.set, *overrides])  # the flags after --set, as always
    if getattr(args, "data", None) is not None and recipe.data.dataset == "digits":
        recipe.data.dataset = "folder"
    return recipe


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.print_recipe:  # printed as saved (with what --weights fills in), so it can be fed back as a recipe file
        if recipe.model.weights:
            from vggnet.engine.finetune import resolve_recipe

            recipe, _ = resolve_recipe(recipe)
        print(recipe.dump())
        return 0
    from vggnet.engine.trainer import train

    # one folder per recipe, so a cifar10 run never tries to resume the demo's checkpoints
    args.out = getattr(args, "out", None) or f"runs/{Path(args.recipe).stem}"
    result = train(recipe, args.out, resume=not args.no_resume, progress=args.progress)
    if "val_top1" in result and os.environ.get("RANK", "0") == "0":  # one line from torchrun's ranks, not one each
        print(f"done: val top-1 {result['val_top1']:.2f}% (best {result['best_top1']:.2f}%) -> {args.out}")
        if not args.no_reference:
            _write_references(args.out)
    return 0


#: validation images the end-of-run references are measured on at most (evenly spread): seconds, not minutes
REFERENCE_LIMIT = 2000


def _write_references(run: str) -> None:
    """drift.json and ood.json beside the run's checkpoint, for `vggnet serve` (issue #30: written at training
    time). A run is never failed by them: without the serve extra, or on any user error, one line says how to
    write them later."""
    from vggnet.cli.monitor_reference import write_references
    from vggnet.errors import VggnetError

    try:
        summary = write_references(run, limit=REFERENCE_LIMIT)
    except (VggnetError, OSError) as exc:
        print(f"no drift.json / ood.json ({str(exc).splitlines()[0]}); `vggnet monitor reference --ckpt {run}` "
              "writes them later")
        return
    print(f"wrote drift.json and ood.json beside the checkpoint (vggnet serve's drift and out-of-domain baselines, "
          f"{summary['source']})")
