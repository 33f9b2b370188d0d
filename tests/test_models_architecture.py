"""The zoo builds the paper's networks: counts, layer layout, shapes, heads."""

import pytest
import torch
import torchvision
from torch import nn

import vggnet
from vggnet.models import CONFIGS, PAPER_PARAMS, VGG, VGGConfig, count_macs, count_params
from vggnet.models.configs import PAPER_TABLE2_MILLIONS

TINY = {"width": 1 / 16, "fc_width": 32}


def meta_model(**kw) -> VGG:
    with torch.device("meta"):
        return VGG(VGGConfig(**kw))


@pytest.mark.parametrize("name", ["vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19"])
def test_parameter_counts_round_to_the_papers_table2(name):
    model = meta_model(name=name)
    assert count_params(model) == PAPER_PARAMS[model.config.config]  # the exact count, as built here
    assert round(count_params(model) / 1e6) == PAPER_TABLE2_MILLIONS[model.config.config]  # what the paper prints


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"])
def test_parameter_counts_equal_torchvision(name):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)()
    assert count_params(meta_model(name=name)) == count_params(theirs)


def test_exact_paper_counts_spelled_out():
    assert PAPER_PARAMS == {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
                            "D": 138_357_544, "E": 143_667_240}
    assert PAPER_TABLE2_MILLIONS == {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}


def test_vgg16_macs_match_torchvision_published_figure():
    assert round(count_macs(VGGConfig("vgg16")) / 1e9, 2) == 15.47
    assert count_macs(VGGConfig("vgg16"), 448) > 4 * count_macs(VGGConfig("vgg16"), 224) * 0.99


def test_list_models_has_every_config_and_bn_twin():
    names = vggnet.list_models()
    assert len(names) == 12
    assert {"vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19"} <= set(names)
    assert all(n + "_bn" in names for n in names if not n.endswith("_bn"))


def test_lrn_sits_after_first_conv_of_a_lrn():
    names = meta_model(name="vgg11_lrn").layer_names()
    assert names[:4] == ["block1_conv1", "block1_relu1", "block1_lrn", "block1_pool"]
    assert "block1_lrn" not in meta_model(name="vgg11").layer_names()


def test_config_c_has_1x1_as_last_conv_of_stages_3_to_5():
    model = meta_model(name="vgg16_c")
    for block in (3, 4, 5):
        assert getattr(model.features, f"block{block}_conv3").kernel_size == (1, 1)
        assert getattr(model.features, f"block{block}_conv2").kernel_size == (3, 3)
    assert meta_model(name="vgg16").features.block3_conv3.kernel_size == (3, 3)


DEPTHS = [("A", 11), ("A-LRN", 11), ("B", 13), ("C", 16), ("D", 16), ("E", 19)]


@pytest.mark.parametrize("letter,depth", DEPTHS)
def test_weight_layer_depth_matches_table_1(letter, depth):
    assert sum(isinstance(e, (int, tuple)) for e in CONFIGS[letter]) + 3 == depth


def test_readable_layer_names_and_bn():
    model = meta_model(name="vgg16_bn")
    names = model.layer_names()
    for expected in ("block3_conv2", "block3_bn2", "block5_pool", "fc6", "fc7", "fc8"):
        assert expected in names


@pytest.mark.parametrize("name", ["vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19"])
@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_full_width_shapes_at_every_size(name, head):
    model = meta_model(name=name, head=head, num_classes=7).eval()
    for size in (32, 224, 320, 384):
        assert model(torch.empty(2, 3, size, size, device="meta")).shape == (2, 7)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_lrn_bn", "vgg13", "vgg16_c", "vgg16_bn", "vgg19"])
@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_tiny_models_run_at_every_size(name, head):
    model = vggnet.create_model(name, num_classes=5, head=head, **TINY).eval()
    with torch.no_grad():
        for size in (32, 224, 320, 384):
            out = model(torch.randn(1, 3, size, size))
            assert out.shape == (1, 5) and torch.isfinite(out).all()
    with torch.no_grad():  # non-square input
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 5)


def test_grayscale_input():
    model = vggnet.create_model("vgg11", in_channels=1, num_classes=10, **TINY).eval()
    assert model.features.block1_conv1.in_channels == 1
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 32, 32))


