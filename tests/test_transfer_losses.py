"""PerceptualLoss: content and style terms against hand-run layers, freezing, modes, pools, loading, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vggnet
from vggnet.data import IMAGENET_MEAN, IMAGENET_STD
from vggnet.losses import PerceptualLoss, gram_matrix

TINY = {"width": 0.125, "fc_width": 32, "num_classes": 3}


def tiny(name: str = "vgg16", seed: int = 0) -> vggnet.VGG:
    torch.manual_seed(seed)
    return vggnet.create_model(name, **TINY)


@pytest.fixture
def model() -> vggnet.VGG:
    return tiny()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def by_hand(model: vggnet.VGG, x: torch.Tensor, names, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Run ``model.features`` child by child on the normalised batch and keep the named outputs."""
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    out = {}
    with torch.no_grad():
        for name, module in model.features.named_children():
            x = module(x)
            if name in names:
                out[name] = x.clone()
    return out


def hand_gram(f: torch.Tensor) -> torch.Tensor:
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def test_gram_matrix_of_a_hand_made_tensor():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # 1×2×1×2: channel rows (1, 2) and (3, 4)
    expected = torch.tensor([[[1 * 1 + 2 * 2, 1 * 3 + 2 * 4], [3 * 1 + 4 * 2, 3 * 3 + 4 * 4]]]) / (2 * 1 * 2)
    torch.testing.assert_close(gram_matrix(f), expected)
    with pytest.raises(ValueError, match="N×C×H×W"):
        gram_matrix(torch.ones(2, 3, 4))


def test_content_loss_equals_hand_computed_weighted_mse(model):
    x, t = images(seed=1), images(seed=2)
    layers, weights = ("relu1_2", "block2_relu2", "relu3_3"), (0.5, 2.0, 1.5)
    loss = PerceptualLoss(model, layers=layers, weights=weights, content_weight=3.0)
    canonical = ("block1_relu2", "block2_relu2", "block3_relu3")
    fx, ft = by_hand(model, x, canonical), by_hand(model, t, canonical)
    expected = 3.0 * sum(w * F.mse_loss(fx[c], ft[c]) for c, w in zip(canonical, weights, strict=True))
    torch.testing.assert_close(loss(x, t), expected)
    parts = loss.components(x, t)
    assert list(parts) == [f"content/{n}" for n in layers]
    torch.testing.assert_close(parts["content/block2_relu2"], F.mse_loss(fx["block2_relu2"], ft["block2_relu2"]))
    # a mapping names layers by any alias; layers left out weigh 1
    by_map = PerceptualLoss(model, layers=layers, weights={"block1_relu2": 0.5, "relu2_2": 2.0})
    expected_map = sum(w * F.mse_loss(fx[c], ft[c]) for c, w in zip(canonical, (0.5, 2.0, 1.0), strict=True))
    torch.testing.assert_close(by_map(x, t), expected_map)


def test_l1_distance_equals_hand_computed(model):
    x, t = images(seed=1), images(seed=2)
    loss = PerceptualLoss(model, layers=["relu2_2"], distance="l1")
    fx, ft = by_hand(model, x, ["block2_relu2"]), by_hand(model, t, ["block2_relu2"])
    torch.testing.assert_close(loss(x, t), F.l1_loss(fx["block2_relu2"], ft["block2_relu2"]))


def test_loss_is_zero_on_the_target_and_grows_with_the_perturbation(model):
    loss = PerceptualLoss(model, style=["relu1_2"])
    x = images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss(x, x), torch.tensor(0.0), rtol=0, atol=1e-12)
    small, large = loss(x + 0.02 * noise, x), loss(x + 0.2 * noise, x)
    assert 0 < small < large


def test_style_loss_equals_hand_computed_gram_mse(model):
    x, t, s = images(seed=1), images(seed=2), images(seed=3)
    style, weights = ("relu1_2", "relu3_3"), (2.0, 0.5)
    loss = PerceptualLoss(model, layers=(), style=style, style_weights=weights, style_weight=10.0)
    canonical = ("block1_relu2", "block3_relu3")
    fx, fs, ft = by_hand(model, x, canonical), by_hand(model, s, canonical), by_hand(model, t, canonical)

    def expected(ref):
        return 10.0 * sum(w * F.mse_loss(hand_gram(fx[c]), hand_gram(ref[c]))
                          for c, w in zip(canonical, weights, strict=True))

    torch.testing.assert_close(loss(x, t, s), expected(fs))
    torch.testing.assert_close(loss(x, t), expected(ft))  # the style target defaults to the target
    # a single style image is compared with every input, and may have another size
    s1 = images(n=1, size=48, seed=4)
    fs1 = by_hand(model, s1, canonical)
    want = 10.0 * sum(w * F.mse_loss(hand_gram(fx[c]), hand_gram(fs1[c]).expand(2, -1, -1))
                      for c, w in zip(canonical, weights, strict=True))
    torch.testing.assert_close(loss(x, t, s1), want)


