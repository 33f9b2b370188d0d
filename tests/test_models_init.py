"""Init schemes and the paper's warm start of deeper nets from net A."""

import math

import pytest
import torch

import vggnet
from vggnet.models import PAPER_WARM_START_LAYERS, init_from_shallower, init_weights

TINY = {"width": 0.5, "fc_width": 128, "num_classes": 10}


def test_kaiming_is_torchvision_scheme():
    model = vggnet.create_model("vgg16", init="kaiming", **TINY)
    w = model.features.block4_conv1.weight
    expected = math.sqrt(2.0 / (w.shape[0] * 9))  # fan-out
    assert abs(w.std().item() - expected) / expected < 0.05
    assert abs(model.head.fc6.weight.std().item() - 0.01) < 0.001
    assert model.features.block4_conv1.bias.abs().max() == 0


def test_paper_normal_init():
    model = vggnet.create_model("vgg11", init="normal", **TINY)
    for w in (model.features.block3_conv1.weight, model.head.fc7.weight):
        assert abs(w.std().item() - 0.01) < 0.001


def test_xavier_init_bound():
    model = vggnet.create_model("vgg11", init="xavier", **TINY)
    w = model.features.block3_conv1.weight
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_bn_starts_as_identity():
    model = vggnet.create_model("vgg11_bn", **TINY)
    bn = model.features.block2_bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and bn.bias.abs().max() == 0


@pytest.mark.parametrize("deeper", ["vgg13", "vgg16_c", "vgg16", "vgg19"])
def test_init_from_a_copies_exactly_the_papers_layers(deeper):
    net_a = vggnet.create_model("vgg11", **TINY)
    target = vggnet.create_model(deeper, init="normal", **TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = init_from_shallower(target, net_a)
    assert copied == list(PAPER_WARM_START_LAYERS)
    source = net_a.state_dict()
    copied_keys = set()
    for layer in PAPER_WARM_START_LAYERS:
        prefix = f"head.{layer}" if layer.startswith("fc") else f"features.{layer}"
        for leaf in ("weight", "bias"):
            key = f"{prefix}.{leaf}"
            assert torch.equal(target.state_dict()[key], source[key])
            copied_keys.add(key)
    for key, value in target.state_dict().items():
        if key not in copied_keys:
            assert torch.equal(value, before[key]), f"{key} should keep its random init"
    # the paper's first four convs of A are A's only convs of blocks 1-3
    assert [n for n in net_a.layer_names() if "conv" in n][:4] == list(PAPER_WARM_START_LAYERS[:4])


def test_init_from_a_with_bn_copies_bn_too():
    net_a = vggnet.create_model("vgg11_bn", **TINY)
    with torch.no_grad():
        net_a.features.block1_bn1.running_mean.fill_(0.3)
    target = vggnet.create_model("vgg16_bn", **TINY)
    init_from_shallower(target, net_a)
    assert torch.equal(target.features.block1_bn1.running_mean, net_a.features.block1_bn1.running_mean)
    untouched = target.features.block2_bn2.running_mean
    assert not torch.equal(untouched, torch.full_like(untouched, 0.3))


def test_init_from_a_mismatched_width_is_a_clear_error():
    net_a = vggnet.create_model("vgg11", width=0.25, fc_width=128, num_classes=10)
    with pytest.raises(ValueError, match="does not fit"):
        init_from_shallower(vggnet.create_model("vgg16", **TINY), net_a)


def test_init_weights_unknown_scheme():
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(vggnet.create_model("vgg11", **TINY), "he")


def test_whitening_init_decorrelates_the_first_convs_outputs():
    torch.manual_seed(0)
    base = torch.rand(64, 3, 16, 16)
    images = base + 0.8 * base.mean(1, keepdim=True)  # strongly correlated colour channels
    model = vggnet.create_model("vgg11_bn", width=0.5, num_classes=10, head="gap")  # 32 first-layer filters
    assert vggnet.models.init_whitening(model, images) == 2 * 16
    conv = model.features[0]
    torch.testing.assert_close(conv.weight[16:32], -conv.weight[:16])
    out = torch.nn.functional.conv2d(images, conv.weight[:16]).permute(1, 0, 2, 3).reshape(16, -1)
    cov = torch.cov(out)
    torch.testing.assert_close(cov, torch.eye(16), atol=0.05, rtol=0.0)  # unit variance, uncorrelated
    big = vggnet.create_model("vgg11_bn", width=1.0, num_classes=10, head="gap")
    before = big.features[0].weight[54:].clone()
    assert vggnet.models.init_whitening(big, images) == 54  # 27 patch dimensions, each with its negation
    assert torch.equal(big.features[0].weight[54:], before)  # the rest keep their random init
    with pytest.raises(ValueError, match="images"):
        vggnet.models.init_whitening(big, torch.rand(4, 1, 16, 16))
