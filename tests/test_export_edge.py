"""The mobile formats: ``vggnet export --format executorch|executorch-int8|tflite|tflite-int8`` of a tiny VGG trained
for seconds on the embedded digits, each file read back in its own runtime (ExecuTorch's Python runtime, LiteRT's
interpreter) and compared with eager on the run's held-out images; ``vggnet predict`` on each; the one-line errors for
a damaged file, a file of the other format and a program that is not a vggnet export.

Needs the ``edge`` extra (executorch, ai-edge-litert: skipped without it) and, to write ``.tflite`` files, the LiteRT
converter (``make edge-convert``: those tests skip without it, the ExecuTorch ones still run).
"""

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vggnet
from export_helpers import PREP, digits, trained_run
from vggnet.cli import main
from vggnet.infer import preprocess

for _module in ("executorch", "ai_edge_litert"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"the edge extra ({_module}) is not installed: pip install 'vggnet[edge]'", allow_module_level=True)

from vggnet.export import ExportError, load_exported  # noqa: E402  (after the skip: imports the edge runtimes)
from vggnet.export.common import MIN_AGREEMENT  # noqa: E402
from vggnet.infer.edge import ExecuTorchRuntime, LiteRTRuntime, tflite_metadata  # noqa: E402


def _converter_missing() -> str | None:
    """Why a .tflite cannot be written here, or None: litert-torch is installed by `make edge-convert`, not an
    extra, and an install without its conversion-time dependencies fails on import."""
    if importlib.util.find_spec("litert_torch") is None:
        return "the LiteRT converter (litert-torch) is not installed: make edge-convert"
    try:
        import litert_torch  # noqa: F401
    except ImportError as exc:
        return f"the LiteRT converter does not import ({exc}): make edge-convert"
    return None


needs_converter = pytest.mark.skipif(_converter_missing() is not None, reason=str(_converter_missing()))

NAMES = {"executorch": "m.pte", "executorch-int8": "m.int8.pte", "tflite": "m.tflite", "tflite-int8": "m.int8.tflite"}
# The executorch export's --max-batch: over 16, where a 32-px VGG captured at a smaller example batch is planned for
# 15 images (the memory-planning caveat the export works around), and under the 40-image slices the tests run.
MAX_BATCH = 24



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model on one thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run_dir):
    return vggnet.load_checkpoint(run_dir / "best.safetensors")[0]


