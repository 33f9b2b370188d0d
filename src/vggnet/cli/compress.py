"""``vggnet compress``: smaller and faster VGGs — prune filters, distil into a student, quantization-aware training."""

from __future__ import annotations

import argparse
import textwrap

PRUNE_EPILOG = """\
what it writes (--out is an ordinary run folder afterwards):
  pruned.safetensors   the pruned network before fine-tuning (a checkpoint like any other: eval, export, serve)
  prune.json           the cut: settings, ratio, every conv's width before/after, parameters and MACs
  best.safetensors     the fine-tuned network, with recipe.yaml, metrics, curves.png as `vggnet train` writes

Fine-tuning uses the source run's recipe.yaml (same data, split, augmentation) for --epochs, at --lr (default:
the recipe's lr x 0.1). Rerunning the same command resumes; other settings on the same --out are refused.

examples:
  vggnet compress prune --ckpt runs/cifar10 --ratio 0.5 --out runs/cifar10-p50 --epochs 10
  vggnet compress prune --ckpt runs/cifar10 --macs-reduction 0.6 --scope global --criterion bn --out runs/p60
  vggnet compress prune --ckpt runs/demo --ratio 0.3 --epochs 0 --out runs/demo-p30     # prune only
"""

DISTILL_EPILOG = """\
The student is trained by the recipe (a built-in name or YAML file, plus --set overrides) exactly as `vggnet
train` would, except for its loss: alpha x T^2 x KL(teacher_T || student_T) + (1 - alpha) x cross-entropy,
with the teacher run on the very batch the student sees (augmentation included), so no logits are cached.
The teacher must have been trained on the same classes (same order), normalisation and crop size.
Rerunning the same command resumes; other distillation settings on the same --out are refused.

examples:
  vggnet compress distill --teacher runs/cifar10 --recipe cifar10 --set model.name=vgg11_bn model.width=0.25 \\
      --out runs/kd-vgg11
  vggnet compress distill --teacher runs/demo --recipe demo --set model.width=0.125 --out runs/demo-kd --epochs 2
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="prune filters, distil into a smaller student, quantization-aware training",
                       description="Make a trained VGG smaller or faster; every result is an ordinary run folder or "
                       "file that eval, export, predict and serve take.")
    csub = p.add_subparsers(dest="compress_command", metavar="METHOD", required=True)

    pr = csub.add_parser(
        "prune", help="remove conv filters (L1 norm or BN scale), then fine-tune",
        description=textwrap.fill(
            "Rank every conv filter (l1: the L1 norm of its weights, Li et al. 2017; bn: |gamma| of its batch "
            "norm, Liu et al. 2017), remove the lowest --ratio of them (per layer, or over the whole network with "
            "--scope global) or as many as --macs-reduction needs, with the matching BN channels and the next "
            "layer's inputs, then fine-tune with the source run's recipe.", width=100),
        epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--ckpt", required=True, metavar="RUN", help="trained run folder or .safetensors checkpoint")
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument("--ratio", type=float, help="fraction of filters to remove, in (0, 1)")
    what.add_argument("--macs-reduction", type=float, metavar="F",
                      help="remove the fewest filters that cut the MACs by this fraction, in (0, 1)")
    pr.add_argument("--criterion", choices=("l1", "bn"), default="l1", help="filter ranking (default: l1)")
    pr.add_argument("--scope", choices=("layer", "global"), default="layer",
                    help="layer: the same fraction of every conv; global: rank all filters together (default: layer)")
    pr.add_argument("--min-keep", type=float, default=0.1,
                    help="with --scope global, the fraction of each conv always kept (default: 0.1)")
    pr.add_argument("--out", required=True, help="run folder to write (resumed when it exists)")
    pr.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs; 0 prunes only (default: 10)")
    pr.add_argument("--lr", type=float, help="fine-tuning lr (default: the source recipe's x 0.1)")
    pr.add_argument("--recipe", help="recipe to fine-tune with when the checkpoint has no recipe.yaml beside it")
    pr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for fine-tuning")
    pr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress on stderr: a bar on a terminal, otherwise (a log, a pipe) a line every 30 s with "
                    "the time left, once a loop has run 30 s (the default); --no-progress: neither")
    pr.set_defaults(func=run_prune)

    kd = csub.add_parser(
        "distill", help="train a student with a teacher's soft targets (Hinton et al. 2015)",
        description=textwrap.fill(
            "Knowledge distillation: train the student described by --recipe/--set while matching the softened "
            "output of a trained --teacher.", width=100),
        epilog=DISTILL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kd.add_argument("--teacher", required=True, metavar="RUN", help="trained teacher run folder or checkpoint")
    kd.add_argument("--recipe", default="demo", help="the student's recipe: built-in name or YAML file")
    kd.add_argument("--data", help="dataset folder (overrides data.path)")
    kd.add_argument("--model", help="student model name (overrides model.name)")
    kd.add_argument("--width", type=float, help="student width multiplier (overrides model.width)")
    kd.add_argument("--epochs", type=int, help="override schedule.epochs")
    kd.add_argument("--temperature", "-T", type=float, default=4.0, help="softmax temperature T (default: 4)")
    kd.add_argument("--alpha", type=float, default=0.9, help="weight of the teacher term, in [0, 1] (default: 0.9)")
    kd.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    kd.add_argument("--out", required=True, help="the student's run folder (resumed when it holds checkpoints)")
    kd.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress on stderr: a bar on a terminal, otherwise (a log, a pipe) a line every 30 s with "
                    "the time left, once a loop has run 30 s (the default); --no-progress: neither")
    kd.set_defaults(func=run_distill)

    from vggnet.cli import compress_qat  # a module of its own: the QAT flags and table

    compress_qat.register(csub)


def run_prune(args: argparse.Namespace) -> int:
    from vggnet.compress.prune import PruneSettings, prune_run

    settings = PruneSettings(source=args.ckpt, ratio=args.ratio, macs_reduction=args.macs_reduction,
                             criterion=args.criterion, scope=args.scope, min_keep=args.min_keep)
    result = prune_run(settings, args.out, epochs=args.epochs, lr=args.lr, overrides=args.set, recipe=args.recipe,
                       progress=args.progress)
    tuned = result.get("finetune") or {}
    if "val_top1" in tuned:
        print(f"done: fine-tuned val top-1 {tuned['val_top1']:.2f}% (best {tuned['best_top1']:.2f}%), "
              f"{100 * result['macs_kept']:.1f} % of the MACs -> {args.out}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from vggnet.cli.train import recipe_from_args
    from vggnet.compress.distill import DistillSettings, distill

    recipe = recipe_from_args(args)
    settings = DistillSettings(teacher=str(args.teacher), temperature=args.temperature, alpha=args.alpha)
    result = distill(recipe, settings, args.out, progress=args.progress)
    if "val_top1" in result:
        print(f"done: student val top-1 {result['val_top1']:.2f}% (best {result['best_top1']:.2f}%) -> {args.out}")
    return 0
