"""UINT8 image tensors over V2 (issue #29, item 12): pixels as Triton's image clients send them, N×H×W×C or
N×C×H×W, preprocessed by the server exactly as ``POST /predict`` preprocesses an upload, and said so in the model
metadata."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import vggnet
from serve_helpers import live_server, output
from vggnet.infer import Predictor, Preprocessing, preprocess
from vggnet.serve import ModelRepository, ServeError, ServeSettings, create_app
from vggnet.serve import v2 as serve_v2

META = {"classes": ["a", "b", "c"], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "image_size": 32}


#: colours of the pictures the tritonclient test sends (a patch of the opposite colour in each): with the net of
#: clear_answer_checkpoint, their top-1 is "b" for some and "c" for others
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0), (128, 0, 255),
           (0, 200, 200)]


def clear_answer_checkpoint(path):
    """A tiny net whose last layer is scaled up, so its top-1 depends on the image and is no near-tie."""
    torch.manual_seed(1)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap")
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(30)
    return vggnet.save_checkpoint(model.eval(), path, META)


def photo(seed: int, size=(60, 44)) -> np.ndarray:
    """An H×W×3 picture (not square, not the model's size: the server must resize and crop it)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y:y + h // 2, x:x + w // 2] = rng.integers(0, 256, 3)
    return pixels


def palette_picture(colour, size=(60, 44)) -> np.ndarray:
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:] = colour
    pixels[10:34, 12:30] = 255 - np.asarray(colour)
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # lossless: the upload decodes to these very pixels
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return clear_answer_checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors")


@pytest.fixture(scope="module")
def prep(ckpt):
    return Predictor.from_checkpoint(ckpt).prep


def uint8_request(pixels: np.ndarray, binary: bool = False) -> tuple[bytes, dict]:
    spec = {"name": "input", "datatype": "UINT8", "shape": list(pixels.shape)}
    if binary:
        spec["parameters"] = {"binary_data_size": pixels.size}
        header = json.dumps({"inputs": [spec]}).encode()
        return header + pixels.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                           "Content-Type": "application/octet-stream"}
    spec["data"] = pixels.reshape(-1).tolist()
    return json.dumps({"inputs": [spec]}).encode(), {"Content-Type": "application/json"}


def test_uint8_images_are_preprocessed_as_a_decoded_upload(prep):
    images = np.stack([photo(0), photo(1)])
    expected = preprocess([Image.open(io.BytesIO(png(p))) for p in images], prep)  # what /predict builds
    for pixels in (images, images.transpose(0, 3, 1, 2)):  # NHWC, NCHW
        body, headers = uint8_request(np.ascontiguousarray(pixels), binary=True)
        request = serve_v2.parse_request(body, headers["Inference-Header-Content-Length"])
        x = serve_v2.input_tensor(request, prep, max_batch_size=4)
        assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
        assert torch.equal(x, expected)
    body, _ = uint8_request(images[:1])  # JSON data
    assert torch.equal(serve_v2.input_tensor(serve_v2.parse_request(body, None), prep, 4), expected[:1])


def test_uint8_layout_and_checks(prep):
    assert serve_v2.uint8_layout([1, 44, 60, 3], 3) == "NHWC"
    assert serve_v2.uint8_layout([1, 3, 44, 60], 3) == "NCHW"
    assert serve_v2.uint8_layout([1, 3, 44, 3], 3) == "NHWC"  # both could be: NHWC, as documented

    def refused(pixels, binary=False, max_batch=4, max_pixels=10**6, data=None) -> ServeError:
        body, headers = uint8_request(pixels, binary)
        if data is not None:
            header = json.loads(body)
            header["inputs"][0]["data"] = data
            body = json.dumps(header).encode()
        request = serve_v2.parse_request(body, headers.get("Inference-Header-Content-Length"))
        with pytest.raises(ServeError) as info:
            serve_v2.input_tensor(request, prep, max_batch, max_pixels)
        return info.value

    one = photo(0)[None]
    assert "[N, H, W, 3] or [N, 3, H, W]" in refused(one[..., :2]).message  # two channels for a 3-channel model
    assert "[N, H, W, 3]" in refused(one[0]).message  # no batch axis
    assert "integers from 0 to 255" in refused(one, data=[256] * one.size).message
    assert "integers from 0 to 255" in refused(one, data=[-1] * one.size).message
    assert "integers from 0 to 255" in refused(one, data=[0.5] * one.size).message
    assert "batch of 5" in refused(np.repeat(one, 5, axis=0)).message
    big = refused(one, max_pixels=100)
    assert big.status == 413 and "pixels exceeds" in big.message
    body, headers = uint8_request(one, binary=True)
    with pytest.raises(ServeError, match="in UINT8 needs"):
        serve_v2.input_tensor(serve_v2.parse_request(body[:-1], headers["Inference-Header-Content-Length"]), prep, 4)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 2, 2, 3], "data": [0] * 12}]})
    with pytest.raises(ServeError, match="'FP32'.*'UINT8'"):
        serve_v2.input_tensor(serve_v2.parse_request(body.encode(), None), prep, 4)


