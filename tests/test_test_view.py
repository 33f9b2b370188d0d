"""The test view travels with the checkpoint (issue 19, item 4): ``test_scale`` (the shorter side an image is
resized to before the centre crop) is recorded at training, read by predict / serve / export, inferred for
torchvision / timm weights, and absent from old checkpoints without changing what they do."""

import json

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import vggnet
from vggnet.cli import main
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.evaluate import eval_images, load_models, predict_proba
from vggnet.evaluate.protocols import Protocol
from vggnet.export.common import export_metadata, parse_metadata
from vggnet.infer import Predictor, Preprocessing, preprocess
from vggnet.models import checkpoint_meta, load_checkpoint
from vggnet.models.pretrained import inspect_weights

META = {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=1"]
# the paper's S in [256, 512] at crop 224, scaled to the 32-px crop: S in [37, 73], Q = (1.143 + 2.286) / 2 x 32
JITTER = ["data.augment=paper", "data.scale=[1.143,2.286]", "data.lighting=0.0"]
Q = round((1.143 + 2.286) / 2 * 32)  # 55


def tiny(seed=0):
    torch.manual_seed(seed)
    return vggnet.create_model("vgg11", num_classes=3, width=0.125, fc_width=32).eval()


# --- metadata: stored, read back, defaulted -------------------------------------------------------------


def test_test_scale_round_trips_through_save_and_load(tmp_path):
    model = tiny()
    file = vggnet.save_checkpoint(model, tmp_path / "m.safetensors", {**META, "test_scale": 48})
    loaded, extra = load_checkpoint(file)
    assert extra["test_scale"] == 48
    meta = checkpoint_meta(file, loaded, extra)
    assert meta["test_scale"] == 48 and meta["image_size"] == 32
    prep = Preprocessing.from_meta(meta)
    assert prep.test_scale == 48 and prep.to_dict()["test_scale"] == 48
    assert Predictor.from_checkpoint(file).prep.test_scale == 48
    assert inspect_weights(file)[1].test_scale == 48


def test_old_checkpoints_keep_resizing_to_the_crop(tmp_path):
    model = tiny()
    file = vggnet.save_checkpoint(model, tmp_path / "old.safetensors", META)  # no test_scale recorded
    meta = checkpoint_meta(file, *load_checkpoint(file))
    assert meta["test_scale"] == 32
    prep = Preprocessing.from_meta({k: v for k, v in meta.items() if k != "test_scale"})
    assert prep.test_scale == 32 and prep == Preprocessing.from_meta(meta)
    assert inspect_weights(file)[1].test_scale is None
    image = torch.randint(0, 256, (3, 40, 50), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    want = TF.center_crop(TF.resize(image, 32, antialias=True), [32, 32])
    want = TF.normalize(TF.to_dtype(want, torch.float32, scale=True), [0.5] * 3, [0.25] * 3)
    assert torch.equal(preprocess([image], prep)[0], want)


def test_preprocess_resizes_the_shorter_side_to_the_test_scale():
    prep = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=3, test_scale=48)
    image = torch.randint(0, 256, (3, 40, 60), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    want = TF.center_crop(TF.resize(image, 48, antialias=True), [32, 32])  # 48 x 72, then the centre 32 x 32
    want = TF.normalize(TF.to_dtype(want, torch.float32, scale=True), [0.5] * 3, [0.25] * 3)
    got = preprocess([image], prep)
    assert got.shape == (1, 3, 32, 32) and torch.equal(got[0], want)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(preprocess([pil], prep), got)


def test_a_test_scale_below_the_crop_is_refused(tmp_path):
    with pytest.raises(ValueError, match="smaller than the 32-px crop"):
        Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=3, test_scale=24)
    model = tiny()
    file = vggnet.save_checkpoint(model, tmp_path / "bad.safetensors", {**META, "test_scale": 24})
    with pytest.raises(ValueError, match="test_scale 24 px is smaller"):
        checkpoint_meta(file, *load_checkpoint(file))


def test_exports_record_the_test_scale_and_old_exports_read_as_the_crop():
    model = tiny()
    prep = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=3,
                         classes=("a", "b", "c"), test_scale=55)
    text = export_metadata(model, prep)
    assert json.loads(text)["preprocessing"]["test_scale"] == 55
    assert parse_metadata(text, "x")[0] == prep
    old = json.loads(text)
    del old["preprocessing"]["test_scale"]  # a file exported before test_scale was recorded
    assert parse_metadata(json.dumps(old), "old")[0].test_scale == 32
    pytest.importorskip("onnxscript")
    from vggnet.export.onnx import _metadata_props

    assert json.loads(_metadata_props(model, prep, None)["test_scale"]) == 55


