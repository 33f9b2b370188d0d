"""``vggnet robustness``: accuracy under FGSM and PGD, and the feature-squeezing guard's threshold and detection rate.

Nothing heavy at the top: ``--help`` imports neither torch nor ART; the command imports them when it runs.
"""

from __future__ import annotations

import argparse
import textwrap

HELP = "accuracy under FGSM / PGD at several eps, and the adversarial guard's threshold and detection rate"

EPILOG = """\
what it writes:
  adversarial.json beside the checkpoint: the detector's threshold (the 1 - false-alarm quantile of the clean
  validation images' scores), its settings and the measured rates; vggnet serve --adversarial-guard reads it.
  With --out DIR: robustness.json and robustness.md (the table printed) there too.

how it measures:
  eps is in pixel units of [0, 1] images (8/255: each pixel changes by at most 8 grey levels), L-inf, untargeted,
  against the true label; FGSM is one signed-gradient step, PGD 10 steps of eps/4 from the clean image. The
  detector is feature squeezing (Xu et al., NDSS 2018): the largest L1 distance between the softmax of an image
  and of its bit-depth-reduced and 2x2-median-filtered copies (two extra forward passes per image). An attack
  that knows the squeezers can be tuned to pass them: this measures the guard against attacks that do not.

examples:
  vggnet robustness --ckpt runs/demo
  vggnet robustness --ckpt runs/cifar10 --data data/cifar10 --limit 1000 --eps 2/255,8/255 --out runs/cifar10/robust
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "robustness", help=HELP,
        description=textwrap.fill(
            "Attack a checkpoint's validation images with FGSM and PGD at several eps (the Adversarial Robustness "
            "Toolbox: the robustness extra), report the accuracy left, set the feature-squeezing detector's "
            "threshold on the clean images at a stated false-alarm rate and report how often it flags the "
            "adversarial ones.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder or .safetensors checkpoint")
    p.add_argument("--data", metavar="DIR",
                   help="ImageFolder tree to test on (default: the run's own validation split, from its recipe.yaml)")
    p.add_argument("--limit", type=int, metavar="N", help="N validation images, evenly spread (default: all)")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255", metavar="LIST",
                   help="L-inf budgets in pixel units of [0, 1] images, comma-separated; fractions allowed "
                   "(default: 1/255,2/255,4/255,8/255)")
    p.add_argument("--attacks", default="fgsm,pgd", metavar="LIST", help="fgsm, pgd or both (default: fgsm,pgd)")
    p.add_argument("--false-alarm", type=float, default=0.05, metavar="P",
                   help="share of clean images the threshold may flag (default: 0.05)")
    p.add_argument("--bits", type=int, default=5, metavar="B",
                   help="colour bits kept by the bit-depth squeezer, 1..8 (default: 5, the paper's CIFAR-10 setting)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per attack step (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model and attacks run")
    p.add_argument("--out", metavar="DIR", help="also write robustness.json and robustness.md here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from vggnet.errors import UsageError

    if args.limit is not None and args.limit < 2:
        raise UsageError(f"--limit must be at least 2, got {args.limit}")
    if not 0 < args.false_alarm < 1:
        raise UsageError(f"--false-alarm must be in (0, 1), got {args.false_alarm}")
    if not 1 <= args.bits <= 8:
        raise UsageError(f"--bits must be 1..8, got {args.bits}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    from vggnet.robustness import RobustnessSettings, markdown, parse_eps, run_robustness
    from vggnet.robustness.attacks import check_available
    from vggnet.robustness.benchmark import check_attacks

    check_available()
    eps, texts = parse_eps(args.eps)
    settings = RobustnessSettings(ckpt=args.ckpt, data=args.data, limit=args.limit, eps=eps, eps_text=texts,
                                  attacks=check_attacks([a.strip() for a in args.attacks.split(",") if a.strip()]),
                                  false_alarm=args.false_alarm, bits=args.bits, batch_size=args.batch_size,
                                  device=args.device)
    results = run_robustness(settings, args.out)
    print(json.dumps(results, indent=2) if args.json else markdown(results))
    if not args.json:
        print(f"\nthreshold written to {results['reference']} (vggnet serve --adversarial-guard reads it)")
    return 0
