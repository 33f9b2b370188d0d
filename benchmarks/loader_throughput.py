"""Decode-bound loader throughput at 224 px: WebDataset shards vs an ImageFolder, same JPEGs, workers 0/1/2.

What it times is the training input path and nothing else (no model): JPEG decode, the paper's augmentation as
``data.augment: paper`` runs it (shorter side rescaled to S in [256, 512], random 224 crop, flip, PCA lighting,
normalise) and collation into batches, through the two loaders training uses (the folder path's DataLoader from
``vggnet.data.build_dataloader`` and ``vggnet.data.shards.ShardLoader``). The images are the 200 raccoon photos of
``../shared/data/raccoon-voc.tar.gz`` (real camera JPEGs of a few hundred px a side, like ImageNet's), repeated
``--copies`` times as separate files, extracted to a temporary folder and sharded with ``vggnet data shard``.
The configurations run in interleaved rounds (each round times every one once), so a neighbour's load on a shared
machine hits them alike; the median round is reported. Each pass is timed from its start (worker start-up
 included, as every epoch pays it).

From the workers=0 rate (one process: one core decoding) it derives images/s per core and the cores one GPU needs at
an assumed H100 VGG-16 training rate (see ``--gpu-rate``: no published figure exists; the default is the derived rate
of ``benchmarks/imagenet_plan.py``). Run:

    python benchmarks/loader_throughput.py          # writes benchmarks/results/loader_throughput.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import write_results  # noqa: E402

RACCOONS = HERE.parent.parent / "shared" / "data" / "raccoon-voc.tar.gz"
# imagenet_plan.py's per-H100 rate: 989 dense BF16 TFLOPS x 0.30 assumed MFU / (3 x 2 x 15.47 GMACs) per image
H100_VGG16_RATE = 3196.0


def _photos(archive: Path, folder: Path, copies: int) -> Path:
    """``copies`` x the archive's JPEGs as files in two class folders (ImageFolder: at least one class needed)."""
    with tarfile.open(archive) as tar:
        jpegs = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()  # type: ignore[union-attr]
                 if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]
    for c in range(copies):
        for i, (_, data) in enumerate(jpegs):
            target = folder / f"class{i % 2}" / f"{c:02d}-{i:04d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return folder


def _rate(loader, limit: int) -> float:
    """Images/s over the first ``limit`` images, from the moment the pass starts (workers' start-up included:
    timing after the first batch would count the batches the workers prefetched meanwhile as free)."""
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        seen += len(images)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=2, help="times the 200 photos are repeated (default 2: 400 files)")
    p.add_argument("--images", type=int, default=320, help="images timed per pass (default 320)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers (default 0 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--gpu-rate", type=float, default=H100_VGG16_RATE,
                   help="VGG-16 training images/s of one H100 (default 3196: ASSUMED, derived as in "
                   "benchmarks/imagenet_plan.py from 989 dense BF16 TFLOPS at 30%% MFU; no published figure found)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "loader_throughput.json")
    args = p.parse_args()

    import torch
    from PIL import Image

    from vggnet.data import ImageFolderDataset, build_dataloader, paper_train_transform, scan_image_folder
    from vggnet.data.shards import ShardLoader, read_manifest, write_shards

    torch.set_num_threads(1)  # decode and augment per process; torch's own threads would blur "per core"
    tf = paper_train_transform((256, 512), crop=224, lighting=0.1, flip=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _photos(RACCOONS, Path(tmp) / "folder", args.copies)
        shards = Path(tmp) / "shards"
        manifest = write_shards(folder, shards, shard_size=50, progress=False)
        samples, classes = scan_image_folder(folder)
        mean_kb = statistics.mean(os.path.getsize(s) for s, _ in samples) / 1024
        sizes = [Image.open(s).size for s, _ in samples[: len(samples) // args.copies]]
        mean_px = f"{statistics.mean(w for w, _ in sizes):.0f} x {statistics.mean(h for _, h in sizes):.0f} px"
        rates: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for workers in args.workers:
                ds = ImageFolderDataset(samples, classes, transform=tf)
                folder_loader = build_dataloader(ds, args.batch, train=True, workers=workers, seed=r)
                rates.setdefault(f"folder/workers={workers}", []).append(_rate(folder_loader, args.images))
                del folder_loader
                shard_loader = ShardLoader(str(shards), read_manifest(str(shards)), "train", args.batch, True, tf,
                                           seed=r, rank=0, world=1, workers=workers, buffer=100)
                shard_loader.set_epoch(r + 1)
                rates.setdefault(f"shards/workers={workers}", []).append(_rate(shard_loader, args.images))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    table = {k: {"img_per_s_median": round(statistics.median(v), 1), "rounds": [round(x, 1) for x in v]}
             for k, v in rates.items()}
    per_core = statistics.median(rates["shards/workers=0"]) if "shards/workers=0" in rates else None
    print(f"{'loader':<20}{'img/s (median)':>16}  rounds")
    for k, v in table.items():
        print(f"{k:<20}{v['img_per_s_median']:>16.1f}  {v['rounds']}")
    fields = {
        "images": f"{len(samples)} files: the 200 raccoon photos of raccoon-voc.tar.gz x {args.copies} "
                  f"(mean {mean_kb:.0f} KiB, {mean_px} per JPEG; ImageNet's average about 110 KiB, 400 x 350 px), "
                  f"{len(manifest['splits']['train']['shards'])} shards",
        "transform": "data.augment: paper at 224 px: shorter side S in [256, 512], random 224 crop, flip, "
                     "PCA lighting 0.1, normalise; batches of " + str(args.batch),
        "note": f"{os.cpu_count()}-core machine shared with other helpers working at the same time: absolute "
                "rates are noisy, workers cannot scale past the cores left over (the main process and the workers "
                "share the same cores) and each timed pass includes the workers' start-up; torch threads set to 1 "
                "per process",
        "table": table,
    }
    if per_core:
        cores = args.gpu_rate / per_core
        fields.update({
            "img_per_s_per_core": round(per_core, 1),
            "img_per_s_per_core_from": "shards, workers=0 (one process decoding), median of the rounds",
            "gpu_rate_img_per_s": args.gpu_rate,
            "gpu_rate_source": "ASSUMED: no published VGG-16 training rate for an H100 was found; derived as in "
                               "benchmarks/imagenet_plan.py (989 dense BF16 TFLOPS x 0.30 MFU / 3 x 2 x 15.47 "
                               "GMACs per 224-px image)",
            "cores_per_gpu": round(cores, 1),
        })
        print(f"{per_core:.1f} img/s per core -> {cores:.1f} cores per GPU at {args.gpu_rate:.0f} img/s (assumed)")
    write_results(args.out, "loader_throughput", args, **fields)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
