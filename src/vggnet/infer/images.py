"""Images named on a command line (files, folders, globs) turned into decoded PIL images, or a clear error.

Prediction reads files chosen by a user, not a curated dataset, so every failure names the file: a path
that does not exist, a glob that matches nothing, a file PIL cannot decode or that ends early (truncated
JPEG/PNG), and an image whose pixel count exceeds a bound. The bound is PIL's decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``) made a hard error: PIL itself only warns between 1× and 2× that limit, and a
server or batch job should refuse, not allocate gigabytes for one crafted header.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vggnet.capture.calibration import evenly_spaced
from vggnet.errors import VggnetError

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "evenly_spaced", "expand_image_paths", "iter_images", "load_image",
           "load_images"]

# The extensions a folder is scanned for (torchvision's ImageFolder list, so training and prediction agree).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


class ImageLoadError(VggnetError, ValueError):
    """An image file that cannot be used: unreadable, truncated, not an image, or too many pixels."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _scan_folder(folder: Path) -> list[Path]:
    found = [Path(root) / name for root, dirs, files in os.walk(folder)
             for name in files if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(found)


def expand_image_paths(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (searched recursively for image extensions, hidden files skipped) and glob patterns,
    expanded in the order given (each folder or glob sorted), duplicates dropped.

    Raises ``FileNotFoundError`` for a missing path, a glob with no match or a folder without images, before
    anything is decoded, so a typo in the 900th argument fails in milliseconds rather than after a long run.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            matches = _scan_folder(path)
            if not matches:
                raise FileNotFoundError(f"{path}: folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            matches = [path]
        elif _GLOB_CHARS & set(text):
            matches = []
            for hit in sorted(glob.glob(text, recursive=True)):
                p = Path(hit)
                matches.extend(_scan_folder(p) if p.is_dir() else [p])
            if not matches:
                raise FileNotFoundError(f"{text}: no file matches this pattern")
        else:
            raise FileNotFoundError(f"image not found: {path}")
        for match in matches:
            if match not in seen:
                seen.add(match)
                out.append(match)
    if not out:
        raise FileNotFoundError("no images given")
    return out


def _upright(image: Image.Image) -> Image.Image:
    """The image as a camera meant it (EXIF orientation applied); a malformed EXIF block is ignored rather
    than failing an otherwise good image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # PIL raises assorted types for corrupt EXIF data
        return image.copy()


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode one image fully (so a truncated file fails here, not later), upright per its EXIF orientation.

    ``max_pixels`` defaults to PIL's decompression-bomb limit; a larger image is refused from its header,
    before its pixels are decoded. Grey, palette, CMYK, 16-bit images are left as they are: the predictor's
    preprocessing converts to the model's channels.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if limit is not None and image.width * image.height > limit:
                    raise ImageLoadError(path, f"{image.width}×{image.height} = {image.width * image.height:,} "
                                               f"pixels exceeds the limit of {limit:,}")
                image.load()
                return _upright(image)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated data, broken headers, bad chunks
        raise ImageLoadError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc


def load_images(paths: Sequence[str | os.PathLike], max_pixels: int | None = None) -> list[Image.Image]:
    """Every image, or the first :class:`ImageLoadError`."""
    return [load_image(p, max_pixels) for p in paths]


def iter_images(paths: Sequence[str | os.PathLike], max_pixels: int | None = None,
                skip_unreadable: bool = False) -> Iterator[tuple[Path, Image.Image | ImageLoadError]]:
    """``(path, image)`` one at a time (memory stays bounded for long lists); with ``skip_unreadable`` a
    broken file yields its :class:`ImageLoadError` instead of raising it."""
    for p in paths:
        try:
            yield Path(p), load_image(p, max_pixels)
        except ImageLoadError as exc:
            if not skip_unreadable:
                raise
            yield Path(p), exc