def test_width_quarter_is_d2l_small_vgg():
    model = meta_model(name="vgg11", width=0.25)
    widths = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 64, 128, 128, 128, 128]
    assert model.head.fc6.in_features == 128 * 49 and model.head.fc6.out_features == 4096


def test_invalid_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown model"):
        vggnet.create_model("vgg17")
    with pytest.raises(ValueError, match="unknown head"):
        vggnet.create_model("vgg11", head="mlp", **TINY)
    with pytest.raises(ValueError, match="width"):
        vggnet.create_model("vgg11", width=0)
    with pytest.raises(ValueError, match="unknown init"):
        vggnet.create_model("vgg11", init="orthogonal", **TINY)


@pytest.mark.parametrize("size", [32, 96, 224])
@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_fc_and_conv_heads_give_equal_logits(name, size):
    model = vggnet.create_model(name, width=0.25, fc_width=256, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a = model(x)
        b = model.convert_head("conv")(x)
        c = model.convert_head("fc")(x)
    assert model.config.head == "fc"
    rel = (a - b).abs().max() / a.abs().max()
    assert rel <= 1e-5
    assert torch.equal(a, c)  # fc -> conv -> fc is lossless


def test_dense_head_differs_from_fc_above_224_and_has_score_map():
    model = vggnet.create_model("vgg11", width=0.25, fc_width=64, num_classes=4).eval()
    conv = vggnet.create_model("vgg11", width=0.25, fc_width=64, num_classes=4).eval()
    conv.load_state_dict(model.state_dict())
    conv.convert_head("conv")
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        scores = conv.score_map(x)
        assert scores.shape == (1, 4, 4, 4)  # 10×10 map, 7×7 kernel
        assert torch.allclose(scores.mean(dim=(2, 3)), conv(x), atol=1e-6)
    with pytest.raises(ValueError, match="conv head"):
        model.score_map(x)


def test_gap_head_cannot_be_converted():
    with pytest.raises(ValueError, match="gap"):
        vggnet.create_model("vgg11", head="gap", **TINY).convert_head("conv")


def test_forward_features_head_and_pre_logits():
    model = vggnet.create_model("vgg13", num_classes=3, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert torch.equal(model.forward_head(feats), model(x))
    conv = model.convert_head("conv")
    assert conv.forward_head(conv.forward_features(x), pre_logits=True).shape == (2, 32)


def test_features_by_name():
    model = vggnet.create_model("vgg16", num_classes=3, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model.forward_intermediates(x, ["block3_conv2", "block5_pool", "fc6"])
    assert out["block3_conv2"].shape == (1, 16, 16, 16)
    assert (out["block3_conv2"] < 0).any()  # captured before the in-place ReLU
    assert out["block5_pool"].shape == (1, 32, 2, 2)
    assert out["fc6"].shape == (1, 32)
    assert torch.equal(out["block5_pool"], model.forward_features(x))
    with pytest.raises(ValueError, match="unknown layer"):
        model.forward_intermediates(x, ["conv6_1"])


@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_reset_classifier(head):
    model = vggnet.create_model("vgg11", num_classes=10, head=head, **TINY)
    before = model.features.block1_conv1.weight.clone()
    model.reset_classifier(3)
    assert model.config.num_classes == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert torch.equal(before, model.features.block1_conv1.weight)


def test_grad_checkpointing_gives_the_same_gradients():
    model = vggnet.create_model("vgg13_bn", num_classes=3, dropout=0.0, **TINY).train()
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    plain = model.features.block1_conv1.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert len(model.blocks()) == 5
    assert torch.allclose(plain, model.features.block1_conv1.weight.grad, atol=1e-6)


def test_channel_lrn_is_torch_lrn_in_any_memory_format():
    from torch import nn

    from vggnet.models.configs import LRN
    from vggnet.models.vgg import ChannelLRN

    ref, fast = nn.LocalResponseNorm(**LRN), ChannelLRN(**LRN)
    for channels in (1, 3, 16, 64):
        x = torch.randn(2, channels, 9, 7) * 4
        for y in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.allclose(fast(y), ref(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    fast(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    assert torch.allclose(grad, x.grad, rtol=1e-4, atol=1e-6)
    assert fast(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
