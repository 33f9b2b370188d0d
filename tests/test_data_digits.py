"""The embedded digits: stratified, deterministic splits of all 1,797 images at any size."""

from collections import Counter

import pytest
import torch
from torchvision import tv_tensors

from vggnet.data import DigitsDataset, digits_tensors, stratified_split


def test_splits_are_disjoint_cover_everything_and_match_the_stratified_split():
    all_x, all_y = digits_tensors("all")
    train_x, train_y = digits_tensors("train", val_fraction=0.2, seed=0)
    val_x, val_y = digits_tensors("val", val_fraction=0.2, seed=0)
    assert len(all_y) == 1797 and len(train_y) + len(val_y) == 1797
    train_idx, val_idx = stratified_split(all_y.tolist(), 0.2, seed=0)
    assert set(train_idx).isdisjoint(val_idx) and sorted(train_idx + val_idx) == list(range(1797))
    assert torch.equal(train_x, all_x[train_idx]) and torch.equal(val_y, all_y[val_idx])
    assert abs(len(val_y) - 0.2 * 1797) < 10


def test_split_is_stratified():
    _, all_y = digits_tensors("all")
    _, val_y = digits_tensors("val", val_fraction=0.2)
    total, val = Counter(all_y.tolist()), Counter(val_y.tolist())
    assert set(val) == set(range(10))
    for label in range(10):
        assert val[label] == round(total[label] * 0.2)


def test_split_is_deterministic_and_depends_on_seed():
    a, b = digits_tensors("val", seed=0), digits_tensors("val", seed=0)
    c = digits_tensors("val", seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("size,channels", [(32, 3), (32, 1), (48, 3)])
def test_shape_dtype_and_range(size, channels):
    x, y = digits_tensors("train", size=size, channels=channels)
    assert x.shape == (len(y), channels, size, size) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.max() >= 250 and x.min() == 0  # 0..16 is rescaled to the full 0..255 range
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_dataset_items_classes_and_transform():
    ds = DigitsDataset("val", size=32, channels=1)
    image, label = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert ds.classes == [str(i) for i in range(10)] and len(ds.targets) == len(ds) == 359
    assert label == ds.targets[0]
    flipped = DigitsDataset("val", size=32, channels=1, transform=lambda im: im.flip(-1))
    assert torch.equal(flipped[0][0], image.flip(-1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        digits_tensors("test")
    with pytest.raises(ValueError, match="channels"):
        digits_tensors("train", channels=2)
