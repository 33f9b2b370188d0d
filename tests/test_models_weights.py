"""Weights: torchvision / timm interop, checkpoints, clear errors."""

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import vggnet
from vggnet.models import WeightsError, detect_format, load_checkpoint, save_checkpoint

TINY = {"width": 0.25, "fc_width": 64}
TV_NAMES = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so a mis-mapped BN layer would show in the logits."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name", TV_NAMES)
def test_torchvision_state_dicts_give_the_same_logits(name):
    theirs = getattr(torchvision.models, name)(num_classes=10).eval()
    randomize_bn(theirs)
    ours = vggnet.create_model(name, num_classes=10, weights=theirs.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max() <= 1e-5
        assert (ours.convert_head("conv")(x) - expected).abs().max() <= 1e-5
    assert expected.abs().max() > 1e-4  # the comparison is not between zeros


def test_torchvision_weights_from_files_in_any_key_order(tmp_path):
    theirs = torchvision.models.vgg11_bn(num_classes=10).eval()
    randomize_bn(theirs)
    pth, st = tmp_path / "tv.pth", tmp_path / "tv.safetensors"
    torch.save({"state_dict": theirs.state_dict()}, pth)
    save_file(dict(sorted(theirs.state_dict().items())), st)  # text order: features.10 < features.2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        for path in (pth, st):
            ours = vggnet.create_model("vgg11_bn", num_classes=10, weights=path).eval()
            assert (ours(x) - expected).abs().max() <= 1e-5


def test_torchvision_vgg16_at_224():
    theirs = torchvision.models.vgg16(num_classes=10).eval()
    ours = vggnet.create_model("vgg16", num_classes=10, head="conv", weights=theirs.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["vgg11", "vgg13_bn", "vgg16", "vgg19_bn"])
def test_timm_state_dicts_give_the_same_logits(name):
    theirs = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomize_bn(theirs)
    assert detect_format(theirs.state_dict()) == "timm"
    x224, x320 = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        # timm's head is fully convolutional: it equals our conv head at every size
        conv = vggnet.create_model(name, num_classes=10, head="conv", weights=theirs.state_dict()).eval()
        assert (conv(x224) - theirs(x224)).abs().max() <= 1e-5
        assert (conv(x320) - theirs(x320)).abs().max() <= 1e-5
        fc = vggnet.create_model(name, num_classes=10, head="fc", weights=theirs.state_dict()).eval()
        assert (fc(x224) - theirs(x224)).abs().max() <= 1e-5


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    model = vggnet.create_model("vgg16_c_bn", num_classes=7, in_channels=1, head="gap", **TINY).eval()
    randomize_bn(model)
    path = save_checkpoint(model, tmp_path / "run" / "best.safetensors", {"classes": list("abcdefg")})
    loaded, extra = load_checkpoint(path)
    assert loaded.config == model.config
    assert extra == {"classes": list("abcdefg")}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_checkpoint_loads_across_fc_and_conv_heads(tmp_path):
    model = vggnet.create_model("vgg11", num_classes=4, **TINY).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    conv = vggnet.create_model("vgg11", num_classes=4, head="conv", weights=path, **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert ((conv(x) - model(x)).abs().max() / model(x).abs().max()) <= 1e-5


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        vggnet.create_model("vgg11", weights=tmp_path / "nope.safetensors", **TINY)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_files_are_clear_errors(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(WeightsError, match="bad"):
        vggnet.create_model("vgg11", weights=bad, **TINY)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(vggnet.create_model("vgg11", **TINY), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="safetensors"):
        load_checkpoint(path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": print}, path)  # needs full unpickling
    with pytest.raises(WeightsError, match="weights-only"):
        vggnet.create_model("vgg11", weights=path, **TINY)


def test_wrong_architecture_is_a_clear_error():
    tv = torchvision.models.vgg11(num_classes=10).state_dict()
    with pytest.raises(WeightsError, match="weighted layers"):
        vggnet.create_model("vgg16", num_classes=10, weights=tv)
    with pytest.raises(WeightsError, match="weighted layers"):
        vggnet.create_model("vgg11_bn", num_classes=10, weights=tv)
    with pytest.raises(WeightsError, match="num_classes"):
        vggnet.create_model("vgg11", num_classes=1000, weights=tv)
    with pytest.raises(WeightsError, match="shape"):
        vggnet.create_model("vgg11", num_classes=10, width=0.5, weights=tv)


def test_vgg16_weights_do_not_fit_config_c():
    d = vggnet.create_model("vgg16", num_classes=3, **TINY).state_dict()
    with pytest.raises(WeightsError, match="block3_conv3"):
        vggnet.create_model("vgg16_c", num_classes=3, weights=d, **TINY)


def test_unrecognised_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="unrecognised"):
        vggnet.create_model("vgg11", weights={"conv.weight": torch.zeros(3)}, **TINY)


def test_non_vggnet_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="not a vggnet checkpoint"):
        load_checkpoint(path)
