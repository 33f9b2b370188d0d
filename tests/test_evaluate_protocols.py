"""Test-time protocols (the paper's Sec. 3.2, 4.1–4.5): dense = single at the training size, crop geometry,
ensembles, top-k by hand, odd and varying image sizes, protocol parsing."""

import copy

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

import vggnet
from vggnet.evaluate import Protocol, crop_boxes, parse_protocol, predict_proba, resolve_scale, summarize

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
UNIT = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def tiny(num_classes=5, head="fc", name="vgg11", sharpen=2.0, seed=0):
    """A tiny random VGG with He-initialised head layers, the last scaled up, so its softmax is far from uniform
    (the FC layers' N(0, 0.01) init would give near-uniform probabilities that hide mistakes)."""
    torch.manual_seed(seed)
    model = vggnet.create_model(name, width=0.125, fc_width=32, num_classes=num_classes, head=head)
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        model.get_classifier().weight.mul_(sharpen)
    return model


def images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def normalise(image, mean=MEAN, std=STD):
    x = image.float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class Sink(list):
    """Shared by a probe and its deep copies, so the test sees what the copy was fed."""

    def __deepcopy__(self, memo):
        return self


class Probe(nn.Module):
    """Records every batch it is given; scores are a linear function of the mean colour."""

    def __init__(self, sink, num_classes=3):
        super().__init__()
        self.sink = sink
        self.lin = nn.Linear(3, num_classes)

    def forward(self, x):
        self.sink.append(x.detach().clone())
        return self.lin(x.mean(dim=(2, 3)))


def unit(image):
    """uint8 -> [0, 1] exactly as the evaluation does it (mean 0, std 1 leave it unchanged)."""
    return TF.to_dtype(image, torch.float32, scale=True)


def recorded(sink):
    return torch.cat(list(sink)) if sink else torch.empty(0)


def contains(batch, view):
    return any(torch.equal(view, b) for b in batch)


# ------------------------------------------------------------------ dense = single at the training size


