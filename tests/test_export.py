"""ONNX, .pt2 (AOTInductor) and TorchScript exports of a tiny checkpoint: parity with eager at several batch
sizes, the metadata inside each file, atomic writes, and errors for files that are not vggnet exports."""

import json
import shutil

import onnx
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.export import ExportError, export_model, format_for, load_exported
from vggnet.export.common import TOLERANCE
from vggnet.export.onnx import export_onnx, load_onnx, quantize_onnx_static
from vggnet.infer import Predictor, Preprocessing

CLASSES = ["cat", "dog", "fox", "owl"]
META = {"classes": CLASSES, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "image_size": 32}
PREP = Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), image_size=32, in_channels=3, num_classes=4,
                     classes=tuple(CLASSES))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=4, width=0.125, head="fc", fc_width=32).eval()
    run = tmp_path_factory.mktemp("run")
    vggnet.save_checkpoint(model, run / "best.safetensors", META)
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return vggnet.load_checkpoint(run_dir / "best.safetensors")[0]


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """Each format exported once (AOTInductor runs a C++ compiler: the slow one)."""
    out = tmp_path_factory.mktemp("exports")
    names = {"onnx": "m.onnx", "pt2": "m.pt2", "torchscript": "m.pt"}
    return {fmt: export_model(run_dir, fmt, out / name) for fmt, name in names.items()}


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_export_checks_batches_1_3_8_against_eager_and_leaves_only_the_file(fmt, exported):
    report = exported[fmt]
    assert report.format == fmt and report.path.is_file() and report.bytes == report.path.stat().st_size
    assert set(report.max_rel_error) == {1, 3, 8}
    assert all(0 <= e <= TOLERANCE[fmt] for e in report.max_rel_error.values())
    assert sorted(p.name for p in report.path.parent.iterdir() if p.name.startswith("m.")) == ["m.onnx", "m.pt",
                                                                                             "m.pt2"]
    assert not list(report.path.parent.glob(".*partial*"))


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_exported_model_reads_back_with_its_preprocessing_and_matches_eager(fmt, exported, model):
    loaded = load_exported(exported[fmt].path)
    assert loaded.format == fmt and loaded.prep == PREP
    assert loaded.meta["model"]["name"] == "vgg11_bn" and loaded.meta["source"].endswith("best.safetensors")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = model(x)
    got = loaded(x)
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    assert float((got - want).abs().max() / want.abs().max()) <= TOLERANCE[fmt]
    with pytest.raises(ValueError, match="N×3×32×32"):
        loaded(torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_exported_predictor_gives_the_checkpoint_labels(fmt, exported, run_dir):
    images = [Image.new("RGB", (40, 34), colour) for colour in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    want = Predictor.from_checkpoint(run_dir).predict(images, topk=2)
    got = load_exported(exported[fmt].path).predictor().predict(images, topk=2)
    assert [[label for label, _ in row] for row in got] == [[label for label, _ in row] for row in want]
    for row_got, row_want in zip(got, want, strict=True):
        assert [p for _, p in row_got] == pytest.approx([p for _, p in row_want], abs=1e-4)


def test_onnx_has_a_dynamic_batch_and_readable_metadata_props(exported):
    proto = onnx.load(str(exported["onnx"].path))
    onnx.checker.check_model(proto)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in proto.graph.output] == ["logits"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["mean"]) == META["mean"] and json.loads(props["classes"]) == CLASSES
    assert json.loads(props["image_size"]) == 32
    assert json.loads(props["vggnet"])["preprocessing"]["std"] == META["std"]


def test_pt2_metadata_is_inside_the_package(exported):
    compiled = torch._inductor.aoti_load_package(str(exported["pt2"].path))
    meta = json.loads(compiled.get_metadata()["vggnet"])
    assert meta["preprocessing"]["classes"] == CLASSES and meta["format"] == "vggnet-export"


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_metadata_is_an_extra_file(exported):
    extra = {"vggnet.json": ""}
    torch.jit.load(str(exported["torchscript"].path), _extra_files=extra)
    assert json.loads(extra["vggnet.json"])["preprocessing"]["image_size"] == 32


def test_format_is_told_from_the_content_when_the_suffix_says_nothing(exported, tmp_path):
    for fmt, report in exported.items():
        anonymous = tmp_path / f"{fmt}.bin"
        shutil.copy(report.path, anonymous)
        assert format_for(anonymous) == fmt
    assert load_exported(tmp_path / "torchscript.bin").format == "torchscript"


def test_a_failed_check_leaves_no_file(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCE, "torchscript", -1.0)  # nothing can pass
    out = tmp_path / "bad.pt"
    with pytest.raises(ExportError, match="max relative error against eager fp32"):
        export_model(run_dir, "torchscript", out)
    assert list(tmp_path.iterdir()) == []


def test_export_errors_for_bad_checkpoints_and_arguments(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_model(tmp_path / "none.safetensors", "onnx", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unknown export format 'coreml'"):
        export_model(run_dir, "coreml", tmp_path / "x.mlpackage")
    with pytest.raises(ValueError, match="must end in .pt2"):
        export_model(run_dir, "pt2", tmp_path / "x.zip")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_files_that_are_not_vggnet_exports_are_refused(model, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        load_exported(garbage)
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "missing.onnx")
    plain = tmp_path / "plain.pt"  # TorchScript without the metadata: preprocessing unknown
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, 3, 32, 32)), str(plain))
    with pytest.raises(ExportError, match="no vggnet metadata"):
        load_exported(plain)
    with pytest.raises(ExportError, match="not a loadable AOTInductor package"):
        load_exported(plain, "pt2")


def test_ort_static_int8_keeps_metadata_and_stays_close(model, tmp_path):
    fp32 = export_onnx(model, PREP, tmp_path / "m.onnx")
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    int8 = load_onnx(quantize_onnx_static(fp32, tmp_path / "m.int8.onnx", calib))
    assert int8.prep == PREP
    proto = onnx.load(str(int8.path))
    assert any(node.op_type == "QuantizeLinear" for node in proto.graph.node)  # QDQ format
    with torch.inference_mode():
        want = model(calib)
    assert float((int8(calib) - want).abs().max() / want.abs().max()) < 0.1
