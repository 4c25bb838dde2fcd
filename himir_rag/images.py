"""Safe image loading: formats, EXIF orientation, RGB, size limits, folder walking."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from himir_rag.errors import ImageLoadError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "iter_image_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def load_image(path: str | os.PathLike[str], *, max_pixels: int = 50_000_000) -> Image.Image:
    """Decode an image file into an RGB image in its displayed orientation.

    Parameters
    ----------
    path : path-like
        The image file.
    max_pixels : int
        Images with more pixels than this are rejected before decoding.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, EXIF orientation applied, first frame of animations,
        transparency composited on white.

    Raises
    ------
    ImageLoadError
        If the file is missing, unreadable, not an image, truncated or too large.

    Example
    -------
    >>> img = load_image("photo.jpg")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        f"{path}: {width}x{height} = {width * height} pixels exceeds "
                        f"max_image_pixels={max_pixels}; raise the limit to index it"
                    )
                img.seek(0)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: not a readable image ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float greyscale: scale to 8 bits instead of clipping
        arr = _scaled_to_uint8(img)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scaled_to_uint8(img: Image.Image):  # -> np.ndarray
    import numpy as np

    arr = np.asarray(img, dtype=np.float64)
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr - low) * (255.0 / (high - low))).astype(np.uint8)


def iter_image_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield image files under ``root`` recursively, sorted, following symlinks safely.

    Directory symlinks are followed once; loops are detected by real path and skipped.
    Files are recognised by extension; whether they decode is checked later.

    Parameters
    ----------
    root : path-like
        A directory, or a single image file.

    Yields
    ------
    pathlib.Path
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    seen: set[str] = set()
    yield from _walk(root, seen)


def _walk(directory: Path, seen: set[str]) -> Iterator[Path]:
    real = os.path.realpath(directory)
    if real in seen:
        logger.warning("%s: directory already visited (symlink loop?), skipped", directory)
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        logger.warning("%s: cannot list directory (%s), skipped", directory, exc)
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=True):
                yield from _walk(path, seen)
            elif entry.is_file(follow_symlinks=True) and path.suffix.lower() in IMAGE_EXTENSIONS:
                yield path
        except OSError as exc:
            logger.warning("%s: cannot stat (%s), skipped", path, exc)
