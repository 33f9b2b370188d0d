"""Shared by the serving tests: tiny checkpoints, hand-made image bytes, and readers for V2 / Prometheus replies."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import vggnet

META = {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}


def tiny_checkpoint(path, seed: int = 0):
    torch.manual_seed(seed)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap")
    return vggnet.save_checkpoint(model, path, META)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width×height, and no pixel data: 57 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def jpeg_bytes(size=(48, 40), colour=(200, 30, 60), patch=((10, 220, 90), (5, 5, 30, 25))) -> bytes:
    """A JPEG of one colour with an optional ``(colour, box)`` rectangle, so flips change the pixels."""
    buf = io.BytesIO()
    image = Image.new("RGB", size, colour)
    if patch is not None:
        image.paste(*patch)
    image.save(buf, "JPEG")
    return buf.getvalue()


def output(response, name: str) -> np.ndarray:
    """One named output tensor of a V2 JSON infer reply."""
    out = next(o for o in response.json()["outputs"] if o["name"] == name)
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def metric_samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving ``app`` on 127.0.0.1 (port chosen by the OS) in a thread; yields (base URL, server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                          timeout_graceful_shutdown=15))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def hold_explanations(monkeypatch, wait_s: float) -> tuple[threading.Event, threading.Event]:
    """Grad-CAM jobs block on the worker until ``release`` is set (or ``wait_s`` passes); ``entered`` is set when
    one has started: a busy explain slot on demand."""
    from vggnet.serve import cam as serve_cam

    entered, release = threading.Event(), threading.Event()
    real = serve_cam.run_cam

    def held(*args):
        entered.set()
        release.wait(wait_s)
        return real(*args)

    monkeypatch.setattr(serve_cam, "run_cam", held)
    return entered, release


def stored_rows(url: str, request_id: str, want: int = 1, timeout_s: float = 10.0) -> list[dict]:
    """The prediction store's rows of one request (by item), once the server's writer has written ``want``."""
    from vggnet import store

    engine = store.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [r for r in store.read_predictions(engine) if r["request_id"] == request_id]
            if len(rows) >= want or time.monotonic() > deadline:
                return sorted(rows, key=lambda r: r["item"])
            time.sleep(0.05)
    finally:
        engine.dispose()
