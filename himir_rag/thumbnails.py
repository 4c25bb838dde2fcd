"""Thumbnails kept inside a saved index: small JPEGs that stand in for photos that are gone.

With ``HiMIRConfig(thumbnails=True)`` every photo indexed gets a JPEG (longer side
:data:`THUMBNAIL_MAX_SIDE`) made from the image already decoded for indexing. They wait in
memory until the next save, which writes them into the new version's ``thumbnails/``
folder as ``<image_id>.jpg``; thumbnails of photos the previous version already had are
hard-linked from it (copied across file systems), so a save writes only the new ones.
Image ids are never reused, so a changed photo (a new id) never gets a stale thumbnail.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from himir_rag.images import encode_image

__all__ = ["ThumbnailStore", "THUMBNAIL_MAX_SIDE", "FOLDER", "make_thumbnail"]

THUMBNAIL_MAX_SIDE = 256
FOLDER = "thumbnails"


def make_thumbnail(image: Image.Image) -> bytes:
    """JPEG bytes of ``image`` downscaled to :data:`THUMBNAIL_MAX_SIDE` (smaller images keep their size)."""
    data, _ = encode_image(image, max_side=THUMBNAIL_MAX_SIDE, fmt="JPEG", quality=85)
    return data


class ThumbnailStore:
    """The thumbnails of one index: those waiting for a save, and the live saved version's folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder  # the live version's thumbnails/, None before the first save
        self._pending: dict[int, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, version_dir: Path) -> ThumbnailStore:
        """The thumbnails of a saved version (none when it has no ``thumbnails/`` folder)."""
        folder = version_dir / FOLDER
        return cls(folder if folder.is_dir() else None)

    def copy(self) -> ThumbnailStore:
        """An independent store with the same saved folder and pending thumbnails."""
        other = ThumbnailStore(self.folder)
        with self._lock:
            other._pending = dict(self._pending)
        return other

    def keep(self, image_id: int, jpeg: bytes) -> None:
        """Hold the thumbnail of a newly committed image until the next save."""
        with self._lock:
            self._pending[int(image_id)] = jpeg

    def path(self, image_id: int) -> Path | None:
        """The saved thumbnail of an image, or None (not saved yet, or not kept)."""
        if self.folder is None:
            return None
        path = self.folder / f"{int(image_id)}.jpg"
        return path if path.is_file() else None

    def write(self, version_dir: Path, image_ids: Iterable[int]) -> None:
        """Write the thumbnails of ``image_ids`` into a new version: new ones written, the others linked."""
        with self._lock:
            pending = dict(self._pending)
        if not pending and self.folder is None:
            return
        target = version_dir / FOLDER
        target.mkdir()
        for image_id in image_ids:
            name = f"{int(image_id)}.jpg"
            if image_id in pending:
                with open(target / name, "wb") as fh:
                    fh.write(pending[image_id])
                    fh.flush()
                    os.fsync(fh.fileno())
            elif self.folder is not None and (self.folder / name).is_file():
                try:
                    os.link(self.folder / name, target / name)
                except OSError:  # another file system, or no hard links
                    shutil.copyfile(self.folder / name, target / name)
        fd = os.open(target, os.O_RDONLY)  # the entries are durable before the version is published
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def saved(self, version_dir: Path, image_ids: Iterable[int]) -> None:
        """After a save: read from the new version; the thumbnails it holds leave memory."""
        if not (version_dir / FOLDER).is_dir():
            return
        self.folder = version_dir / FOLDER
        with self._lock:
            for image_id in image_ids:
                self._pending.pop(int(image_id), None)
