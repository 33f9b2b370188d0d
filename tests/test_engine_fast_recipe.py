"""The airbench-style training options: lookahead, per-group lr scales, frozen BN scales, logit scale."""

import pytest
import torch
from torch import nn

from vggnet.engine.lookahead import Lookahead
from vggnet.engine.recipe import DEFAULTS, load_recipe
from vggnet.engine.schedule import LRSchedule
from vggnet.engine.trainer import build_optimizer, configure_batch_norm, train
from vggnet.models import create_model, load_checkpoint, save_checkpoint


def tiny(**kw):
    return create_model("vgg11_bn", num_classes=10, width=0.125, head="gap", dropout=0.0, **kw)


def test_lookahead_pulls_fast_weights_to_the_slow_copy():
    net = nn.Linear(2, 1, bias=False)
    net.weight.data.fill_(0.0)
    la = Lookahead(net, every=2, total_steps=4)
    assert la.decay(0) == 0.0 and la.decay(4) == pytest.approx(0.95 ** 2)
    net.weight.data.fill_(1.0)
    la.after_step(1)  # not a multiple of 2: nothing happens
    assert net.weight.data.eq(1.0).all()
    la.after_step(4)  # decay 0.95^2: slow = 0 + (1 - d) * (1 - 0)
    expected = 1 - 0.95 ** 2
    assert torch.allclose(net.weight.data, torch.full((1, 2), expected))
    net.weight.data.fill_(5.0)
    state = la.state_dict()
    la.finish()  # the model becomes the slow copy
    assert torch.allclose(net.weight.data, torch.full((1, 2), expected))
    other = Lookahead(nn.Linear(2, 1, bias=False), every=2, total_steps=4)
    other.load_state_dict(state)
    assert torch.allclose(other.slow["weight"], state["weight"])
    with pytest.raises(ValueError, match="every"):
        Lookahead(net, every=0, total_steps=4)


def test_lookahead_averages_bn_running_stats_too():
    net = nn.BatchNorm2d(3)
    la = Lookahead(net, every=1, total_steps=1)
    net.running_mean.fill_(2.0)
    la.after_step(1)  # decay 0.95 at the end: slow mean = 0.05 * 2
    assert torch.allclose(net.running_mean, torch.full((3,), 0.1))
    assert "num_batches_tracked" not in la.slow  # integer buffers are left alone


def test_bias_lr_scale_and_bias_decay_groups():
    model = tiny()
    cfg = {**DEFAULTS["optim"], "name": "nesterov", "weight_decay": 0.01, "bias_lr_scale": 64.0}
    plain = build_optimizer(model, {**cfg, "decay_biases": False})
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 64.0]
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01, 0.0]
    decayed = build_optimizer(model, {**cfg, "decay_biases": True})
    # same per-step decay (lr x coefficient) as the weights
    assert decayed.param_groups[1]["weight_decay"] * 64 == pytest.approx(0.01)
    assert all(p.ndim <= 1 for p in decayed.param_groups[1]["params"])


def test_frozen_bn_scales_leave_the_optimizer_and_momentum_is_set():
    model = tiny()
    configure_batch_norm(model, freeze_scale=True, momentum=0.4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad and m.momentum == 0.4 for m in bns)
    opt = build_optimizer(model, {**DEFAULTS["optim"]})
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(m.weight) in in_opt for m in bns)


def test_logit_scale_is_part_of_the_model_and_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    plain = tiny().eval()
    scaled = tiny(logit_scale=0.25).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(scaled(x), plain(x) * 0.25, atol=1e-6)
    assert torch.allclose(scaled.forward_head(scaled.forward_features(x), pre_logits=True),
                          plain.forward_head(plain.forward_features(x), pre_logits=True))
    save_checkpoint(scaled, tmp_path / "m.safetensors")
    again, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert again.config.logit_scale == 0.25
    with pytest.raises(ValueError, match="logit_scale"):
        tiny(logit_scale=0.0)


def test_onecycle_starts_at_initial_lr_frac():
    cfg = {**DEFAULTS["schedule"], "name": "onecycle", "epochs": 10, "pct_start": 0.2, "initial_lr_frac": 0.2,
           "final_lr_frac": 0.07}
    s = LRSchedule(cfg, base_lr=1.0, steps_per_epoch=10)
    assert s.lr_at(0) == pytest.approx(0.2) and s.lr_at(20) == pytest.approx(1.0)
    assert s.lr_at(100) == pytest.approx(0.07)


FAST = ["data.dataset=digits", "model.width=0.125", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=2",
        "train.eval_every=1"]


def test_cifar10_recipe_settings_resume_exactly(tmp_path):
    """The committed cifar10 recipe (lookahead, scaled lrs, frozen BN scales) on digits: 1 + resume + 1 = 2."""
    straight, resumed = tmp_path / "s", tmp_path / "r"
    train(load_recipe("cifar10", FAST), straight, progress=False)
    train(load_recipe("cifar10", [*FAST, "train.stop_after_epoch=1"]), resumed, progress=False)
    train(load_recipe("cifar10", FAST), resumed, progress=False)
    a = load_checkpoint(straight / "checkpoints/epoch-0002/model.safetensors")[0].state_dict()
    b = load_checkpoint(resumed / "checkpoints/epoch-0002/model.safetensors")[0].state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    bn_scales = [v for k, v in a.items() if "_bn" in k and k.endswith("weight")]
    assert bn_scales and all(torch.equal(v, torch.ones_like(v)) for v in bn_scales)  # frozen at 1
