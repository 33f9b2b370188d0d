"""`vggnet serve` on files written by `vggnet export` (ONNX fp32, ONNX INT8, TorchScript, .pt2): served as they
are, without calibration data, answering exactly what ``load_exported(file).predictor()`` answers; version
folders that hold two models, a --runtime for an exported file, and formats that run code from the file
(.pt2, TorchScript) without --trust-model-code are errors."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import jpeg_bytes, output, tiny_checkpoint
from vggnet.cli import main
from vggnet.export import export_model, load_exported
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.repository import ModelConfig, exported_kind

pytest.importorskip("onnxruntime.quantization")

SETTINGS = {"load_in_background": False, "access_log": False}


def v2_request(x: torch.Tensor) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def expected_top(file, data: bytes, k: int) -> list[tuple[str, float]]:
    """What `vggnet predict --ckpt FILE` answers for the image bytes ``data``."""
    return load_exported(file).predictor().predict([Image.open(io.BytesIO(data))], topk=k)[0]


def assert_same_top(body: dict, expected: list[tuple[str, float]]) -> None:
    assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], [p for _, p in expected],
                               rtol=1e-5, atol=1e-7)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model on one thread


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A random tiny checkpoint exported as fp32 ONNX, INT8 ONNX and TorchScript (about 10 s in all).

    The INT8 export calibrates on a folder of random PNGs and its agreement bound is lowered to 0: an
    untrained net's logits are nearly tied, so INT8 flips its top-1 often; whether the export is good is
    tests/test_export_int8.py's business, these tests check that the server runs the file as it is.
    """
    root = tmp_path_factory.mktemp("exported")
    ckpt = tiny_checkpoint(root / "run" / "best.safetensors", seed=5)
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(calib / f"{i:02d}.png")
    int8 = export_model(ckpt, "onnx-int8", root / "m.int8.onnx", calib_data=calib, calib_images=8, check_images=8,
                        min_agreement=0.0)
    assert int8.format == "onnx-int8"
    return {"ckpt": ckpt, "onnx": export_model(ckpt, "onnx", root / "m.onnx").path, "onnx-int8": int8.path,
            "torchscript": export_model(ckpt, "torchscript", root / "m.pt").path}


def place(root, model: str, version: str, file):
    """Copy ``file`` into the version folder ``root/model/version``."""
    folder = root / model / version
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(file, folder / file.name)


