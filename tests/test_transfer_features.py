"""Appendix B descriptors (`vggnet features`): dense, flip-averaged, L2-normalised, averaged or stacked."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import vggnet
from vggnet.cli import main
from vggnet.data import eval_transform
from vggnet.evaluate import FolderImages
from vggnet.transfer import load_features
from vggnet.transfer.features import extract_features, feature_images, fingerprint, load_source

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
CLASSES = ["cat", "dog", "fox"]


def tiny(name="vgg11_bn", head="fc", seed=0):
    torch.manual_seed(seed)
    model = vggnet.create_model(name, num_classes=3, width=0.125, fc_width=32, head=head).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    return model


def images(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(32, 32), (40, 50), (64, 48), (37, 33), (96, 96)]  # even horizontal trims: mirror-exact
    return [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), generator=g, dtype=torch.uint8) for i in range(n)]


def extract(model, imgs, **kw):
    args = {"layer": "relu7", "scales": (1.0,), "crop": 32, "mean": MEAN, "std": STD, "amp_bf16": False, **kw}
    return extract_features(model, imgs, **args)


def test_unit_length_rows_and_stacked_dims():
    model = tiny()
    feats, ok = extract(model, images())
    assert feats.shape == (5, 32) and bool(ok.all())
    assert torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)
    stacked, _ = extract(model, images(), scales=(1.0, 48, 64), stack=True)
    assert stacked.shape == (5, 96)
    assert torch.allclose(stacked.norm(dim=1), torch.ones(5), atol=1e-5)
    for s in range(3):  # each scale's part is itself unit length before the final normalisation
        assert torch.allclose(stacked[:, 32 * s:32 * (s + 1)].norm(dim=1), torch.full((5,), 3 ** -0.5), atol=1e-5)


def test_flip_averaging_makes_the_descriptor_mirror_invariant():
    model = tiny()
    imgs = images()
    mirrored = [im.flip(-1) for im in imgs]
    a, _ = extract(model, imgs)
    b, _ = extract(model, mirrored)
    assert torch.allclose(a, b, atol=1e-5)
    a, _ = extract(model, imgs, flip=False)
    b, _ = extract(model, mirrored, flip=False)
    assert not torch.allclose(a, b, atol=1e-3)  # without the flip the mirror is a different input


def reference(model, image, q, layer):
    """The paper's recipe by hand: rescale, trim to a multiple of 32, conv head, average, flip, L2."""
    net = vggnet.create_model(model.config.name, num_classes=3, width=0.125, fc_width=32, head="conv").eval()
    net.load_state_dict(model.convert_head("conv").state_dict())
    model.convert_head("fc")
    x = eval_transform(q, None, mean=MEAN, std=STD)(image).as_subclass(torch.Tensor)
    h, w = (s - s % 32 for s in x.shape[-2:])
    top, left = round((x.shape[-2] - h) / 2), round((x.shape[-1] - w) / 2)  # torchvision centre_crop rounding
    x = x[:, top:top + h, left:left + w].unsqueeze(0)
    with torch.no_grad():
        maps = [net.forward_intermediates(v, [layer])[layer] for v in (x, x.flip(-1))]
    vec = torch.stack([m.mean(dim=(2, 3)) if m.dim() == 4 else m for m in maps]).mean(0)
    return F.normalize(vec, dim=1)[0]


@pytest.mark.parametrize("layer", ["relu7", "fc6", "conv4_2", "pool3"])
def test_matches_a_hand_computed_reference(layer):
    model = tiny()
    imgs = images()
    feats, _ = extract(model, imgs, layer=layer, scales=(1.0, 80))
    for i, image in enumerate(imgs):
        expected = F.normalize((reference(model, image, 32, layer) + reference(model, image, 80, layer)) / 2, dim=0)
        assert torch.allclose(feats[i], expected, atol=1e-5), i


def test_fc_and_conv_heads_give_the_same_features():
    model = tiny()
    conv = tiny()
    conv.convert_head("conv")
    a, _ = extract(model, images(), scales=(64,))
    b, _ = extract(conv, images(), scales=(64,))
    assert torch.allclose(a, b, atol=1e-5)
    assert model.config.head == "fc"  # the caller's model is not converted


