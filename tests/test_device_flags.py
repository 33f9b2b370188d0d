"""``--device`` / ``--precision`` for predict and serve (issue 19, item 3): one rule in ``vggnet.hardware``, shared
with eval and training, checked before anything loads. Runs on CPUs: CUDA's absence is real or monkeypatched."""

import json

import pytest
import torch

import vggnet
from vggnet import hardware
from vggnet.cli import main
from vggnet.engine.trainer import pick_precision
from vggnet.infer import Predictor, Preprocessing, make_runtime
from vggnet.infer.predictor import EagerRuntime, check_cpu_only, placement

META = {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
PREP = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=3)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap").eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return vggnet.save_checkpoint(model, tmp_path_factory.mktemp("run") / "best.safetensors", META)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    pixels = torch.randint(0, 256, (40, 50, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


# --- parsing and refusals: vggnet.hardware ---------------------------------------------------------------


def test_default_device_is_cuda_only_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device(None) == torch.device("cpu")
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert hardware.resolve_device(None) == torch.device("cuda")
    assert hardware.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_gpu_or_unknown_device_is_a_clear_error(monkeypatch, no_cuda):
    with pytest.raises(ValueError, match="CUDA is not available here.*--device cpu"):
        hardware.resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        hardware.resolve_device("cuda:0")
    for bad in ("gpu0", "tpu"):
        with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
            hardware.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        hardware.resolve_device("cuda:3")


