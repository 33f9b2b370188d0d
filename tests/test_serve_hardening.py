"""Inputs whose own checksums fail, 500s that say nothing but a request id, no paths in the index, and
optional bearer-token authentication checked before the body is read."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import jpeg_bytes, live_server, tiny_checkpoint
from vggnet.cli import main
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.auth import read_api_keys
from vggnet.serve.errors import ServeError
from vggnet.serve.limits import check_integrity, decode_image

LIMITS = {"max_body_bytes": 1024 * 1024, "max_image_pixels": 1_000_000}
KEY = "k" * 24


def image_bytes(fmt: str) -> bytes:
    pixels = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_with_bad_idat_crc() -> bytes:
    """A PNG whose pixel data is intact but whose IDAT CRC is wrong: PIL alone decodes it."""
    data = bytearray(image_bytes("PNG"))
    start = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4:start])
    data[start + 4 + length] ^= 0xFF
    return bytes(data)


def test_pil_alone_would_classify_a_png_with_a_bad_crc():
    with Image.open(io.BytesIO(png_with_bad_idat_crc())) as image:
        image.load()  # the gap check_integrity closes: no error here
    with pytest.raises(ServeError, match="chunk 'IDAT' at byte 33 fails its CRC check") as info:
        decode_image(png_with_bad_idat_crc(), 10**7)
    assert info.value.status == 400


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "GIF", "BMP"])
def test_intact_files_of_every_accepted_format_pass(fmt):
    assert decode_image(image_bytes(fmt), 10**7).size == (40, 40)


def test_truncated_png_and_spliced_webp_are_refused():
    png = image_bytes("PNG")
    with pytest.raises(ServeError, match="IEND|runs past the end"):
        check_integrity(png[:-12], "PNG")  # IEND cut off
    with pytest.raises(ServeError, match="RIFF header states"):
        check_integrity(image_bytes("WEBP") + b"appended", "WEBP")
    check_integrity(png + b"trailing bytes after IEND are tolerated", "PNG")


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tiny_checkpoint(root / "cls" / "1" / "best.safetensors", seed=1)
    (root / "bad" / "1").mkdir(parents=True)
    (root / "bad" / "1" / "best.safetensors").write_bytes(b"not a safetensors file")
    return root


def test_corrupt_png_is_400_and_the_intact_one_is_classified(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, **LIMITS))
    with TestClient(app) as c:
        ok = c.post("/predict?model=cls", content=image_bytes("PNG"), headers={"content-type": "image/png"})
        assert ok.status_code == 200
        bad = c.post("/predict?model=cls", content=png_with_bad_idat_crc(), headers={"content-type": "image/png"})
        assert bad.status_code == 400 and "CRC" in bad.json()["error"]


def test_500_says_internal_error_and_a_request_id_only(repo_dir, monkeypatch):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, **LIMITS))
    with TestClient(app, raise_server_exceptions=False) as c:
        batcher = app.state.server.version("cls", None).batcher

        def fail(x):
            raise RuntimeError(f"secret detail from {repo_dir}/cls/1/best.safetensors")

        monkeypatch.setattr(batcher, "fn", fail)
        r = c.post("/predict?model=cls", content=jpeg_bytes(),
                   headers={"x-request-id": "abc123", "content-type": "image/jpeg"})
        assert r.status_code == 500
        assert r.json() == {"error": "internal error", "request_id": "abc123"}
        assert r.headers["x-request-id"] == "abc123"
        assert "secret" not in r.text and str(repo_dir) not in r.text


def test_repository_index_shows_no_paths(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, **LIMITS))
    with TestClient(app) as c:
        index = {e["name"]: e for e in c.post("/v2/repository/index").json()}
        reason = index["bad"]["reason"]
        assert index["bad"]["state"] == "UNAVAILABLE" and "best.safetensors" in reason
        assert str(repo_dir) not in reason and "/" not in reason.split(":", 1)[1]
        body = c.post("/v2/models/bad/infer", json={"inputs": []}).text
        assert str(repo_dir) not in body


@pytest.fixture
def secured(repo_dir):
    def make(public=("health", "metrics")):
        settings = ServeSettings(load_in_background=False, api_keys=(KEY, "second-key-0123456789"),
                                 public_endpoints=public, **LIMITS)
        return TestClient(create_app(ModelRepository.from_dir(repo_dir), settings))
    return make


def test_bearer_token_required_except_on_public_endpoints(secured):
    with secured() as c:
        image = {"content": jpeg_bytes(), "headers": {"content-type": "image/jpeg"}}
        r = c.post("/predict?model=cls", **image)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "API key" in r.json()["error"]
        wrong = c.post("/predict?model=cls", content=image["content"],
                       headers={**image["headers"], "authorization": "Bearer " + "x" * 24})
        assert wrong.status_code == 401
        for key in (KEY, "second-key-0123456789"):
            good = c.post("/predict?model=cls", content=image["content"],
                          headers={**image["headers"], "authorization": f"Bearer {key}"})
            assert good.status_code == 200
        assert c.get("/v2/health/live").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/v2/models/cls").status_code == 401  # metadata is not public by default
        assert c.post("/v2/repository/index").status_code == 401
        assert 'status="401"' in c.get("/metrics").text  # refused requests are counted


def test_unauthenticated_upload_is_refused_before_its_body_is_read(secured):
    with secured() as c:
        r = c.post("/predict?model=cls", content=b"x" * (4 * 1024 * 1024), headers={"content-type": "image/jpeg"})
        assert r.status_code == 401  # not 413: the 4 MiB body over the 1 MiB limit was never looked at


def test_decoding_runs_in_its_own_pool_below_the_event_loop_priority(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir),
                     ServeSettings(load_in_background=False, decode_threads=3, **LIMITS))
    server = app.state.server
    assert server.decode_pool._max_workers == 3

    def where() -> tuple[str, int]:
        return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    name, nice = asyncio.run(server.offload(where))
    assert name.startswith("vggnet-decode")
    if sys.platform.startswith("linux"):  # the nice value is per thread there
        assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    server.decode_pool.shutdown()


def test_public_endpoint_groups_are_configurable(secured):
    with secured(public=()) as c:
        assert c.get("/v2/health/live").status_code == 401 and c.get("/metrics").status_code == 401
    with secured(public=("metadata",)) as c:
        assert c.get("/v2/models/cls").status_code == 200 and c.get("/v2").status_code == 200
        assert c.post("/v2/models/cls/infer", json={}).status_code == 401  # metadata never covers inference


def test_api_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# production\n{KEY}\n\n  second-key-0123456789  \n")
    assert read_api_keys(keys) == (KEY, "second-key-0123456789")
    keys.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no API key"):
        read_api_keys(keys)
    keys.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        read_api_keys(keys)


def test_cli_refuses_unknown_public_groups(tmp_path, capsys, repo_dir):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    code = main(["serve", "--model-repo", str(repo_dir), "--api-key-file", str(keys), "--public-endpoints", "docs"])
    assert code == 2 and "unknown group" in capsys.readouterr().err


def png_with_text_chunk(crc_over: bytes | None = None) -> tuple[bytes, int]:
    """A PNG with a tEXt chunk after the pixel data (whose CRC PIL never checks) and where that chunk starts; its
    CRC is taken over ``crc_over``, by default type + data as the PNG spec defines it."""
    png = image_bytes("PNG")
    at = png.rfind(b"IEND") - 4
    payload = b"key\x00value"
    crc = zlib.crc32(b"tEXt" + payload if crc_over is None else crc_over) & 0xFFFFFFFF
    return png[:at] + struct.pack(">I", len(payload)) + b"tEXt" + payload + struct.pack(">I", crc) + png[at:], at


def test_png_chunk_check_takes_the_crc_over_type_and_data():
    """vggnet's PNG walk reads (type + data) for the CRC, as the PNG spec defines it: a file written that way passes,
    one whose CRC covers anything else is refused, naming the chunk (PIL alone accepts all three)."""
    data = image_bytes("PNG")  # the spec's coverage, as PIL's encoder (zlib) writes it
    start = data.find(b"IHDR")
    (stored,) = struct.unpack(">I", data[start + 17:start + 21])
    assert zlib.crc32(data[start:start + 17]) & 0xFFFFFFFF == stored
    good, at = png_with_text_chunk()
    check_integrity(good, "PNG")
    assert decode_image(good, 10**7).size == (40, 40)
    payload = b"key\x00value"
    for crc_over in (payload, struct.pack(">I", len(payload)) + b"tEXt" + payload, b"tEXt" + payload[:-1]):
        bad, at = png_with_text_chunk(crc_over)
        with Image.open(io.BytesIO(bad)) as image:
            image.load()  # PIL reads the chunk and never checks its CRC
        with pytest.raises(ServeError, match=f"chunk 'tEXt' at byte {at} fails its CRC check") as info:
            decode_image(bad, 10**7)
        assert info.value.status == 400


# --- admission and the body-read time limit, over a real socket ------------------------------------------------


def _held_upload(url: str, sent: int = 16, declared: int = 200_000) -> socket.socket:
    """A client that announces a body of ``declared`` bytes, sends ``sent`` of them and keeps the socket open."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)))
    conn.sendall(f"POST /predict?model=cls HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + b"\xff" * sent)
    return conn


def _read_reply(conn: socket.socket) -> str:
    """The whole HTTP reply: headers and body may arrive in separate TCP segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_admission_503_before_the_body_is_read_and_health_stays_fast(repo_dir):
    settings = ServeSettings(load_in_background=False, max_concurrency=1, body_timeout_s=20, **LIMITS)
    app = create_app(ModelRepository.from_dir(repo_dir), settings)
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=10) as http:
        held = _held_upload(url)
        try:
            deadline = time.monotonic() + 5
            while app.state.server.receiving < 1:  # the held upload has its slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            start = time.perf_counter()
            r = http.post("/predict?model=cls", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "being received already" in r.json()["error"]
            assert time.perf_counter() - start < 2
            t0 = time.perf_counter()
            assert http.get("/v2/health/live").status_code == 200
            assert time.perf_counter() - t0 < 0.5
            assert "vggnet_admission_refused_total 1.0" in http.get("/metrics").text
        finally:
            held.close()
        deadline = time.monotonic() + 5
        while app.state.server.receiving:  # the slot is given back when the client goes away
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = http.post("/predict?model=cls", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200


def test_a_slow_sender_gets_408_and_frees_its_slot(repo_dir):
    settings = ServeSettings(load_in_background=False, max_concurrency=1, body_timeout_s=0.5, **LIMITS)
    app = create_app(ModelRepository.from_dir(repo_dir), settings)
    with live_server(app) as (url, _):
        held = _held_upload(url)
        try:
            held.settimeout(10)
            start = time.perf_counter()
            reply = _read_reply(held)
            assert reply.startswith("HTTP/1.1 408") and "not received within 0.5 s" in reply
            assert time.perf_counter() - start < 5
        finally:
            held.close()
        assert app.state.server.receiving == 0
