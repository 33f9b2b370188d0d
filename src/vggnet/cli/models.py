"""``vggnet models``: the model zoo at a glance."""

from __future__ import annotations

import argparse
import json

from vggnet.errors import UsageError
from vggnet.models import list_models
from vggnet.models.configs import PAPER_TABLE2_MILLIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list every VGG configuration with parameters and GMACs",
        description="List the model zoo: each of the paper's six configurations (A, A-LRN, B, C, D, E) "
        "with and without batch norm, its parameter count and its multiply-accumulates per image.",
    )
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the last layer (default 1000)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels for GMACs (default 224)")
    p.add_argument("--width", type=float, default=1.0, help="conv width multiplier (default 1.0)")
    p.add_argument("--head", choices=["fc", "conv", "gap"], default="fc", help="classifier head (default fc)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.input_size < 32:
        raise UsageError("input size must be at least 32 pixels (five 2×2 poolings)")
    # here, not at the top: the counts need torch (a meta-device model, FlopCounterMode), `--help` does not
    from vggnet.models import VGGConfig, count_macs, count_params, meta_model

    rows = []
    # the paper's Table 2 counts (in millions) hold for its own nets only: 1000 classes, full width, no BN, the fc
    # head or its fully-convolutional form (the same weights, reshaped)
    as_paper = args.num_classes == 1000 and args.width == 1.0 and args.head in ("fc", "conv")
    for name in list_models():
        config = VGGConfig(name=name, num_classes=args.num_classes, width=args.width, head=args.head)
        params = count_params(meta_model(config))
        rows.append({
            "name": name, "config": config.config, "bn": config.batch_norm, "params": params,
            "paper_params_millions": PAPER_TABLE2_MILLIONS[config.config] if as_paper and not config.batch_norm
            else None,
            "gmacs": round(count_macs(config, args.input_size) / 1e9, 2),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14}{'config':<8}{'BN':<5}{'params':>14}{'GMACs@' + str(args.input_size):>12}")
    for r in rows:
        print(f"{r['name']:<14}{r['config']:<8}{'yes' if r['bn'] else '-':<5}{r['params']:>14,}{r['gmacs']:>12.2f}")
    return 0