def test_forward_is_the_weighted_sum_of_the_components(model):
    x, t, s = images(seed=1), images(seed=2), images(seed=3)
    loss = PerceptualLoss(model, layers=["relu2_2", "relu3_3"], weights=[1.0, 4.0], style=["relu1_2", "relu2_2"],
                          style_weights=[3.0, 5.0], content_weight=0.5, style_weight=20.0)
    parts = loss.components(x, t, s)
    assert set(parts) == {"content/relu2_2", "content/relu3_3", "style/relu1_2", "style/relu2_2"}
    expected = (0.5 * (parts["content/relu2_2"] + 4.0 * parts["content/relu3_3"])
                + 20.0 * (3.0 * parts["style/relu1_2"] + 5.0 * parts["style/relu2_2"]))
    torch.testing.assert_close(loss(x, t, s), expected)


def test_features_agree_with_forward_intermediates(model):
    names = ["conv3_3", "block2_pool", "fc7"]
    loss = PerceptualLoss(model, layers=names)
    x = images()
    got = loss.features(x)
    assert list(got) == names
    model.eval()
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.forward_intermediates(normalised, names)
    for name in names:
        torch.testing.assert_close(got[name], want[name])
    assert (got["conv3_3"] < 0).any()  # a conv output, not overwritten by the ReLU after it


def test_input_range_minus_one_one_matches_zero_one(model):
    x, t = images(seed=1), images(seed=2)
    base = PerceptualLoss(model, style=["relu2_2"])(x, t)
    for spec in ((-1, 1), "-1,1"):
        signed = PerceptualLoss(model, style=["relu2_2"], input_range=spec)
        torch.testing.assert_close(signed(x * 2 - 1, t * 2 - 1), base)
    torch.testing.assert_close(PerceptualLoss(model, style=["relu2_2"], input_range="0,1")(x, t), base)


def test_gradients_reach_the_input_only(model):
    loss = PerceptualLoss(model, style=["relu1_2", "relu3_3"])
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    x = images(seed=1).requires_grad_(True)
    t = images(seed=2).requires_grad_(True)  # e.g. a generator's output used as the target
    value = loss(x, t)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    optimiser = torch.optim.SGD([x], lr=1.0)
    optimiser.step()
    assert all(torch.equal(v, before[k]) for k, v in loss.state_dict().items())
    assert loss(x, t) < value  # the step moved the input towards the target


def test_single_forward_pass_when_shapes_allow(model):
    loss = PerceptualLoss(model, style=["relu1_2"])
    batches = []
    loss.net[0].register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    x, t, s = images(seed=1), images(seed=2), images(seed=3)
    with torch.no_grad():
        loss(x, t, s)
    assert batches == [6]  # input, target and style target in one concatenated batch
    batches.clear()
    with torch.no_grad():
        loss(x, t, images(n=1, size=40))
    assert batches == [4, 1]  # a style image of another size runs on its own
    batches.clear()
    loss(x.requires_grad_(True), t, s)
    assert batches == [2, 4]  # with autograd: the input alone, then both targets under no_grad


def test_train_mode_keeps_the_network_in_eval():
    bn = tiny("vgg11_bn")
    with torch.no_grad():  # non-trivial running stats, so train-mode BN would give other values
        for module in bn.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    loss = PerceptualLoss(bn, layers=["relu3_2"])
    x, t = images(seed=1), images(seed=2)
    eval_value = loss(x, t)
    stats = {k: v.clone() for k, v in loss.net.state_dict().items()}
    assert loss.train() is loss
    assert loss.training and not any(m.training for m in loss.net.modules())
    torch.testing.assert_close(loss(x, t), eval_value)
    assert all(torch.equal(v, stats[k]) for k, v in loss.net.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in loss.net.modules())


