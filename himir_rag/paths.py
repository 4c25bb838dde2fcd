"""Where photos live: the collection root, root-relative paths, and the containment check.

An index records one collection root (the folder first indexed). Photos under it are
stored by their POSIX path relative to the root, so the index keeps working when the
folder moves (``HiMIRIndex.relocate``) and photo keys do not depend on where the folder
is mounted. Photos outside the root are stored by absolute path.

A photo is only read when its real path (symlinks resolved) lies inside its *base*: the
root for photos stored relative to it, the photo's own folder otherwise. This keeps a
symlink, or an edited catalog row such as ``../../etc/passwd``, from pulling files from
outside the collection into an index or into a chat model's prompt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

__all__ = ["relative_to_root", "resolve_stored", "stored_resolver", "is_within", "outside_reason", "photo_base"]


def relative_to_root(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    """POSIX path of ``path`` relative to ``root``; ``""`` when it is not lexically under it.

    Example
    -------
    >>> relative_to_root("/photos/trip/a.jpg", "/photos")
    'trip/a.jpg'
    >>> relative_to_root("/elsewhere/a.jpg", "/photos")
    ''
    """
    if root is None:
        return ""
    path, root = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    if path == root or not path.startswith(root.rstrip(os.sep) + os.sep):
        return ""
    return Path(os.path.relpath(path, root)).as_posix()


def resolve_stored(stored: str, root: str | os.PathLike[str] | None) -> tuple[str, str]:
    """``(absolute path, root-relative path or "")`` of a catalog row.

    A relative row is joined to ``root`` and normalised; a row that climbs out of the root
    (``../../etc/passwd``) keeps its relative text, so :func:`photo_base` gives the root and
    the containment check refuses it. Without a root (indexes saved before roots were
    recorded, synthetic ``from_snapshot`` collections) a row is returned as it is.
    """
    if os.path.isabs(stored) or root is None:
        return stored, ""
    if os.sep == "/":  # the same as joining the parts, without a path object per row (100k rows at load)
        return os.path.normpath(os.path.join(root, stored)), stored
    return os.path.normpath(os.path.join(root, *PurePosixPath(stored).parts)), stored


def stored_resolver(root: str | os.PathLike[str] | None) -> Callable[[str], tuple[str, str]]:
    """:func:`resolve_stored` against ``root`` for many rows (a catalog's), with the root normalised once
    and a fast path for plain relative rows: no empty, ``.`` or ``..`` part (nothing for ``normpath`` to
    change), which is every row a save writes."""
    if root is None or os.sep != "/":
        return lambda stored: resolve_stored(stored, root)
    base = os.path.normpath(root)
    prefix = base if base.endswith("/") else base + "/"

    def resolve(stored: str) -> tuple[str, str]:
        if stored and not stored.startswith(("/", ".")) and "//" not in stored and "/." not in stored \
                and not stored.endswith("/"):
            return prefix + stored, stored
        return resolve_stored(stored, root)
    return resolve


def photo_base(path: str, relpath: str, root: str | os.PathLike[str] | None) -> str:
    """The folder ``path`` must stay inside: the root for root-relative photos, else its own folder."""
    if relpath and root is not None:
        return str(root)
    return os.path.dirname(path)


def is_within(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> bool:
    """Whether the real path of ``path`` is ``base``'s real path or below it (symlinks resolved)."""
    real, real_base = os.path.realpath(path), os.path.realpath(base)
    return real == real_base or real.startswith(real_base.rstrip(os.sep) + os.sep)


def outside_reason(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str | None:
    """None when ``path`` resolves inside ``base``; else a reason naming where it points."""
    if is_within(path, base):
        return None
    return (f"real path {os.path.realpath(path)} is outside the collection folder {base} "
            "(a symlink or an edited catalog row); pass follow_symlinks=True (--follow-symlinks) to allow it")
