"""Runtimes against eager on a tiny VGG-11-BN (32×32), image loading errors, checkpoint errors, ``auto``."""

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch._inductor.utils import run_and_get_code

import vggnet
from vggnet.capture import export_graph
from vggnet.infer import (
    RUNTIMES,
    AutoRuntime,
    ImageLoadError,
    Predictor,
    Preprocessing,
    RuntimeUnavailable,
    expand_image_paths,
    fold_batchnorm,
    load_image,
    make_runtime,
)
from vggnet.infer.images import evenly_spaced, iter_images
from vggnet.infer.predictor import EagerRuntime

CLASSES = [f"c{i}" for i in range(10)]
META = {"classes": CLASSES, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}
PREP = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=10,
                     classes=tuple(CLASSES))


def tiny_model(head: str = "fc") -> vggnet.VGG:
    """VGG-11-BN at 1/8 width with non-trivial batch-norm statistics, so folding them is really tested."""
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head=head, fc_width=64)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def calib():
    return torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def eager(model, x):
    with torch.inference_mode():
        return model(x)


def test_every_compiled_runtime_gets_its_own_dynamo_cache(model, calib):
    """torch.compile caches per code object: two compiled VGGs would share ``VGG.forward``'s cache, and the
    ninth model in a process would silently run eagerly. Each runtime compiles its own exported graph."""
    a, b = export_graph(model, calib[:2]), export_graph(tiny_model(), calib[:2])
    assert type(a).forward.__code__ is not type(b).forward.__code__
    with torch.no_grad():
        assert rel_error(a(calib[:3]), eager(model, calib[:3])) < 1e-5  # and the batch stays dynamic


def test_fold_batchnorm_keeps_logits_and_leaves_the_model_alone(model, inputs):
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 8  # the original is untouched
    assert rel_error(eager(folded, inputs), eager(model, inputs)) < 1e-5


# fp32 paths: the same function up to summation order. Tolerance: max |runtime − eager| / max |eager|.
FP32 = {"eager": 1e-5, "channels_last": 1e-5, "compile": 1e-4, "onnx": 1e-4}  # eager: batch-size-dependent kernels


@pytest.mark.parametrize("name", list(FP32))
def test_fp32_runtimes_match_eager_at_any_batch_size(name, model, inputs):
    runtime = make_runtime(name, model, PREP)
    assert runtime.name == name
    want = eager(model, inputs[:8])
    # a new batch size after the first must not be refused or recompiled wrongly (compile: one recompile is
    # enough to show it, each costs seconds)
    for batch in (8, 3) if name == "compile" else (8, 3, 1):
        got = runtime(inputs[:batch])
        assert got.dtype == torch.float32 and got.shape == (batch, 10)
        assert rel_error(got, want[:batch]) <= FP32[name], (name, batch)


# Reduced precision: a loose bound on the logits, and the same top-1 wherever eager's top-1 leads its top-2 by
# more than twice that bound (there, only a bug can flip the class; near-ties may flip legitimately).
REDUCED = {"bf16": 0.03, "compile-bf16": 0.03, "int8": 0.1, "int8-dynamic": 0.05, "onnx-int8": 0.1}


# What runs reduced, read from what actually runs (an fp32 path meets the tolerances above, so these are what
# fail if a path silently falls back to fp32): the tiny VGG-11 has 8 convs and 3 linear layers.
KERNEL_CALL = re.compile(r"\b(onednn\.qconv_pointwise|onednn\.qlinear_pointwise|mkldnn\._convolution_pointwise|"
                         r"mkldnn\._linear_pointwise|extern_kernels\._int_mm|extern_kernels\.mm|extern_kernels\.addmm)"
                         r"(?:\.\w+)?\(")
INDUCTOR_KERNELS = {  # the kernel calls in Inductor's generated code
    "int8": {"onednn.qconv_pointwise": 8, "onednn.qlinear_pointwise": 3},  # oneDNN int8 conv / linear
    "int8-dynamic": {"mkldnn._convolution_pointwise": 8, "extern_kernels._int_mm": 3},  # fp32 convs by design
    "compile-bf16": {"mkldnn._convolution_pointwise": 8, "mkldnn._linear_pointwise": 3},  # on bf16 weights:
}
FROZEN_PARAM = re.compile(r"^_frozen_param\d+ = None  # device\(type='cpu'\) torch\.(\w+) ", re.M)