def test_precision_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.inference_dtype(None, cpu) is None and hardware.inference_dtype("fp32", cpu) is None
    assert hardware.inference_dtype("bf16", cpu) is torch.bfloat16
    assert hardware.inference_dtype("auto", cpu) is (torch.bfloat16 if hardware.native_bf16(cpu) else None)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        hardware.inference_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        hardware.inference_dtype("int4", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda", 0)
    assert hardware.inference_dtype("fp16", cuda) is torch.float16
    assert hardware.autocast_dtype("auto", cuda) is torch.float16  # a GPU without bf16
    with pytest.raises(ValueError, match="does not support bf16"):
        hardware.inference_dtype("bf16", cuda)


def test_training_and_inference_read_precision_alike():
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        for precision in ("fp32", "bf16", "fp16"):
            assert pick_precision(precision, device) is hardware.autocast_dtype(precision, device)
    assert pick_precision("auto", torch.device("cpu")) is hardware.autocast_dtype("auto", "cpu")


def test_cli_precision_choices_are_the_hardware_ones():
    from vggnet.cli import predict, serve

    assert set(predict.PRECISIONS) == set(serve.PRECISIONS) == set(hardware.PRECISIONS)


# --- the eager runtime puts the model and the inputs where asked ----------------------------------------


def test_eager_runtime_runs_on_the_device_in_the_autocast_dtype(model):
    seen = {}

    def hook(module, inputs, output):
        seen.update(input_device=inputs[0].device, output_dtype=output.dtype)

    predictor = Predictor(model, PREP, "eager", device="cpu", precision="bf16")
    runtime = predictor.runtime
    assert isinstance(runtime, EagerRuntime) and runtime.device == torch.device("cpu")
    assert runtime.autocast is torch.bfloat16
    assert all(p.device.type == "cpu" for p in runtime.model.parameters())
    handle = runtime.model.features.block1_conv1.register_forward_hook(hook)
    try:
        logits = predictor.logits(torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert seen == {"input_device": torch.device("cpu"), "output_dtype": torch.bfloat16}
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"  # the Runtime contract
    fp32 = Predictor(model, PREP, "eager").runtime
    assert fp32.autocast is None and fp32.model is model  # the default: fp32 on the CPU, no copy


def test_a_device_for_a_cpu_runtime_is_refused_before_it_is_built(model, no_cuda):
    with pytest.raises(ValueError, match="runtime int8 runs on the CPU only"):
        make_runtime("int8", model, PREP, None, device="cuda")
    with pytest.raises(ValueError, match="runtime channels_last runs in its own precision"):
        make_runtime("channels_last", model, PREP, None, precision="bf16")
    assert make_runtime("channels_last", model, PREP, None, device="cpu", precision="fp32").name == "channels_last"
    with pytest.raises(ValueError, match="CUDA is not available"):
        Predictor(model, PREP, "eager", device="cuda")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        placement("cpu", "fp16")
    check_cpu_only("anything", None, None)
    check_cpu_only("anything", "cpu", "fp32")


# --- the commands: errors come first, before any file is read --------------------------------------------


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_refuses_a_missing_gpu_before_loading_anything(tmp_path, no_cuda, capsys):
    missing = str(tmp_path / "nothing-here")  # neither the checkpoint nor the images exist: the device fails first
    code, _, err = run(["predict", "--ckpt", missing, "--device", "cuda", missing], capsys)
    assert code == 2 and "CUDA is not available" in err
    code, _, err = run(["predict", "--ckpt", missing, "--precision", "fp16", missing], capsys)
    assert code == 2 and "fp16 needs a CUDA device" in err
    code, _, err = run(["predict", "--ckpt", missing, "--runtime", "int8", "--device", "cuda", missing], capsys)
    assert code == 2 and "--runtime int8 runs on the CPU only" in err
    code, _, err = run(["predict", "--ckpt", str(tmp_path / "m.onnx"), "--device", "cuda:0", missing], capsys)
    assert code == 2 and "an exported file (m.onnx) runs on the CPU only" in err
    code, _, err = run(["predict", "--ckpt", str(tmp_path / "m.pt2"), "--precision", "bf16", missing], capsys)
    assert code == 2 and "runs in its own precision" in err


def test_predict_runs_eager_with_a_device_and_precision(ckpt, image, capsys):
    code, out, err = run(["predict", "--json", "--ckpt", str(ckpt), "--device", "cpu", "--precision", "bf16",
                          str(image)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "cpu" and report["precision"] == "bf16" and report["runtime"] == "eager"
    code, out, err = run(["predict", "--json", "--ckpt", str(ckpt), str(image)], capsys)
    assert code == 0, err
    assert json.loads(out)["device"] == "cpu" and json.loads(out)["precision"] == "fp32"


def test_eval_refuses_a_missing_gpu_before_loading_anything(tmp_path, no_cuda, capsys):
    code, _, err = run(["eval", "--ckpt", str(tmp_path / "nothing-here"), "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err


def test_serve_refuses_bad_devices_before_the_server_starts(ckpt, tmp_path, no_cuda, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from vggnet.serve import app

    def never(*args, **kwargs):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(app, "run_server", never)
    code, _, err = run(["serve", "--ckpt", str(ckpt), "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err
    code, _, err = run(["serve", "--ckpt", str(ckpt), "--precision", "fp16"], capsys)
    assert code == 2 and "fp16 needs a CUDA device" in err
    code, _, err = run(["serve", "--ckpt", str(ckpt), "--runtime", "channels_last", "--precision", "bf16"], capsys)
    assert code == 2 and "runtime channels_last (model run" in err
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really onnx: refused before it is read")
    with pytest.raises(ValueError, match=r"m.onnx: an exported file \(onnx\) runs on the CPU only"):
        app.check_exported(onnx, "eager", False, device="cuda")
    with pytest.raises(ValueError, match="runs in its own precision"):
        app.check_exported(onnx, "eager", False, precision="bf16")


def test_served_checkpoints_run_on_the_settings_device(ckpt):
    pytest.importorskip("fastapi")
    from vggnet.serve.app import ModelVersion, ServeSettings, with_overrides
    from vggnet.serve.repository import ModelConfig

    settings = with_overrides(ServeSettings(), device="cpu", precision="bf16")
    version = ModelVersion(ModelConfig.single(ckpt, "m"), "1", settings)
    predictor = version._load_checkpoint()
    assert predictor.runtime.device == torch.device("cpu") and predictor.runtime.autocast is torch.bfloat16
    assert predictor.logits(torch.zeros(1, 3, 32, 32)).dtype == torch.float32
