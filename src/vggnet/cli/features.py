"""``vggnet features``: the paper's Appendix B descriptors of a folder of images, saved for a linear model."""

from __future__ import annotations

import argparse
import functools
import textwrap
import time

from vggnet.cli.ray_engine import RAY_EPILOG
from vggnet.cli.ray_engine import add_arguments as add_engine_arguments
from vggnet.errors import UsageError

EPILOG = """\
the descriptor (the paper's Appendix B):
  for each scale Q: shorter side -> Q, the whole image through the network made fully convolutional
  (fc6 as a 7x7 conv, fc7/fc8 as 1x1: same weights), the --layer map averaged over positions, averaged
  with the mirrored image's, L2-normalised; over scales averaged (default) or stacked (--stack), then
  L2-normalised again. A scale below 16 is a multiple of the model's training crop, 16 or more is pixels
  (the paper: 256,384,512 for 224-px nets). Conv layers (block5_pool, relu5_3, conv4_3 ...) work too.

layer names: vggnet's (block3_conv3, block5_pool, fc7, relu7), style-transfer / LPIPS (conv3_3, relu3_3,
  pool3), torchvision's index (features.22). fc7 is the layer's own output; relu7 is rectified (what
  Caffe's in-place ReLU left in its fc7 blob, and what the paper's features were).

output (.npz, loads with allow_pickle=False): features (N x D), labels, classes, paths, split (train/val per
  image), layer, scales, stack, model, source. Unreadable images are skipped and counted. A file given to
  `vggnet probe --test` is tested on every row, whatever its split (--test-split val restricts it).

examples:
  vggnet features --ckpt runs/demo --out runs/demo/feats.npz                    # the demo run's digits
  vggnet probe --train runs/demo/feats.npz --out runs/demo/probe                  # linear SVM on them
  vggnet features --weights vgg16-397923af.pth --data photos/ --layer relu7 --scales 256,384,512 --out f.npz
  vggnet features --weights vgg16-397923af.pth --data test_photos/ --layer relu7 --scales 256,384,512 --out t.npz
  vggnet probe --train f.npz --test t.npz                                        # f's train rows vs all of t
  vggnet features --ckpt runs/cifar10 --data data/other --layer block5_pool --scales 1,1.5 --stack --out g.npz
  vggnet features --ckpt runs/cifar10 --data data/big --engine ray --concurrency 8 --out big.npz
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="image descriptors for linear models: dense multi-scale features, flip-averaged, L2-normalised",
        description=textwrap.fill(
            "Describe every image of a data folder with a trained VGG, as the paper's Appendix B does, and save "
            "the descriptors with labels, class names, file paths and the train/val split to an .npz file for "
            "`vggnet probe` (a linear SVM) or your own models. The network is a vggnet run folder or checkpoint "
            "(--ckpt) or any VGG weights file (--weights: torchvision, timm; the architecture is read from the "
            "tensors, --model names it explicitly).", width=100),
        epilog=EPILOG + "\n" + RAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="RUN", help="vggnet run folder or .safetensors checkpoint")
    src.add_argument("--weights", metavar="FILE", help="VGG weights (.pth / .safetensors: torchvision, timm, vggnet)")
    p.add_argument("--model", help="architecture of --weights, e.g. vgg16 (default: read from the weights)")
    p.add_argument("--data", help="ImageFolder tree (class folders, or train/ and val/); default: the run's data")
    p.add_argument("--split", choices=("all", "train", "val"), default="all", help="which images (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out share per class when --data has no val/ folder (default: 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split (default: 0)")
    p.add_argument("--layer", help="layer to describe with (default: relu7, the paper's, for the fc and conv heads; "
                   "block5_pool for the gap head, which has no fc7)")
    p.add_argument("--scales", default="1.0",
                   help="comma-separated test scales Q (default: 1.0 = the training crop)")
    p.add_argument("--stack", action="store_true", help="concatenate the scales' descriptors instead of averaging")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average with the mirrored image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the hardware runs it natively)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: a bar on a terminal; elsewhere a line every 30 s with "
                   "the time left, once the work has taken 30 s; --no-progress: none)")
    p.add_argument("--out", required=True, help="the .npz file to write (replaced only when complete)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def parse_scales(text: str) -> list[float | int]:
    values: list[float | int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(int(item) if item.isdigit() else float(item))
        except ValueError:
            raise UsageError(f"--scales: {item!r} is not a number (e.g. --scales 1.0,1.5 or 256,384,512)") from None
    return values


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vggnet.cli.ray_engine import check as check_engine
    from vggnet.cli.ray_engine import features as ray_features
    from vggnet.transfer import FeatureFile, save_features
    from vggnet.transfer.features import extract_features, feature_images, fingerprint, load_source, pixel_scales

    scales = parse_scales(args.scales)
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_engine(args)
    model, prep, source = load_source(args.ckpt, args.weights, args.model)
    default = "relu7" if "relu7" in model.layer_names() else "block5_pool"
    layer = model.resolve_layer(args.layer or default)  # bad names and scales fail before any image is read
    pixels = pixel_scales(scales, prep["image_size"])
    images, labels, classes, paths, split = feature_images(args.data, args.ckpt, args.split, args.val_fraction,
                                                           args.split_seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    describe = extract_features if args.engine == "local" else functools.partial(ray_features, args)
    feats, ok = describe(model, images, layer=layer, scales=pixels, crop=prep["image_size"],
                         mean=prep["mean"], std=prep["std"], stack=args.stack, flip=args.flip,
                         batch_size=args.batch_size, device=device, amp_bf16=args.bf16,
                         progress=args.progress)
    seconds = time.perf_counter() - start
    keep = ok.numpy()
    ff = FeatureFile(features=feats.numpy()[keep], labels=np.asarray(labels)[keep], classes=classes,
                     paths=[p for p, k in zip(paths, keep, strict=True) if k],
                     split=np.asarray(split)[keep], layer=layer, scales=pixels, stack=args.stack,
                     model=model.config.name, source=source, fingerprint=fingerprint(model))
    save_features(ff, args.out)
    counts = {part: int((ff.split == part).sum()) for part in ("train", "val")}
    skipped = int((~keep).sum())
    print(f"{len(ff.labels)} images ({counts['train']} train, {counts['val']} val, {len(classes)} classes"
          f"{f', {skipped} unreadable skipped' if skipped else ''}): {ff.describe()} in {seconds:.1f} s -> {args.out}")
    return 0
