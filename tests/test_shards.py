"""WebDataset shards: written by `vggnet data shard`, read by the webdataset library, streamed in training with
per-rank / per-worker splitting and exact mid-epoch resume; bad input is one line naming it."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vggnet.atomic import file_sha256
from vggnet.cli import main
from vggnet.data import digits_tensors, load_image_folder
from vggnet.data.shards import ShardLoader, read_manifest
from vggnet.engine.hooks import TrainHooks
from vggnet.engine.recipe import Recipe
from vggnet.engine.trainer import train
from vggnet.errors import VggnetError
from vggnet.models import load_checkpoint

wds = pytest.importorskip("webdataset")


def _folder(root: Path, n: int = 24, classes: int = 3, jpeg: bool = True) -> Path:
    """Images whose top-left pixel encodes their index (PNG, lossless); with ``jpeg`` a quarter are JPEG."""
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((12 + i % 5, 10, 3), 40, np.uint8)
        pixels[0, 0] = (i, 7, 9)
        if jpeg and i % 4 == 3:
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=95)
        else:
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _digits_folder(root: Path, per_class: int | None = None) -> Path:
    x, y = digits_tensors("train", size=32, channels=3, val_fraction=0.0, seed=0)
    seen: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(x, y.tolist(), strict=True)):
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / str(label) / f"{i:05d}.png")
    return root


def test_webdataset_reads_what_data_shard_writes(tmp_path, capsys):
    src, out = _folder(tmp_path / "f"), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "5", "--val-fraction", "0.25"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train_ds, val_ds, classes = load_image_folder(src, val_fraction=0.25, seed=0)  # the folder path's split
    assert manifest["classes"] == classes
    for split, ds in (("train", train_ds), ("val", val_ds)):
        entry = manifest["splits"][split]
        urls = [str(out / s["name"]) for s in entry["shards"]]
        for s in entry["shards"]:
            assert file_sha256(out / s["name"]) == s["sha256"]
        seen = {}
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):  # a peer reads our files
            meta = json.loads(sample["json"])
            ext = "jpg" if "jpg" in sample else "png"
            assert sample[ext] == (src / meta["path"]).read_bytes()  # the original bytes, not re-encoded
            seen[str(src / meta["path"])] = int(sample["cls"])
        assert seen == dict(ds.samples) and len(seen) == entry["count"] == sum(s["count"] for s in entry["shards"])
    assert capsys.readouterr().out.count("shard(s)") == 2
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "5", "--val-fraction", "0.25"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before  # a rerun keeps complete shards


def _index(image: torch.Tensor) -> torch.Tensor:
    return image[0, 0, 0].long()  # the test images' own index


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    src, out = _folder(tmp_path / "f", n=32, classes=4, jpeg=False), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "4"]) == 0
    manifest = read_manifest(str(out))
    for world, workers in ((1, 0), (2, 2)):
        seen: list[int] = []
        for rank in range(world):
            loader = ShardLoader(str(out), manifest, "train", 1, True, _index, seed=3, rank=rank, world=world,
                                 workers=workers, buffer=4)
            loader.set_epoch(1)
            seen += [int(i) for images, _ in loader for i in images.reshape(-1)]
        assert sorted(seen) == list(range(32)), (world, workers)


def _batches(loader: ShardLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_gives_exactly_the_remaining_batches(tmp_path, workers):
    src, out = _digits_folder(tmp_path / "f", per_class=12), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "13"]) == 0
    url = (out.resolve()).as_uri()  # file://: any fsspec URL
    from vggnet.data import small_image_train_transform

    tf = small_image_train_transform(size=32, pad=4, mean=[0.5] * 3, std=[0.5] * 3)

    def loader() -> ShardLoader:
        return ShardLoader(url, read_manifest(url), "train", 8, True, tf, seed=1, rank=0, world=1, workers=workers,
                           buffer=16)

    whole = loader()
    whole.set_epoch(2)
    full = _batches(whole)
    assert len(full) == len(whole) >= 12
    first = loader()
    first.set_epoch(2)
    k = 5
    for n, _ in enumerate(first, start=1):
        if n == k:
            break
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    rest = _batches(resumed)
    assert len(rest) == len(full) - k
    for (a, la), (b, lb) in zip(full[k:], rest, strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)
    other = loader()
    other.set_epoch(3)  # another epoch: another order
    assert not torch.equal(_batches(other)[0][1], full[0][1])


class _Interrupt(TrainHooks):
    """The plain cross-entropy step, then a crash after ``stop`` steps (as a killed job)."""

    def __init__(self, stop: int, smoothing: float) -> None:
        super().__init__()
        self.calls, self.stop, self.smoothing = 0, stop, smoothing
        self.loss = self._loss

    def _loss(self, logits, targets, images):
        self.calls += 1
        if self.calls > self.stop:
            raise KeyboardInterrupt
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


def _tiny(path: str, **extra: str) -> Recipe:
    sets = [f"data.path={path}", "data.format=shards", "data.workers=2", "data.shuffle_buffer=20",
            "model.width=0.0625", "schedule.epochs=2", "optim.batch_size=16", "train.tracking=none",
            "data.dataset=folder", *(f"{k}={v}" for k, v in extra.items())]
    return Recipe.load("demo", sets)


def test_interrupted_run_resumed_mid_epoch_ends_with_identical_weights(tmp_path):
    src, out = _digits_folder(tmp_path / "f", per_class=10), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "20", "--val-fraction", "0.2"]) == 0
    recipe = _tiny(str(out), **{"train.checkpoint_every": "3"})
    train(recipe, tmp_path / "whole", progress=False)
    steps = len(list((tmp_path / "whole" / "checkpoints").iterdir()))
    assert steps >= 1
    with pytest.raises(KeyboardInterrupt):  # 4 steps an epoch: stopped after step 7, checkpoint at step 6
        train(recipe, tmp_path / "cut", progress=False, hooks=_Interrupt(7, recipe.optim.label_smoothing))
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").iterdir())][-1].endswith("-step-000000006")
    train(recipe, tmp_path / "cut", progress=False)
    whole, _ = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    cut, _ = load_checkpoint(tmp_path / "cut" / "last.safetensors")
    for name, value in whole.state_dict().items():
        assert torch.equal(value, cut.state_dict()[name]), name
    log = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in log] == pytest.approx([r["train_loss"] for r in ref], abs=1e-9)


def test_checkpoint_every_needs_shards():
    with pytest.raises(VggnetError, match="checkpoint_every needs data.format: shards"):
        train(Recipe.load("demo", ["train.checkpoint_every=2", "schedule.epochs=1", "train.tracking=none"]),
              "/nonexistent-never-written", progress=False)


def _corrupt(shard: Path) -> str:
    """Replace the first image of ``shard`` with bytes no decoder reads; returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    key = next(m.name.split(".")[0] for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{key}.png":
                data = b"\x89PNG\r\n\x1a\n" + b"not an image" * 10
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return key


def test_unreadable_image_in_a_shard_is_skipped_and_named(tmp_path, caplog):
    src, out = _folder(tmp_path / "f", n=12, jpeg=False), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "6"]) == 0
    key = _corrupt(out / "train-000000.tar")
    loader = ShardLoader(str(out), read_manifest(str(out)), "train", 1, True, _index, seed=0, rank=0, world=1,
                         workers=0, buffer=0)
    loader.set_epoch(1)
    with caplog.at_level(logging.WARNING, logger="vggnet.data.shards"):
        seen = [int(images[0]) for images, _ in loader]
    assert len(seen) == 11 and loader.skipped == 1
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and key in lines[0] and "train-000000.tar" in lines[0] and "\n" not in lines[0]