def _foreign_keys(model, head_names):
    """A tiny VGG's weights under torchvision's (features.N, classifier.0/3/6) or timm's (pre_logits.fc1/fc2,
    head.fc) names, without building a full-size model: only the order and shapes of the layers matter."""
    state, out = model.state_dict(), {}
    convs = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state if k.startswith("features.")))
    for index, layer in enumerate(convs):
        for leaf in ("weight", "bias"):
            out[f"features.{3 * index}.{leaf}"] = state[f"{layer}.{leaf}"]
    for foreign, name in zip(head_names, ("fc6", "fc7", "fc8"), strict=True):
        for leaf in ("weight", "bias"):
            out[f"{foreign}.{leaf}"] = state[f"head.{name}.{leaf}"]
    return out


@pytest.mark.parametrize("fmt, head_names", [("torchvision", ("classifier.0", "classifier.3", "classifier.6")),
                                             ("timm", ("pre_logits.fc1", "pre_logits.fc2", "head.fc"))])
def test_torchvision_and_timm_weights_imply_their_resize_256_view(fmt, head_names):
    _, info = inspect_weights(_foreign_keys(tiny(), head_names))
    assert info.format == fmt and info.image_size == 224 and info.test_scale == 256


# --- a run trained with scale jitter: predict and eval's single protocol see the same view ---------------


@pytest.fixture(scope="module")
def jitter_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jitter") / "run"
    train(load_recipe("demo", [*FAST, *JITTER]), out)
    return out


def test_training_records_the_validation_scale(jitter_run, tmp_path):
    _, extra = load_checkpoint(jitter_run / "best.safetensors")
    assert extra["test_scale"] == Q and extra["image_size"] == 32
    flat = tmp_path / "flat"  # no jitter: the validation view is the crop itself
    train(load_recipe("demo", [*FAST, "train.stop_after_epoch=1", "schedule.epochs=2"]), flat)
    assert load_checkpoint(flat / "last.safetensors")[1]["test_scale"] == 32


def test_predict_agrees_with_eval_single_at_the_checkpoint_scale(jitter_run, tmp_path, capsys):
    models, meta = load_models(jitter_run)
    images, labels, _ = eval_images(jitter_run)  # the run's own validation split (embedded digits)
    folder = tmp_path / "val"
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    assert main(["predict", "--json", "--topk", "1", "--batch-size", "64", "--ckpt", str(jitter_run),
                 str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_scale"] == Q and report["failed"] == 0
    predicted = [row["top"][0]["index"] for row in report["predictions"]]

    single = Protocol("single", (Q,))  # the evaluate protocol at the checkpoint's own test scale
    probs = predict_proba(models, images, single, crop=meta["image_size"], mean=meta["mean"], std=meta["std"],
                          amp_bf16=False, progress=False)
    assert predicted == probs.argmax(1).tolist()
    at_crop = predict_proba(models, images, Protocol("single", (1.0,)), crop=32, mean=meta["mean"], std=meta["std"],
                            amp_bf16=False, progress=False)
    assert predicted != at_crop.argmax(1).tolist()  # today's view (shorter side to the crop) is another one
    # and the eval command's top-1 error over that split is predict's
    assert main(["eval", "--json", "--ckpt", str(jitter_run), "--protocol", f"single@{Q}", "--device", "cpu",
                 "--no-bf16"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["results"][0]
    wrong = sum(p != y for p, y in zip(predicted, labels, strict=True))
    assert evaluated["top1_err"] == pytest.approx(100 * wrong / len(labels))
    # an export carries the same view: a TorchScript file predicts the same labels
    exported = tmp_path / "m.pt"
    assert main(["export", "--ckpt", str(jitter_run), "--format", "torchscript", "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["predict", "--json", "--topk", "1", "--ckpt", str(exported), str(folder)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_scale"] == Q
    assert [row["top"][0]["index"] for row in again["predictions"]] == predicted


def test_eval_defaults_to_the_checkpoint_scale(jitter_run, capsys):
    assert main(["eval", "--json", "--ckpt", str(jitter_run), "--device", "cpu", "--no-bf16"]) == 0
    default = json.loads(capsys.readouterr().out)["results"][0]
    assert default["protocol"].startswith("single@") and default["scales_px"] == [Q]
    assert main(["eval", "--json", "--ckpt", str(jitter_run), "--protocol", "single", "--device", "cpu",
                 "--no-bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["scales_px"] == [32]  # an explicit `single` is the crop


def test_eval_refuses_to_guess_a_view_for_members_validated_at_different_scales(jitter_run, tmp_path, capsys):
    flat = tmp_path / "flat"  # validated at the crop (32 px), the jittered run at Q = 55 px
    train(load_recipe("demo", [*FAST, "train.stop_after_epoch=1", "schedule.epochs=2"]), flat)
    capsys.readouterr()
    argv = ["eval", "--json", "--ckpt", str(jitter_run), "--ckpt", str(flat / "last.safetensors"), "--device", "cpu",
            "--no-bf16"]
    assert main(argv) == 2
    assert "different test scales ([32, 55] px)" in capsys.readouterr().err
    assert main([*argv, "--protocol", f"single@{Q}"]) == 0  # named explicitly: fine
