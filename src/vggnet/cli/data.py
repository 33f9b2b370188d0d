"""``vggnet data``: turn an archive into a training folder, and look at what a folder holds.

Kept to the data package only (no model or training imports), so it starts fast and works on a
machine that will never train.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vggnet.errors import UsageError

if TYPE_CHECKING:
    from vggnet.data.voc import VOCAnnotation


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="prepare and inspect image datasets",
        description="Prepare image datasets for training (safe, idempotent archive extraction, an optional "
        "decoded cache for tiny images) and inspect ImageFolder trees (one sub-folder of images per class).",
    )
    p.set_defaults(func=lambda args: _help(p))
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")

    prep = data_sub.add_parser(
        "prepare", help="extract a .tar.gz of class folders (or a PASCAL VOC box set), once",
        description="Extract ARCHIVE (.tar or .tar.gz of <class>/<image> folders, optionally under train/ "
        "and val/, or a PASCAL VOC box set: annotations/*.xml (or Annotations/, annots/, xml/...) beside images/) "
        "into --out. Refuses members "
        "that would land outside --out, does nothing when --out already holds this archive, never leaves a "
        "half-extracted folder. Prints the folder for --data.",
    )
    prep.add_argument("archive", type=Path, metavar="ARCHIVE", help="the .tar.gz to extract")
    prep.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to extract into")
    prep.add_argument("--cache", action="store_true",
                      help="also decode every image once into DIR/<split>.npz (tiny images, e.g. CIFAR-10)")
    prep.add_argument("--size", type=int, default=None,
                      help="with --cache: resize to SIZE x SIZE (shorter side, centre crop); "
                      "needed when image sizes differ")
    prep.set_defaults(func=run_prepare)

    info = data_sub.add_parser(
        "info", help="classes and image counts of an ImageFolder tree",
        description="Show the classes of PATH and how many images each holds, per split when PATH has "
        "train/ and val/ folders. Fails with a clear message when PATH is not usable for training.",
    )
    info.add_argument("path", type=Path, metavar="PATH",
                      help="an ImageFolder root, or a folder with train/ and val/")
    info.set_defaults(func=run_info)

    shard = data_sub.add_parser(
        "shard", help="write an ImageFolder tree as WebDataset tar shards (data.format: shards)",
        description="Write FOLDER (one sub-folder of images per class, or train/ and val/ folders) as WebDataset "
        "tar shards under --out: per image KEY.cls (class index), KEY.<ext> (the original bytes, never "
        "re-encoded) and KEY.json (source path, class), images shuffled across shards, and DIR/manifest.json "
        "(classes, shards with counts and sha256, the split rule). Training shards are train-NNNNNN.tar; the "
        "validation split (the val/ folder, or --val-fraction held out per class as training holds it out) is "
        "val-NNNNNN.tar. Each shard is written whole or not at all; a rerun keeps the complete ones. Train on "
        "them with --set data.format=shards --data DIR (or any fsspec URL of DIR).",
    )
    shard.add_argument("folder", type=Path, metavar="FOLDER", help="the ImageFolder tree to shard")
    shard.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder the shards go into")
    size = shard.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, metavar="N",
                      help="images per shard (default: by size, see --shard-mb); a job with P processes x W "
                      "loader workers needs at least P x W training shards to keep every worker busy")
    size.add_argument("--shard-mb", type=float, default=None, metavar="MB",
                      help="start a new shard before one passes MB megabytes (default 256: WebDataset's advice is "
                      "100 MB to a few GB per shard)")
    shard.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="hold out this fraction of each class into val-*.tar, with the rule and seed training "
                       "uses for data.val_fraction (default 0: none; a FOLDER with train/ and val/ uses val/)")
    shard.add_argument("--split-seed", type=int, default=0, metavar="S",
                       help="seed of the --val-fraction split (data.split_seed; default 0)")
    shard.add_argument("--shuffle-seed", type=int, default=0, metavar="S",
                       help="seed of the order images are spread over the shards (default 0)")
    shard.set_defaults(func=run_shard)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _splits(root: Path) -> dict[str, Path]:
    """The ImageFolder roots under ``root``: its train/ and val/ when it has both, else ``root`` itself."""
    val = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val is not None:
        return {"train": root / "train", val.name: val}
    return {root.name: root}


def _count(root: Path) -> tuple[list[str], dict[str, Counter[str]]]:
    """Images per class and split, through the same checks (and errors) that training applies."""
    from vggnet.data import load_image_folder  # torch and torchvision: not for `vggnet data --help`

    train, val, classes = load_image_folder(root, val_fraction=0.0)
    splits = {"train" if val is not None else "images": train, **({"val": val} if val is not None else {})}
    return classes, {name: Counter(classes[t] for t in ds.targets) for name, ds in splits.items()}


def _holds_xml(folder: Path) -> bool:
    return any(p.suffix.lower() == ".xml" and p.is_file() for p in folder.iterdir())


def _voc_root(root: Path) -> Path | None:
    """The folder of a VOC box set, for `vggnet localize --data`; None for class folders.

    A folder with a sub-folder of XML, whatever its name, is taken as a box set: one whose XML folder is not a
    name :func:`~vggnet.data.voc.load_voc_folder` reads then gets its error listing the names it accepts,
    rather than being blamed for "class folders" holding no images.
    """
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if any(_holds_xml(sub) for sub in folder.iterdir() if sub.is_dir()):
            return folder
    return None


def print_voc_load(annotations: Sequence[VOCAnnotation], skipped: Sequence[tuple[Path, str]]) -> None:
    """Each skipped file and each box note once, on stderr (the library returns them and does not warn)."""
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    for annotation in annotations:
        for note in annotation.notes:
            print(f"note {annotation.source}: {note}", file=sys.stderr)


def _prepare_voc(voc: Path) -> int:
    from vggnet.data.voc import class_names, load_voc_folder

    annotations, skipped = load_voc_folder(voc)
    print_voc_load(annotations, skipped)
    objects = sum(len(a.objects) for a in annotations)
    notes = sum(len(a.notes) for a in annotations)
    print(f"VOC box set: {voc}")
    print(f"{len(annotations):,} annotated images, {objects:,} objects, classes {class_names(annotations)}, "
          f"{len(skipped)} skipped" + (" (unusable files, each named on stderr)" if skipped else "")
          + (f", {notes} box(es) clipped to the image or dropped (noted on stderr)" if notes else ""))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be at least 1, got {args.size}")
    from vggnet.data import decode_to_cache, prepare_archive

    root = prepare_archive(args.archive, args.out)
    voc = _voc_root(root)
    if voc is not None:
        return _prepare_voc(voc)
    classes, counts = _count(root)
    total = sum(sum(c.values()) for c in counts.values())
    print(f"ImageFolder root: {root}")
    print(f"{len(classes)} classes, {total:,} images")
    if args.cache:
        for split, folder in _splits(root).items():
            cache = args.out / f"{split}.npz"
            images, _, _ = decode_to_cache(folder, cache, size=args.size)
            n, h, w, c = images.shape
            print(f"decoded cache: {cache} ({n:,} x {h}x{w}x{c} uint8, {images.nbytes / 2**20:,.0f} MiB)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    classes, counts = _count(args.path)
    splits = list(counts)
    width = max([len("class"), len("total"), *map(len, classes)]) + 2
    print(f"{args.path}: {len(classes)} classes, {sum(sum(c.values()) for c in counts.values()):,} images")
    print(f"{'class':<{width}}" + "".join(f"{s:>10}" for s in splits))
    for name in classes:
        print(f"{name:<{width}}" + "".join(f"{counts[s][name]:>10,}" for s in splits))
    print(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>10,}" for s in splits))
    return 0


def run_shard(args: argparse.Namespace) -> int:
    from vggnet.data.shards import write_shards  # torch: not for `vggnet data --help`

    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    manifest = write_shards(args.folder, args.out, shard_size=args.shard_size, shard_mb=args.shard_mb,
                            val_fraction=args.val_fraction, split_seed=args.split_seed,
                            shuffle_seed=args.shuffle_seed)
    for path in manifest["skipped"]:
        print(f"skipped {args.folder / path}: not a readable image", file=sys.stderr)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['count']:,} images in {len(split['shards'])} shard(s)")
    kept = manifest["kept_from_earlier_run"]
    print(f"{len(manifest['classes'])} classes, {manifest['total']:,} images"
          + (f", {kept} shard(s) already complete from an earlier run" if kept else "")
          + f"; manifest: {args.out / 'manifest.json'}")
    print(f"train on them: vggnet train --data {args.out} --set data.format=shards")
    return 0
