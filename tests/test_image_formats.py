"""Truncated JPEG, GIF and BMP uploads are refused with 400 (README, serving: "JPEG, GIF and BMP carry no checksum,
and their truncation is caught by the decoder (all tested)").

These formats carry no checksum for ``check_integrity`` to verify: only the decoder running out of data catches a cut
file, so every cut that loses pixels is tried, on the decoder's own path and through the HTTP endpoint.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import tiny_checkpoint
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.errors import ServeError
from vggnet.serve.limits import decode_image

FORMATS = ["JPEG", "GIF", "BMP"]
MEDIA = {"JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp"}
# what GIF may lose at its end without losing a pixel: the image data's block terminator and the trailer (';')
GIF_TAIL = b"\x00;"


def encoded(fmt: str, side: int = 24) -> bytes:
    pixels = (np.random.default_rng(0).random((side, side, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def pixels_lost(fmt: str, data: bytes, cut: int) -> bool:
    """Whether ``data[:cut]`` lacks image data, not just GIF's closing bytes."""
    return not (fmt == "GIF" and data.endswith(GIF_TAIL) and cut >= len(data) - len(GIF_TAIL))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_cut_that_loses_pixels_is_400(fmt):
    data = encoded(fmt)
    whole = np.asarray(decode_image(data, 10**7).convert("RGB"))
    refused = 0
    for cut in range(1, len(data)):
        if not pixels_lost(fmt, data, cut):  # GIF without its trailer: every pixel is there, the same image
            assert np.array_equal(np.asarray(decode_image(data[:cut], 10**7).convert("RGB")), whole)
            continue
        with pytest.raises(ServeError) as info:
            decode_image(data[:cut], 10**7)
        assert info.value.status == 400, (cut, str(info.value))
        assert "truncated" in str(info.value).lower() or "not an image" in str(info.value), (cut, str(info.value))
        refused += 1
    assert refused >= len(data) - len(GIF_TAIL) - 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_cut_in_its_pixel_data_is_named_truncated(fmt):
    """Past the header (the format is known), the reason is the truncation, not an unknown format."""
    data = encoded(fmt)
    with pytest.raises(ServeError, match="corrupt or truncated image: .*[Tt]runcated") as info:
        decode_image(data[: len(data) * 3 // 4], 10**7)
    assert info.value.status == 400


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tiny_checkpoint(root / "cls" / "1" / "best.safetensors", seed=1)
    app = create_app(ModelRepository.from_dir(root), ServeSettings(load_in_background=False))
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_upload_intact_is_classified_truncated_is_400(client, fmt):
    data = encoded(fmt)
    ok = client.post("/predict?model=cls", content=data, headers={"content-type": MEDIA[fmt]})
    assert ok.status_code == 200 and ok.json()["predictions"], ok.text
    for cut in (len(data) * 3 // 4, len(data) - 3):  # both inside the pixel data (a GIF palette is 768 bytes)
        bad = client.post("/predict?model=cls", content=data[:cut], headers={"content-type": MEDIA[fmt]})
        assert bad.status_code == 400 and "truncated" in bad.json()["error"].lower(), (cut, bad.text)
