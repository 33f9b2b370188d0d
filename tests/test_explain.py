"""Grad-CAM, boxes, filter / feature-map grids and ``vggnet explain``, on tiny VGGs with 32×32 inputs."""

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vggnet
from vggnet.cli import build_parser, main
from vggnet.explain import (
    cam_box,
    default_cam_layer,
    feature_map_grid,
    filter_grid,
    grad_cam,
    grad_cam_raw,
    spatial_layers,
)

TINY = {"width": 0.125, "fc_width": 32}
CLASSES = ["red", "green", "blue"]
META = {"classes": CLASSES, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}


# --- Grad-CAM on a network whose evidence is known ------------------------------------------------------------------

def corner_model() -> vggnet.VGG:
    """VGG-11 set by hand: channel 0 fires on red above 0.5, channel 1 on green above 0.5, and every later conv
    passes both on through its centre tap alone (no spatial mixing, zero bias). The gap head scores class 1 from
    channel 0 and class 0 from channel 1. So class 1's evidence is wherever the image is red, and nowhere else."""
    model = vggnet.create_model("vgg11", num_classes=2, width=0.125, head="gap")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        for conv in convs:
            conv.weight[0, 0, 1, 1] = 1.0
            conv.weight[1, 1, 1, 1] = 1.0
        convs[0].bias[:2] = -0.5
        model.head.fc.weight[1, 0] = 1.0
        model.head.fc.weight[0, 1] = 1.0
    return model.eval()


def corner_image() -> torch.Tensor:
    """Grey, a red patch in the top-left quadrant (class 1: score 0.5) and a dimmer green one in the top-right
    (class 0: score 0.3), so class 1 is the top-1. Top-right rather than bottom-right so that a map transposed
    by mistake (H and W swapped) lands in the bottom-left and fails."""
    x = torch.full((1, 3, 32, 32), 0.2)
    x[0, 0, 2:10, 2:10] = 1.0
    x[0, 1, 2:10, 22:30] = 0.8
    return x


def quadrant_means(cam: torch.Tensor) -> dict[str, float]:
    h, w = cam.shape[-2] // 2, cam.shape[-1] // 2
    return {"tl": cam[:h, :w].mean().item(), "tr": cam[:h, w:].mean().item(),
            "bl": cam[h:, :w].mean().item(), "br": cam[h:, w:].mean().item()}


def peak_quadrant(cam: torch.Tensor) -> str:
    row, col = divmod(int(cam.argmax()), cam.shape[-1])
    return ("t" if row < cam.shape[-2] // 2 else "b") + ("l" if col < cam.shape[-1] // 2 else "r")


@pytest.mark.parametrize("layer", [None, "block3_relu2", "block4_conv2"])
def test_gradcam_finds_the_known_evidence(layer):
    model, x = corner_model(), corner_image()
    result = grad_cam_raw(model, x, layer)
    assert torch.allclose(result.logits, torch.tensor([[0.3, 0.5]]))
    assert result.targets.tolist() == [1]  # None explains the top-1
    for target, where in ((None, "tl"), (1, "tl"), (0, "tr")):
        cam = grad_cam(model, x, layer, target)[0]
        means = quadrant_means(cam)
        assert cam.max().item() == pytest.approx(1.0)
        assert peak_quadrant(cam) == where, (target, means)
        assert all(means[where] > 3 * v for k, v in means.items() if k != where), (target, means)


def test_default_layer_is_the_deepest_relu_with_a_4x4_map():
    vgg11, vgg16 = (vggnet.create_model(name, num_classes=2, **TINY) for name in ("vgg11", "vgg16_bn"))
    assert default_cam_layer(vgg11) == "block5_relu2"  # no size given: the last conv's ReLU
    assert default_cam_layer(vgg16, 224) == "block5_relu3"  # 14x14
    assert default_cam_layer(vgg16, 64) == "block5_relu3"  # 4x4
    assert default_cam_layer(vgg11, 32) == "block4_relu2"  # block 5 is 2x2 at 32 px: block 4's 4x4
    assert default_cam_layer(vgg16, 63) == "block4_relu3"  # 63 px: block 5 is 3x3
    x = torch.randn(1, 3, 32, 32)
    assert grad_cam_raw(vgg11, x).maps.shape[-2:] == (4, 4)  # the default follows the images' size


# --- in-place ReLUs, model state ------------------------------------------------------------------------------------

def reference_cam(model: vggnet.VGG, x: torch.Tensor, layer: str, target: torch.Tensor) -> torch.Tensor:
    """Textbook Grad-CAM with a forward hook, on a copy whose ReLUs are not in place (so the hook is safe)."""
    ref = copy.deepcopy(model).eval()
    for module in ref.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    seen = {}
    handle = dict(ref.named_layers())[ref.resolve_layer(layer)].register_forward_hook(
        lambda _m, _i, out: seen.update(a=out))
    logits = ref(x)
    handle.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen["a"])
    cam = F.relu((grads.mean((2, 3), keepdim=True) * seen["a"]).sum(1))
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax((1, 2), keepdim=True)).detach()


