"""What ``--engine ray`` costs on one machine: ``vggnet predict`` against ``vggnet predict --engine ray``.

Both commands run as a user runs them (a fresh ``vggnet`` process each, wall clock from start to exit, so the Ray
path pays for starting a local Ray, its actors and sending the model), on the same CIFAR-10 JPEGs (extracted from
``../shared/data/cifar10-train-jpg.tar.gz``, evenly over the classes) and the same checkpoint (an untrained
VGG-11-BN at CIFAR's 32 px: the numbers are throughput, not accuracy). The Ray path also runs on a handful of
images, so its fixed start-up cost and its per-image rate can be told apart. Rounds interleave the commands, so
the load of other processes on a shared machine falls on all of them alike.

    .venv/bin/python benchmarks/ray_overhead.py --images 600 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from machine import write_results

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
CIFAR = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616], "image_size": 32}


def extract(n: int, folder: Path) -> int:
    """The first n // 10 JPEGs of every class (the archive is ordered by class, then number)."""
    per_class, taken = n // 10, {}
    with tarfile.open(TAR) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            cls = member.name.split("/")[-2]
            if taken.get(cls, 0) >= per_class:
                if len(taken) == 10 and all(v >= per_class for v in taken.values()):
                    break
                continue
            taken[cls] = taken.get(cls, 0) + 1
            target = folder / cls / Path(member.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return sum(taken.values())


def checkpoint(folder: Path, arch: str) -> Path:
    import torch

    import vggnet

    torch.manual_seed(0)
    model = vggnet.create_model(arch, num_classes=10).eval()
    file = folder / "best.safetensors"
    vggnet.save_checkpoint(model, file, {**CIFAR, "classes": [str(i) for i in range(10)]})
    return file


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vggnet.cli", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="CIFAR-10 JPEGs to predict (default: 600)")
    p.add_argument("--small", type=int, default=20, help="images of the start-up probe (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--arch", default="vgg11_bn", help="architecture of the untrained checkpoint (default: vgg11_bn)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=2, help="Ray actors (default: 2, one per core here)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_overhead.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        work = Path(tmp)
        n = extract(args.images, work / "big")
        small = extract(args.small, work / "small")
        ckpt = str(checkpoint(work, args.arch))
        common = ["predict", "--ckpt", ckpt, "--json", "--batch-size", str(args.batch_size), "--no-progress"]
        ray = ["--engine", "ray", "--concurrency", str(args.concurrency)]
        commands = {"local": [*common, str(work / "big")], "ray": [*common, *ray, str(work / "big")],
                    "ray_small": [*common, *ray, str(work / "small")]}
        times: dict[str, list[float]] = {k: [] for k in commands}
        load: list[float] = []  # 1-minute load average before each run: how busy the shared machine was
        for r in range(args.rounds):
            for name, argv in commands.items():
                load.append(round(os.getloadavg()[0], 2))
                times[name].append(timed(argv))
                print(f"round {r + 1} {name}: {times[name][-1]:.1f} s (load {load[-1]})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    startup = med["ray_small"]
    steady = (n - small) / (med["ray"] - startup) if med["ray"] > startup else float("nan")
    result = {
        "images": n, "small_images": small, "arch": args.arch, "image_size": 32,
        "seconds": times, "median_seconds": med, "load_average_1min_before_each_run": load,
        "images_per_s": {"local": n / med["local"], "ray": n / med["ray"]},
        "ray_over_local_time": med["ray"] / med["local"],
        "ray_startup_s_estimate": startup, "ray_images_per_s_after_startup": steady,
        "commands": {k: "vggnet " + " ".join(v) for k, v in commands.items()},
        "note": "wall clock of a fresh vggnet process each (Ray: starts a local Ray, 2 actors); the machine has "
                "2 cores shared with other helpers' jobs (load averages above), so absolute numbers move with "
                "their load; rounds interleave the commands",
    }
    print(f"local {n / med['local']:.0f} img/s, ray {n / med['ray']:.0f} img/s (x{med['ray'] / med['local']:.2f} "
          f"time); ray start-up ~{startup:.0f} s, then {steady:.0f} img/s")
    write_results(args.out, "ray_overhead", args, **result)


if __name__ == "__main__":
    main()
