"""Fine-tuning in the engine: weights from vggnet / torchvision / timm files, classifier reset, freezing,
frozen BN statistics, per-part learning rates, the finetune recipe's values read from the weights."""

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import vggnet
from vggnet.engine.finetune import freeze, lr_multipliers, resolve_recipe
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import build_optimizer, train
from vggnet.models import WeightsError, load_checkpoint
from vggnet.models.pretrained import inspect_weights, load_backbone

FAST = ["data.dataset=digits", "data.val_fraction=0.2", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "schedule.min_steps=0"]  # one epoch, not the recipe's 300-step floor
ARCH = {"width": 0.125, "fc_width": 32}


def source_checkpoint(path, name="vgg11_bn", classes=None, head="fc"):
    """A tiny vggnet checkpoint with non-trivial BN statistics, as a trained source net would have."""
    torch.manual_seed(1)
    model = vggnet.create_model(name, num_classes=len(classes or range(10)), head=head, **ARCH)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    meta = {"classes": classes or [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.5] * 3,
            "image_size": 32}
    return vggnet.save_checkpoint(model, path, meta), model


def finetune(*overrides):
    return load_recipe("finetune", [*FAST, *overrides])


def test_recipe_reads_architecture_and_preprocessing_from_the_weights(tmp_path):
    ckpt, _ = source_checkpoint(tmp_path / "src.safetensors", "vgg13_bn")
    recipe, pretrained = resolve_recipe(finetune(f"model.weights={ckpt}"))
    assert recipe["model"]["name"] == "vgg13_bn" and recipe["model"]["width"] == 0.125
    assert recipe["model"]["head"] == "fc" and recipe["model"]["fc_width"] == 32
    assert recipe["data"]["mean"] == [0.5] * 3 and recipe["data"]["image_size"] == 32
    assert pretrained is not None and pretrained.info.format == "vggnet"


def test_torchvision_weights_imply_imagenet_preprocessing_at_224(tmp_path):
    tv = torchvision.models.vgg11_bn(num_classes=7)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    recipe, pretrained = resolve_recipe(finetune(f"model.weights={path}"))
    assert recipe["model"]["name"] == "vgg11_bn" and recipe["model"]["width"] == 1.0
    assert recipe["model"]["head"] == "fc" and recipe["model"]["fc_width"] == 4096
    assert recipe["data"]["mean"] == [0.485, 0.456, 0.406] and recipe["data"]["image_size"] == 224
    assert pretrained.info.classes is None and pretrained.info.config["num_classes"] == 7


@pytest.mark.parametrize("name", ["vgg11", "vgg13_bn", "vgg16", "vgg19_bn"])
def test_architecture_is_read_from_torchvision_and_timm_tensors(name):
    tv = getattr(torchvision.models, name)(num_classes=4)
    assert inspect_weights(tv.state_dict())[1].config["name"] == name
    tm = timm.create_model(name, num_classes=4, pretrained=False)
    info = inspect_weights(tm.state_dict())[1]
    assert info.config["name"] == name and info.config["head"] == "conv"


def test_config_c_and_width_are_read_from_a_bare_state_dict():
    model = vggnet.create_model("vgg16_c", num_classes=3, width=0.25, head="gap")
    info = inspect_weights(model.state_dict())[1]
    assert info.config == {"name": "vgg16_c", "width": 0.25, "head": "gap", "in_channels": 3, "num_classes": 3}


def test_null_keys_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="--weights"):
        resolve_recipe(finetune())


def test_classifier_reset_for_other_classes_and_backbone_loaded(tmp_path, capsys):
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors", classes=list("abcde"))
    out = tmp_path / "run"
    train(finetune(f"model.weights={ckpt}", "train.stop_after_epoch=1", "optim.lr=0"), out)
    log = capsys.readouterr().out
    assert "classifier fc8 re-initialised for 10 classes" in log
    model, extra = load_checkpoint(out / "last.safetensors")
    assert extra["weights"] == {"source": str(ckpt), "format": "vggnet"}
    assert model.config.num_classes == 10
    ours, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(ours["features.block1_conv1.weight"], theirs["features.block1_conv1.weight"])  # lr 0
    assert torch.equal(ours["head.fc7.weight"], theirs["head.fc7.weight"])
    assert ours["head.fc8.weight"].shape == (10, 32)


def test_same_classes_keep_the_classifier(tmp_path):
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors")
    model = vggnet.create_model("vgg11_bn", num_classes=10, **ARCH)
    assert load_backbone(model, source.state_dict()) is True
    assert torch.equal(model.head.fc8.weight, source.head.fc8.weight)
    fresh = vggnet.create_model("vgg11_bn", num_classes=10, **ARCH)
    assert load_backbone(fresh, source.state_dict(), keep_classifier=False) is False
    assert not torch.equal(fresh.head.fc8.weight, source.head.fc8.weight)  # re-initialised, N(0, 0.01)
    assert fresh.head.fc8.bias.abs().sum() == 0 and fresh.head.fc8.weight.std() < 0.02
    assert torch.equal(fresh.head.fc7.weight, source.head.fc7.weight)