@pytest.mark.parametrize(("name", "layer"), [("vgg11", "block4_conv2"), ("vgg11", "relu4_2"),
                                             ("vgg11_bn", "block4_bn2"), ("vgg11_bn", "block3_conv1")])
def test_inplace_relu_safe_and_model_untouched(name, layer):
    """block4_conv2's output is overwritten by ReLU(inplace=True) right after: a hook would see the rectified map.
    Ours must equal the reference and leave modes (per module), inplace flags and .grad as they were."""
    model = vggnet.create_model(name, num_classes=3, head="fc", **TINY).train()
    if name.endswith("_bn"):
        model.features.block1_bn1.eval()  # a frozen BN inside a training model stays frozen
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([0, 2])
    expected = reference_cam(model, x, layer, target)
    assert (expected.amax((1, 2)) > 0).all()  # a meaningful comparison, not two zero maps
    got = grad_cam(model, x, layer, target)
    assert torch.allclose(got, expected, atol=1e-5)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert torch.equal(grad_cam(model, x, layer, target), got)  # dropout off: deterministic


def test_works_inside_inference_mode():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    x = torch.randn(1, 3, 32, 32)
    expected = grad_cam(model, x)
    with torch.inference_mode():
        assert torch.allclose(grad_cam(model, x), expected)


# --- heads, targets, layers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["fc", "conv", "gap"])
def test_every_head(head):
    model = vggnet.create_model("vgg11", num_classes=3, head=head, **TINY)
    x = torch.randn(2, 3, 32, 32)
    result = grad_cam_raw(model, x)
    with torch.no_grad():
        assert torch.allclose(result.logits, model.eval()(x), atol=1e-5)  # the conv head's score is averaged
    assert torch.equal(result.targets, result.logits.argmax(1))
    cam = grad_cam(model, x, target=[2, 1])
    assert cam.shape == (2, 32, 32) and torch.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() <= 1
    assert all(m == pytest.approx(1.0) or m == 0 for m in cam.amax((1, 2)).tolist())


def test_conv_head_score_map_is_a_layer():
    model = vggnet.create_model("vgg11", num_classes=3, head="conv", **TINY)
    assert "fc8" in spatial_layers(model)
    assert grad_cam(model, torch.randn(1, 3, 48, 48), layer="classifier").shape == (1, 48, 48)


@pytest.mark.parametrize("target", [3, -1, [0, 3], [0]])
def test_target_out_of_range(target):
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2|2 images"):
        grad_cam(model, torch.randn(2, 3, 32, 32), target=target)


def test_unknown_and_vector_layers_list_the_valid_names():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="valid names: block1_conv1, block1_relu1"):
        grad_cam(model, x, layer="conv9_9")
    with pytest.raises(ValueError, match="not a grid.*block5_pool"):
        grad_cam(model, x, layer="fc7")


# --- cam_box --------------------------------------------------------------------------------------------------------