def test_avg_pool_replaces_every_max_pool(model):
    x, t = images(seed=1), images(seed=2)
    max_loss = PerceptualLoss(model, layers=["relu4_3"])
    avg_loss = PerceptualLoss(model, layers=["relu4_3"], pool="avg")
    assert not any(isinstance(m, nn.MaxPool2d) for m in avg_loss.net.modules())
    pools = [m for m in avg_loss.net.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert not torch.allclose(avg_loss(x, t), max_loss(x, t))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_network_is_a_truncated_private_copy(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = PerceptualLoss(model, layers=["relu2_2"], style=["relu1_2"], pool="avg")
    assert list(loss.net._modules)[-1] == "block2_relu2"  # nothing after the deepest layer is kept
    x = images().requires_grad_(True)
    loss(x, images(seed=2)).backward()
    with torch.no_grad():
        next(loss.net.parameters()).add_(1.0)  # the copy's weights are not the caller's
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(isinstance(model.features[i], nn.MaxPool2d) for i in (4, 9, 16, 23, 30))
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_checkpoint_path_uses_its_mean_and_std(model, tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    path = vggnet.save_checkpoint(model, tmp_path / "tiny.safetensors", {"mean": mean, "std": std, "image_size": 32})
    loss = PerceptualLoss(path, layers=["relu2_2"])
    torch.testing.assert_close(loss.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(loss.std.flatten(), torch.tensor(std))
    x, t = images(seed=1), images(seed=2)
    fx, ft = by_hand(model, x, ["block2_relu2"], mean, std), by_hand(model, t, ["block2_relu2"], mean, std)
    torch.testing.assert_close(loss(x, t), F.mse_loss(fx["block2_relu2"], ft["block2_relu2"]))
    assert not torch.allclose(PerceptualLoss(model, layers=["relu2_2"])(x, t), loss(x, t))  # ImageNet's differ
    explicit = PerceptualLoss(str(tmp_path / "tiny.safetensors"), layers=["relu2_2"], mean=IMAGENET_MEAN)
    torch.testing.assert_close(explicit.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(explicit.std.flatten(), torch.tensor(std))


def test_torchvision_weights_match_torchvision_features():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # random weights, no download; only the features get (cheap) random values
        tv = torchvision.models.vgg16()
    tv = tv.to_empty(device="cpu").eval()
    torch.manual_seed(0)
    for module in tv.features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(module.bias, 0.0, 0.1)
    for param in tv.classifier.parameters():
        nn.init.zeros_(param)
    loss = PerceptualLoss(vggnet.create_model("vgg16", weights=tv.state_dict()), layers=["relu2_2"])
    x, t = images(n=1, seed=1), images(n=1, seed=2)
    norm = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, ft = (tv.features[:9]((v - norm[0]) / norm[1]) for v in (x, t))  # index 8 is relu2_2
    torch.testing.assert_close(loss(x, t), F.mse_loss(fx, ft))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": ["relu9_9"]}, "valid names: block1_conv1"),
    ({"layers": ["relu3_3"], "style": ["nope"]}, "unknown layer name 'nope'"),
    ({"layers": []}, "no layers"),
    ({"layers": ["relu1_2", "relu2_2"], "weights": [1.0]}, "1 values for 2 layers"),
    ({"layers": ["relu1_2"], "weights": {"relu2_2": 1.0}}, "not one of the layers"),
    ({"layers": [], "style": ["relu1_2"], "style_weights": [1.0, 2.0]}, "2 values for 1 layers"),
    ({"layers": ["relu1_2", "block1_relu2"]}, "same layer"),
    ({"style": ["fc7"]}, "Gram matrix needs a conv feature map"),
    ({"input_range": (0, 1, 2)}, "input_range"),
    ({"input_range": (1, 0)}, "low < high"),
    ({"input_range": "0,255"}, "input_range"),
    ({"pool": "min"}, "pool must be one of max, avg"),
    ({"distance": "l2"}, "distance must be one of mse, l1"),
    ({"mean": [0.5, 0.5]}, "mean has 2 values for a 3-channel model"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
])
def test_bad_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerceptualLoss(model, **kwargs)


def test_bad_model_is_refused():
    with pytest.raises(TypeError, match="VGG or a checkpoint path"):
        PerceptualLoss(nn.Conv2d(3, 3, 1))


def test_bad_inputs_are_refused(model):
    loss = PerceptualLoss(model, layers=["relu1_2"], style=["relu1_2"])
    x = images()
    with pytest.raises(ValueError, match=r"input \(2, 3, 32, 32\), target \(2, 3, 16, 16\)"):
        loss(x, images(size=16))
    with pytest.raises(ValueError, match="N×C×H×W"):
        loss(x[0], x[0])
    with pytest.raises(ValueError, match="1 channels; the model takes 3"):
        loss(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="1 channels"):
        loss.features(x[:, :1])
    with pytest.raises(ValueError, match="batch size 3"):
        loss(x, x, images(n=3))
