"""Input limits applied before any work is queued: body size, compression, content types, image pixels.

A service that decodes images from strangers has to bound three things separately, because each can
be small where another is huge: the bytes on the wire (``Content-Length`` checked up front, and a cap
while streaming, since chunked bodies announce nothing), the bytes after ``Content-Encoding`` (a few KiB
of gzip can inflate to gigabytes), and the pixels after image decoding (a 100-byte PNG header can claim
20000×20000 pixels = 1.2 GB of RGB). The image's size is read from its header by ``Image.open`` — which
decodes nothing — and checked before ``load()`` allocates the pixel buffer.
"""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
import zlib

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.requests import Request

from .errors import ServeError, bad_request

__all__ = [
    "IMAGE_FORMATS", "IMAGE_MEDIA_TYPES", "check_integrity", "decode_image", "decompress", "media_type", "read_body",
]

#: PIL formats the service decodes; anything else (TIFF, PSD, EPS...) is refused: fewer decoders, fewer CVEs.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
#: Content types accepted for a raw image body (``application/octet-stream`` means "detect the format").
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif",
                               "application/octet-stream"})


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower-cased; ``""`` when there is no Content-Type."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"request body larger than the limit of {limit:,} bytes")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 when it
    has not arrived within ``timeout_s`` (a client sending a byte a second must not hold a slot).

    ``Content-Length`` is trusted only to refuse early; the streamed byte count is what is enforced, so a
    chunked body or a lying header cannot get past the cap.
    """
    if timeout_s:
        try:
            async with asyncio.timeout(timeout_s):
                return await read_body(request, limit)
        except TimeoutError:
            raise ServeError(408, f"request body not received within {timeout_s:g} s") from None
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip / deflate (tritonclient's request compression) with an output cap:
    inflating stops at ``limit`` + 1 bytes, so a compression bomb costs at most ``limit`` of memory."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    # wbits: 16 + MAX_WBITS reads the gzip wrapper, MAX_WBITS the zlib wrapper ("deflate" in HTTP)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"corrupt {encoding} body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ServeError(413, f"decompressed body larger than the limit of {limit:,} bytes")
    if not inflater.eof:
        raise bad_request(f"truncated {encoding} body")
    return out


def _png_chunks_intact(data: bytes) -> str | None:
    """Why a PNG's chunk stream is damaged (a chunk's CRC-32 does not match, it runs past the end, IEND is
    missing), or None. PIL checks the CRCs of the chunks before the pixel data only: a PNG whose IDAT
    chunks were damaged in a way zlib still inflates would otherwise be classified as if whole."""
    pos = 8  # after the signature
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            return f"chunk {kind.decode('latin-1')!r} runs past the end of the file"
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF != crc:
            return f"chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC check"
        if kind == b"IEND":
            return None
        pos = end + 4
    return "no IEND chunk: the file is truncated"


def check_integrity(data: bytes, image_format: str | None) -> None:
    """Refuse (400) a file whose own consistency checks fail, before it is decoded and classified.

    PNG carries a CRC-32 per chunk: all are verified (PIL verifies only those before the pixel data).
    WebP's RIFF header states the file's length: a mismatch means a truncated or spliced file. JPEG, GIF
    and BMP carry no checksum; their truncation is caught when the decoder runs out of data (400 too).
    """
    problem = None
    if image_format == "PNG":
        problem = _png_chunks_intact(data)
    elif image_format == "WEBP" and len(data) >= 12:
        (size,) = struct.unpack("<I", data[4:8])
        if size + 8 != len(data) + (len(data) % 2):  # RIFF pads odd sizes with one byte
            problem = f"the RIFF header states {size + 8:,} bytes but the file has {len(data):,}"
    if problem:
        raise bad_request(f"corrupt {image_format} file: {problem}")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image with the pixel count checked from the header before any pixel is decoded,
    turned upright per its EXIF orientation (as ``vggnet.infer.load_image`` does for files).

    Truncated or corrupt files (a bad PNG CRC included: :func:`check_integrity`) and unknown formats are 400;
    too many pixels is 413. PIL's own global
    decompression-bomb limit stays in force as a second line (its error is mapped to 413 too).
    """
    if not data:
        raise bad_request("empty image body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise ServeError(415, f"image format {image.format} not accepted; send one of "
                                      f"{', '.join(sorted(IMAGE_FORMATS))}")
            width, height = image.size
            if width < 1 or height < 1:
                raise bad_request(f"image of size {width}×{height}")
            if width * height > max_pixels:
                raise ServeError(413, f"image of {width}×{height} = {width * height:,} pixels exceeds the "
                                      f"limit of {max_pixels:,} pixels")
            check_integrity(data, image.format)
            image.load()  # decodes now: a truncated file fails here, not later in preprocessing
            upright = ImageOps.exif_transpose(image)  # as `vggnet predict` reads files: same image, same answer
    except ServeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ServeError(413, f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise bad_request("the body is not an image in a known format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "corrupt / truncated"
        raise bad_request(f"corrupt or truncated image: {exc}") from None
    return upright
