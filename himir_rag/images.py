"""Safe image loading: formats, EXIF orientation, RGB, size limits, folder walking, re-encoding.

Nothing leaves the library as a file's raw bytes: :func:`encode_image` re-encodes a decoded
image, so a path that does not hold an image (``/etc/shadow`` behind a symlink) can only
fail to decode, never be shipped.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from stat import S_ISREG

from PIL import Image, ImageOps, UnidentifiedImageError

from himir_rag.errors import ImageLoadError
from himir_rag.paths import is_within

__all__ = ["IMAGE_EXTENSIONS", "load_image", "decode_image", "iter_image_files", "encode_image",
           "encode_image_file", "encoded_mime_type", "image_header_problem"]

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
        If the file is missing, empty, unreadable, not an image, truncated or has more
        than ``max_pixels`` pixels (checked from the header, before decoding).

    Example
    -------
    >>> img = load_image("photo.jpg")  # doctest: +SKIP
    """
    path = Path(path)
    _check_readable_file(path)
    return _decode(path, path, max_pixels)


def decode_image(source: str | os.PathLike[str] | bytes | Image.Image, *, max_pixels: int = 50_000_000,
                 name: str = "uploaded image") -> Image.Image:
    """An RGB image in its displayed orientation from a file, encoded bytes or a PIL image.

    Paths go through :func:`load_image`; bytes are decoded with the same checks (size limit
    from the header, truncation); a PIL image is oriented and converted to RGB.

    Parameters
    ----------
    source : path-like, bytes or PIL.Image.Image
        The image.
    max_pixels : int
        Images with more pixels than this are rejected (before decoding for files and bytes).
    name : str
        How bytes are named in error messages.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``.

    Raises
    ------
    ImageLoadError
        If the image cannot be read, is empty, not an image, truncated or too large.
    TypeError
        If ``source`` is none of the accepted types.

    Example
    -------
    >>> decode_image(open("photo.jpg", "rb").read()).size  # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)):
        return load_image(source, max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{name}: empty (0 bytes); give a JPEG, PNG, WebP... photo")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels)
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageLoadError(_too_large(name, f"{source.width}x{source.height} pixels", max_pixels))
        return _to_rgb(ImageOps.exif_transpose(source))
    raise TypeError(f"an image must be a path, bytes or a PIL image, got {type(source).__name__}")


def _decode(source: Path | io.BytesIO, path: Path | str, max_pixels: int) -> Image.Image:
    """Decode ``source`` (a file or a buffer) with the checks of :func:`load_image`; errors name ``path``."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 Mpx on; our own max_pixels check below is the one that decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(_too_large(path, f"{width}x{height} = {width * height} pixels", max_pixels))
                img.seek(0)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's hard limit (2x MAX_IMAGE_PIXELS), hit before ours
        declared = _BOMB_PIXELS.search(str(exc))
        size = f"{declared.group(1)} pixels" if declared else "more pixels than Pillow allows"
        raise ImageLoadError(_too_large(path, size, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        hint = "remove it or give it its real extension" if isinstance(path, Path) else "give a JPEG, PNG, WebP... photo"
        raise ImageLoadError(f"{path}: not an image file Pillow can decode (unknown format or not an image); "
                             f"{hint}") from exc
    except OSError as exc:
        if exc.errno is not None:  # a filesystem error (permission denied, I/O error), not a decoding one
            hint = "; check its permissions" if isinstance(exc, PermissionError) else ""
            raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc}){hint}") from exc
        raise ImageLoadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc}); "
                             "the file is truncated or corrupt") from exc
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageLoadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc}); "
                             "the file is truncated or corrupt") from exc


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(path: Path | str, size: str, max_pixels: int) -> str:
    return (f"{path}: image of {size} exceeds max_image_pixels={max_pixels} (decompression-bomb guard); "
            "raise max_image_pixels in HiMIRConfig to index it")