@pytest.mark.parametrize("other, match", [("vgg13_bn", r"do not fit vgg13_bn.*missing \['features.block1_conv2"),
                                          ("vgg11", r"do not fit vgg11 .*unexpected \['features.block1_bn1")])
def test_backbone_of_another_architecture_is_refused(tmp_path, other, match):
    ckpt, _ = source_checkpoint(tmp_path / "src.safetensors")
    with pytest.raises(WeightsError, match=match):
        train(finetune(f"model.weights={ckpt}", f"model.name={other}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_torchvision_file_of_another_depth_is_refused(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.vgg11(num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match="torchvision weights have 11 weighted layers but vgg13"):
        train(finetune(f"model.weights={path}", "model.name=vgg13"), tmp_path / "run")


def test_backbone_of_another_width_names_the_layer(tmp_path):
    ckpt, _ = source_checkpoint(tmp_path / "src.safetensors")
    with pytest.raises(WeightsError, match=r"features\.block1_[\w.]+: weights have shape \(8.*\), model needs \(16"):
        train(finetune(f"model.weights={ckpt}", "model.width=0.25"), tmp_path / "run")


def test_torchvision_file_finetunes_end_to_end(tmp_path, capsys):
    tv = torchvision.models.vgg11(num_classes=1000)
    small = vggnet.create_model("vgg11", num_classes=1000, **ARCH)  # a torchvision-format file at tiny width
    keys = list(tv.state_dict())
    state = dict(zip(keys, small.state_dict().values(), strict=True))
    path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    out = tmp_path / "run"
    train(finetune(f"model.weights={path}", "data.image_size=32", "model.freeze=block2"), out)
    log = capsys.readouterr().out
    assert "torchvision vgg11 width 0.125" in log and "re-initialised for 10 classes" in log
    model, extra = load_checkpoint(out / "last.safetensors")
    assert extra["mean"] == [0.485, 0.456, 0.406]  # the weights' own normalisation
    assert torch.equal(model.features.block2_conv1.weight, small.features.block2_conv1.weight)


def test_frozen_parameters_stay_bit_identical(tmp_path):
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors", classes=list("abcde"))
    out = tmp_path / "run"
    train(finetune(f"model.weights={ckpt}", "model.freeze=block3", "train.ema=0.9", "train.lookahead=2",
                   "optim.weight_decay=0.01", "schedule.epochs=2"), out)
    model, _ = load_checkpoint(out / "last.safetensors")
    ours, theirs = model.state_dict(), source.state_dict()
    frozen = [k for k in ours if k.split(".")[1].startswith(("block1", "block2", "block3"))
              and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(frozen) == 16  # weight and bias of the 4 convs and 4 BNs in vgg11_bn blocks 1-3
    for key in frozen:
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["features.block4_conv1.weight"], theirs["features.block4_conv1.weight"])
    # without freeze_bn the frozen blocks' BN statistics follow the new data
    assert not torch.equal(ours["features.block1_bn1.running_mean"], theirs["features.block1_bn1.running_mean"])


def test_freeze_bn_keeps_the_statistics_of_frozen_blocks(tmp_path):
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors", classes=list("abcde"))
    out = tmp_path / "run"
    train(finetune(f"model.weights={ckpt}", "model.freeze=block2", "model.freeze_bn=true"), out)
    model, _ = load_checkpoint(out / "last.safetensors")
    ours, theirs = model.state_dict(), source.state_dict()
    for key in ("features.block1_bn1.running_mean", "features.block2_bn1.running_var"):
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["features.block3_bn1.running_mean"], theirs["features.block3_bn1.running_mean"])


def test_freeze_errors():
    model = vggnet.create_model("vgg11_bn", num_classes=3, **ARCH)
    with pytest.raises(ValueError, match="whole network"):
        freeze(model, "fc8", False)
    with pytest.raises(ValueError, match="whole network"):
        freeze(model, "head", False)
    with pytest.raises(ValueError, match="set model.freeze too"):
        freeze(model, None, True)
    with pytest.raises(ValueError, match="unknown layer"):
        freeze(model, "block7", False)
    names, bns = freeze(model, "fc6", True)
    assert names[-1] == "fc6" and len(bns) == 8
    assert not model.head.fc6.weight.requires_grad and model.head.fc7.weight.requires_grad


def test_lr_multipliers_most_specific_wins():
    model = vggnet.create_model("vgg11_bn", num_classes=3, **ARCH)
    mults = lr_multipliers(model, {"features": 0.1, "block5": 0.5, "block5_conv2": 0.7, "head": 2.0,
                                   "fc7": 3.0})
    assert mults["features.block1_conv1.weight"] == 0.1
    assert mults["features.block5_conv1.weight"] == 0.5 and mults["features.block5_bn1.bias"] == 0.5
    assert mults["features.block5_conv2.weight"] == 0.7
    assert mults["head.fc6.weight"] == 2.0 and mults["head.fc7.bias"] == 3.0 and mults["head.fc8.bias"] == 2.0
    last = lr_multipliers(model, {"head": 0.5, "classifier": 10})  # classifier: the last layer, as everywhere
    assert last["head.fc8.weight"] == 10 and last["head.fc6.weight"] == 0.5
    assert set(lr_multipliers(model, None).values()) == {1.0}
    assert lr_multipliers(model, {"conv5_2": 0.2})["features.block5_conv2.weight"] == 0.2  # aliases too
    with pytest.raises(ValueError, match="unknown key 'blocks'"):
        lr_multipliers(model, {"blocks": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        lr_multipliers(model, {"features": -1})
    with pytest.raises(ValueError, match="block5_pool has no parameters"):
        lr_multipliers(model, {"pool5": 0})


def test_optimizer_groups_carry_the_multipliers():
    model = vggnet.create_model("vgg11_bn", num_classes=3, **ARCH)
    freeze(model, "block1", False)
    cfg = load_recipe("finetune", ["optim.lr_mult={features: 0.1, fc8: 2}"])["optim"]
    opt = build_optimizer(model, cfg)
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scales[id(model.features.block2_conv1.weight)] == 0.1
    assert scales[id(model.head.fc6.weight)] == 1.0 and scales[id(model.head.fc8.weight)] == 2.0
    assert id(model.features.block1_conv1.weight) not in scales  # frozen: in no group
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.features.block2_conv1.bias)] == 0.0 and decay[id(model.head.fc8.weight)] > 0


def test_lr_mult_is_applied_in_training(tmp_path):
    """With features at multiplier 0 nothing in them moves, while the head trains."""
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors", classes=list("abcde"))
    out = tmp_path / "run"
    train(finetune(f"model.weights={ckpt}", "optim.lr_mult={features: 0}", "optim.weight_decay=0.01"), out)
    model, _ = load_checkpoint(out / "last.safetensors")
    assert torch.equal(model.features.block4_conv2.weight, source.features.block4_conv2.weight)
    assert not torch.equal(model.head.fc7.weight, source.head.fc7.weight)


def test_lr_mult_override_merges_with_the_recipe():
    recipe = load_recipe("finetune", ["optim.lr_mult.block5=0.5"])
    assert recipe["optim"]["lr_mult"] == {"features": 0.1, "block5": 0.5}
    assert load_recipe("finetune", ["optim.lr_mult=null"])["optim"]["lr_mult"] is None
    with pytest.raises(ValueError, match="must be a mapping"):
        load_recipe("finetune", ["optim.lr_mult=0.1"])


def test_checkpoint_without_preprocessing_is_not_given_imagenet_values(tmp_path):
    model = vggnet.create_model("vgg11_bn", num_classes=3, **ARCH)
    bare = vggnet.save_checkpoint(model, tmp_path / "bare.safetensors")  # no mean / std / image_size
    with pytest.raises(WeightsError, match="does not record its mean, std, image_size"):
        resolve_recipe(finetune(f"model.weights={bare}"))
    given = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.image_size=32"]
    recipe, _ = resolve_recipe(finetune(f"model.weights={bare}", *given))  # fine once the recipe says them
    assert recipe["model"]["name"] == "vgg11_bn"


def test_same_class_count_other_names_resets_the_classifier(tmp_path, capsys):
    ckpt, source = source_checkpoint(tmp_path / "src.safetensors", classes=[f"c{i}" for i in range(10)])
    train(finetune(f"model.weights={ckpt}", "optim.lr=0"), tmp_path / "run")
    assert "classifier fc8 re-initialised for 10 classes" in capsys.readouterr().out
    model, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert not torch.equal(model.head.fc8.weight, source.head.fc8.weight)
    assert model.head.fc8.weight.std() < 0.02  # VGG.reset_classifier's N(0, 0.01), as documented
    assert torch.equal(model.head.fc7.weight, source.head.fc7.weight)


def test_weights_and_init_from_together_are_refused(tmp_path):
    ckpt, _ = source_checkpoint(tmp_path / "src.safetensors")
    with pytest.raises(ValueError, match="give one of them"):
        resolve_recipe(finetune(f"model.weights={ckpt}", f"model.init_from={ckpt}"))


def test_finetune_resumes_without_the_weights_file(tmp_path):
    ckpt, _ = source_checkpoint(tmp_path / "src.safetensors", classes=list("abcde"))
    args = [f"model.weights={ckpt}", "model.freeze=block2", "schedule.epochs=2"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(finetune(*args), straight)
    train(finetune(*args, "train.stop_after_epoch=1"), resumed)
    ckpt.rename(tmp_path / "moved.safetensors")  # a downloaded file deleted since: resume needs only the run
    train(finetune(*args), resumed)
    assert load_checkpoint(resumed / "last.safetensors")[1]["weights"]["source"] == str(ckpt)
    a, _ = load_checkpoint(straight / "last.safetensors")
    b, _ = load_checkpoint(resumed / "last.safetensors")
    for key, value in a.state_dict().items():
        assert torch.allclose(value.float(), b.state_dict()[key].float(), atol=1e-6), key
