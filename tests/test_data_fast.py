"""TensorLoader: batched augmentation that is correct, seeded by (seed, epoch) and shardable."""

import pytest
import torch
import torch.nn.functional as F

from vggnet.data import TensorLoader

N, C, H, W = 40, 3, 8, 8


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8), torch.arange(N) % 10


def loader(data, **kw):
    base = dict(batch_size=16, shuffle=True, drop_last=False, seed=0, augment="flip_crop", pad=2,
                mean=(0.0,) * C, std=(1.0,) * C)
    return TensorLoader(*data, **{**base, **kw})


def epoch(tl):
    return [(x.clone(), y.clone()) for x, y in tl]


def same(a, b):
    if len(a) != len(b):
        return False
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_shapes_dtypes_and_length(data):
    tl = loader(data)
    batches = epoch(tl)
    assert len(tl) == len(batches) == 3 and [len(y) for _, y in batches] == [16, 16, 8]
    x, y = batches[0]
    assert x.shape == (16, C, H, W) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(loader(data, drop_last=True)) == 2


def test_plain_batches_are_normalised_originals_with_their_labels(data):
    images, labels = data
    tl = loader(data, augment="none", shuffle=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    order = tl.epoch_indices()
    x, y = torch.cat([b[0] for b in tl]), torch.cat([b[1] for b in tl])
    expected = (images[order].float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, labels[order])
    assert sorted(order.tolist()) == list(range(N)) and order.tolist() != list(range(N))


def test_every_augmented_image_is_a_reflect_padded_crop_or_its_flip(data):
    images, _ = data
    tl = loader(data, pad=2)
    x = torch.cat([b[0] for b in tl]) * 255
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    flips = shifts = 0
    for out, i in zip(x, tl.epoch_indices(), strict=True):
        crops = {(dy, dx): padded[i, :, dy:dy + H, dx:dx + W] for dy in range(5) for dx in range(5)}
        matches = [(dy, dx, f) for (dy, dx), crop in crops.items() for f in (False, True)
                   if torch.allclose(out, crop.flip(-1) if f else crop, atol=1e-3)]
        assert matches, "an output is not a crop of its padded input"
        flips += all(m[2] for m in matches)
        shifts += all((m[0], m[1]) != (2, 2) for m in matches)
    assert 5 < flips < N - 5 and shifts > N // 2  # both augmentations actually happen


def test_no_flip_and_no_pad_is_identity(data):
    images, _ = data
    tl = loader(data, pad=0, flip=False)
    x = torch.cat([b[0] for b in tl]) * 255
    assert torch.allclose(x, images[tl.epoch_indices()].float(), atol=1e-3)


def test_alternating_flip_mirrors_each_image_every_other_epoch(data):
    images = data[0].float() / 255
    tl = loader(data, pad=0, flip="alternate", shuffle=False)
    mirrored = []
    for e in (1, 2, 3):
        tl.set_epoch(e)
        x = torch.cat([b for b, _ in tl])
        assert all(torch.allclose(x[i], images[i]) or torch.allclose(x[i], images[i].flip(-1)) for i in range(N))
        mirrored.append(torch.tensor([torch.allclose(x[i], images[i].flip(-1)) for i in range(N)]))
    assert 0 < int(mirrored[0].sum()) < N  # a random half starts mirrored
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
    with pytest.raises(ValueError, match="flip must be"):
        loader(data, flip="sometimes")


def test_cutout_zeroes_a_clipped_square(data):
    tl = loader(data, pad=0, flip=False, cutout=4, mean=(2.0,) * C)  # no pixel is 0 otherwise
    x = torch.cat([b[0] for b in tl])
    zeros = (x == 0).all(1).flatten(1).sum(1)
    assert zeros.max() == 16 and zeros.min() >= 4 and (zeros == 0).sum() == 0


def test_deterministic_by_seed_and_epoch(data):
    a, b = loader(data), loader(data)
    a.set_epoch(3)
    b.set_epoch(3)
    assert same(epoch(a), epoch(b)) and same(epoch(a), epoch(a))
    b.set_epoch(4)
    assert not torch.equal(a.epoch_indices(), b.epoch_indices()) and not same(epoch(a), epoch(b))
    c = loader(data, seed=1)
    c.set_epoch(3)
    assert not same(epoch(a), epoch(c))


def test_state_dict_round_trip_continues_the_same_sequence(data):
    a = loader(data, seed=7)
    a.set_epoch(5)
    resumed = loader(data, seed=0)
    resumed.load_state_dict(a.state_dict())
    assert resumed.state_dict() == {"epoch": 5, "seed": 7}
    assert same(epoch(a), epoch(resumed))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(data, drop_last):
    shards = [loader(data, rank=r, world_size=3, drop_last=drop_last, batch_size=4) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    indices = [s.epoch_indices().tolist() for s in shards]
    flat = [i for shard in indices for i in shard]
    assert len(flat) == len(set(flat))
    if drop_last:  # training: equal shards, same number of steps everywhere
        assert [len(s) for s in indices] == [13, 13, 13] and len({len(s) for s in shards}) == 1
    else:  # evaluation: every image exactly once
        assert sorted(flat) == list(range(N))
    assert sum(len(y) for s in shards for _, y in s) == (36 if drop_last else N)  # 3 full batches of 4 each
    # ranks augment differently even when they would see the same image
    assert not torch.equal(next(iter(shards[0]))[0], next(iter(shards[1]))[0])


def test_channels_last_output_and_bad_arguments(data):
    x, _ = next(iter(loader(data, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert next(iter(loader(data)))[0].is_contiguous()
    with pytest.raises(ValueError, match="augment"):
        loader(data, augment="autoaugment")
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(data[0].float(), data[1], batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        loader(data, rank=2, world_size=2)


def _upscaled(images, size):
    x = images.float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_paper_and_center_at_native_scale_are_the_image(data):
    images, _ = data
    for augment in ("paper", "center"):
        tl = loader(data, augment=augment, shuffle=False, flip=False, crop=H, scale=1.0)
        x, _ = next(iter(tl))
        assert torch.allclose(x, images[:16].float() / 255, atol=1e-5)


def test_paper_scale_jitter_gives_crops_of_the_rescaled_image_or_their_flips(data):
    images, _ = data
    tl = loader(data, augment="paper", shuffle=False, crop=H, scale=(2.0, 2.0))  # S = 2H, fixed
    x, _ = next(iter(tl))
    big = _upscaled(images[:16], 2 * H) / 255
    flips = 0
    for i in range(16):
        views = [big[i, :, t:t + H, left:left + H] for t in range(H + 1) for left in range(H + 1)]
        plain = any(torch.allclose(x[i], v, atol=1e-5) for v in views)
        mirrored = any(torch.allclose(x[i], v.flip(-1), atol=1e-5) for v in views)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < 16


def test_paper_jitter_range_varies_the_scale(data):
    images, _ = data
    tl = loader(data, augment="paper", shuffle=False, flip=False, crop=H, scale=(1.0, 3.0))  # relative S
    x, _ = next(iter(tl))
    native = images[:16].float() / 255
    # S = H keeps the image, every other S in 1..3x zooms in: 16 draws are not all the native scale
    zoomed = [not torch.allclose(x[i], native[i], atol=1e-5) for i in range(16)]
    assert any(zoomed)


def test_center_view_is_the_centre_crop_of_the_rescaled_image(data):
    images, _ = data
    tl = loader(data, augment="center", shuffle=False, crop=H, scale=2.0)
    x, _ = next(iter(tl))
    big = _upscaled(images[:16], 2 * H) / 255
    off = H // 2
    assert torch.allclose(x, big[:, :, off:off + H, off:off + H], atol=1e-5)


def test_pca_lighting_shifts_each_image_by_one_colour(data):
    kw = dict(augment="paper", shuffle=False, flip=False, crop=H, scale=1.0, seed=3)
    plain, _ = next(iter(loader(data, **kw)))
    lit, _ = next(iter(loader(data, lighting=0.1, **kw)))
    shift = lit - plain
    assert shift.abs().max() > 0
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5)  # constant per image and channel
    assert not torch.allclose(shift[0], shift[1])


def test_paper_augment_bad_scales(data):
    with pytest.raises(ValueError, match="crop <= Smin"):
        loader(data, augment="paper", crop=H, scale=(0.75, 1.0))
    with pytest.raises(ValueError, match="augment must be"):
        loader(data, augment="mixup")
