"""vggnet.serve without HTTP: repository layout, A/B router, dynamic batcher, input limits, V2 codec."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from serve_helpers import jpeg_bytes, png_header, tiny_checkpoint
from vggnet.infer import Preprocessing
from vggnet.serve import Batcher, BatcherClosed, ModelConfig, ModelRepository, QueueFull, ServeError, VersionRouter, v2
from vggnet.serve.limits import decode_image, decompress
from vggnet.serve.repository import model_name_for, sort_versions

PREP = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_channels=3, num_classes=3,
                     classes=("a", "b", "c"))
UNIT_JPEG = dict(size=(40, 30), patch=None)  # one flat colour


# --- repository -------------------------------------------------------------------------------------------


def test_repository_layout_config_and_naming(tmp_path):
    root = tmp_path / "repo"
    tiny_checkpoint(root / "cls" / "9" / "best.safetensors")
    tiny_checkpoint(root / "cls" / "10" / "last.safetensors")
    tiny_checkpoint(root / "plain" / "v1" / "weights.safetensors")
    (root / "cls" / "config.yaml").write_text("ab: {9: 0.9, 10: 0.1}\nmax_batch_size: 4\nruntime: eager\n")
    (root / ".hidden").mkdir()
    repo = ModelRepository.from_dir(root)
    assert sorted(repo.models) == ["cls", "plain"]
    cls = repo.models["cls"]
    assert cls.ordered_versions == ["9", "10"]  # numeric order, not "10" < "9"
    assert cls.default_version == "10"  # the highest version when none is configured
    assert cls.ab == {"9": 0.9, "10": 0.1} and cls.max_batch_size == 4 and cls.runtime == "eager"
    assert cls.versions["9"].name == "best.safetensors"
    assert repo.models["plain"].versions["v1"].name == "weights.safetensors"
    assert sort_versions(["b", "a"]) == ["a", "b"]

    single = ModelRepository.from_checkpoints([root / "cls" / "9"])
    assert list(single.models) == ["9"]
    assert model_name_for(root / "cls" / "9" / "best.safetensors") == "9"
    assert model_name_for(root / "plain" / "v1" / "weights.safetensors") == "weights"
    named = ModelRepository.from_checkpoints([root / "cls" / "9", root / "cls" / "10"], ["a", "b"])
    assert list(named.models) == ["a", "b"]


@pytest.mark.parametrize("config, message", [
    ("max_batch: 4\n", "unknown key"),
    ("default_version: 7\n", "default_version '7'"),
    ("ab: {1: 0.5, 3: 0.5}\n", "ab names version '3'"),
    ("ab: {1: 0}\n", "sum to 0"),
    ("max_batch_size: 0\n", "max_batch_size"),
    ("batching: maybe\n", "batching"),
])
def test_repository_config_errors(tmp_path, config, message):
    tiny_checkpoint(tmp_path / "m" / "1" / "best.safetensors")
    (tmp_path / "m" / "config.yaml").write_text(config)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(tmp_path / "m")


def test_repository_version_folder_errors(tmp_path):
    tiny_checkpoint(tmp_path / "m" / "1" / "x.safetensors")
    tiny_checkpoint(tmp_path / "m" / "1" / "y.safetensors")
    with pytest.raises(ValueError, match="exactly one"):
        ModelConfig.from_dir(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without version folders"):
        ModelConfig.from_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        ModelRepository.from_dir(tmp_path / "missing")


def test_router_weighted_split_is_exact_and_deterministic():
    router = VersionRouter("1", {"1": 0.9, "2": 0.1})
    picks = [router.choose() for _ in range(100)]
    for window in range(0, 100, 10):  # every window of 10 has exactly one canary request
        assert picks[window:window + 10].count("2") == 1
    router = VersionRouter("1", {"1": 3, "2": 1})
    assert [router.choose() for _ in range(8)].count("2") == 2
    assert {VersionRouter("5").choose() for _ in range(5)} == {"5"}


# --- batcher ----------------------------------------------------------------------------------------------


class Gated:
    """fn for a Batcher: records each batch; the first call blocks until ``release`` is set."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        self.entered.set()
        self.release.wait(10)
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            raise RuntimeError("poisoned batch")
        return x[:, :1] * 2


def rows(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 2), value)


