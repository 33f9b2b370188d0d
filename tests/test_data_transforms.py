"""The two transforms torchvision v2 lacks, and the paper/eval/small-image pipelines built from them."""

import pytest
import torch
from torchvision import tv_tensors

from vggnet.data import (
    PCALighting,
    RandomIsotropicRescale,
    eval_transform,
    paper_train_transform,
    small_image_train_transform,
)


def image(h=30, w=40) -> tv_tensors.Image:
    return tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))


def test_isotropic_rescale_jitters_the_shorter_side_and_keeps_aspect():
    t = RandomIsotropicRescale(20, 40)
    seen = set()
    for _ in range(60):
        out = t(image(30, 40))
        short, long = out.shape[-2], out.shape[-1]
        assert 20 <= short <= 40 and abs(long - short * 40 / 30) < 1  # torchvision truncates
        seen.add(short)
    assert len(seen) > 5  # S really varies per call
    portrait = t(image(40, 30))
    assert portrait.shape[-1] < portrait.shape[-2]  # the shorter side is the width here


def test_isotropic_rescale_fixed_scale_and_bad_range():
    assert {RandomIsotropicRescale(24, 24)(image()).shape for _ in range(5)} == {(3, 24, 32)}
    with pytest.raises(ValueError):
        RandomIsotropicRescale(40, 20)


def test_pca_lighting_zero_std_is_identity_and_shift_is_uniform():
    x = torch.rand(3, 8, 8)
    assert torch.equal(PCALighting(0.0)(x), x)
    shift = PCALighting(0.5)(x) - x
    per_channel = shift[:, 0, 0]
    assert per_channel.abs().sum() > 0
    assert torch.allclose(shift, per_channel.view(3, 1, 1).expand_as(shift), atol=1e-6)


def test_pca_lighting_keeps_the_image_type_and_refuses_uint8():
    out = PCALighting(0.1)(tv_tensors.Image(torch.rand(3, 4, 4)))
    assert isinstance(out, tv_tensors.Image)
    with pytest.raises(TypeError, match="float"):
        PCALighting(0.1)(image())


@pytest.mark.parametrize("scale", [(32, 64), (1.0, 2.0), 40])
def test_paper_train_transform_on_small_images(scale):
    t = paper_train_transform(scale, crop=32, mean=(0.5, 0.5, 0.5))
    out = t(image(30, 40))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert -0.5 - 0.2 < out.min() and out.max() < 0.5 + 0.2  # minus the mean only (std 1), plus lighting


def test_paper_scale_must_cover_the_crop():
    with pytest.raises(ValueError, match="at least the crop"):
        paper_train_transform((200, 512), crop=224)


def test_eval_transform_centre_crop_or_whole_image():
    out = eval_transform(36, 32)(image(30, 40))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert eval_transform(36, None)(image(30, 40)).shape == (3, 36, 48)


def test_small_image_transform_cutout_cuts_one_square():
    x = tv_tensors.Image(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    out = small_image_train_transform(size=32, pad=4, cutout=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(x)
    assert out.shape == (3, 32, 32)
    assert int((out == 0).all(0).sum()) == 64
    plain = small_image_train_transform(size=32, pad=4)(x)
    assert not (plain == 0).any()


def test_one_scale_rule_for_recipes_and_protocols():
    from vggnet.data.transforms import scale_pixels
    from vggnet.evaluate import resolve_scale

    for value, crop, px in ((1.5, 32, 48), (2, 32, 64), (1.143, 224, 256), (256, 224, 256), (16, 32, 16)):
        assert scale_pixels(value, crop) == px == resolve_scale(value, crop)
    for bad in (0, -1.0, float("nan"), 37.5, True):
        with pytest.raises(ValueError):
            scale_pixels(bad, 32)