@pytest.fixture(scope="module")
def repo_dir(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    place(root, "fp32", "1", exports["onnx"])
    place(root, "int8", "1", exports["onnx-int8"])
    place(root, "mixed", "1", exports["ckpt"])  # a checkpoint version and an exported one, side by side
    place(root, "mixed", "2", exports["onnx-int8"])
    return root


@pytest.fixture(scope="module")
def client(repo_dir):
    with TestClient(create_app(ModelRepository.from_dir(repo_dir), ServeSettings(**SETTINGS))) as c:
        yield c


@pytest.mark.parametrize("model, fmt", [("fp32", "onnx"), ("int8", "onnx-int8")])
def test_exported_onnx_is_served_as_load_exported_runs_it(client, exports, model, fmt):
    data = jpeg_bytes()
    r = client.post(f"/predict?model={model}&topk=3", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert_same_top(r.json(), expected_top(exports[fmt], data, 3))
    x = torch.randn(3, 3, 32, 32)
    r = client.post(f"/v2/models/{model}/infer", json=v2_request(x))
    assert r.status_code == 200, r.text
    loaded = load_exported(exports[fmt])
    assert loaded.format == fmt
    np.testing.assert_allclose(output(r, "logits"), loaded(x).numpy(), rtol=1e-5, atol=1e-6)


def test_metadata_names_the_exported_format_and_platform(client):
    meta = client.get("/v2/models/int8").json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["parameters"]["format"] == "onnx-int8" and meta["parameters"]["runtime"] == "onnx-int8"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["shape"] == [-1, 3]
    assert meta["parameters"]["preprocessing"]["mean"] == [0.5] * 3  # from the file's own metadata
    assert client.get("/v2/models/fp32").json()["parameters"]["format"] == "onnx"
    assert client.get("/v2/models/int8/config").json()["platform"] == "onnxruntime_onnx"
    checkpoint = client.get("/v2/models/mixed/versions/1").json()
    assert checkpoint["platform"] == "pytorch" and checkpoint["parameters"]["format"] == "checkpoint"
    assert checkpoint["parameters"]["runtime"] == "eager"
    assert client.get("/v2/models/mixed/versions/2").json()["parameters"]["format"] == "onnx-int8"
    index = client.post("/v2/repository/index").json()
    assert sorted((e["name"], e["version"], e["state"]) for e in index) == [
        ("fp32", "1", "READY"), ("int8", "1", "READY"), ("mixed", "1", "READY"), ("mixed", "2", "READY")]


def test_ckpt_file_serves_one_exported_file(exports, tmp_path):
    repo = ModelRepository.from_checkpoints([exports["onnx-int8"]])
    assert list(repo.models) == ["m.int8"] and repo.models["m.int8"].versions["1"] == exports["onnx-int8"]
    data = jpeg_bytes(colour=(20, 160, 90))
    with TestClient(create_app(repo, ServeSettings(**SETTINGS))) as c:
        r = c.post("/predict?topk=2", files={"image": ("x.jpg", data, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == "m.int8"
        assert_same_top(r.json(), expected_top(exports["onnx-int8"], data, 2))
    # --ckpt RUN still means the run's checkpoint when `vggnet export` left its default output beside it
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(exports["ckpt"], run / "best.safetensors")
    shutil.copy(exports["onnx"], run / "best.onnx")
    assert ModelConfig.single(run).versions["1"].name == "best.safetensors"


def test_a_version_folder_with_two_models_is_an_error_naming_them(exports, tmp_path):
    place(tmp_path, "a", "1", exports["ckpt"]).rename(tmp_path / "a" / "1" / "x.safetensors")
    place(tmp_path, "a", "1", exports["onnx"])
    folder = re.escape(str(tmp_path / "a" / "1"))
    with pytest.raises(ValueError, match=rf"{folder}: .*exactly one.*found: x.safetensors, m.onnx"):
        ModelConfig.from_dir(tmp_path / "a")
    place(tmp_path, "b", "1", exports["ckpt"])  # a run folder with an export beside its checkpoint
    shutil.copy(exports["onnx-int8"], tmp_path / "b" / "1" / "best.int8.onnx")
    with pytest.raises(ValueError, match=r"found: best.safetensors, best.int8.onnx; keep one"):
        ModelConfig.from_dir(tmp_path / "b")
    place(tmp_path / "repo", "c", "1", exports["onnx"])
    place(tmp_path / "repo", "c", "1", exports["onnx-int8"])
    with pytest.raises(ValueError, match=r"c/1: .*found: m.int8.onnx, m.onnx"):
        ModelRepository.from_dir(tmp_path / "repo")
    # a weights-only torch file is no exported model (TorchScript shares its .pt suffix): not a second model
    place(tmp_path, "d", "1", exports["onnx"])
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "d" / "1" / "weights.pt")
    assert ModelConfig.from_dir(tmp_path / "d").versions["1"].name == "m.onnx"
    assert exported_kind(tmp_path / "d" / "1" / "weights.pt") is None
    assert exported_kind(exports["torchscript"]) == "torchscript" and exported_kind(exports["onnx-int8"]) == "onnx"


def test_a_runtime_for_an_exported_file_is_an_error(exports, capsys):
    assert main(["serve", "--ckpt", str(exports["onnx-int8"]), "--runtime", "int8"]) == 2
    err = capsys.readouterr().err
    assert "an exported file runs in its own runtime" in err and "drop --runtime int8" in err
    # built without the CLI: the version does not load, says why, and keeps the server unready
    repo = ModelRepository.from_checkpoints([exports["onnx"]])
    with TestClient(create_app(repo, ServeSettings(runtime="bf16", **SETTINGS))) as c:
        assert c.get("/v2/health/ready").status_code == 503
        (entry,) = c.post("/v2/repository/index").json()
        assert entry["state"] == "UNAVAILABLE" and "drop --runtime bf16" in entry["reason"]
        r = c.post("/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 503 and "drop --runtime bf16" in r.json()["error"]


def test_onnx_without_onnxruntime_says_what_to_install(exports, monkeypatch, capsys):
    """The serve image installs vggnet[serve] only; ONNX Runtime comes with the export extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["serve", "--ckpt", str(exports["onnx"])]) == 2
    assert "needs onnxruntime, which is not installed: pip install 'vggnet[serve,export]'" in capsys.readouterr().err


def test_cli_serves_exported_files_without_calibration_data(exports, monkeypatch, capsys):
    import vggnet.serve.app

    served = []
    monkeypatch.setattr(vggnet.serve.app, "run_server", lambda repo, settings, **kw: served.append((repo, settings)))
    assert main(["serve", "--ckpt", str(exports["onnx-int8"]), "--ckpt", str(exports["onnx"])]) == 0
    repo, settings = served.pop()
    assert sorted(repo.models) == ["m", "m.int8"] and settings.calib_data is None and settings.runtime == "eager"
    # checkpoints still need calibration images for a calibrated runtime, and --calib-data reaches the server
    assert main(["serve", "--ckpt", str(exports["ckpt"]), "--runtime", "int8"]) == 2
    assert "needs calibration images" in capsys.readouterr().err
    calib = str(exports["ckpt"].parent.parent / "calib")
    assert main(["serve", "--ckpt", str(exports["ckpt"]), "--runtime", "int8", "--calib-data", calib,
                 "--calib-n", "4"]) == 0
    _, settings = served.pop()
    assert settings.calib_data == calib and settings.calib_n == 4
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "exported files (vggnet export): served as they are, on the CPU, INT8 ones included" in help_text
    assert "--trust-model-code" in help_text


def test_torchscript_is_served_only_with_trust_model_code(exports, capsys):
    """torch.jit.load runs the TorchScript program in the file: code from the file, unlike a safetensors
    checkpoint or ONNX, so the operator has to say the file is trusted."""
    assert main(["serve", "--ckpt", str(exports["torchscript"])]) == 2
    assert "--trust-model-code" in capsys.readouterr().err
    repo = ModelRepository.from_checkpoints([exports["torchscript"]])
    with TestClient(create_app(repo, ServeSettings(**SETTINGS))) as c:
        (entry,) = c.post("/v2/repository/index").json()
        assert entry["state"] == "UNAVAILABLE" and "TorchScript program" in entry["reason"]
    data = jpeg_bytes(colour=(90, 90, 200))
    with TestClient(create_app(repo, ServeSettings(trust_model_code=True, **SETTINGS))) as c:
        r = c.post("/predict?topk=3", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert_same_top(r.json(), expected_top(exports["torchscript"], data, 3))
        meta = c.get("/v2/models/m").json()
        assert meta["platform"] == "pytorch_libtorch" and meta["parameters"]["format"] == "torchscript"


def test_serving_an_exported_file_imports_no_training_code(exports):
    """serve sits below engine, evaluate and compress (docs/architecture.md); loading an export goes through
    vggnet.export, whose INT8 calibration path reaches vggnet.evaluate, but only when it exports."""
    code = textwrap.dedent(f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        from fastapi.testclient import TestClient
        from vggnet.serve import ModelRepository, ServeSettings, create_app
        repo = ModelRepository.from_checkpoints([{str(exports["onnx-int8"])!r}])
        with TestClient(create_app(repo, ServeSettings(load_in_background=False, access_log=False))) as c:
            r = c.post("/v2/models/m.int8/infer", json={{"inputs": [{{"name": "input", "datatype": "FP32",
                       "shape": [1, 3, 32, 32], "data": [0.0] * 3072}}]}})
        print(json.dumps([r.status_code, sorted(m for m in sys.modules if m.startswith("vggnet."))]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    status, modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == 200 and "vggnet.export.onnx" in modules
    assert not [m for m in modules if m.split(".")[1] in ("engine", "evaluate", "compress", "reproduce")]


@pytest.mark.slow
def test_pt2_package_is_served_only_with_trust_model_code(exports, tmp_path):
    """AOTInductor compiles C++ (about 30 s for this model on 2 busy cores); the package holds a shared library
    that loading runs, hence the same trust rule as TorchScript. pt2-int8 loads through the same path."""
    pt2 = export_model(exports["ckpt"], "pt2", tmp_path / "m.pt2").path
    repo = ModelRepository.from_checkpoints([pt2])
    with TestClient(create_app(repo, ServeSettings(**SETTINGS))) as c:
        (entry,) = c.post("/v2/repository/index").json()
        assert entry["state"] == "UNAVAILABLE" and "compiled shared library" in entry["reason"]
    data = jpeg_bytes(colour=(200, 200, 40))
    with TestClient(create_app(repo, ServeSettings(trust_model_code=True, **SETTINGS))) as c:
        r = c.post("/predict?topk=3", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert_same_top(r.json(), expected_top(pt2, data, 3))
        meta = c.get("/v2/models/m").json()
        assert meta["platform"] == "pytorch" and meta["parameters"]["format"] == "pt2"
