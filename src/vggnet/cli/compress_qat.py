"""``vggnet compress qat``: quantization-aware training of a trained run, measured against PTQ on the same model.

Registered by ``vggnet compress`` (:mod:`vggnet.cli.compress`) on its sub-command parsers; imports nothing heavy
until it runs.
"""

from __future__ import annotations

import argparse
import json
import textwrap

EPILOG = """\
what it does:
  1. the source's fp32 top-1 and its PTQ INT8 top-1 (the `int8` runtime: torchao PT2E static INT8 for x86
     Inductor, calibrated on --calib training images), both on the run's own validation split
  2. torch.export of the network (batch norm folded into the convs unless --no-fold-bn), torchao
     prepare_qat_pt2e: fake INT8 quantizers where the x86 quantizer puts INT8 ops, ranges initialised on the
     same --calib images
  3. --epochs of fine-tuning through the training loop (`vggnet train`'s) on the run's training data (its
     recipe.yaml): SGD, momentum 0.9, cosine from --lr, fp32
  4. convert_pt2e, saved as an ExportedProgram and evaluated like the PTQ model (Inductor INT8 kernels)

what it writes (--out):
  qat.pt2             the INT8 model: torch.export.save, preprocessing (mean, std, image_size, classes) in its
                      "vggnet.json" extra file. Load with vggnet.compress.qat.load_qat(path), or plain torch:
                        import torch.ao.quantization.fx._decomposed   # registers the quantized ops
                        program = torch.export.load(path, extra_files={"vggnet.json": ""})
  metrics.json        fp32 / PTQ / QAT top-1, agreement with fp32, per-epoch history; written last
  qat.json            the settings; other settings on the same --out are refused (only --epochs may grow)
  checkpoints/        the training loop's, one folder per finished epoch: rerunning the same command resumes after
                      the last one, and a larger --epochs continues training
  recipe.yaml, ...    the rest of a `vggnet train` run folder: metrics.jsonl (val_top1 is the fake-quantized
                      graph's), curves.png; no best/last.safetensors (the fp32 source is not this folder's model)

A quantized or exported model (qat.pt2, an .onnx / INT8 file, a QAT output folder) cannot be trained: pass the
fp32 run folder or .safetensors checkpoint it came from.

examples:
  vggnet compress qat --ckpt runs/demo --out runs/demo-qat --epochs 2
  vggnet compress qat --ckpt runs/cifar10/best.safetensors --recipe cifar10 --out runs/c10-qat --lr 5e-4
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "qat", help="quantization-aware training (torchao PT2E) and its INT8 accuracy against PTQ",
        description=textwrap.fill(
            "Quantization-aware training: fine-tune a trained VGG for a few epochs with INT8 rounding simulated "
            "(torchao's PT2E QAT flow, x86 Inductor quantizer), convert it to INT8, and report the validation "
            "top-1 of the fp32 source, of its post-training (PTQ) INT8 model and of the QAT INT8 model. QAT "
            "usually recovers part of what PTQ loses; on a network PTQ already handles, expect a tie.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="RUN", help="trained fp32 run folder or .safetensors checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (resumed when it holds checkpoints)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default: 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate, decayed by cosine (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the recipe's)")
    p.add_argument("--calib", type=int, default=256, metavar="N",
                   help="training images that calibrate PTQ and initialise QAT's ranges (default: 256)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay on conv/linear weights (default: 0)")
    p.add_argument("--recipe", default=None,
                   help="recipe the checkpoint was trained with, when it has no recipe.yaml beside it")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                   help="train batch norm through torchao's simulated conv-BN fusion instead of folding it first "
                   "(slower to convert)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="evaluate the QAT model's q/dq graph eagerly instead of with Inductor's INT8 kernels")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: a bar on a terminal; elsewhere a line every 30 s with "
                   "the time left, once the work has taken 30 s; --no-progress: none)")
    p.set_defaults(func=run)


def format_table(metrics: dict) -> str:
    """Three rows, one per model, so PTQ and QAT read side by side against fp32."""
    rows = [("fp32 (source)", metrics["fp32"]["top1"], None),
            ("PTQ INT8", metrics["ptq"]["top1"], metrics["ptq"].get("agreement_with_fp32")),
            (f"QAT INT8 ({metrics['epochs']} ep)", metrics["qat"]["top1"], metrics["qat"].get("agreement_with_fp32"))]
    lines = [f"{'model':<20} {'val top-1':>10} {'agrees with fp32':>17}"]
    for name, top1, agree in rows:
        shown = "-" if agree is None else f"{100 * agree:.2f} %"
        lines.append(f"{name:<20} {top1:>8.2f} % {shown:>17}")
    lines.append(f"({metrics['val_images']} validation images, {metrics['calib_images']} calibration images; "
                 f"INT8 model: {metrics['result']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vggnet.compress.qat import qat_finetune

    metrics = qat_finetune(args.ckpt, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           calib_images=args.calib, weight_decay=args.weight_decay, recipe=args.recipe,
                           fold_bn=args.fold_bn, compile=args.compile, progress=args.progress)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "trained_epochs"}, indent=2))
    else:
        print(format_table(metrics))
    return 0
