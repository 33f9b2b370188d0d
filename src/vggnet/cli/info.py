"""``vggnet info NAME``: a layer-by-layer table of one model."""

from __future__ import annotations

import argparse

from vggnet.errors import UsageError
from vggnet.models import list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show one model's layers with output shapes, parameters and MACs",
        description="Print a layer table for a model name (see `vggnet models`) or a vggnet checkpoint file: "
        "every named layer (block3_conv2, fc6, ...) with its output shape for one image.",
    )
    p.add_argument("model", help=f"a model name ({', '.join(list_models()[:4])}, ...) or a .safetensors checkpoint")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--width", type=float, default=1.0, help="conv width multiplier")
    p.add_argument("--head", choices=["fc", "conv", "gap"], default="fc")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: the table needs torch (a meta-device model), `--help` does not
    from vggnet.models import VGGConfig, count_macs, layer_table, read_checkpoint

    if args.model.endswith(".safetensors"):
        config = read_checkpoint(args.model)[0]
    else:
        config = VGGConfig(name=args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                           width=args.width, head=args.head)
    if args.input_size < 32:
        raise UsageError("input size must be at least 32 pixels (five 2×2 poolings)")
    rows = layer_table(config, args.input_size)
    print(f"{config.name} (config {config.config}, head {config.head}, width {config.width}) "
          f"at {config.in_channels}×{args.input_size}×{args.input_size}")
    print(f"{'layer':<16}{'type':<20}{'output shape':<22}{'params':>13}{'MMACs':>11}")
    for r in rows:
        shape = "×".join(str(d) for d in r.output_shape)
        print(f"{r.name:<16}{r.kind:<20}{shape:<22}{r.params:>13,}{r.macs / 1e6:>11.1f}")
    total_params = sum(r.params for r in rows)
    print(f"{'total':<58}{total_params:>13,}{count_macs(config, args.input_size) / 1e6:>11.1f}")
    return 0
