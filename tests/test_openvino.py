"""The ``openvino`` and ``openvino-int8`` runtimes on a tiny VGG trained for seconds on the embedded digits: top-1
agreement with eager on held-out images, what actually runs (precision, INT8 convolutions), a dynamic batch,
``auto``, the missing-calibration and missing-package errors, and ``vggnet predict`` end to end."""

import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import vggnet  # noqa: E402
from export_helpers import PREP, digits, trained_run  # noqa: E402
from vggnet.cli import main  # noqa: E402
from vggnet.errors import UsageError  # noqa: E402
from vggnet.infer import AutoRuntime, RuntimeUnavailable, make_runtime, preprocess, top1_agreement  # noqa: E402
from vggnet.infer.runtimes import AUTO_CANDIDATES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model on one thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run_dir):
    return vggnet.load_checkpoint(run_dir / "best.safetensors")[0]


@pytest.fixture(scope="module")
def calib():
    return preprocess(list(digits("train")[0][::20]), PREP)  # 72 training images


@pytest.fixture(scope="module")
def held_out(model):
    x = preprocess(list(digits("val")[0]), PREP)  # 360 validation images, never calibrated on
    with torch.inference_mode():
        return x, model(x)


def cpu_has_bf16() -> bool:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def conv_precisions(runtime) -> list[str]:
    """The precision each convolution of the compiled model runs in, as the CPU plugin reports it."""
    ops = runtime.compiled.get_runtime_model().get_ordered_ops()
    return [op.get_rt_info()["runtimePrecision"].astype(str) for op in ops
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"]


def test_openvino_agrees_with_eager_in_the_default_precision_at_any_batch_size(model, calib, held_out):
    x, want = held_out
    runtime = make_runtime("openvino", model, PREP, calib)
    got = runtime(x)
    assert runtime.name == "openvino" and got.dtype == torch.float32 and got.shape == want.shape
    assert top1_agreement(got, want) >= 0.99
    assert runtime.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert set(conv_precisions(runtime)) == {"bf16" if cpu_has_bf16() else "f32"} and len(conv_precisions(runtime)) == 8
    for n in (1, 5, 1):  # one compiled model, batch sizes it was not converted with
        assert torch.allclose(runtime(x[:n]), got[:n], atol=1e-3 * float(got.abs().max()))


def test_openvino_int8_runs_int8_convolutions_and_agrees_with_eager(model, calib, held_out):
    x, want = held_out
    runtime = make_runtime("openvino-int8", model, PREP, calib)
    got = runtime(x)
    assert runtime.name == "openvino-int8" and got.dtype == torch.float32 and got.shape == want.shape
    assert top1_agreement(got, want) >= 0.97  # the INT8 exports' bound (tests/test_export_int8.py)
    precisions = conv_precisions(runtime)
    assert len(precisions) == 8 and set(precisions) <= {"u8", "i8"}, precisions
    assert runtime(x[:1]).shape == (1, 10) and runtime(x[:5]).shape == (5, 10)


def test_openvino_int8_without_calibration_is_one_line(model):
    with pytest.raises(UsageError, match="openvino-int8.*calibration") as info:
        make_runtime("openvino-int8", model, PREP)
    assert "\n" not in str(info.value) and "--calib-data" in str(info.value)


def test_a_missing_openvino_names_the_extra_and_auto_skips_it(model, calib, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the extra imports
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'vggnet\[openvino\]'"):
        make_runtime("openvino", model, PREP, calib)
    auto = make_runtime("auto", model, PREP, calib[:8], candidates=["openvino", "openvino-int8"])
    rows = {r["name"]: r for r in auto.report}
    assert auto.chosen.name == "eager" and list(rows) == ["eager", "openvino", "openvino-int8"]
    assert all("vggnet[openvino]" in rows[n]["error"] for n in ("openvino", "openvino-int8"))


def test_auto_builds_times_and_reports_openvino(model, calib):
    auto = make_runtime("auto", model, PREP, calib, candidates=["openvino"])
    assert isinstance(auto, AutoRuntime)
    rows = {r["name"]: r for r in auto.report}
    assert list(rows) == ["eager", "openvino"] and rows["openvino"]["error"] is None
    assert rows["openvino"]["ok"] and rows["openvino"]["agreement"] >= 0.99 and rows["openvino"]["img_per_s"] > 0
    assert "openvino" in auto.summary()
    assert AUTO_CANDIDATES[-2:] == ("openvino", "openvino-int8")  # tried by default, timed after the PyTorch ones


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shots")
    for i, image in enumerate(digits("val")[0][:6]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"{i}.png")
    return root


def predict_table(argv, capsys) -> tuple[list[list[str]], str]:
    assert main(["predict", "--topk", "2", *argv]) == 0
    out, err = capsys.readouterr()
    return [line.split() for line in out.strip().splitlines()], err


@pytest.mark.parametrize("runtime", ["openvino", "openvino-int8"])
def test_cli_predict_prints_the_table_eager_prints(runtime, run_dir, images, capsys):
    want, _ = predict_table(["--ckpt", str(run_dir), str(images)], capsys)
    got, err = predict_table(["--ckpt", str(run_dir), "--runtime", runtime, str(images)], capsys)
    # nothing but the table on stdout (no NNCF progress bar or log line), the same top-1 labels, probabilities as
    # close as the precision allows (bf16 logits: a few tenths of a point; INT8 moves a tiny model's by a few)
    assert len(got) == len(want) == 7 and got[0] == want[0] == ["image", "top-1", "top-2"]
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g[0] == w[0] and g[1] == w[1]
        assert float(g[2].rstrip("%")) == pytest.approx(float(w[2].rstrip("%")), abs=10 if "int8" in runtime else 0.5)
    calibrating = [line for line in err.splitlines() if "calibrating" in line]
    assert calibrating == ([f"vggnet predict: calibrating openvino-int8 on 64 images of the training split of "
                            f"{run_dir / 'recipe.yaml'} (digits)"] if runtime == "openvino-int8" else [])
