"""The ImageNet plan's arithmetic (benchmarks/imagenet_plan.md): the paper's VGG-16 recipe on N H100s.

Every input is in INPUTS with where it comes from: ``measured`` (this project, on its machines), ``computed``
(counted by vggnet's own code), ``cited`` (a published figure, with the source) or ``assumed`` (a stated guess, to
replace with a measurement). The loader's images/s per core is read from benchmarks/results/loader_throughput.json
when that file exists (issue 33, part 2) and is otherwise a marked placeholder. Run:

    python benchmarks/imagenet_plan.py            # prints the tables, writes benchmarks/results/imagenet_plan.json
    python benchmarks/imagenet_plan.py --mfu 0.2  # any input can be changed: see --help
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOADER_JSON = RESULTS / "loader_throughput.json"

INPUTS: dict[str, dict] = {
    "images": {"value": 1_281_167, "source": "cited",
               "note": "ILSVRC-2012 training images (Russakovsky et al., IJCV 2015); the paper's '1.3M'"},
    "val_images": {"value": 50_000, "source": "cited", "note": "ILSVRC-2012 validation set"},
    "dataset_bytes": {"value": 147.9e9, "source": "assumed",
                      "note": "ILSVRC2012_img_train.tar as commonly reported (~138 GiB), original JPEG bytes; "
                              "`vggnet data shard` stores the original bytes, so the shards total about the same"},
    "epochs": {"value": 74, "source": "cited", "note": "Simonyan & Zisserman 2015, sec. 3.1 (370K iterations)"},
    "batch": {"value": 256, "source": "cited", "note": "the paper's global mini-batch"},
    "macs_per_image": {"value": None, "source": "computed",
                       "note": "VGG-16 (config D, fc head, 1000 classes) at 224 px: vggnet.models.complexity"},
    "params": {"value": None, "source": "computed", "note": "VGG-16 parameters: vggnet.models.complexity"},
    "train_flops_factor": {"value": 3.0, "source": "assumed",
                           "note": "a training step is ~3x a forward pass (backward ~2x forward)"},
    "peak_bf16_tflops": {"value": 989.0, "source": "cited",
                         "note": "H100 SXM5 dense BF16 tensor-core peak (NVIDIA H100 datasheet: 1,979 with "
                                 "sparsity, half without)"},
    "mfu": {"value": 0.30, "source": "assumed",
            "note": "fraction of the peak a bf16 channels_last VGG-16 step reaches (no published H100 VGG-16 "
                    "training rate was found; replace with benchmarks/train_throughput.py on a lent H100)"},
    "loader_img_per_s_per_core": {"value": 200.0, "source": "assumed (PENDING)",
                                  "note": "placeholder until benchmarks/results/loader_throughput.json exists: "
                                          "JPEG decode + rescale to S in [256, 512] + 224 crop + flip, per core"},
    "loader_headroom": {"value": 1.25, "source": "assumed", "note": "cores beyond the mean rate, for jitter"},
    "cores_per_8gpu_node": {"value": 112, "source": "cited",
                            "note": "DGX H100: 2x Xeon Platinum 8480C, 56 cores each (NVIDIA DGX H100 datasheet)"},
    "nvlink_busbw_gbs": {"value": 360.0, "source": "assumed",
                         "note": "NCCL all-reduce bus bandwidth inside one 8-GPU NVLink node (GB/s)"},
    "ib_busbw_gbs": {"value": 40.0, "source": "assumed",
                     "note": "per-GPU NCCL bus bandwidth across nodes: 8x 400 Gb/s NICs per node (DGX H100 "
                             "datasheet) = 50 GB/s per GPU line rate, ~80% of it reached"},
    "grad_bytes_per_param": {"value": 4, "source": "assumed",
                             "note": "DDP all-reduces fp32 gradients (autocast keeps fp32 parameters)"},
    "step_overhead_s": {"value": 0.001, "source": "assumed",
                        "note": "per step, not overlapped: optimizer update of 138 M params, launch latency"},
    "usd_per_gpu_hour": {"value": 3.99, "source": "cited",
                         "note": "Lambda on-demand 8x H100 SXM, per GPU-hour (lambda.ai/instances, as transcribed "
                                 "2026-09-20 in api-evangelist/lambda-labs plans/lambda-labs-plans-pricing.yml); "
                                 "prices change: treat as an assumption for budgeting"},
    "gpus": {"value": [1, 8, 32, 64], "source": "assumed", "note": "the plan's sizes"},
}


def _loader_rate() -> tuple[float, str, str]:
    """Images/s per core from part 2's measurement when it exists (the 224-px row from shards), else the placeholder."""
    fallback = INPUTS["loader_img_per_s_per_core"]
    if not LOADER_JSON.is_file():
        return fallback["value"], fallback["source"], fallback["note"]
    data = json.loads(LOADER_JSON.read_text())
    for key in ("img_per_s_per_core", "images_per_s_per_core"):
        if isinstance(data.get(key), (int, float)):
            return float(data[key]), "measured", f"{LOADER_JSON.name}: {key}"
    raise SystemExit(f"{LOADER_JSON} has no top-level img_per_s_per_core; pass --loader-img-per-s-per-core")