def test_unreadable_images_are_masked():
    imgs = images(3)
    feats, ok = extract(tiny(), [imgs[0], None, imgs[2]])
    assert ok.tolist() == [True, False, True] and feats[1].abs().sum() == 0


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"unknown layer name 'conv9_9'.*block1_conv1"):
        extract(model, images(1), layer="conv9_9")
    with pytest.raises(ValueError, match="below the 32 px"):
        extract(model, images(1), scales=(0.5,))
    with pytest.raises(ValueError, match="no image could be read"):
        extract(model, [None])


@pytest.fixture
def run(tmp_path):
    """A run folder on the embedded digits, as `vggnet train --recipe demo` leaves one."""
    folder = tmp_path / "run"
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, fc_width=32)
    vggnet.save_checkpoint(model, folder / "best.safetensors",
                           {"classes": [str(i) for i in range(10)], "mean": MEAN, "std": STD, "image_size": 32})
    recipe = {"data": {"dataset": "digits", "val_fraction": 0.2, "split_seed": 0, "image_size": 32}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def test_cli_on_the_run_data_then_probe(run, tmp_path, capsys):
    out = tmp_path / "f.npz"
    assert main(["features", "--ckpt", str(run), "--layer", "fc7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1797 images (1438 train, 359 val, 10 classes)" in printed
    ff = load_features(out)
    assert ff.features.shape == (1797, 32) and ff.layer == "fc7" and ff.scales == [32]
    assert ff.classes == [str(i) for i in range(10)] and set(ff.split) == {"train", "val"}
    assert np.allclose(np.linalg.norm(ff.features, axis=1), 1, atol=1e-4)
    assert main(["probe", "--train", str(out), "--model", "svm"]) == 0
    assert "linear SVM" in capsys.readouterr().out


def test_cli_default_layer_is_relu7_or_block5_pool_for_the_gap_head(folder, tmp_path, capsys):
    for head, expected in (("fc", "relu7"), ("gap", "block5_pool")):
        ckpt = vggnet.save_checkpoint(tiny(head=head), tmp_path / f"{head}.safetensors",
                                      {"classes": CLASSES, "mean": MEAN, "std": STD, "image_size": 32})
        out = tmp_path / f"{head}.npz"
        assert main(["features", "--ckpt", str(ckpt), "--data", str(folder), "--split", "val", "--out", str(out)]) == 0
        assert load_features(out).layer == expected
    assert "block5_pool" in capsys.readouterr().out


def class_folder(root, per_class=6, seed=0):
    """One folder per class, no train/ or val/: each class tinted by its own colour channel."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 80, (40 + 4 * (i % 6), 48, 3), generator=g, dtype=torch.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return class_folder(tmp_path / "photos")


def test_cli_with_torchvision_weights_on_a_folder(folder, tmp_path, capsys):
    import torchvision

    keys = list(torchvision.models.vgg11(num_classes=3).state_dict())
    small = tiny("vgg11").state_dict()
    weights = tmp_path / "tv.pth"
    torch.save(dict(zip(keys, small.values(), strict=True)), weights)  # a torchvision file at tiny width
    (folder / "fox" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "f.npz"
    code = main(["features", "--weights", str(weights), "--data", str(folder), "--layer", "pool5",
                 "--scales", "64", "--stack", "--val-fraction", "0.34", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 unreadable skipped" in printed
    ff = load_features(out)
    assert ff.model == "vgg11" and ff.stack and ff.classes == CLASSES and len(ff.labels) == 18
    assert ff.layer == "block5_pool"  # the canonical name, whatever alias was asked for
    assert (ff.split == "val").sum() == 6 and all("broken" not in p for p in ff.paths)
    model, prep, _ = load_source(weights=str(weights))
    assert prep == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 224}
    assert ff.fingerprint == fingerprint(model) and len(ff.fingerprint) == 16
    other = tiny("vgg11", seed=1)
    assert fingerprint(other) != ff.fingerprint  # same architecture, other weights


def test_cli_errors_write_nothing(folder, run, tmp_path, capsys):
    out = tmp_path / "f.npz"
    (folder / "empty").mkdir()
    assert main(["features", "--ckpt", str(run), "--data", str(folder), "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()
    assert main(["features", "--ckpt", str(run), "--layer", "fc9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown layer name 'fc9'" in err and "relu7" in err and not out.exists()
    assert main(["features", "--ckpt", str(run), "--model", "vgg16", "--out", str(out)]) == 2
    assert "--model goes with --weights" in capsys.readouterr().err
    assert main(["features", "--ckpt", str(run), "--scales", "1,x", "--out", str(out)]) == 2
    assert main(["features", "--ckpt", str(run), "--batch-size", "0", "--out", str(out)]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert main(["features", "--ckpt", str(run), "--layer", "fc7", "--out", str(tmp_path)]) == 2  # a folder
    assert "error" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".f.npz*"))
    assert not list(tmp_path.glob(".*.tmp.npz"))


def test_feature_images_keep_the_folder_split(folder):
    for part in ("train", "val"):  # a tree with its own train/ and val/ folders (the same images here)
        (folder.parent / "split" / part).mkdir(parents=True)
        for c in CLASSES:
            (folder.parent / "split" / part / c).symlink_to(folder / c)
    imgs, labels, classes, paths, split = feature_images(str(folder.parent / "split"), None)
    assert classes == CLASSES and split.count("train") == 18 and split.count("val") == 18
    assert isinstance(imgs, FolderImages) and imgs.paths == paths  # lazy: decoded only when described
    only_val = feature_images(str(folder.parent / "split"), None, split="val")
    assert set(only_val[4]) == {"val"} and len(only_val[0]) == 18


def probe_table(out):
    """The Markdown table `vggnet probe` prints, as {header: cell} per model."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line]
    return {cells[0]: dict(zip(rows[0], cells, strict=True)) for cells in rows[1:]}


def test_probe_tests_every_row_of_a_plain_test_folder(folder, tmp_path, capsys):
    """Issue #34: features of a folder without train/ and val/ carry the default 10 % val split; given as
    --test they are scored on every row, and the table says so; --test-split restricts them."""
    ckpt = vggnet.save_checkpoint(tiny(), tmp_path / "net.safetensors",
                                  {"classes": CLASSES, "mean": MEAN, "std": STD, "image_size": 32})
    test_folder = class_folder(tmp_path / "test_photos", per_class=10, seed=1)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for data, out in ((folder, a), (test_folder, b)):
        assert main(["features", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]) == 0
    train_ff, test_ff = load_features(a), load_features(b)
    n_fit, n_val = int((train_ff.split == "train").sum()), int((test_ff.split == "val").sum())
    assert len(test_ff.labels) == 30 and 0 < n_val < 30  # the default split did mark some test rows val
    capsys.readouterr()

    assert main(["probe", "--train", str(a), "--test", str(b), "--model", "svm", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert f"{n_fit} train rows of 18" in out.splitlines()[0] and "all 30 rows" in out.splitlines()[0]
    row = probe_table(out)["linear SVM"]
    assert row["n test (all rows)"] == "30" and row["n train (train rows)"] == str(n_fit)
    report = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert (report["n_test"], report["test_split"], report["test_rows"]) == (30, "all", "all 30 rows")
    assert (report["n_train"], report["train_split"]) == (n_fit, "train")
    assert np.sum(report["results"]["svm"]["confusion"]) == 30  # every test row was scored
    md = (tmp_path / "p" / "probe.md").read_text()
    assert "all 30 rows" in md and "| n test (all rows) |" in md

    for split, n in (("val", n_val), ("train", 30 - n_val)):
        assert main(["probe", "--train", str(a), "--test", str(b), "--model", "svm", "--test-split", split,
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["n_test"], report["test_split"]) == (n, split)
        assert report["test_rows"] == f"{n} {split} rows of 30"
        assert np.sum(report["results"]["svm"]["confusion"]) == n