def test_metadata_lists_every_accepted_input(ckpt):
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]), ServeSettings(load_in_background=False))
    with TestClient(app) as c:
        meta = c.get("/v2/models/m").json()
        # the standard entry is the FP32 tensor, unchanged; accepted_inputs adds the UINT8 forms
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
        accepted = meta["parameters"]["accepted_inputs"]
        assert [(a["datatype"], a["shape"], a["layout"]) for a in accepted] == [
            ("FP32", [-1, 3, 32, 32], "NCHW"), ("UINT8", [-1, -1, -1, 3], "NHWC"), ("UINT8", [-1, 3, -1, -1], "NCHW")]
        assert all(a["name"] == "input" for a in accepted) and "POST /predict" in accepted[1]["values"]
        body, headers = uint8_request(photo(3)[None])
        r = c.post("/v2/models/m/infer", content=body, headers=headers)  # JSON pixels
        assert r.status_code == 200, r.text
        upload = c.post("/predict?topk=3", content=png(photo(3)), headers={"Content-Type": "image/png"}).json()
        probs = output(r, "probabilities")[0]
        np.testing.assert_allclose(sorted(probs, reverse=True), [p["probability"] for p in upload["predictions"]],
                                   rtol=1e-5, atol=1e-6)


def test_tritonclient_uint8_gives_the_top1_of_predict(ckpt):
    import tritonclient.http as triton  # in the dev extra: a missing client fails this test, it is never skipped

    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]), ServeSettings(load_in_background=False))
    with live_server(app) as (url, _):
        import httpx

        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tops = []
        for colour in PALETTE:
            pixels = palette_picture(colour)
            upload = httpx.post(f"{url}/predict?topk=3", content=png(pixels), headers={"Content-Type": "image/png"},
                                timeout=30).json()["predictions"]
            for batch in (pixels[None], pixels.transpose(2, 0, 1)[None].copy()):  # NHWC, NCHW
                tensor = triton.InferInput("input", list(batch.shape), "UINT8")
                tensor.set_data_from_numpy(batch, binary_data=True)
                result = client.infer("m", [tensor], outputs=[
                    triton.InferRequestedOutput("probabilities", class_count=1),
                    triton.InferRequestedOutput("logits")])
                label = result.as_numpy("probabilities")[0, 0]
                label = (label.decode() if isinstance(label, bytes) else label).split(":")[2]
                assert label == upload[0]["label"], colour
                probs = torch.from_numpy(result.as_numpy("logits").copy()).softmax(1)[0].numpy()
                np.testing.assert_allclose(sorted(probs, reverse=True), [p["probability"] for p in upload],
                                           rtol=1e-5, atol=1e-6)
            if upload[0]["probability"] - upload[1]["probability"] >= 0.05:  # a clear answer, no near-tie
                tops.append(upload[0]["label"])
        # the answer depends on the image, so agreeing on it means something
        assert len(tops) >= 5 and len(set(tops)) >= 2, tops
        client.close()


def test_preprocessing_of_a_model_with_its_own_test_scale():
    """A model that resizes to 40 before its 32 crop: the UINT8 path uses that, as /predict does."""
    common = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "image_size": 32, "in_channels": 3, "num_classes": 2}
    prep = Preprocessing(**common, test_scale=40)
    pixels = photo(5, size=(80, 50))
    body, headers = uint8_request(pixels[None], binary=True)
    x = serve_v2.input_tensor(serve_v2.parse_request(body, headers["Inference-Header-Content-Length"]), prep, 1)
    assert torch.equal(x, preprocess([Image.fromarray(pixels)], prep))
    assert not torch.equal(x, preprocess([Image.fromarray(pixels)], Preprocessing(**common)))  # the scale matters