def per_gpu_rate(v: dict) -> float:
    """Training images/s one H100 sustains at a large per-GPU batch: peak x MFU / FLOPs per image."""
    return v["peak_bf16_tflops"] * 1e12 * v["mfu"] / (v["train_flops_factor"] * 2 * v["macs_per_image"])


def allreduce_s(v: dict, gpus: int) -> float:
    """One gradient all-reduce (ring): 2 (N-1)/N x bytes / bus bandwidth; NVLink inside a node, IB across."""
    if gpus == 1:
        return 0.0
    bw = v["nvlink_busbw_gbs"] if gpus <= 8 else v["ib_busbw_gbs"]
    return 2 * (gpus - 1) / gpus * v["params"] * v["grad_bytes_per_param"] / (bw * 1e9)


def loader_cores_per_gpu(v: dict) -> float:
    """CPU cores one GPU's loader may use: the node's cores less one per training process, shared by 8 GPUs."""
    return (v["cores_per_8gpu_node"] - 8) / 8


def row(v: dict, gpus: int, global_batch: int) -> dict:
    """One line of the plan: step time (compute and all-reduce overlapped, the loader as a ceiling), epochs/hour,
    hours, cost, loader cores."""
    rate = per_gpu_rate(v)
    fed = loader_cores_per_gpu(v) * v["loader_img_per_s_per_core"]  # what the node's CPUs can decode per GPU
    per_gpu = global_batch / gpus
    compute = per_gpu / min(rate, fed)
    comm = allreduce_s(v, gpus)
    step = max(compute, comm) + v["step_overhead_s"]  # DDP overlaps the all-reduce with the backward pass
    bound = "all-reduce" if comm > compute else ("loader" if fed < rate else "GPU")
    train_img_s = global_batch / step
    epoch_s = v["images"] / train_img_s + v["val_images"] / (gpus * rate * v["train_flops_factor"])
    hours = v["epochs"] * epoch_s / 3600
    unfed = global_batch / (max(per_gpu / rate, comm) + v["step_overhead_s"]) / gpus  # an unlimited loader
    needed = math.ceil(unfed * v["loader_headroom"] / v["loader_img_per_s_per_core"])  # cores to keep up
    return {"gpus": gpus, "global_batch": global_batch, "per_gpu_batch": per_gpu,
            "compute_ms": 1e3 * compute, "allreduce_ms": 1e3 * comm, "step_ms": 1e3 * step, "bound": bound,
            "img_per_s": train_img_s, "scaling_eff": train_img_s / (gpus * rate),
            "epochs_per_hour": 3600 / epoch_s, "hours": hours, "gpu_hours": hours * gpus,
            "usd": hours * gpus * v["usd_per_gpu_hour"], "loader_cores_needed_per_gpu": needed,
            "loader_cores_available_per_gpu": loader_cores_per_gpu(v), "under_filled": per_gpu < 32}