def test_batcher_groups_queued_requests_and_splits_results():
    fn = Gated()
    batcher = Batcher(fn, max_batch_size=4, max_delay_ms=0).start()
    try:
        first = batcher.submit(rows(1, 0.0))
        assert fn.entered.wait(5)  # the worker is busy with the first request ...
        futures = [batcher.submit(rows(1, float(i))) for i in range(1, 4)]  # ... while three queue up
        futures.append(batcher.submit(rows(3, 9.0)))  # does not fit the 4-row batch: leads the next one
        assert batcher.queued_rows == 6
        fn.release.set()
        results = [f.result(5) for f in [first, *futures]]
    finally:
        batcher.close()
    assert fn.calls == [1, 3, 3]  # never more than max_batch_size rows, a request is never split
    for i, (out, info) in enumerate(results[1:4], start=1):
        assert out.shape == (1, 1) and float(out) == 2.0 * i  # each request gets its own rows back
        assert info.batch_rows == 3 and info.batch_requests == 3 and info.queue_s >= 0
    assert results[4][0].shape == (3, 1) and results[4][1].batch_requests == 1


def test_batcher_failed_batch_fails_only_the_bad_request():
    fn = Gated(fail_on=-1.0)
    batcher = Batcher(fn, max_batch_size=8, max_delay_ms=0).start()
    try:
        batcher.submit(rows(1, 0.0))
        assert fn.entered.wait(5)
        good_a, bad, good_b = batcher.submit(rows(1, 1.0)), batcher.submit(rows(1, -1.0)), batcher.submit(rows(2, 2.0))
        fn.release.set()
        assert float(good_a.result(5)[0]) == 2.0
        assert good_b.result(5)[0].tolist() == [[4.0], [4.0]]
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.result(5)
        assert float(batcher.submit(rows(1, 3.0)).result(5)[0]) == 6.0  # the worker survived
    finally:
        batcher.close()
    assert fn.calls[:2] == [1, 4]  # the batch of 4 was tried, then its requests alone
    assert sorted(fn.calls[2:5]) == [1, 1, 2]


def test_batcher_drains_on_close_and_refuses_after():
    fn = Gated()
    batcher = Batcher(fn, max_batch_size=2, max_delay_ms=10_000, adaptive=False).start()
    first = batcher.submit(rows(2, 0.0))  # a full batch starts at once; the odd last one would wait 10 s
    assert fn.entered.wait(5)
    queued = [batcher.submit(rows(1, float(i))) for i in range(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(BatcherClosed):
        batcher.submit(rows(1, 0.0))
    fn.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert all(f.done() and not f.cancelled() for f in [first, *queued])  # drained, no 10 s delay waited
    assert [float(f.result()[0][0]) for f in queued] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_batcher_queue_limit_and_cancelled_requests():
    fn = Gated()
    batcher = Batcher(fn, max_batch_size=2, max_delay_ms=0, max_queue=3).start()
    try:
        batcher.submit(rows(1, 0.0))
        assert fn.entered.wait(5)
        kept = batcher.submit(rows(2, 1.0))
        gone = batcher.submit(rows(1, 5.0))
        with pytest.raises(QueueFull):
            batcher.submit(rows(1, 0.0))
        with pytest.raises(ValueError, match="1 to 2"):
            batcher.submit(rows(3, 0.0))
        assert gone.cancel()  # the client went away while queued
        fn.release.set()
        assert float(kept.result(5)[0][0][0]) == 2.0
    finally:
        batcher.close()
    assert fn.calls == [1, 2]  # the cancelled request was never computed


def test_batcher_waits_only_for_announced_requests():
    batcher = Batcher(lambda x: x, max_batch_size=8, max_delay_ms=2_000).start()
    try:
        start = time.perf_counter()
        _, info = batcher.submit(rows(1, 0.0)).result(5)  # nobody else on the way: no waiting
        assert time.perf_counter() - start < 1.0 and info.batch_requests == 1
        with batcher.arriving():  # a second request is being received: the first one waits for it
            early = batcher.submit(rows(1, 1.0))
            time.sleep(0.2)
            assert not early.done()
            late = batcher.submit(rows(1, 2.0))
        assert early.result(5)[1].batch_requests == 2 and late.result(5)[1].batch_requests == 2
    finally:
        batcher.close()


# --- limits -----------------------------------------------------------------------------------------------


def test_decode_image_limits():
    assert decode_image(jpeg_bytes(**UNIT_JPEG), 10_000).size == (40, 30)
    with pytest.raises(ServeError) as err:  # under PIL's own bomb limit, over ours: refused from the header
        decode_image(png_header(7000, 7000), 36_000_000)
    assert err.value.status == 413 and "49,000,000 pixels" in err.value.message
    with pytest.raises(ServeError) as err:
        decode_image(png_header(20000, 20000), 36_000_000)
    assert err.value.status == 413
    with pytest.raises(ServeError) as err:
        decode_image(jpeg_bytes(**UNIT_JPEG)[:300], 10_000)
    assert err.value.status == 400 and "truncated" in err.value.message
    with pytest.raises(ServeError) as err:
        decode_image(b"GIF89a but not really", 10_000)
    assert err.value.status == 400
    with pytest.raises(ServeError) as err:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, "TIFF")
        decode_image(buf.getvalue(), 10_000)
    assert err.value.status == 415
    with pytest.raises(ServeError, match="empty"):
        decode_image(b"", 10)


def test_decompress_caps_output():
    data = b"x" * 5000
    assert decompress(gzip.compress(data), "gzip", 5000) == data
    assert decompress(zlib.compress(data), "deflate", 5000) == data
    with pytest.raises(ServeError) as err:
        decompress(gzip.compress(b"\0" * 10_000_000), "gzip", 1_000_000)  # ~10 KiB inflating to 10 MB
    assert err.value.status == 413
    with pytest.raises(ServeError) as err:
        decompress(b"not gzip", "gzip", 100)
    assert err.value.status == 400
    with pytest.raises(ServeError) as err:
        decompress(b"", "br", 100)
    assert err.value.status == 415


# --- V2 codec ---------------------------------------------------------------------------------------------


def v2_body(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}], **extra}).encode()


