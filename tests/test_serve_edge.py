"""`vggnet serve` on the mobile formats: a ``.pte`` (ExecuTorch) and a ``.tflite`` (LiteRT) version answer exactly
what ``load_exported(file).predictor()`` answers, in their own runtimes, beside a checkpoint version; their
metadata names the format; a missing runtime is one line naming the extra.

Needs the ``edge`` extra (skipped without it); the ``.tflite`` version needs the LiteRT converter to be written
(``make edge-convert``, which CI runs), else only the ExecuTorch half runs.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import jpeg_bytes, output, tiny_checkpoint
from vggnet.cli import main
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.repository import exported_kind

for _module in ("executorch", "ai_edge_litert"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"the edge extra ({_module}) is not installed: pip install 'vggnet[edge]'", allow_module_level=True)

from vggnet.export import export_model, load_exported  # noqa: E402  (after the skip: imports the edge runtimes)

SETTINGS = {"load_in_background": False, "access_log": False}


def _converter() -> bool:
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A random tiny GAP checkpoint as a fp32 .pte, an INT8 .pte and (with the converter) a fp32 .tflite."""
    root = tmp_path_factory.mktemp("edge")
    ckpt = tiny_checkpoint(root / "run" / "best.safetensors", seed=7)
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(calib / f"{i:02d}.png")
    files = {"ckpt": ckpt, "executorch": export_model(ckpt, "executorch", root / "m.pte", max_batch=24).path,
             # untrained logits are nearly tied: agreement is test_export_edge's business, not the server's
             "executorch-int8": export_model(ckpt, "executorch-int8", root / "m.int8.pte", calib_data=calib,
                                             calib_images=8, check_images=8, min_agreement=0.0,
                                             max_batch=24).path}
    if _converter():
        files["tflite"] = export_model(ckpt, "tflite", root / "m.tflite").path
    return files


@pytest.fixture(scope="module")
def client(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for name in ("executorch", "executorch-int8", "tflite"):
        if name in exports:
            (root / name / "1").mkdir(parents=True)
            shutil.copy(exports[name], root / name / "1" / exports[name].name)
    (root / "executorch" / "2").mkdir()
    shutil.copy(exports["ckpt"], root / "executorch" / "2" / "best.safetensors")  # a checkpoint beside it
    with TestClient(create_app(ModelRepository.from_dir(root), ServeSettings(**SETTINGS))) as c:
        yield c


FORMATS = ["executorch", "executorch-int8",
           pytest.param("tflite", marks=pytest.mark.skipif(not _converter(), reason="no LiteRT converter"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mobile_file_is_served_as_load_exported_runs_it(client, exports, fmt):
    data = jpeg_bytes()
    r = client.post(f"/predict?model={fmt}&version=1&topk=3", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    loaded = load_exported(exports[fmt])
    expected = loaded.predictor().predict([Image.open(io.BytesIO(data))], topk=3)[0]
    assert [p["label"] for p in r.json()["predictions"]] == [label for label, _ in expected]
    np.testing.assert_allclose([p["probability"] for p in r.json()["predictions"]], [p for _, p in expected],
                               rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 3, 32, 32)
    r = client.post(f"/v2/models/{fmt}/versions/1/infer",
                    json={"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                      "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(output(r, "logits"), loaded(x).numpy(), rtol=1e-5, atol=1e-5)
    meta = client.get(f"/v2/models/{fmt}/versions/1").json()
    assert meta["parameters"]["format"] == fmt and meta["parameters"]["runtime"] == fmt
    assert meta["platform"] == fmt.removesuffix("-int8")


def test_a_checkpoint_version_beside_a_pte_one_stays_a_checkpoint(client):
    meta = client.get("/v2/models/executorch/versions/2").json()
    assert meta["parameters"]["format"] == "checkpoint" and meta["platform"] == "pytorch"
    states = {(e["name"], e["version"]): e["state"] for e in client.post("/v2/repository/index").json()}
    assert all(state == "READY" for state in states.values()) and ("executorch-int8", "1") in states


def test_the_suffixes_are_exported_kinds(tmp_path):
    assert exported_kind(tmp_path / "m.int8.pte") == "executorch"
    assert exported_kind(tmp_path / "m.tflite") == "tflite"


def test_a_pte_without_executorch_says_what_to_install(exports, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if not installed
    assert main(["serve", "--ckpt", str(exports["executorch"])]) == 2
    err = capsys.readouterr().err
    assert "needs executorch, which is not installed: pip install 'vggnet[serve,edge]'" in err
    assert len(err.strip().splitlines()) == 1