def two_blobs() -> np.ndarray:
    m = np.zeros((20, 30))
    m[2:5, 3:6] = 1.0  # small, holds the peak
    m[10:18, 15:27] = 0.8  # large, lower
    return m


def test_cam_box_takes_the_largest_region_xyxy_exclusive():
    assert cam_box(two_blobs(), 0.5) == (15, 10, 27, 18)
    assert cam_box(torch.from_numpy(two_blobs()), 0.9) == (3, 2, 6, 5)  # only the peak blob passes 0.9
    assert cam_box(np.ones((20, 30))) == (0, 0, 30, 20)
    assert cam_box(np.zeros((4, 5))) == (0, 0, 5, 4)


def test_cam_box_is_4_connected():
    m = np.zeros((10, 10))
    m[[0, 1, 2], [0, 1, 2]] = 1.0  # a diagonal: three regions of one pixel under 4-connectivity
    m[7, 5:7] = 1.0  # two side by side: the largest
    assert cam_box(m) == (5, 7, 7, 8)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_cam_box_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        cam_box(two_blobs(), fraction)


# --- filter and feature-map grids -----------------------------------------------------------------------------------

def test_filter_grid_scales_each_filter():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)  # 8 first-layer filters: a 3×3 grid of 3×3 tiles
    grid = filter_grid(model)
    assert grid.shape == (11, 11, 3) and grid.min() >= 0 and grid.max() <= 1
    w = model.features.block1_conv1.weight.detach()[5].permute(1, 2, 0).numpy()  # tile 5: row 1, column 2
    assert np.allclose(grid[4:7, 8:11], (w - w.min()) / (w.max() - w.min()), atol=1e-6)


def test_feature_map_grid_keeps_the_most_active_channels():
    model = vggnet.create_model("vgg11", num_classes=3, **TINY)
    x = torch.randn(3, 32, 32)
    fg = feature_map_grid(model, x, "relu3_1", max_maps=10)
    with torch.no_grad():
        maps = model.eval().forward_intermediates(x[None], ["relu3_1"])["relu3_1"][0]
    assert fg.total == 32 and fg.layer == "block3_relu1" and fg.note.startswith("10 of 32")
    assert fg.channels == sorted(maps.mean((1, 2)).argsort(descending=True)[:10].tolist())
    assert fg.grid.shape == (3 * 9 - 1, 4 * 9 - 1)  # 10 tiles of 8×8: 3 rows of 4, 1-px gaps
    with pytest.raises(ValueError, match="not maps"):
        feature_map_grid(model, x, "fc8")


# --- vggnet explain -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11", num_classes=3, width=0.125, head="gap")
    run = tmp_path_factory.mktemp("run")
    vggnet.save_checkpoint(model, run / "best.safetensors", META)
    return run


