"""Filter pruning and knowledge distillation on tiny models (the digits demo at width 0.125, 32 px)."""

import json

import pytest
import torch
import torch.nn.functional as F

import vggnet
from vggnet.cli import main
from vggnet.compress.distill import DistillLoss, DistillSettings, distill, kd_loss
from vggnet.compress.prune import PruneSettings, apply, filter_scores, plan, prune, prune_run, ratio_for_macs
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.models import count_macs, load_checkpoint

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false"]
META = {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32}


def tiny(head="fc", name="vgg11_bn", classes=10):
    torch.manual_seed(0)
    model = vggnet.create_model(name, num_classes=classes, width=0.125, head=head, fc_width=32).eval()
    for m in model.modules():  # BN with non-trivial statistics and scales, so pruning mistakes show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.1, 2)
    return model


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A trained demo run (2 epochs): the source of pruning and the teacher of distillation."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(load_recipe("demo", [*FAST, "schedule.epochs=2"]), out, progress=False)
    return out


# ---- pruning ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_ratio_zero_leaves_the_logits_unchanged(head):
    model = tiny(head)
    x = torch.randn(3, 3, 32, 32)
    same = prune(model, 0.0)
    assert same.config.channels == tuple(m.out_channels for _, m in same.features.named_children()
                                         if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_pruned_shapes_follow_the_kept_filters_through_bn_next_conv_and_fc6(head):
    model = tiny(head)
    pruned = prune(model, 0.5)
    widths = [m.out_channels for _, m in model.features.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert list(pruned.config.channels) == [w - round(0.5 * w) for w in widths]
    layers = dict(pruned.features.named_children())
    assert layers["block2_conv1"].in_channels == pruned.config.channels[0]
    assert layers["block1_bn1"].num_features == pruned.config.channels[0]
    last = pruned.config.channels[-1]
    fc6 = pruned.head.fc6 if head != "gap" else pruned.head.fc
    assert (fc6.in_channels if head == "conv" else fc6.in_features) == last * (49 if head == "fc" else 1)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(pruned, 32) < 0.4 * count_macs(model, 32)  # about a quarter: both sides of each conv halve


def test_the_kept_filters_are_the_highest_scoring_and_the_function_is_theirs():
    """Pruning only the last conv, by hand: the pruned net must equal the original with those filters' outputs
    zeroed — provided the pruned channels pass nothing on (their BN shift is set so that ReLU kills them)."""
    model = tiny("fc")
    scores = filter_scores(model, "l1")["block5_conv2"]
    keep = plan(model, {"block5_conv2": 0.25})
    kept = keep["block5_conv2"]
    assert set(kept.tolist()) == set(torch.topk(scores, len(kept)).indices.tolist())
    dropped = sorted(set(range(len(scores))) - set(kept.tolist()))
    bn = dict(model.features.named_children())["block5_bn2"]
    with torch.no_grad():
        bn.weight[dropped] = 0
        bn.bias[dropped] = -1  # ReLU(-1) = 0: these channels contribute nothing to fc6
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(apply(model, keep)(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_criterion_ranks_by_the_batch_norm_scale():
    model = tiny()
    bn = dict(model.features.named_children())["block1_bn1"]
    assert torch.equal(filter_scores(model, "bn")["block1_conv1"], bn.weight.detach().abs())
    with pytest.raises(ValueError, match="no batch norm"):
        filter_scores(vggnet.create_model("vgg11", width=0.125, num_classes=3), "bn")


def test_global_scope_keeps_a_floor_in_every_layer_and_hits_the_ratio():
    model = tiny()
    with torch.no_grad():  # one layer far weaker than the rest: a global ranking would empty it
        dict(model.features.named_children())["block3_conv1"].weight.mul_(1e-3)
    keep = plan(model, 0.5, scope="global", min_keep=0.25)
    total = sum(m.out_channels for _, m in model.features.named_children() if isinstance(m, torch.nn.Conv2d))
    assert abs(sum(len(k) for k in keep.values()) - total / 2) <= 0.1 * total
    assert len(keep["block3_conv1"]) >= 0.25 * 32


def test_macs_target_finds_a_ratio_that_meets_it():
    model = tiny()
    ratio = ratio_for_macs(model, 0.5, 32)
    assert count_macs(prune(model, ratio), 32) <= 0.5 * count_macs(model, 32)
    assert count_macs(prune(model, max(0.0, ratio - 0.02)), 32) > 0.5 * count_macs(model, 32)  # the smallest


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratios_outside_the_range_are_refused(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune(tiny(), ratio)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        PruneSettings(source="x", ratio=ratio)


def test_a_ratio_that_empties_a_layer_is_refused_naming_it():
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.03)  # block1_conv1 has 2 filters
    with pytest.raises(ValueError, match="all 2 filters of block1_conv1"):
        prune(model, 0.8)
    with pytest.raises(ValueError, match="unknown conv"):
        plan(tiny(), {"block9_conv1": 0.5})


def test_a_pruned_model_saves_loads_and_exports(tmp_path):
    pruned = prune(tiny(), 0.5)
    vggnet.save_checkpoint(pruned, tmp_path / "p.safetensors", META)
    again, _ = load_checkpoint(tmp_path / "p.safetensors")
    assert again.config == pruned.config and again.config.channels == pruned.config.channels
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), pruned(x))
    from vggnet.export import export_model, load_exported

    report = export_model(tmp_path / "p.safetensors", "onnx", tmp_path / "p.onnx")
    assert max(report.max_rel_error.values()) <= 1e-4
    assert load_exported(tmp_path / "p.onnx").prep.num_classes == 10


def test_a_pruned_model_serves(tmp_path):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from vggnet.infer import Predictor
    from vggnet.serve import ModelRepository, ServeSettings, create_app

    pruned = prune(tiny(), 0.5)
    vggnet.save_checkpoint(pruned, tmp_path / "pruned" / "1" / "best.safetensors", META)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, "PNG")
    app = create_app(ModelRepository.from_dir(tmp_path), ServeSettings(load_in_background=False))
    with TestClient(app) as client:
        reply = client.post("/predict?model=pruned&topk=1", content=buf.getvalue(),
                            headers={"Content-Type": "image/png"})
    assert reply.status_code == 200, reply.text
    expected = Predictor.from_checkpoint(tmp_path / "pruned" / "1").predict([Image.open(buf)], topk=3)[0]
    assert [p["label"] for p in reply.json()["predictions"]] == [label for label, _ in expected][:1]


def test_prune_run_fine_tunes_resumes_and_refuses_other_settings(teacher_run, tmp_path):
    out = tmp_path / "p"
    settings = PruneSettings(source=str(teacher_run), ratio=0.5)
    result = prune_run(settings, out, epochs=1, progress=False, log=lambda _: None)
    assert result["macs_kept"] < 0.4 and (out / "best.safetensors").is_file()
    model, extra = load_checkpoint(out / "best.safetensors")
    assert model.config.channels == tuple(after for _, after in result["widths"].values())
    assert json.loads((out / "prune.json").read_text())["settings"] == {**settings.__dict__}
    again = prune_run(settings, out, epochs=2, progress=False, log=lambda _: None)  # one more epoch, resumed
    assert again["finetune"]["epoch"] == 2
    assert len(list((out / "checkpoints").iterdir())) >= 1
    with pytest.raises(ValueError, match="new --out"):
        prune_run(PruneSettings(source=str(teacher_run), ratio=0.3), out, epochs=1, progress=False,
                  log=lambda _: None)


def test_prune_cli_prunes_only_with_zero_epochs(teacher_run, tmp_path, capsys):
    assert main(["compress", "prune", "--ckpt", str(teacher_run), "--macs-reduction", "0.5", "--epochs", "0",
                 "--out", str(tmp_path / "p")]) == 0
    report = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert report["macs_kept"] <= 0.5
    assert not (tmp_path / "p" / "best.safetensors").exists()
    assert main(["compress", "prune", "--ckpt", str(teacher_run), "--ratio", "1.2", "--out",
                 str(tmp_path / "q")]) == 2
    assert "(0, 1)" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ---- distillation -----------------------------------------------------------------------------------------------

def test_kd_loss_on_hand_made_logits():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    T = 4.0
    p, q = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    soft = (p * (p.log() - q)).sum() * T * T
    hard = -F.log_softmax(s, 1)[0, 0]
    torch.testing.assert_close(kd_loss(s, t, y, T, 0.9), 0.9 * soft + 0.1 * hard)
    torch.testing.assert_close(kd_loss(s, t, y, T, 0.0), hard)
    assert kd_loss(t, t, y, T, 1.0).abs() < 1e-6  # the student that copies the teacher pays nothing


def test_distill_loss_runs_the_frozen_teacher_on_the_batch():
    teacher = tiny("gap")
    loss = DistillLoss(teacher, 2.0, 1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        target = teacher(x)
    assert loss(target.clone(), torch.zeros(4, dtype=torch.long), x).abs() < 1e-6
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_trains_resumes_and_refuses_other_settings(teacher_run, tmp_path):
    student = load_recipe("demo", [*FAST, "model.width=0.0625", "schedule.epochs=1"])
    out = tmp_path / "kd"
    result = distill(student, DistillSettings(str(teacher_run)), out, progress=False)
    assert result["epoch"] == 1 and (out / "best.safetensors").is_file()
    assert json.loads((out / "distill.json").read_text())["temperature"] == 4.0
    longer = load_recipe("demo", [*FAST, "model.width=0.0625", "schedule.epochs=2"])
    assert distill(longer, DistillSettings(str(teacher_run)), out, progress=False)["epoch"] == 2
    with pytest.raises(ValueError, match="new --out"):
        distill(longer, DistillSettings(str(teacher_run), temperature=2.0), out, progress=False)


def test_distillation_moves_the_student_toward_the_teacher(teacher_run, tmp_path):
    """Same student, seed and steps, trained once on the teacher's soft targets (alpha 1) and once on the labels:
    on the held-out split the distilled one is the closer to the teacher, KL(teacher || student) at T = 1."""
    from vggnet.engine.distributed import Dist
    from vggnet.engine.inputs import build_inputs

    student = load_recipe("demo", [*FAST, "model.width=0.0625", "schedule.epochs=1"])
    distill(student, DistillSettings(str(teacher_run), temperature=4.0, alpha=1.0), tmp_path / "kd", progress=False)
    train(student, tmp_path / "ce", progress=False)
    teacher, _ = load_checkpoint(teacher_run / "last.safetensors")
    held_out = build_inputs(student, Dist()).val

    def kl_to_teacher(run: str) -> float:
        model, _ = load_checkpoint(tmp_path / run / "last.safetensors")
        total, n = 0.0, 0
        with torch.no_grad():
            for images, _ in held_out:
                t, s = F.log_softmax(teacher.eval()(images), 1), F.log_softmax(model.eval()(images), 1)
                total += float(F.kl_div(s, t, reduction="sum", log_target=True))
                n += len(images)
        return total / n

    distilled, plain = kl_to_teacher("kd"), kl_to_teacher("ce")
    assert distilled < 0.9 * plain, (distilled, plain)  # 0.88 vs 1.12 here


def test_a_teacher_with_other_classes_is_refused_before_anything_is_written(tmp_path):
    other = tiny("gap", classes=4)
    vggnet.save_checkpoint(other, tmp_path / "t.safetensors", {**META, "classes": list("abcd")})
    student = load_recipe("demo", [*FAST, "schedule.epochs=1"])
    with pytest.raises(ValueError, match="classes"):
        distill(student, DistillSettings(str(tmp_path / "t.safetensors")), tmp_path / "kd", progress=False)
    assert not (tmp_path / "kd").exists()
    with pytest.raises(ValueError, match="alpha"):
        DistillSettings("t", alpha=1.5)


def test_distill_cli(teacher_run, tmp_path, capsys):
    assert main(["compress", "distill", "--teacher", str(teacher_run), "--recipe", "demo", "--set", *FAST,
                 "model.width=0.0625", "--epochs", "1", "--out", str(tmp_path / "kd"), "--no-progress"]) == 0
    assert "student val top-1" in capsys.readouterr().out
