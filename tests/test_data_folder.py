"""ImageFolder loading: splits, layouts, the errors users hit, and corrupt files mid-epoch."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from vggnet.data import (
    DataError,
    build_dataloader,
    collate_skip_none,
    load_image_folder,
    small_image_train_transform,
)


def make_folder(root: Path, classes=("cat", "dog", "fox"), n=5, size=(40, 30), ext="jpg") -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{ext}")
    return root


def names(ds) -> set[str]:
    return {Path(p).relative_to(Path(p).parents[1]).as_posix() for p, _ in ds.samples}


def test_split_is_stratified_disjoint_and_covering(tmp_path):
    make_folder(tmp_path, n=10)
    train, val, classes = load_image_folder(tmp_path, val_fraction=0.2, seed=0)
    assert classes == ["cat", "dog", "fox"] and train.classes == val.classes == classes
    assert len(train) == 24 and len(val) == 6
    assert sorted(val.targets) == [0, 0, 1, 1, 2, 2]
    assert names(train).isdisjoint(names(val)) and len(names(train) | names(val)) == 30
    image, label = train[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8 and label == train.targets[0]


def test_split_is_deterministic_and_seeded(tmp_path):
    make_folder(tmp_path, n=10)
    a = load_image_folder(tmp_path, val_fraction=0.2, seed=0)[1]
    b = load_image_folder(tmp_path, val_fraction=0.2, seed=0)[1]
    c = load_image_folder(tmp_path, val_fraction=0.2, seed=1)[1]
    assert a.samples == b.samples and a.samples != c.samples


def test_zero_val_fraction_gives_no_val(tmp_path):
    make_folder(tmp_path)
    train, val, _ = load_image_folder(tmp_path, val_fraction=0.0)
    assert val is None and len(train) == 15


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_explicit_train_val_layout_is_used_as_given(tmp_path, val_name):
    make_folder(tmp_path / "train", n=4)
    make_folder(tmp_path / val_name, n=2)
    train, val, classes = load_image_folder(tmp_path, val_fraction=0.5)
    assert (len(train), len(val)) == (12, 6) and classes == ["cat", "dog", "fox"]
    assert all(f"/{val_name}/" in p for p, _ in val.samples)


def test_train_only_layout_is_split_and_hidden_folders_are_not_classes(tmp_path):
    make_folder(tmp_path / "train", n=10)
    (tmp_path / "train" / ".vggnet-cache").mkdir()
    train, val, classes = load_image_folder(tmp_path, val_fraction=0.1)
    assert classes == ["cat", "dog", "fox"] and (len(train), len(val)) == (27, 3)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere.*no such path"):
        load_image_folder(tmp_path / "nowhere")


def test_folder_without_class_folders(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) emu hold no images"):
        load_image_folder(tmp_path)


def test_train_and_val_classes_must_match(tmp_path):
    make_folder(tmp_path / "train", classes=("cat", "dog"))
    make_folder(tmp_path / "val", classes=("cat", "owl"))
    with pytest.raises(DataError, match=r"only in train: \['dog'\], only in val: \['owl'\]"):
        load_image_folder(tmp_path)


@pytest.fixture
def corrupt_folder(tmp_path):
    make_folder(tmp_path)
    good = (tmp_path / "cat" / "000.jpg").read_bytes()
    (tmp_path / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "dog" / "text.jpg").write_text("this is not a JPEG")
    return tmp_path


def test_corrupt_files_are_skipped_counted_and_logged_once(corrupt_folder, caplog):
    train, _, _ = load_image_folder(corrupt_folder, val_fraction=0.0)
    assert len(train) == 17
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate_skip_none)
    with caplog.at_level(logging.WARNING, logger="vggnet.data"):
        for _ in range(2):  # two epochs: counted once per file, not per visit
            seen = sum(len(labels) for images, labels in loader)
            assert seen == 15
    assert train.skipped == 2
    assert {Path(p).name for p in train.skipped_files} == {"truncated.jpg", "text.jpg"}
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2


def test_corrupt_files_with_workers_and_transforms(corrupt_folder):
    train, _, _ = load_image_folder(corrupt_folder, val_fraction=0.0)
    train.transform = small_image_train_transform(size=32, pad=4)
    loader = build_dataloader(train, batch_size=4, train=False, workers=1)
    batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == 15
    assert batches[0][0].shape == (4, 3, 32, 32) and batches[0][0].dtype == torch.float32


def test_collate_skip_none_all_bad_batch():
    assert collate_skip_none([None, None]) is None
    images, labels = collate_skip_none([None, (torch.zeros(3), 1)])
    assert images.shape == (1, 3) and labels.tolist() == [1]


def test_build_dataloader_defaults(tmp_path):
    train, _, _ = load_image_folder(make_folder(tmp_path), val_fraction=0.0)
    loader = build_dataloader(train, batch_size=4, train=True, seed=3)
    assert loader.num_workers == min(2, __import__("os").cpu_count()) and loader.persistent_workers
    assert loader.drop_last and loader.collate_fn is collate_skip_none
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.generator.initial_seed() == 3
    evaluation = build_dataloader(train, batch_size=4, train=False, workers=0, distributed=True)
    assert isinstance(evaluation.sampler, DistributedSampler) and evaluation.sampler.num_replicas == 1
    assert list(evaluation.sampler) == list(range(15)) and not evaluation.drop_last
