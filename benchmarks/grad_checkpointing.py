"""Memory saved by per-block gradient checkpointing (``train.grad_checkpointing``), and its time cost.

Each variant runs in a fresh process (so peak RSS is its own): build VGG-16-BN, take one warm-up
training step, then measure the peak resident memory growth and the time of two more steps.

    .venv/bin/python benchmarks/grad_checkpointing.py [--batch 16] [--size 224]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(checkpointing: bool, batch: int, size: int) -> dict[str, float]:
    import torch

    import vggnet

    model = vggnet.create_model("vgg16_bn", num_classes=10).train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # optimizer state and allocator warm
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import gc

    gc.collect()
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    seconds = (time.perf_counter() - t0) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak / 1024, "growth_mib": (peak - base) / 1024, "step_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--child", choices=["on", "off"])
    ap.add_argument("--out", default="benchmarks/results/grad_checkpointing.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.batch, args.size)))
        return
    rows = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--size",
                              str(args.size)], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = rows["off"], rows["on"]
    print(f"VGG-16-BN, batch {args.batch}, {args.size}x{args.size}, fp32, one training step")
    print(f"{'checkpointing':<15}{'peak RSS MiB':>14}{'step s':>10}")
    for mode in ("off", "on"):
        print(f"{mode:<15}{rows[mode]['peak_rss_mib']:>14.0f}{rows[mode]['step_s']:>10.2f}")
    saved = off["peak_rss_mib"] - on["peak_rss_mib"]
    print(f"saved {saved:.0f} MiB of peak memory ({100 * saved / off['peak_rss_mib']:.0f}%), "
          f"step time x{on['step_s'] / off['step_s']:.2f}")
    result = {"benchmark": "gradient checkpointing per block", "command": " ".join(["python", *sys.argv]),
              "date": datetime.date.today().isoformat(), "machine": platform.machine(), "batch": args.batch,
              "size": args.size, "rows": rows, "saved_mib": saved, "time_ratio": on["step_s"] / off["step_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