def shard_layout(v: dict, rows: list[dict]) -> dict:
    """One shard count for every N: a multiple of every (ranks x workers) with at least 2 shards per worker at the
    largest, so every rank and worker gets a whole, equal number of shards (equal batches per rank, exact resume).
    Workers per GPU: the loader cores available to it (a worker per core)."""
    workers = int(loader_cores_per_gpu(v))
    streams = [r["gpus"] * workers for r in rows]
    unit = math.lcm(*streams)
    shards = unit * math.ceil(2 * max(streams) / unit)
    return {"workers_per_gpu": workers, "shards": shards, "images_per_shard": v["images"] / shards,
            "mb_per_shard": v["dataset_bytes"] / shards / 1e6, "one_gb_shards": math.ceil(v["dataset_bytes"] / 1e9),
            "per_rank": {r["gpus"]: shards // r["gpus"] for r in rows},
            "per_worker": {r["gpus"]: shards // (r["gpus"] * workers) for r in rows}}


def plan(v: dict) -> dict:
    paper = [row(v, n, v["batch"]) for n in v["gpus"]]
    scaled = [row(v, n, max(v["batch"], 128 * n)) for n in v["gpus"]]
    fed = loader_cores_per_gpu(v) * v["loader_img_per_s_per_core"]
    return {"per_gpu_img_per_s": per_gpu_rate(v), "loader_fed_img_per_s": fed, "paper_batch": paper,
            "scaled_batch": scaled,
            "shards": shard_layout(v, paper + scaled)}


def markdown(result: dict) -> str:
    out = [f"per-H100 training rate (GPU-bound): {result['per_gpu_img_per_s']:.0f} img/s; the loader can feed "
           f"{result['loader_fed_img_per_s']:.0f} img/s per GPU", ""]
    head = ("| GPUs | global batch | per-GPU batch | step ms (compute / all-reduce) | bound | img/s | GPU busy | "
            "epochs/h | hours (74 ep) | GPU-hours | cost USD | loader cores/GPU: needed (available) |")
    for title, rows in (("paper's batch 256", result["paper_batch"]),
                        ("batch max(256, 128 x N), linear LR scaling + warmup", result["scaled_batch"])):
        out += [f"**{title}**", "", head, "|" + "---|" * 12]
        for r in rows:
            flag = " (under-filled)" if r["under_filled"] else ""
            out.append(f"| {r['gpus']} | {r['global_batch']} | {r['per_gpu_batch']:g}{flag} | {r['step_ms']:.1f} "
                       f"({r['compute_ms']:.1f} / {r['allreduce_ms']:.1f}) | {r['bound']} | {r['img_per_s']:,.0f} | "
                       f"{100 * r['scaling_eff']:.0f}% | {r['epochs_per_hour']:.2f} | {r['hours']:.1f} | "
                       f"{r['gpu_hours']:,.0f} | {r['usd']:,.0f} | {r['loader_cores_needed_per_gpu']} "
                       f"({r['loader_cores_available_per_gpu']:g}) |")
        out.append("")
    s = result["shards"]
    out.append(f"shards: {s['shards']} of ~{s['mb_per_shard']:.0f} MB (~{s['images_per_shard']:.0f} images), "
               f"{s['workers_per_gpu']} loader workers per GPU; shards per rank by N {s['per_rank']}; per worker "
               f"{s['per_worker']}; ~1 GB shards would be {s['one_gb_shards']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, spec in INPUTS.items():
        if isinstance(spec["value"], (int, float)) and spec["source"] != "computed":
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(spec["value"]), default=None,
                                help=f"{spec['note']} [{spec['source']}; default {spec['value']}]")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the JSON")
    args = parser.parse_args()
    import torch

    from vggnet.models import create_model
    from vggnet.models.complexity import count_macs, count_params

    with torch.device("meta"):  # shapes only: no weights allocated
        model = create_model("vgg16", num_classes=1000)
    values = {k: spec["value"] for k, spec in INPUTS.items()}
    values.update(macs_per_image=count_macs(model, 224), params=count_params(model))
    sources = {k: spec["source"] for k, spec in INPUTS.items()}
    rate, source, note = _loader_rate()
    values["loader_img_per_s_per_core"], sources["loader_img_per_s_per_core"] = rate, source
    INPUTS["loader_img_per_s_per_core"]["note"] = note
    for key in INPUTS:
        given = getattr(args, key, None)
        if given is not None:
            values[key], sources[key] = given, "given on the command line"
    result = plan(values)
    print(markdown(result))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        inputs = {k: {"value": values[k], "source": sources[k], "note": INPUTS[k]["note"]} for k in INPUTS}
        (RESULTS / "imagenet_plan.json").write_text(json.dumps({"inputs": inputs, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