@pytest.fixture(scope="module")
def held_out():
    """The run's validation images, preprocessed: never calibrated on."""
    x, _ = digits("val")
    return preprocess(list(x), PREP)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight validation digits as PNG files, for vggnet predict."""
    folder = tmp_path_factory.mktemp("images")
    x, _ = digits("val")
    for i in range(8):
        Image.fromarray(x[i * 9].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return folder


def cli(argv):
    """(exit code, stdout, stderr) of `vggnet ARGV`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def export(run_dir, folder, fmt, *extra):
    """`vggnet export --json` through the CLI; INT8 by the --out suffix alone (*.int8.pte, *.int8.tflite)."""
    out = folder / fmt / NAMES[fmt]  # a folder each, to see that nothing is left beside the file
    fmt_args = [] if fmt.endswith("-int8") else ["--format", fmt]
    code, stdout, stderr = cli(["export", "--ckpt", str(run_dir), *fmt_args, "--out", str(out), "--json", *extra])
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture(scope="module")
def exported_et(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("et")
    return {fmt: export(run_dir, folder, fmt, "--max-batch", str(MAX_BATCH))
            for fmt in ("executorch", "executorch-int8")}


@pytest.fixture(scope="module")
def exported_tflite(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite")
    return {fmt: export(run_dir, folder, fmt) for fmt in ("tflite", "tflite-int8")}


def _reports(request, fmt):
    return request.getfixturevalue("exported_et" if fmt.startswith("executorch") else "exported_tflite")[fmt]


FORMATS = [pytest.param("executorch"), pytest.param("executorch-int8"),
           pytest.param("tflite", marks=needs_converter), pytest.param("tflite-int8", marks=needs_converter)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_is_checked_and_agrees_with_eager_in_its_own_runtime(fmt, request, model, held_out):
    report = _reports(request, fmt)
    path = Path(report["path"])
    assert report["format"] == fmt and path.is_file() and report["bytes"] == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    assert {"1", "3", "8"} <= set(report["max_rel_error"])
    loaded = load_exported(path)
    assert loaded.format == fmt and loaded.prep == PREP
    runtime = loaded.runtime.fn  # the runtime itself, behind the shape check
    assert isinstance(runtime, ExecuTorchRuntime if fmt.startswith("executorch") else LiteRTRuntime)
    with torch.inference_mode():
        want = model.eval()(held_out).argmax(1)
    got = torch.cat([loaded(chunk) for chunk in held_out.split(40)]).argmax(1)  # 40: over the .pte's max batch
    agreement = float((got == want).float().mean())
    if fmt.endswith("-int8"):
        assert report["tolerance"] is None and report["min_agreement"] == MIN_AGREEMENT
        assert report["agreement"] >= MIN_AGREEMENT and agreement >= MIN_AGREEMENT
        assert report["check"]["split"] == "val" and report["quantization"]["calibration"]["split"] == "train"
        assert loaded.meta["quantization"]["weights"] == "int8, symmetric, per output channel"
    else:
        assert report["tolerance"] == 1e-4 and max(report["max_rel_error"].values()) <= 1e-4
        assert agreement >= 0.99
        assert "quantization" not in loaded.meta
        with pytest.raises(ExportError, match="no quantization record"):
            load_exported(path, f"{fmt}-int8")


def test_executorch_memory_is_planned_for_the_max_batch_and_larger_batches_run_in_slices(exported_et, model):
    """Captured at an example batch below the max, the lowering would plan for fewer images (15 here) and the max
    batch would fail: the program must run exactly max_batch images in one call."""
    for fmt, report in exported_et.items():
        assert report["max_batch"] == MAX_BATCH
        runtime = ExecuTorchRuntime(report["path"])
        assert runtime.max_batch == MAX_BATCH
        x = torch.randn(MAX_BATCH, 3, 32, 32)
        (logits,) = runtime.method.execute([x])  # one call at the max batch, no slicing
        assert logits.shape == (MAX_BATCH, 10), fmt
    runtime = ExecuTorchRuntime(exported_et["executorch"]["path"])
    x = torch.randn(MAX_BATCH * 2 + 3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(runtime(x), model(x), rtol=1e-4, atol=1e-4)


@needs_converter
def test_tflite_is_written_at_batch_1_resized_at_run_time_and_carries_its_metadata(exported_tflite, model):
    for fmt, report in exported_tflite.items():
        runtime = LiteRTRuntime(report["path"])
        assert list(runtime.input["shape_signature"]) == [1, 3, 32, 32], fmt
        meta = json.loads(tflite_metadata(report["path"]))
        assert meta["format"] == "vggnet-export" and meta["preprocessing"] == PREP.to_dict()
        assert ("quantization" in meta) == fmt.endswith("-int8")
        assert meta["litert"] == {"batch": 1, "resizable": True} and report["resizable"] is True  # gap head
        if fmt.endswith("-int8"):  # int8 in and out, quantized by the runtime
            assert runtime.input["dtype"].__name__ == "int8" and runtime.output["dtype"].__name__ == "int8"
    runtime = LiteRTRuntime(exported_tflite["tflite"]["path"])
    for batch in (5, 1, 37):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(runtime(x), model(x), rtol=1e-4, atol=1e-4)


@needs_converter
@pytest.mark.parametrize("head", ["fc", "conv"])
def test_tflite_of_a_head_that_does_not_resize_runs_one_image_at_a_time(head, tmp_path):
    """litert-torch bakes the batch of 1 into the fc and conv heads: resized, the file fails or returns one row, so the
    export records it and the runtime slices instead (fp32: an untrained net is enough for the tolerance check)."""
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=4, width=0.0625, head=head, fc_width=16).eval()
    meta = {"classes": ["a", "b", "c", "d"], "mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32}
    ckpt = vggnet.save_checkpoint(model, tmp_path / "fc.safetensors", meta)
    out = tmp_path / f"{head}.tflite"
    code, stdout, err = cli(["export", "--ckpt", str(ckpt), "--out", str(out), "--json"])
    assert code == 0, err
    report = json.loads(stdout)
    assert set(report["max_rel_error"]) == {"1", "3", "8"} and report["resizable"] is False
    loaded = load_exported(out)
    assert loaded.meta["litert"] == {"batch": 1, "resizable": False} and loaded.runtime.fn.resizable is False
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_executorch_metadata_is_a_constant_method_of_the_program(exported_et):
    runtime = ExecuTorchRuntime(exported_et["executorch-int8"]["path"])
    meta = json.loads(runtime.metadata)
    assert meta["format"] == "vggnet-export" and meta["preprocessing"] == PREP.to_dict()
    assert meta["quantization"]["tool"].endswith("XNNPACKQuantizer")
    assert meta["model"]["name"] == "vgg11_bn"


def _table(lines):
    """image -> top-1 label, from predict's table."""
    return {line.split()[0]: line.split()[1] for line in lines[1:]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_on_the_file_prints_the_checkpoints_table(fmt, request, run_dir, images):
    report = _reports(request, fmt)
    code, want, err = cli(["predict", "--ckpt", str(run_dir), "--topk", "2", str(images)])
    assert code == 0, err
    code, got, err = cli(["predict", "--ckpt", report["path"], "--topk", "2", str(images)])
    assert code == 0 and err == "", err  # the runtimes' own load-time lines are held back
    want, got = want.splitlines(), got.splitlines()
    assert len(got) == len(want) == 9 and got[0] == want[0]
    if fmt.endswith("-int8"):  # the same labels; probabilities within INT8 rounding
        assert _table(got) == _table(want)
    else:
        assert got == want


@pytest.fixture(scope="module")
def bad_files(exported_et, tmp_path_factory):
    """A truncated .pte, a .pte of a model vggnet did not export (no metadata), and the .pte named .tflite."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    folder = tmp_path_factory.mktemp("bad")
    good = Path(exported_et["executorch"]["path"])
    (folder / "truncated.pte").write_bytes(good.read_bytes()[:4000])
    shutil.copy(good, folder / "program.tflite")
    other = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    program = to_edge_transform_and_lower(other, partitioner=[XnnpackPartitioner()]).to_executorch()
    (folder / "other.pte").write_bytes(program.buffer)
    return folder


@pytest.mark.parametrize("name, says", [
    ("truncated.pte", r"not a loadable ExecuTorch program: Failed to load program, error: 0x:23 \(File size is too "
                      r"small"),
    ("other.pte", r"no vggnet metadata in this file"),
    ("program.tflite", r"not a loadable LiteRT \(.tflite\) model: The model is not a valid Flatbuffer buffer"),
])
def test_a_damaged_foreign_or_mistyped_file_is_one_line_exit_2(name, says, bad_files, images):
    code, out, err = cli(["predict", "--ckpt", str(bad_files / name), str(images)])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("vggnet predict: error: ")
    assert __import__("re").search(says, err), err


@needs_converter
def test_a_pte_named_tflite_and_a_tflite_named_pte_are_refused_in_one_line(exported_tflite, tmp_path, images):
    wrong = tmp_path / "model.pte"
    shutil.copy(exported_tflite["tflite"]["path"], wrong)
    code, out, err = cli(["predict", "--ckpt", str(wrong), str(images)])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "Program identifier 'TFL3' != expected 'ET12'" in err


def test_a_max_batch_the_lowering_fixes_is_an_error_not_a_program_that_fails_at_batch_1(run_dir, tmp_path):
    """Example batch 16 on this 32-px model: ExecuTorch 1.5's XNNPACK lowering fixes the batch at 16. Either the
    export says so in one line, or (a later ExecuTorch) the program runs batch 1 and 16."""
    out = tmp_path / "m16.pte"
    code, _, err = cli(["export", "--ckpt", str(run_dir), "--out", str(out), "--max-batch", "16"])
    if code == 2:
        assert "fixed the batch dimension at 16" in err and len(err.strip().splitlines()) == 1
        assert list(tmp_path.iterdir()) == []
    else:
        assert code == 0, err
        runtime = ExecuTorchRuntime(out)
        assert runtime.max_batch == 16
        for batch in (1, 16):
            runtime.method.execute([torch.randn(batch, 3, 32, 32)])


def test_export_flags_are_checked_before_any_work(run_dir, tmp_path):
    code, _, err = cli(["export", "--ckpt", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "m.tflite"),
                        "--max-batch", "4"])
    assert code == 2 and "--max-batch applies to the executorch formats" in err
    code, _, err = cli(["export", "--ckpt", str(run_dir), "--format", "executorch", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "an ExecuTorch program must end in .pte" in err
    assert list(tmp_path.iterdir()) == []