def test_v2_parse_json_and_binary_inputs():
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    t = v2.input_tensor(v2.parse_request(v2_body(x), None), PREP, 4)
    assert t.dtype == torch.float32 and np.array_equal(t.numpy(), x)
    nested = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                                     "data": x.tolist()}]}).encode()
    assert np.array_equal(v2.input_tensor(v2.parse_request(nested, None), PREP, 4).numpy(), x)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    parsed = v2.parse_request(header + x.astype("<f4").tobytes(), str(len(header)))
    assert np.array_equal(v2.input_tensor(parsed, PREP, 4).numpy(), x)


@pytest.mark.parametrize("body, message", [
    ({"inputs": []}, "non-empty"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}, "unknown input"),
    ({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}, "FP32"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32], "data": [0] * 3072}]}, "expected"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 3, 32, 32], "data": [0] * 15360}]}, "1 to 4"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0] * 3071}]}, "3071"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["0"] * 3072}]}, "type"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [[0, 1], [0]]}]}, "regular"),
])
def test_v2_input_errors(body, message):
    with pytest.raises(ServeError, match=message) as err:
        v2.input_tensor(v2.parse_request(json.dumps(body).encode(), None), PREP, 4)
    assert err.value.status == 400


def test_v2_rejects_nan_and_bad_headers():
    data = [0.0] * 3072
    data[7] = float("nan")
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": data}]})
    assert "NaN" in body  # Python's json writes the non-standard literal; the server must refuse it
    with pytest.raises(ServeError, match="NaN"):
        v2.input_tensor(v2.parse_request(body.encode(), None), PREP, 4)
    with pytest.raises(ServeError, match="Inference-Header-Content-Length"):
        v2.parse_request(b"{}", "99")
    with pytest.raises(ServeError, match="not valid JSON"):
        v2.parse_request(b"{", None)
    with pytest.raises(ServeError, match="nested too deeply"):
        v2.parse_request(b"[" * 100_000 + b"]" * 100_000, None)


def test_v2_outputs_binary_and_classification():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    request = v2.parse_request(json.dumps({"id": "r1", "inputs": [], "outputs": [
        {"name": "probabilities", "parameters": {"binary_data": True}},
        {"name": "logits", "parameters": {"classification": 2}}]}).encode(), None)
    outputs = v2.requested_outputs(request, PREP)
    body, headers = v2.encode_response(logits, outputs, PREP, model_name="m", model_version="3",
                                       request_id=request.id)
    length = int(headers["inference-header-content-length"])
    header = json.loads(body[:length])
    assert header["id"] == "r1" and header["model_version"] == "3"
    probs, classes = header["outputs"]
    assert probs["parameters"]["binary_data_size"] == 24 and "data" not in probs
    got = np.frombuffer(body[length:], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(got, logits.softmax(1).numpy(), rtol=1e-6)
    assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 2]
    assert classes["data"] == ["3.000000:1:b", "2.000000:2:c", "5.000000:2:c", "0.000000:0:a"]
    default = v2.requested_outputs(v2.parse_request(b'{"parameters": {"binary_data_output": true}}', None), PREP)
    assert [(o.name, o.binary) for o in default] == [("logits", True), ("probabilities", True)]
    with pytest.raises(ServeError, match="unknown output"):
        v2.requested_outputs(v2.parse_request(b'{"outputs": [{"name": "features"}]}', None), PREP)