def test_missing_shard_is_one_line_at_startup_and_when_reached(tmp_path, capsys):
    src, out = _folder(tmp_path / "f", n=12, jpeg=False), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "4"]) == 0
    capsys.readouterr()
    url = out.resolve().as_uri()
    manifest = read_manifest(url)
    loader = ShardLoader(url, manifest, "train", 1, True, _index, seed=0, rank=0, world=1, workers=2, buffer=0)
    (out / "train-000001.tar").unlink()
    loader.set_epoch(1)
    with pytest.raises(VggnetError, match=r"train-000001\.tar: shard listed in the manifest is missing") as exc:
        list(loader)  # gone after startup: the worker says which, the main process raises one line
    assert "\n" not in str(exc.value)
    code = main(["train", "--data", url, "--out", str(tmp_path / "run"), "--set", "data.format=shards",
                 "train.tracking=none", "schedule.epochs=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "train-000001.tar" in err and "missing" in err


@pytest.mark.slow  # two 4-epoch runs of the digits demo: about a minute on two idle cores
def test_demo_trains_to_the_folder_accuracy_from_shards(tmp_path):
    src, out = _digits_folder(tmp_path / "f"), tmp_path / "s"
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "200", "--val-fraction", "0.2"]) == 0
    base = Recipe.load("demo", ["data.dataset=folder", "data.workers=0", "train.tracking=none", "model.width=0.125",
                                "schedule.epochs=4", "optim.batch_size=32", "data.val_fraction=0.2"])
    shards = train(base.override(f"data.path={out}", "data.format=shards"), tmp_path / "shards", progress=False)
    folder = train(base.override(f"data.path={src}", "data.in_memory=false"), tmp_path / "folder", progress=False)
    print(f"val top-1: shards {shards['val_top1']:.2f}, folder {folder['val_top1']:.2f}")
    assert folder["val_top1"] > 90
    assert abs(shards["val_top1"] - folder["val_top1"]) <= 1.0, (shards["val_top1"], folder["val_top1"])