def run_and_check_reduced(name: str, runtime, x: torch.Tensor, tmp_path, onnx_files: list[bytes]) -> torch.Tensor:
    """``runtime(x)`` (its first call, which compiles), checking that the reduced arithmetic is really used."""
    if name == "bf16":  # eager: every conv and linear layer reads and writes bf16
        seen = []
        hooks = [m.register_forward_hook(lambda _m, i, o: seen.append((i[0].dtype, o.dtype)))
                 for m in runtime.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        try:
            got = runtime(x)
        finally:
            for hook in hooks:
                hook.remove()
        assert len(seen) == 11 and set(seen) == {(torch.bfloat16, torch.bfloat16)}, seen
        return got
    if name == "onnx-int8":  # Q/DQ around every conv and linear layer, fused by ORT into integer kernels
        import onnx
        import onnxruntime as ort

        got = runtime(x)
        (model_bytes,) = onnx_files
        graph = onnx.load_from_string(model_bytes).graph
        producer = {out: node.op_type for node in graph.node for out in node.output}
        layers = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
        assert len(layers) == 11 and all(producer.get(i) == "DequantizeLinear" for n in layers for i in n.input[:2])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as OnnxRuntime builds it
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
        assert ops["QLinearConv"] == 8 and ops["QGemm"] == 3 and ops["Conv"] == ops["Gemm"] == 0, ops
        return got
    got, codes = run_and_get_code(runtime, x)  # Inductor: the code it generated (also on a cache hit)
    code = "\n".join(codes)
    assert Counter(KERNEL_CALL.findall(code)) == INDUCTOR_KERNELS[name], Counter(KERNEL_CALL.findall(code))
    if name == "compile-bf16":
        assert set(FROZEN_PARAM.findall(code)) == {"bfloat16"}, set(FROZEN_PARAM.findall(code))
    return got


@pytest.mark.parametrize("name", list(REDUCED))
def test_reduced_precision_runtimes_agree_with_eager(name, model, calib, inputs, tmp_path, monkeypatch):
    import vggnet.infer.ort

    onnx_files: list[bytes] = []

    class RecordingOnnxRuntime(vggnet.infer.ort.OnnxRuntime):  # keeps the model file the session was built from
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            onnx_files.append(Path(path).read_bytes())

    monkeypatch.setattr(vggnet.infer.ort, "OnnxRuntime", RecordingOnnxRuntime)
    runtime = make_runtime(name, model, PREP, calib)
    got, want = run_and_check_reduced(name, runtime, inputs, tmp_path, onnx_files), eager(model, inputs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = REDUCED[name]
    assert rel_error(got, want) <= tol, name
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * want.abs().max()
    assert clear.sum() >= 5, "too few clear-cut rows for the check to mean anything"
    assert torch.equal(got[clear].argmax(1), want[clear].argmax(1)), name
    if name not in ("compile-bf16", "int8-dynamic"):  # their dynamic batch is compile's and int8's: one
        assert runtime(inputs[:3]).shape == (3, 10)   # more Inductor compile each would add ~8 s


@pytest.mark.parametrize("name", ["int8", "onnx-int8", "auto"])
def test_calibrated_runtimes_refuse_to_build_without_calibration(name, model):
    with pytest.raises(ValueError, match="calibration"):
        make_runtime(name, model, PREP)


def test_int8_dynamic_explains_that_the_conv_head_has_no_fc_layers():
    with pytest.raises(RuntimeUnavailable, match="Linear"):
        make_runtime("int8-dynamic", tiny_model("conv"), PREP)


def test_unknown_runtime_lists_the_choices(model):
    with pytest.raises(ValueError, match="channels_last.*int8-dynamic.*onnx-int8"):
        make_runtime("tensorrt", model, PREP)


class _Slow:
    name = "eager"

    def __init__(self, model):
        self.inner = EagerRuntime(model)

    def __call__(self, x):
        time.sleep(0.03)
        return self.inner(x)


def test_auto_keeps_the_fastest_accurate_runtime_and_reports_the_rest(model, calib, monkeypatch):
    def wrong(model, prep, calib=None, **_):  # fast but useless: the least likely class
        inner = EagerRuntime(model)

        class Wrong:
            name = "test-wrong"

            def __call__(self, x):
                return -inner(x)
        return Wrong()

    def broken(model, prep, calib=None, **_):
        raise RuntimeUnavailable("test-broken needs a package that is not installed")

    monkeypatch.setitem(RUNTIMES, "eager", lambda model, prep, calib=None, **_: _Slow(model))
    monkeypatch.setitem(RUNTIMES, "test-wrong", wrong)
    monkeypatch.setitem(RUNTIMES, "test-broken", broken)
    auto = make_runtime("auto", model, PREP, calib, candidates=["channels_last", "test-wrong", "test-broken"])
    assert isinstance(auto, AutoRuntime)
    assert auto.chosen.name == "channels_last" and auto.name == "auto:channels_last"
    rows = {r["name"]: r for r in auto.report}
    assert list(rows) == ["eager", "channels_last", "test-wrong", "test-broken"]
    assert rows["test-wrong"]["ok"] is False and rows["test-wrong"]["agreement"] < 0.99
    assert rows["test-broken"]["error"] == "test-broken needs a package that is not installed"
    assert rows["eager"]["ok"] and rows["eager"]["img_per_s"] < rows["channels_last"]["img_per_s"]
    assert "* channels_last" in auto.summary() and "skipped" in auto.summary()
    assert rel_error(auto(calib[:4]), eager(model, calib[:4])) < 1e-5


def test_auto_rejects_unknown_candidates(model, calib):
    with pytest.raises(ValueError, match="unknown"):
        make_runtime("auto", model, PREP, calib, candidates=["nope"])


def test_predictor_rejects_a_batch_of_the_wrong_shape(model):
    predictor = Predictor(model, PREP)
    for bad in (torch.zeros(2, 3, 64, 64), torch.zeros(2, 1, 32, 32), torch.zeros(3, 32, 32)):
        with pytest.raises(ValueError, match="N×3×32×32"):
            predictor.logits(bad)


def test_predictor_runs_a_runtime_object_without_a_model(model):
    predictor = Predictor(None, PREP, EagerRuntime(model))
    image = Image.new("RGB", (40, 36), (200, 30, 30))
    assert predictor.predict([image], topk=2) == Predictor(model, PREP).predict([image], topk=2)
    with pytest.raises(ValueError, match="needs the model"):
        Predictor(None, PREP, "eager")


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def ckpt(tmp_path, model):
    return vggnet.save_checkpoint(model, tmp_path / "best.safetensors", META)


def test_from_checkpoint_reads_the_preprocessing(ckpt, model):
    predictor = Predictor.from_checkpoint(ckpt.parent, "channels_last")
    assert predictor.source == ckpt and predictor.prep == PREP
    assert predictor.runtime.name == "channels_last"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Predictor.from_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="run folder without best.safetensors or last.safetensors"):
        Predictor.from_checkpoint(tmp_path)


def test_checkpoint_whose_weights_belong_to_another_model_is_refused(ckpt, tmp_path):
    with safe_open(str(ckpt), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(metadata["config"])
    config["name"] = "vgg13_bn"  # the file claims configuration B; the weights are A's
    save_file(tensors, tmp_path / "other.safetensors", metadata={**metadata, "config": json.dumps(config)})
    with pytest.raises(vggnet.WeightsError, match="vgg13_bn"):
        Predictor.from_checkpoint(tmp_path / "other.safetensors")


def test_foreign_state_dict_is_not_a_checkpoint(tmp_path, model):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "plain.safetensors")
    with pytest.raises(vggnet.WeightsError, match="not a vggnet checkpoint"):
        Predictor.from_checkpoint(tmp_path / "plain.safetensors")


def test_checkpoint_without_preprocessing_is_refused(tmp_path, model):
    path = vggnet.save_checkpoint(model, tmp_path / "bare.safetensors", {"classes": CLASSES})
    with pytest.raises(ValueError, match="lacks mean, std, image_size"):
        Predictor.from_checkpoint(path)


# ---------------------------------------------------------------------------------------------------- images


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.PNG", ".hidden/d.png", ".e.png"):
        Image.new("RGB", (20, 10), (10, 20, 30)).save(root / name, format="PNG" if "png" in name.lower() else "JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_expand_image_paths_handles_files_folders_and_globs(image_dir):
    found = expand_image_paths([image_dir])
    names = [p.relative_to(image_dir).as_posix() for p in found]
    assert names == [".hidden/d.png", "a.jpg", "b.png", "sub/c.PNG"]  # sorted, recursive, hidden files skipped
    assert expand_image_paths([image_dir / "b.png", f"{image_dir}/*.png", image_dir / "a.jpg"]) == [
        image_dir / "b.png", image_dir / "a.jpg"]  # given order kept, duplicates dropped
    assert expand_image_paths([f"{image_dir}/**/*.PNG"]) == [image_dir / "sub/c.PNG"]


@pytest.mark.parametrize("spec, message", [("missing.png", "image not found"), ("*.gif", "no file matches"),
                                           ("empty", "folder holds no images")])
def test_expand_image_paths_names_what_is_missing(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        expand_image_paths([tmp_path / spec if "*" not in spec else f"{tmp_path}/{spec}"])


def test_truncated_and_non_image_files_raise_image_load_error_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    assert load_image(good).size == (64, 64)
    for path, reason in ((truncated, "unreadable image"), (text, "not an image file")):
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(path)
        assert info.value.path == path and str(path) in str(info.value)


def test_pixel_limit_and_decompression_bombs_are_errors(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20)).save(path)
    with pytest.raises(ImageLoadError, match="600 pixels exceeds the limit of 500"):
        load_image(path, max_pixels=500)
    for limit in (400, 250):  # PIL only warns between 1x and 2x its limit and raises above: both are errors here
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(path)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_iter_images_can_report_unreadable_files_and_go_on(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    items = list(iter_images([good, bad, good], skip_unreadable=True))
    assert [type(i).__name__ for _, i in items] == ["Image", "ImageLoadError", "Image"]
    with pytest.raises(ImageLoadError):
        list(iter_images([good, bad]))


def test_evenly_spaced_is_deterministic_and_spread():
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError):
        evenly_spaced([1], 0)