def test_dense_equals_single_centre_crop_at_224_after_head_conversion():
    model = tiny(head="fc")
    before = copy.deepcopy(model.state_dict())
    imgs = images((224, 224), (224, 224), (224, 224))
    kw = {"crop": 224, "mean": MEAN, "std": STD, "amp_bf16": False}
    single = predict_proba([model], imgs, Protocol("single", (1.0,), flip=False), **kw)
    dense = predict_proba([model], imgs, Protocol("dense", (1.0,), flip=False), **kw)

    x = torch.stack([normalise(i) for i in imgs])
    with torch.no_grad():
        logits_fc = copy.deepcopy(model).eval()(x)
        logits_conv = copy.deepcopy(model).eval().convert_head("conv")(x)
    ordinary = logits_fc.softmax(1)
    assert ordinary.max() > 0.5 and ordinary.min() < 0.05  # not uniform: the comparison below means something
    torch.testing.assert_close(logits_conv, logits_fc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, ordinary, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense, ordinary, rtol=1e-5, atol=1e-6)
    # the caller's model is untouched: still the fc head, still in training mode, same weights
    assert model.config.head == "fc" and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dense_slides_the_conv_head_over_a_large_image_and_averages_its_mirror():
    model = tiny(head="fc")
    imgs = images((256, 288))  # feature map 8×9: the 7×7 fc6 kernel takes 2×3 positions
    kw = {"crop": 224, "mean": MEAN, "std": STD, "amp_bf16": False}
    dense = predict_proba(model, imgs, "dense@256", **kw)  # the image's own size: no resampling
    x = normalise(imgs[0]).unsqueeze(0)
    conv = copy.deepcopy(model).eval().convert_head("conv")
    with torch.no_grad():
        plain, mirrored = conv(x), conv(x.flip(-1))
        assert conv.score_map(x).shape[-2:] == (2, 3)
        resized_fc = copy.deepcopy(model).eval()(x)  # the fc head would pool 8×9 down to 7×7 instead
    assert (plain - mirrored).abs().max() > 1e-2  # the flip matters for this image
    assert (plain - resized_fc).abs().max() > 1e-3  # and so does sliding the conv head
    torch.testing.assert_close(dense, (plain.softmax(1) + mirrored.softmax(1)) / 2, rtol=1e-5, atol=1e-6)
    no_flip = predict_proba(model, imgs, "dense@256:noflip", **kw)
    torch.testing.assert_close(no_flip, plain.softmax(1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ crop geometry


def test_crop_boxes_is_a_5x5_grid_with_corners_inside_the_image():
    boxes = crop_boxes(40, 56, 32)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    assert sorted({t for t, _ in boxes}) == [0, 2, 4, 6, 8]
    assert sorted({left for _, left in boxes}) == [0, 6, 12, 18, 24]
    assert {(0, 0), (0, 24), (8, 0), (8, 24)} <= set(boxes)  # the four corners
    assert all(0 <= t and t + 32 <= 40 and 0 <= left and left + 32 <= 56 for t, left in boxes)
    assert boxes[:5] == [(0, 0), (0, 6), (0, 12), (0, 18), (0, 24)]  # row by row
    assert sorted({t for t, _ in crop_boxes(42, 42, 32)}) == [0, 3, 5, 8, 10]  # 2.5 and 7.5 round half up
    assert set(crop_boxes(32, 32, 32)) == {(0, 0)}
    with pytest.raises(ValueError, match="does not fit"):
        crop_boxes(31, 56, 32)


def test_multicrop_feeds_50_crops_per_scale_and_really_mirrors_them():
    sink = Sink()
    image = images((40, 56))[0]
    probs = predict_proba([Probe(sink)], [image], "multicrop@40,1.5", crop=32, amp_bf16=False,
                          channels_last=False, **UNIT)
    assert probs.shape == (1, 3)
    seen = recorded(sink)
    assert seen.shape == (100, 3, 32, 32)  # 25 boxes × 2 flips × 2 scales
    x = unit(image)  # Q = 40 is the image's own size: no resampling
    for top, left in crop_boxes(40, 56, 32):
        view = x[:, top:top + 32, left:left + 32]
        assert contains(seen, view) and contains(seen, view.flip(-1))
    assert not torch.equal(x[:, :32, :32], x[:, :32, :32].flip(-1))  # the image is not symmetric
    larger = unit(TF.resize(image, [48], antialias=True))  # Q = 1.5 × 32
    assert larger.shape[-2:] == (48, 67)
    for top, left in ((0, 0), (16, 35), (8, 18)):  # corners and the centre of the 5×5 grid
        view = larger[:, top:top + 32, left:left + 32]
        assert contains(seen, view) and contains(seen, view.flip(-1))


def test_single_and_dense_views():
    sink = Sink()
    image = images((40, 56))[0]
    x = unit(image)
    predict_proba([Probe(sink)], [image], "single@40:flip", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    centre = TF.center_crop(x, [32, 32])
    assert torch.equal(recorded(sink), torch.stack([centre, centre.flip(-1)]))
    sink.clear()
    predict_proba([Probe(sink)], [image], "dense@40", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    assert torch.equal(recorded(sink), torch.stack([centre, centre.flip(-1)]))  # 40×56 trims to its centre 32×32


def test_dense_trims_sides_to_a_multiple_of_32_around_the_centre():
    """Max-pool flooring would otherwise drop the remainder from the bottom and right only."""
    sink = Sink()
    image = images((70, 100))[0]
    predict_proba([Probe(sink)], [image], "dense@70:noflip", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    x = unit(image)
    assert torch.equal(recorded(sink), x[:, 3:67, 2:98].unsqueeze(0))  # 70 -> 64 (3 + 3), 100 -> 96 (2 + 2)
    sink.clear()
    square = images((64, 96))[0]  # already multiples of 32: untouched
    predict_proba([Probe(sink)], [square], "dense@64:noflip", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    assert torch.equal(recorded(sink), unit(square).unsqueeze(0))
    sink.clear()
    predict_proba([Probe(sink)], [image], "dense@70:noflip", crop=40, amp_bf16=False, channels_last=False, **UNIT)
    assert recorded(sink).shape[-2:] == (64, 96)
    sink.clear()
    small = images((36, 36))[0]  # 36 -> 32 would go below a 34-px crop: that side is kept whole
    predict_proba([Probe(sink)], [small], "dense@36:noflip", crop=34, amp_bf16=False, channels_last=False, **UNIT)
    assert recorded(sink).shape[-2:] == (36, 36)


def test_shift_views_are_the_centre_crop_translated_within_reflect_padding():
    sink = Sink()
    image = images((32, 32))[0]
    predict_proba([Probe(sink)], [image], "shift", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    seen = recorded(sink)
    assert seen.shape == (10, 3, 32, 32) and parse_protocol("shift").views_per_image() == 10
    x = unit(image)
    assert torch.equal(seen[0], x) and contains(seen, x.flip(-1))
    padded = torch.nn.functional.pad(x.unsqueeze(0), (2, 2, 2, 2), mode="reflect")[0]
    for top, left in ((0, 0), (0, 4), (4, 0), (4, 4)):  # moved 2 px along both diagonals
        view = padded[:, top:top + 32, left:left + 32]
        assert not torch.equal(view, x) and contains(seen, view) and contains(seen, view.flip(-1))
    assert torch.equal(seen[4][:, :30, :30], x[:, 2:, 2:])  # the last shift really moves the content
    sink.clear()
    predict_proba([Probe(sink)], [image], "shift:noflip", crop=32, amp_bf16=False, channels_last=False, **UNIT)
    assert len(recorded(sink)) == 5


# ------------------------------------------------------------------ ensembles


def test_ensemble_of_one_is_the_model_and_of_two_the_mean_softmax():
    a, b = tiny(num_classes=4, seed=1), tiny(num_classes=4, seed=2, head="gap", name="vgg11_bn")
    imgs = images((32, 32), (32, 32), (32, 32))
    kw = {"crop": 32, "mean": MEAN, "std": STD, "amp_bf16": False}
    x = torch.stack([normalise(i) for i in imgs])
    with torch.no_grad():
        la, lb = copy.deepcopy(a).eval()(x), copy.deepcopy(b).eval()(x)
    pa = predict_proba([a], imgs, "single", **kw)
    torch.testing.assert_close(pa, la.softmax(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(predict_proba(a, imgs, "single", **kw), pa)  # a bare module is an ensemble of one
    pab = predict_proba([a, b], imgs, "single", **kw)
    torch.testing.assert_close(pab, (la.softmax(1) + lb.softmax(1)) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pab, ((la + lb) / 2).softmax(1), atol=1e-3)  # probabilities, not logits, averaged
    # the same holds for the richest protocol
    varied = images((40, 56), (48, 40))
    both = predict_proba([a, b], varied, "dense+multicrop@1,1.25", **kw)
    each = [predict_proba([m], varied, "dense+multicrop@1,1.25", **kw) for m in (a, b)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)


def test_ensemble_of_different_class_counts_is_refused():
    with pytest.raises(ValueError, match="number of classes"):
        predict_proba([tiny(num_classes=3), tiny(num_classes=4)], images((32, 32)), "single", crop=32,
                      mean=MEAN, std=STD)


# ------------------------------------------------------------------ metrics


def test_summarize_top1_top5_by_hand():
    scores = torch.arange(6.0).repeat(4, 1)  # class 5 best, class 0 worst, for every image
    targets = [5, 4, 1, 0]  # ranks 1, 2, 5, 6
    s = summarize(scores, targets, list("abcdef"))
    assert s["n"] == 4 and s["skipped"] == 0 and s["top5_k"] == 5
    assert s["top1_err"] == pytest.approx(75.0)  # only the first is right
    assert s["top5_err"] == pytest.approx(25.0)  # only the last is outside the top 5
    assert s["per_class_acc"] == {"a": 0.0, "b": 0.0, "c": None, "d": None, "e": 0.0, "f": 100.0}
    assert s["confusion"][5] == [0, 0, 0, 0, 0, 1] and s["confusion"][0] == [0, 0, 0, 0, 0, 1]
    assert sum(map(sum, s["confusion"])) == 4


def test_summarize_few_classes_and_skipped_rows():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [float("nan")] * 3, [0.1, 0.1, 0.8]])
    s = summarize(probs, [2, 0, 1, 0], ["x", "y", "z"])
    assert s["n"] == 3 and s["skipped"] == 1 and s["top5_k"] == 3
    assert s["top1_err"] == pytest.approx(200 / 3)  # only the second image is right
    assert s["top5_err"] == 0.0  # top-3 of 3 classes always contains the target
    assert s["per_class_acc"] == {"x": 50.0, "y": None, "z": 0.0}
    with pytest.raises(ValueError, match="class names"):
        summarize(probs, [0, 0, 0, 0], ["x", "y"])


# ------------------------------------------------------------------ odd and varying sizes

PROTOCOLS = ["single", "single:flip", "shift", "shift@1.25", "dense", "multicrop", "dense+multicrop", "dense@1.0,1.5",
             "multicrop@1,1.25,1.5", "dense+multicrop@32,48", "single@1.0,1.5:flip"]


@pytest.mark.parametrize("text", PROTOCOLS)
def test_every_protocol_on_non_square_and_varying_sizes(text):
    model = tiny(num_classes=4, head="gap", name="vgg11_bn")
    imgs = images((40, 56), (56, 40), (32, 32), (45, 33))
    imgs.insert(3, imgs[0].clone())  # a second image of the first one's size: batched with it for dense
    kw = {"crop": 32, "mean": MEAN, "std": STD, "amp_bf16": False}
    probs = predict_proba([model], imgs, text, batch_size=7, **kw)
    assert probs.shape == (5, 4) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    other = predict_proba([model], imgs, text, batch_size=13 if "multicrop" in text else 1, **kw)
    torch.testing.assert_close(probs, other, rtol=1e-4, atol=1e-5)  # batching (and splitting images) changes nothing
    torch.testing.assert_close(probs[0], probs[3])  # same image, same answer


def test_fc_head_dense_on_non_square_and_unreadable_image_gives_nan_row():
    model = tiny(num_classes=3, head="fc")
    imgs = [*images((40, 56)), None, *images((64, 48))]
    probs = predict_proba([model], imgs, "dense+multicrop@1,1.5", crop=32, mean=MEAN, std=STD, amp_bf16=False)
    assert probs.shape == (3, 3)
    assert torch.isnan(probs[1]).all() and torch.isfinite(probs[[0, 2]]).all()
    assert summarize(probs, [0, 1, 2], ["a", "b", "c"])["skipped"] == 1


def test_scales_too_small_are_refused():
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match="smaller than the 32-px training crop"):
        predict_proba([model], images((40, 40)), "single@0.9", crop=32, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="below the 32 px"):
        predict_proba([model], images((40, 40)), "dense@0.5", crop=32, mean=MEAN, std=STD)


def test_bf16_autocast_stays_close_to_fp32():
    model = tiny(num_classes=3, head="gap", name="vgg11_bn", sharpen=1.0)
    imgs = images((40, 56))
    kw = {"crop": 32, "mean": MEAN, "std": STD}
    convs: list[torch.dtype] = []  # what each conv of the evaluated copy wrote, via a global forward hook

    def record(module, _inputs, out):
        if isinstance(module, nn.Conv2d):
            convs.append(out.dtype)

    hook = nn.modules.module.register_module_forward_hook(record)
    try:
        fp32 = predict_proba([model], imgs, "single", amp_bf16=False, **kw)
        assert convs and set(convs) == {torch.float32}
        convs.clear()
        bf16 = predict_proba([model], imgs, "single", amp_bf16=True, **kw)
        assert convs and set(convs) == {torch.bfloat16}  # the bf16 path really ran in bf16
    finally:
        hook.remove()
    assert bf16.dtype == torch.float32 and (fp32 - bf16).abs().max() < 0.05


# ------------------------------------------------------------------ parsing


def test_relative_and_absolute_scales():
    p = parse_protocol("dense@1.0,1.14,1.29")
    assert p.kind == "dense" and p.scales == (1.0, 1.14, 1.29) and p.flip is True
    assert p.pixel_scales(224) == (224, 255, 289)
    paper = parse_protocol("multicrop@256,384,512")
    assert paper.scales == (256, 384, 512) and paper.pixel_scales(224) == (256, 384, 512)
    assert parse_protocol("multicrop@1.143,1.714,2.286").pixel_scales(224) == (256, 384, 512)
    assert paper.pixel_scales(32) == (256, 384, 512)  # pixels do not depend on the crop
    assert parse_protocol("single@2").pixel_scales(32) == (64,)  # a small integer is relative too
    assert parse_protocol("single@16").pixel_scales(224) == (16,)  # from 16 up: pixels
    assert resolve_scale(1.5, 32) == 48 and resolve_scale(48, 32) == 48
    single = parse_protocol(" Single ")
    assert single == Protocol("single", (1.0,), flip=False) and single.flip is False
    assert parse_protocol("single:flip").flip is True and parse_protocol("dense:noflip").flip is False
    assert parse_protocol("dense+multicrop@256,384,512").components == ("dense", "multicrop")
    assert parse_protocol("multicrop@1,1.5").views_per_image() == 100
    for text in ("single", "single@1.5:flip", "dense@1,1.14:noflip", "multicrop@256,384,512", "dense+multicrop"):
        assert parse_protocol(str(parse_protocol(text))) == parse_protocol(text)


@pytest.mark.parametrize("text", ["", "  ", "foo", "dense@", "dense@1,,2", "dense@abc", "dense@-1", "dense@0",
                                  "dense@256.5", "dense:mirror", "dense@nan", "dense@inf", "multicrop@1,2@3",
                                  "single+dense"])
def test_bad_protocol_strings_raise_value_error(text):
    with pytest.raises(ValueError):
        parse_protocol(text)


def test_protocol_dataclass_validates():
    with pytest.raises(ValueError, match="unknown protocol kind"):
        Protocol("tencrop")
    with pytest.raises(ValueError):
        Protocol("dense", ())
    assert Protocol("dense", 1.5).scales == (1.5,)