def _check_readable_file(path: Path) -> None:
    """Reject missing, non-regular and empty files with a message naming the problem."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not S_ISREG(stat.st_mode):
        raise ImageLoadError(f"{path}: not a regular file")
    if stat.st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes); nothing to index")


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


def iter_image_files(root: str | os.PathLike[str], *, on_skip: Callable[[Path, str], None] | None = None,
                     follow_symlinks: bool = False) -> Iterator[Path]:
    """Yield image files under ``root`` recursively, sorted, following symlinks safely.

    Symlinks whose target lies inside ``root`` (real paths compared) are followed;
    directory symlinks once, loops are detected by real path and not walked again (each
    file is yielded once). Symlinks to files or folders outside ``root`` are skipped with
    a reason (a folder is reported once, not walked) unless ``follow_symlinks``. Files are
    recognised by extension; whether they decode is checked later.

    Parameters
    ----------
    root : path-like
        A directory, or a single image file.
    on_skip : callable, optional
        ``on_skip(path, reason)`` for what cannot be walked: unlistable directories,
        broken or looping symlinks with an image extension, links out of ``root``.
        Always logged as well.
    follow_symlinks : bool
        Also follow symlinks whose target is outside ``root``.

    Yields
    ------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If ``root`` is neither a file nor a directory.
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    seen: set[str] = set()
    base = None if follow_symlinks else os.path.realpath(root)
    yield from _walk(root, seen, on_skip or (lambda path, reason: None), base)


def _outside(path: Path, base: str | None) -> str | None:
    """Why ``path`` (a symlink or inside a followed one) is refused, or None when it stays inside ``base``."""
    if base is None or is_within(path, base):
        return None
    return (f"symlink to {os.path.realpath(path)}, outside the indexed folder {base}; not indexed "
            "(pass follow_symlinks=True / --follow-symlinks to include it)")


def _walk(directory: Path, seen: set[str], on_skip: Callable[[Path, str], None],
          base: str | None) -> Iterator[Path]:
    real = os.path.realpath(directory)
    if real in seen:
        # not a loss: the directory's files are (or will be) yielded under their first path
        logger.warning("%s: directory already visited (symlink loop?), not walked again", directory)
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        _skip(on_skip, directory, f"cannot list directory ({exc.strerror or exc})")
        return
    for entry in entries:
        path = Path(entry.path)
        is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
        try:
            refused = _outside(path, base) if entry.is_symlink() else None
            if refused is not None and (is_image_name or entry.is_dir(follow_symlinks=True)):
                _skip(on_skip, path, refused)
            elif refused is not None:
                continue
            elif entry.is_dir(follow_symlinks=True):
                yield from _walk(path, seen, on_skip, base)
            elif entry.is_file(follow_symlinks=True) and is_image_name:
                yield path
            elif is_image_name and entry.is_symlink():
                _skip(on_skip, path, f"broken symlink (target {os.readlink(path)!r} does not exist)")
        except OSError as exc:
            if is_image_name or entry.is_symlink():
                _skip(on_skip, path, f"cannot stat ({exc.strerror or exc})")


def _skip(on_skip: Callable[[Path, str], None], path: Path, reason: str) -> None:
    logger.warning("%s: %s, skipped", path, reason)
    on_skip(path, reason)


_JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})


def encode_image(image: Image.Image, *, max_side: int | None = None,
                 fmt: str = "PNG", quality: int = 90) -> tuple[bytes, str]:
    """Re-encode a decoded image as PNG or JPEG, downscaled so its longer side is at most ``max_side``.

    Returns
    -------
    tuple[bytes, str]
        ``(encoded bytes, mime type)``.

    Example
    -------
    >>> data, mime = encode_image(Image.new("RGB", (800, 600)), max_side=256, fmt="JPEG")
    >>> mime, Image.open(io.BytesIO(data)).size
    ('image/jpeg', (256, 192))
    """
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    if fmt.upper() not in ("PNG", "JPEG"):
        raise ValueError(f"fmt must be 'PNG' or 'JPEG', got {fmt!r}")
    buffer = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue(), "image/jpeg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def image_header_problem(path: str | os.PathLike[str]) -> str | None:
    """None when Pillow recognises ``path``'s header as an image (nothing is decoded); else why not."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed on open; size is always set for an image
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        return f"not an image file Pillow can read ({type(exc).__name__})"
    return None


def encoded_mime_type(path: str | os.PathLike[str]) -> str:
    """The MIME type :func:`encode_image_file` gives ``path``: ``image/jpeg`` for JPEG names, else ``image/png``."""
    return "image/jpeg" if Path(path).suffix.lower() in _JPEG_EXTENSIONS else "image/png"


def encode_image_file(path: str | os.PathLike[str], *, max_side: int | None = None,
                      max_pixels: int = 50_000_000) -> tuple[bytes, str]:
    """Decode an image file (:func:`load_image`) and re-encode it: JPEG for ``.jpg``/``.jpeg``, else PNG.

    The file's own bytes are never returned, so a file that is not an image raises.

    Raises
    ------
    ImageLoadError
        The file is missing, unreadable or not a decodable image.
    """
    fmt = "JPEG" if encoded_mime_type(path) == "image/jpeg" else "PNG"
    return encode_image(load_image(path, max_pixels=max_pixels), max_side=max_side, fmt=fmt)
