"""Every command in README.md's bash blocks runs here, or is skipped by name with the reason (issue #28).

The README is parsed, not copied: each ```bash block's lines (a `\\` continuation joins lines into one
command, comments and blank lines are dropped) are looked up in COMMANDS, an explicit table:

- Run: the command is run as written, through bash (so quoting, globs, `>` and `&&` mean what they
  mean to a reader), with `vggnet` a shell function for `sys.executable -m vggnet`, in a scratch folder
  standing in for the reader's checkout: `data/cifar10`, `runs/cifar10`, `cat.png`, `shots/` ... are
  made there by the README's own earlier commands (`after`) or by `prepare_workspace`. Changes to the
  text are explicit: `sub` (old -> new, each must occur) and `append` (flags the line leaves open,
  used to shrink epochs, images and grids to seconds). Exit status 0 and the files the README promises
  (`expect`, globs allowed) are asserted; `stdout` strings must appear in the output.
- Skip: with the reason, which names what is missing here (ImageNet, downloaded weights, a server ...).

A README command that the table does not know fails, so a new example cannot slip past; a table row the
README no longer has fails too.

Stand-ins: `data/cifar10` is a 200-image CIFAR-10 tree (20 per class, from ../shared/data's archive; without
it the embedded digits, drawn in folders named after CIFAR-10's classes, so `--class dog` exists), prepared by
the README's own `vggnet data prepare` from a small archive of the same layout; `runs/cifar10` is the README's
cifar10 training run on it for one epoch; the raccoon commands use 24 of the 200 photos (skipped without
../shared/data/raccoon-voc.tar.gz). `vggnet serve` runs until /v2/health/ready answers 200 (on a free port),
then gets SIGTERM and must exit 0, as the README says it does.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED / "cifar10-train-jpg.tar.gz"
RACCOON_ARCHIVE = SHARED / "raccoon-voc.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 20  # CIFAR-10 images per class in data/cifar10: 180 train, 20 validation
RACCOON_PHOTOS = 24  # raccoon-1 ... raccoon-24: raccoon-1*.jpg matches 11 of them
SHOTS = ("cat", "dog", "horse")  # shots/<name>.png
COMMAND_TIMEOUT = 900
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

# --- the table ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    expect: tuple[str, ...] = ()  # files (or globs) the command must leave, relative to the workspace
    sub: tuple[tuple[str, str], ...] = ()  # (README text, what runs instead); each must occur in the command
    append: str = ""  # flags the README line leaves open, appended to shrink the job
    after: tuple[str, ...] = ()  # README commands (table keys) whose outputs this one reads
    stdout: tuple[str, ...] = ()  # strings the output must contain
    needs_raccoon: bool = False  # skipped without ../shared/data/raccoon-voc.tar.gz
    model_repo: bool = False  # builds models/ (the README's layout and config.yaml) from runs/cifar10 first
    serve: bool = False  # a `vggnet serve` in it runs until ready, then gets SIGTERM (must exit 0)


@dataclass(frozen=True)
class Skip:
    reason: str


SETUP = "setup command, run by CI itself"
IMAGENET = "needs ImageNet (/path/to/imagenet), not available here"
TV_WEIGHTS = "needs downloaded torchvision weights ({}); nothing is downloaded here"
CURL = ("needs a running server and curl; the routes are tested in process by tests/test_serve_http.py, "
        "tests/test_serve_app.py and tests/test_serve_routers.py, and `vggnet serve` itself runs here")
AUTO = ("builds and times every runtime, torch.compile ones included (90 s on the tiny run with a cold Inductor "
        "cache here); the auto runtime is tested by tests/test_infer.py")

PREP_CIFAR = "vggnet data prepare ../shared/data/cifar10-train-jpg.tar.gz --out data/cifar10"
TRAIN_DEMO = "vggnet train --recipe demo --out runs/demo"
TRAIN_CIFAR = "vggnet train --recipe cifar10 --data data/cifar10 --out runs/cifar10"
FEATURES_DEMO = "vggnet features --ckpt runs/demo --out runs/demo/feats.npz"
PREP_RACCOON = "vggnet data prepare ../shared/data/raccoon-voc.tar.gz --out data/raccoon"
LOCALIZE_TRAIN = "vggnet localize train --data data/raccoon --weights runs/transfer/source --out runs/raccoon"
PRUNE = "vggnet compress prune --ckpt runs/cifar10 --macs-reduction 0.5 --out runs/cifar10-p50 --epochs 6"
EXPORT_INT8 = "vggnet export --ckpt runs/cifar10-p50 --format onnx-int8 --out exports/p50.int8.onnx"
EXPORT_ONNX = "vggnet export --ckpt runs/cifar10 --format onnx --out exports/cifar10.onnx"
SHARD_CIFAR = "vggnet data shard data/cifar10 --out shards/cifar10 --val-fraction 0.1"
EXPORT_PTE = "vggnet export --ckpt runs/cifar10 --format executorch --out exports/cifar10.pte"
DISTILL = ("vggnet compress distill --teacher runs/cifar10 --recipe cifar10 --data data/cifar10 "
           "--set model.name=vgg11_bn model.width=0.25 --out runs/cifar10-kd")
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "best.safetensors",
             "last.safetensors", "checkpoints/epoch-0001")

COMMANDS: dict[str, Run | Skip] = {
    # Two commands / installing
    "make demo": Skip(SETUP),
    "make test": Skip(SETUP),
    "pip install .": Skip(SETUP),
    "pip install -c constraints.txt '.[export,quant,serve]'": Skip(SETUP),
    # Training
    TRAIN_DEMO: Run(append="--epochs 1", expect=tuple(f"runs/demo/{f}" for f in RUN_FILES)),
    PREP_CIFAR: Run(sub=(("../shared/data/cifar10-train-jpg.tar.gz", "cifar10-subset.tar.gz"),),
                    expect=tuple(f"data/cifar10/train/{c}/*.jpg" for c in CIFAR_CLASSES)),
    TRAIN_CIFAR: Run(append="--epochs 1 --batch-size 64", after=(PREP_CIFAR,),
                     expect=tuple(f"runs/cifar10/{f}" for f in RUN_FILES)),
    "vggnet train --recipe paper --data /path/to/imagenet --model vgg11 --out runs/A": Skip(IMAGENET),
    "vggnet train --recipe paper --data /path/to/imagenet --model vgg16 --init-from runs/A/best.safetensors "
    "--out runs/D": Skip(IMAGENET),
    "vggnet train --recipe cifar10 --data data/cifar10 --set optim.name=adamw optim.lr=0.002 train.ema=0.999 "
    "--out runs/x": Run(append="--epochs 1 --batch-size 64", after=(PREP_CIFAR,),
                        expect=("runs/x/best.safetensors", "runs/x/recipe.yaml")),
    # Evaluation
    "vggnet eval --ckpt runs/cifar10 --data data/cifar10 --protocol single --protocol \"dense@1,1.25\" "
    "--protocol \"multicrop@1.14,1.5\" --out runs/cifar10/eval": Run(
        append="--limit 8", after=(TRAIN_CIFAR,),
        expect=("runs/cifar10/eval/eval.json", "runs/cifar10/eval/eval.md", "runs/cifar10/eval/*.png")),
    "vggnet eval --ckpt runs/D --ckpt runs/E --data /path/to/imagenet --protocol \"dense+multicrop@256,384,512\"":
        Skip(IMAGENET),
    # Reproducing the paper's tables
    "vggnet reproduce --data data/cifar10 --out runs/reproduce": Skip(
        "the full study on all of CIFAR-10 (7 nets x 12 epochs, ~49 min); its smoke test runs here"),
    "vggnet reproduce --out runs/reproduce-smoke --epochs 1 --width 0.125 --limit 200": Run(
        append="--data data/cifar10", after=(PREP_CIFAR,),  # 7 nets on 180 images, not 1,617 digits
        expect=("runs/reproduce-smoke/results.md", "runs/reproduce-smoke/results.json",
                "runs/reproduce-smoke/error_per_config.png")),
    # Transfer
    "vggnet train --recipe finetune --weights runs/cifar10 --data my_photos/ --out runs/mine": Run(
        append="--epochs 1 --set schedule.min_steps=0", after=(TRAIN_CIFAR,),  # min_steps would raise it to 300 steps
        expect=("runs/mine/best.safetensors", "runs/mine/recipe.yaml")),
    "vggnet train --recipe finetune --weights vgg16-397923af.pth --data my_photos/ --set model.freeze=block3 "
    "model.freeze_bn=true": Skip(TV_WEIGHTS.format("vgg16-397923af.pth")),
    "vggnet train --recipe finetune --weights vgg16_bn.safetensors --data my_photos/ --set "
    "optim.lr_mult.block5=0.5 optim.lr_mult.fc8=2": Skip(TV_WEIGHTS.format("vgg16_bn.safetensors")),
    FEATURES_DEMO: Run(after=(TRAIN_DEMO,), expect=("runs/demo/feats.npz",)),
    "vggnet probe --train runs/demo/feats.npz --out runs/demo/probe": Run(
        after=(FEATURES_DEMO,),
        expect=("runs/demo/probe/probe.json", "runs/demo/probe/probe.md", "runs/demo/probe/confusion_svm.png",
                "runs/demo/probe/confusion_logreg.png")),
    "vggnet features --weights vgg16-397923af.pth --data voc/ --layer relu7 --scales 256,384,512 --out voc.npz":
        Skip(TV_WEIGHTS.format("vgg16-397923af.pth") + ", and a VOC image folder (voc/)"),
    "vggnet probe --train voc.npz --test voc_test.npz": Skip(
        "needs voc.npz / voc_test.npz, features from downloaded torchvision weights on VOC images (the line "
        "above); probe --test and --test-split are tested by tests/test_transfer_probe.py"),
    # Boxes
    PREP_RACCOON: Run(sub=(("../shared/data/raccoon-voc.tar.gz", "raccoon-subset.tar.gz"),), needs_raccoon=True,
                      expect=("data/raccoon/annotations/raccoon-1.xml", "data/raccoon/images/raccoon-1.jpg")),
    LOCALIZE_TRAIN: Run(sub=(("runs/transfer/source", "runs/cifar10"),), append="--epochs 1 --val 6",
                        after=(PREP_RACCOON, TRAIN_CIFAR), needs_raccoon=True,
                        expect=("runs/raccoon/best.safetensors",)),
    "vggnet localize eval --ckpt runs/raccoon --data data/raccoon": Run(
        after=(LOCALIZE_TRAIN,), needs_raccoon=True,
        stdout=("whole", "centre", "dense", "mean box", "centred mean-size box", "whole image")),
    "vggnet localize predict --ckpt runs/raccoon data/raccoon/images/raccoon-1*.jpg --annotations "
    "data/raccoon/annotations --out boxes/": Run(
        after=(LOCALIZE_TRAIN,), needs_raccoon=True,
        expect=("boxes/raccoon-1.boxes.png", "boxes/raccoon-19.boxes.png")),
    # Explain
    "vggnet explain --ckpt runs/cifar10 cat.png dog.jpg": Run(
        after=(TRAIN_CIFAR,), expect=("explain/cat.gradcam.png", "explain/dog.gradcam.png")),
    "vggnet explain --ckpt runs/cifar10 --class dog --layer relu4_2 --out why/ 'shots/*.png'": Run(
        after=(TRAIN_CIFAR,), expect=tuple(f"why/{s}.gradcam.png" for s in SHOTS)),
    "vggnet explain --ckpt runs/cifar10 --filters --feature-maps block2_conv1 cat.png": Run(
        after=(TRAIN_CIFAR,), expect=("explain/filters.png", "explain/cat.block2_conv1.png")),
    # Compression
    PRUNE: Run(sub=(("--epochs 6", "--epochs 1"),), after=(TRAIN_CIFAR,),
               expect=("runs/cifar10-p50/best.safetensors", "runs/cifar10-p50/prune.json")),
    DISTILL: Run(sub=(("model.width=0.25", "model.width=0.25 optim.batch_size=64"),), append="--epochs 1",
                       after=(TRAIN_CIFAR,),
                       expect=("runs/cifar10-kd/best.safetensors", "runs/cifar10-kd/distill.json")),
    "vggnet compress qat --ckpt runs/cifar10 --out runs/cifar10-qat --epochs 2": Run(
        sub=(("--epochs 2", "--epochs 1"),), append="--no-compile", after=(TRAIN_CIFAR,),
        expect=("runs/cifar10-qat/qat.pt2",), stdout=("PTQ", "QAT")),
    EXPORT_INT8: Run(append="--check-images 20", after=(PRUNE,), expect=("exports/p50.int8.onnx",)),
    "vggnet predict --ckpt exports/p50.int8.onnx shots/ && vggnet serve --ckpt exports/p50.int8.onnx": Run(
        after=(EXPORT_INT8,), serve=True, stdout=tuple(f"shots/{s}.png" for s in SHOTS)),
    # Inference and export
    "vggnet predict --ckpt runs/cifar10 photo.jpg shots/ 'more/**/*.png'": Run(
        after=(TRAIN_CIFAR,), stdout=("photo.jpg", "shots/cat.png", "more/a/b/frog.png")),
    "vggnet predict --ckpt runs/cifar10 --topk 3 --json --batch-size 64 shots/ > labels.json": Run(
        after=(TRAIN_CIFAR,), expect=("labels.json",)),
    "vggnet predict --ckpt runs/cifar10 --runtime int8 --calib-data data/cifar10/train --calib-n 256 shots/": Run(
        after=(TRAIN_CIFAR,), stdout=tuple(f"shots/{s}.png" for s in SHOTS)),
    "vggnet predict --ckpt runs/cifar10 --runtime auto --calib-data data/cifar10/train shots/": Skip(AUTO),
    "vggnet predict --ckpt runs/demo --runtime int8 shots/": Run(
        after=(TRAIN_DEMO,), stdout=("calibrating int8 on", "training split", *(f"shots/{s}.png" for s in SHOTS))),
    EXPORT_ONNX: Run(after=(TRAIN_CIFAR,), expect=("exports/cifar10.onnx",)),
    "pip install -c constraints.txt '.[edge]'": Skip(SETUP),
    "make edge-convert": Skip(SETUP),
    EXPORT_PTE: Run(after=(TRAIN_CIFAR,), expect=("exports/cifar10.pte",)),
    "vggnet export --ckpt runs/cifar10 --format tflite-int8 --out exports/cifar10.int8.tflite": Run(
        after=(TRAIN_CIFAR,), expect=("exports/cifar10.int8.tflite",), append="--check-images 20"),
    "vggnet predict --ckpt exports/cifar10.pte shots/": Run(after=(EXPORT_PTE,),
                                                            stdout=tuple(f"shots/{s}.png" for s in SHOTS)),
    "vggnet predict --ckpt exports/cifar10.onnx shots/": Run(after=(EXPORT_ONNX,),
                                                             stdout=tuple(f"shots/{s}.png" for s in SHOTS)),
    # Beyond one machine
    "pip install -c constraints.txt '.[shards]'": Skip(SETUP),
    SHARD_CIFAR: Run(after=(PREP_CIFAR,), expect=("shards/cifar10/manifest.json", "shards/cifar10/*.tar")),
    "vggnet train --recipe cifar10 --data shards/cifar10 --out runs/cifar10-shards --set data.format=shards "
    "train.checkpoint_every=500": Run(after=(SHARD_CIFAR,), append="--epochs 1 --batch-size 64",
                                      expect=("runs/cifar10-shards/last.safetensors",)),
    "vggnet predict --ckpt runs/cifar10 --engine ray --concurrency 2 --batch-size 64 --json --out labels.parquet "
    "shots/": Run(after=(TRAIN_CIFAR,), expect=("labels.parquet",), stdout=tuple(f"shots/{s}.png" for s in SHOTS)),
    "vggnet predict --ckpt runs/cifar10 --engine ray --concurrency 16 s3://bucket/shots/": Skip(
        "needs an S3 bucket; URIs are read on the workers in tests/test_ray_engine.py (file://)"),
    "vggnet features --ckpt runs/cifar10 --data data/cifar10 --engine ray --concurrency 4 --out feats.npz": Skip(
        "starts a second local Ray (about 25 s) for what tests/test_ray_engine.py checks against the local .npz"),
    "torchrun --nnodes 1:2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 "
    "--max-restarts 3 -m vggnet train --recipe demo --out runs/elastic": Skip(
        "needs HOST's address; the same torchrun command, with a worker killed mid-epoch and mid-save, runs in "
        "tests/test_elastic.py on loopback"),
    # Serving
    "vggnet serve --ckpt runs/cifar10 --port 8000": Run(after=(TRAIN_CIFAR,), serve=True),
    "vggnet serve --model-repo models/ --host 0.0.0.0 --allowed-hosts models.example.com": Run(
        after=(TRAIN_CIFAR,), serve=True, model_repo=True),
    "curl -s localhost:8000/v2/health/ready": Skip(CURL),
    "curl -s -X POST --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/predict?topk=3'":
        Skip(CURL),
    "curl -s -F image=@cat.jpg localhost:8000/predict": Skip(CURL),
    "curl -s -X POST localhost:8000/v2/models/cifar10/infer -H 'Content-Type: application/json' -d "
    "'{\"inputs\":[{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,3,32,32],\"data\":[0.1, ...3072 "
    "values]}]}'": Skip(CURL),
    "curl -s -X POST --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/explain?class=dog' "
    "-o why-dog.png": Skip(CURL),
    "curl -s -F image=@cat.jpg 'localhost:8000/explain?layer=relu4_2&format=json' | jq .class": Skip(CURL),
}


# --- README parsing ----------------------------------------------------------------------------------------

def _strip_comment(line: str) -> str:
    """The line without a shell comment (an unquoted # at the start or after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command of the shell code blocks, continuations joined,
    comments dropped, runs of blanks made one space."""
    commands: list[tuple[int, str]] = []
    lang: str | None = None
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            start = number
        stripped = _strip_comment(line).rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        command = " ".join(" ".join([*pending, stripped]).split())
        pending = []
        if command:
            commands.append((start, command))
    return commands


README_COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


# --- the workspace -----------------------------------------------------------------------------------------

def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _cifar_subset(out: Path) -> None:
    """A train/<class>/NNNN.* archive of PER_CLASS images per class: CIFAR-10's own JPEGs when ../shared
    has them, else the embedded digits (digit i in the folder of CIFAR-10's class i)."""
    with tarfile.open(out, "w:gz") as dst:
        if CIFAR_ARCHIVE.exists():
            counts: dict[str, int] = {}
            with tarfile.open(CIFAR_ARCHIVE) as src:
                for member in src:
                    parts = member.name.split("/")
                    if member.isfile() and len(parts) == 3 and counts.get(parts[1], 0) < PER_CLASS:
                        counts[parts[1]] = counts.get(parts[1], 0) + 1
                        dst.addfile(member, src.extractfile(member))
            assert sorted(counts) == sorted(CIFAR_CLASSES) and set(counts.values()) == {PER_CLASS}, counts
            return
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        counts = dict.fromkeys(range(10), 0)
        for image, label in zip(digits.images, digits.target, strict=True):
            if counts[label] == PER_CLASS:
                continue
            pixels = (image * 255 / 16).astype("uint8")
            data = _png(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB"))
            info = tarfile.TarInfo(f"train/{CIFAR_CLASSES[label]}/{counts[label]:04d}.png")
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
            counts[label] += 1


def _raccoon_subset(out: Path) -> None:
    wanted = {f"{folder}/raccoon-{i}.{ext}" for i in range(1, RACCOON_PHOTOS + 1)
              for folder, ext in (("images", "jpg"), ("annotations", "xml"))}
    found = set()
    with tarfile.open(RACCOON_ARCHIVE) as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            name = member.name.removeprefix("./")
            if member.isfile() and name in wanted:
                found.add(name)
                member.name = name
                dst.addfile(member, src.extractfile(member))
    assert found == wanted, sorted(wanted - found)


def prepare_workspace(ws: Path) -> None:
    """What the README assumes the reader has: the archives' stand-ins, photos and a folder of their own."""
    from PIL import Image

    _cifar_subset(ws / "cifar10-subset.tar.gz")
    if RACCOON_ARCHIVE.exists():
        _raccoon_subset(ws / "raccoon-subset.tar.gz")
    with tarfile.open(ws / "cifar10-subset.tar.gz") as tar:
        names = sorted(m.name for m in tar if m.isfile())

        def image(cls: str, index: int):
            member = [n for n in names if n.startswith(f"train/{cls}/")][index]
            return Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")

        image("cat", 0).save(ws / "cat.png")
        image("dog", 0).save(ws / "dog.jpg", quality=95)
        image("ship", 0).save(ws / "photo.jpg", quality=95)
        (ws / "shots").mkdir()
        for name in SHOTS:
            image(name, 1).save(ws / "shots" / f"{name}.png")
        (ws / "more" / "a" / "b").mkdir(parents=True)
        image("frog", 1).save(ws / "more" / "a" / "b" / "frog.png")
        for cls in ("airplane", "automobile", "bird"):  # my_photos/: three classes of the reader's own
            (ws / "my_photos" / cls).mkdir(parents=True)
            for i in range(8):
                image(cls, i).save(ws / "my_photos" / cls / f"{i}.png")


def readme_model_config() -> str:
    """The README's config.yaml example for a model repository (its one ```yaml block with `ab:`)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    blocks = [b for b in blocks if re.search(r"^ab:", b, flags=re.M)]
    assert len(blocks) == 1, "README: expected one ```yaml block with the model repository's `ab:` example"
    return blocks[0]


def build_model_repo(ws: Path) -> None:
    """models/cifar10/{1,2}/best.safetensors and the README's config.yaml, as its layout shows."""
    repo = ws / "models" / "cifar10"
    if repo.exists():
        return
    for version in ("1", "2"):
        (repo / version).mkdir(parents=True)
        shutil.copy(ws / "runs" / "cifar10" / "best.safetensors", repo / version / "best.safetensors")
    (repo / "config.yaml").write_text(readme_model_config())


SHELL_PRELUDE = r"""
vggnet() {
  if [ "${1:-}" = serve ] && [ -n "${SERVE_PORT:-}" ]; then
    "$VGGNET_PY" -m vggnet "$@" --port "$SERVE_PORT" &
    local pid=$!
    if ! "$VGGNET_PY" -c "$WAIT_READY" "$SERVE_PORT" "$pid"; then
      kill -TERM "$pid" 2>/dev/null; wait "$pid"; return 1
    fi
    kill -TERM "$pid"; wait "$pid"
  else
    "$VGGNET_PY" -m vggnet "$@"
  fi
}
"""

WAIT_READY = r"""
import sys, time, urllib.request
port, pid = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "Z"
    if state in "ZX":
        sys.exit("vggnet serve exited before it was ready")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                print(f"ready: http://127.0.0.1:{port}/v2/health/ready 200", flush=True)
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.25)
sys.exit("vggnet serve was not ready within 300 s")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Workspace:
    """The scratch folder the commands share; each README command runs at most once (prerequisites first)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict[str, subprocess.CompletedProcess[str] | str] = {}
        self.seconds: dict[str, float] = {}
        prepare_workspace(root)

    def command_line(self, command: str, spec: Run) -> str:
        line = command
        for old, new in spec.sub:
            assert old in line, f"substitution {old!r} does not occur in {command!r}"
            line = line.replace(old, new)
        if spec.append:
            first, sep, rest = line.partition(" && ")  # flags go to the command they shrink (the first)
            line = f"{first} {spec.append}{sep}{rest}"
        return line

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        spec = COMMANDS[command]
        assert isinstance(spec, Run), command
        if command in self.results:
            result = self.results[command]
            if isinstance(result, str):
                pytest.skip(result)
            return result
        if spec.needs_raccoon and not RACCOON_ARCHIVE.exists():
            self.results[command] = f"needs {RACCOON_ARCHIVE} (the raccoon photos), not beside the repo"
            pytest.skip(self.results[command])
        for prerequisite in spec.after:
            done = self.run(prerequisite)
            if done.returncode != 0:
                pytest.fail(f"prerequisite failed (exit {done.returncode}): {prerequisite}\n{_tail(done.stdout)}")
        if spec.model_repo:
            build_model_repo(self.root)
        line = self.command_line(command, spec)
        env = {**os.environ, "VGGNET_PY": sys.executable, "WAIT_READY": WAIT_READY,
               # idle OpenMP threads sleep instead of spinning (the README's advice for shared cores), and
               # numpy's OpenBLAS runs one thread: on 2 busy cores `vggnet probe` took 100 s with its default
               # threads and 13 s with one (scikit-learn's small solves spin-wait for the other thread)
               "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        if spec.serve:
            env["SERVE_PORT"] = str(_free_port())
        start = time.monotonic()
        result = subprocess.run(["bash", "-c", SHELL_PRELUDE + line], cwd=self.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT)
        self.seconds[command] = time.monotonic() - start
        result.args = line
        self.results[command] = result
        return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"))


# --- the tests ---------------------------------------------------------------------------------------------

def test_readme_has_commands() -> None:
    assert len(README_COMMANDS) >= 40, README_COMMANDS
    assert any(c.startswith("vggnet train") for _, c in README_COMMANDS)


def test_every_readme_command_is_in_the_table() -> None:
    unknown = [f"README.md:{n}: {c}" for n, c in README_COMMANDS if c not in COMMANDS]
    assert not unknown, ("README commands that tests/test_readme_commands.py's COMMANDS does not know "
                         "(add a Run or a Skip with its reason):\n" + "\n".join(unknown))


def test_every_table_row_is_in_the_readme() -> None:
    in_readme = {c for _, c in README_COMMANDS}
    stale = [c for c in COMMANDS if c not in in_readme]
    assert not stale, "table rows no longer in README.md (remove them):\n" + "\n".join(stale)
    for spec in COMMANDS.values():
        for prerequisite in getattr(spec, "after", ()):
            assert isinstance(COMMANDS.get(prerequisite), Run), prerequisite


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for _, c in README_COMMANDS],
                         ids=[f"L{n}:{c[:70]}" for n, c in README_COMMANDS])
def test_readme_command(command: str, workspace: Workspace) -> None:
    spec = COMMANDS.get(command)
    if spec is None:
        pytest.fail(f"not in COMMANDS of tests/test_readme_commands.py (add a Run or a Skip): {command}")
    if isinstance(spec, Skip):
        pytest.skip(spec.reason)
    result = workspace.run(command)
    report = f"$ {result.args}\n(exit {result.returncode})\n{_tail(result.stdout)}"
    assert result.returncode == 0, report
    missing = [pattern for pattern in spec.expect if not list(workspace.root.glob(pattern))]
    assert not missing, f"files the README promises are missing: {missing}\n{report}"
    absent = [text for text in spec.stdout if text not in result.stdout]
    assert not absent, f"missing from the output: {absent}\n{report}"
    if command.endswith("> labels.json"):
        labels = json.loads((workspace.root / "labels.json").read_text())
        assert len(labels["predictions"]) == len(SHOTS) and all(len(p["top"]) == 3 for p in labels["predictions"])
    if spec.serve:
        assert result.stdout.count("ready: http://127.0.0.1:") == command.count("vggnet serve"), report
