"""Layers by the names the ecosystem uses: vggnet's, style-transfer / LPIPS (Caffe) and torchvision's index."""

import pytest
import torch
import torchvision

import vggnet

TINY = {"width": 0.125, "fc_width": 32}


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_aliases_match_torchvision_indices(name):
    """features.N and relu3_3 reach the same activation as torchvision's features[:N+1]."""
    theirs = getattr(torchvision.models, name)(num_classes=3).eval()
    ours = vggnet.create_model(name, num_classes=3, weights=theirs.state_dict()).eval()
    relu33 = ours.layers_through("relu3_3")
    index = len(relu33) - 1  # 15 for vgg16, 22 for vgg16_bn
    assert index == (22 if name.endswith("_bn") else 15)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.features[: index + 1](x)
        got = ours.forward_intermediates(x, ["relu3_3", f"features.{index}", "block3_relu3"])
    for key, value in got.items():
        assert torch.allclose(value, expected, atol=1e-5), key


def test_alias_table():
    model = vggnet.create_model("vgg16_bn", num_classes=3, **TINY)
    a = model.layer_aliases()
    assert a["conv3_3"] == "block3_conv3" and a["bn3_3"] == "block3_bn3" and a["relu3_3"] == "block3_relu3"
    assert a["pool5"] == "block5_pool" and a["block2"] == "block2_pool" and a["classifier"] == "fc8"
    assert a["features.0"] == "block1_conv1" and a["features.43"] == "block5_pool"
    assert model.resolve_layer("fc7") == "fc7" and model.resolve_layer("relu7") == "relu7"
    gap = vggnet.create_model("vgg11", num_classes=3, head="gap", **TINY)
    assert gap.resolve_layer("classifier") == "fc"
    lrn = vggnet.create_model("vgg11_lrn", num_classes=3, **TINY)
    assert lrn.resolve_layer("lrn1") == "block1_lrn"


def test_unknown_layer_lists_the_valid_ones():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    with pytest.raises(ValueError, match=r"unknown layer name 'conv3_3'.*block3_conv2.*fc7"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), ["conv3_3"])  # vgg11 has two convs in block 3


@pytest.mark.parametrize("bn", [False, True])
def test_outputs_before_an_inplace_relu_are_what_the_layer_produced(bn):
    model = vggnet.create_model("vgg11_bn" if bn else "vgg11", num_classes=3, **TINY).eval()
    if bn:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    pre = "bn2_1" if bn else "conv2_1"
    got = model.forward_intermediates(x, [pre, "relu2_1", "fc6", "relu6"])
    with torch.no_grad():
        layers = dict(model.named_layers())
        ref = model.layers_through(pre)
        y = x
        for _, module in ref:
            y = module(y) if not isinstance(module, torch.nn.ReLU) else torch.relu(y)
    assert (got[pre] < 0).any()  # not rectified later by relu2_1
    assert torch.allclose(got[pre], y, atol=1e-6)
    assert torch.equal(got["relu2_1"], torch.relu(got[pre]))
    assert (got["fc6"] < 0).any() and torch.equal(got["relu6"], torch.relu(got["fc6"]))
    assert isinstance(layers["relu6"], torch.nn.ReLU) and layers["relu6"].inplace  # the hazard is real


def test_only_layers_up_to_the_deepest_run():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY).eval()
    ran = []
    for name, module in model.named_layers():
        module.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    out = model.forward_intermediates(torch.randn(1, 3, 32, 32), ["pool2", "conv2_1"])
    assert set(out) == {"pool2", "conv2_1"}
    assert ran[-1] == "block2_pool" and "block3_conv1" not in ran


def test_gradients_flow_through_intermediates():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model.forward_intermediates(x, ["conv2_1"])["conv2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_layers_through():
    model = vggnet.create_model("vgg16", num_classes=3, **TINY)
    assert [n for n, _ in model.layers_through("block2")][-1] == "block2_pool"
    assert [n for n, _ in model.layers_through("features")][-1] == "block5_pool"
    assert [n for n, _ in model.layers_through("fc7")][-1] == "fc7"
    with pytest.raises(ValueError, match="unknown layer"):
        model.layers_through("block6")