@pytest.fixture
def images(tmp_path):
    """cat.png, cat.jpg (same stem), dog.png in a sub-folder, and broken.png, which is not an image."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "sub").mkdir()
    for name, (h, w) in (("cat.png", (40, 50)), ("cat.jpg", (32, 32)), ("sub/dog.png", (64, 36))):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return tmp_path


def explain(argv, capsys):
    code = main(["explain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_overlays_and_skips_the_unreadable(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    code, stdout, err = explain(["--ckpt", run_dir, images / "cat.png", images / "broken.png", images / "cat.jpg",
                                 images / "sub", "--out", out, "--filters", "--feature-maps", "block2_conv1",
                                 "--topk", "2"], capsys)
    assert code == 1, err  # one image unreadable: the rest are written, the status says the result is partial
    assert "skipped" in err and "broken.png" in err and "1 of 4 images could not be read" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cat-2.block2_conv1.png", "cat-2.gradcam.png", "cat.block2_conv1.png", "cat.gradcam.png",
                       "dog.block2_conv1.png", "dog.gradcam.png", "filters.png"]
    for name in written:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 100
    assert stdout.count(".gradcam.png") == 3


def test_cli_class_by_name_and_nothing_readable(run_dir, images, tmp_path, capsys):
    code, stdout, err = explain(["--ckpt", run_dir, images / "cat.png", "--class", "blue", "--layer", "relu4_2",
                                 "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "class blue" in stdout and (tmp_path / "a" / "cat.gradcam.png").is_file()
    code, _, err = explain(["--ckpt", run_dir, images / "broken.png", "--out", tmp_path / "b"], capsys)
    assert code == 1 and "broken.png" in err
    assert not any((tmp_path / "b").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "conv9_9"], "valid names: block1_conv1"),
    (["--layer", "fc"], "not a grid"),
    (["--feature-maps", "nope"], "unknown layer name 'nope'"),
    (["--class", "3"], r"out of range: the model has 3 classes \(0..2\)"),
    (["--class", "purple"], "class names: red, green, blue"),
    (["--topk", "0"], "--topk"),
])
def test_cli_errors_are_messages(run_dir, images, tmp_path, capsys, args, message):
    code, _, err = explain(["--ckpt", run_dir, images / "cat.png", "--out", tmp_path / "o", *args], capsys)
    assert code == 2
    assert err.startswith("vggnet explain: error:")
    assert re.search(message, err), err


def test_cli_help_explains_each_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--help"])
    text = capsys.readouterr().out
    for option in ("--ckpt", "--layer", "--class", "--topk", "--out", "--box", "--filters", "--feature-maps",
                   "--max-maps", "Grad-CAM", "exit status"):
        assert option in text


def test_explain_imports_no_training_or_serving():
    """What ``vggnet explain`` imports, its lazy imports included, in a fresh interpreter."""
    code = ("import sys, tqdm, vggnet.explain, vggnet.cli.explain, vggnet.infer.predictor, vggnet.infer.images; "
            "bad = [m for m in sys.modules if m.startswith(('vggnet.engine', 'vggnet.serve', 'fastapi'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- an all-zero map is said in words, not drawn as a blank overlay -------------------------------------------------

def test_an_all_zero_map_gets_a_caption_and_no_box():
    from matplotlib.patches import Rectangle

    from vggnet.explain import no_evidence, overlay_figure

    image = np.full((32, 32, 3), 0.5)
    blank = overlay_figure(image, np.zeros((32, 32)), explained="cat", layer="block5_relu2")
    texts = [t.get_text() for t in blank.axes[1].texts]
    assert texts == ["no positive evidence for cat at block5_relu2"]
    assert not [p for p in blank.axes[1].patches if isinstance(p, Rectangle)]  # no whole-image "region" box
    heat = np.zeros((32, 32))
    heat[4:12, 4:12] = 1.0
    shown = overlay_figure(image, heat, explained="cat", layer="block5_relu2")
    assert len(shown.axes[1].texts) == 0 and [p for p in shown.axes[1].patches if isinstance(p, Rectangle)]
    assert no_evidence(torch.zeros(3, 3)) and not no_evidence(heat)


def test_cli_says_when_a_map_holds_no_positive_evidence(run_dir, images, tmp_path, capsys):
    dead = vggnet.create_model("vgg11", num_classes=3, width=0.125, head="gap")
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()  # every activation is 0: nothing speaks for any class
    vggnet.save_checkpoint(dead, tmp_path / "dead.safetensors", META)
    layer = default_cam_layer(dead, META["image_size"])
    code, stdout, err = explain(["--ckpt", tmp_path / "dead.safetensors", images / "cat.png", "--out", tmp_path / "o"],
                                capsys)
    assert code == 0, err
    assert f"no positive evidence for red at {layer}" in stdout  # all logits 0: the top-1 is class 0, "red"
    code, stdout, err = explain(["--ckpt", run_dir, images / "cat.png", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "no positive evidence" not in stdout


def test_default_output_folders_are_git_ignored():
    """What the README's and --help's examples write at the repository root must not show up in `git status`."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs a git checkout")
    paths = ["explain/cat.gradcam.png", "boxes/raccoon-1.boxes.png", "why/cat.gradcam.png", "exports/m.onnx",
             "runs/demo/best.safetensors", "data/raccoon/images/a.jpg", "voc.npz"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == paths
