"""Framework documents as index input: LlamaIndex ``ImageDocument``/``Document``, LangChain ``Document``.

Neither framework is imported: a document is recognised by its attributes (``metadata``
plus ``image_path``, ``id_`` / ``doc_id`` or ``page_content``). Its image file is
``image_path`` (attribute or metadata), else metadata ``file_path``, else ``source``. The
document's id is kept as metadata ``doc_id`` (the adapters return it as the node /
document id) and its other JSON metadata as the photo's user metadata, minus the path key
that located the file (the index stores the path itself, root-relative) and ``file_name``
(which the adapters set for every photo).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from himir_rag.errors import ConfigError
from himir_rag.ingest import MetadataLookup

__all__ = ["is_document", "documents_to_paths", "DOC_ID_KEY", "PATH_KEYS"]

logger = logging.getLogger(__name__)

DOC_ID_KEY = "doc_id"
PATH_KEYS = ("image_path", "file_path", "source")


def is_document(item: Any) -> bool:
    """Whether ``item`` looks like a LlamaIndex or LangChain document (not a path)."""
    if isinstance(item, (str, os.PathLike)):
        return False
    return isinstance(getattr(item, "metadata", None), Mapping) and any(
        hasattr(item, name) for name in ("image_path", "id_", "doc_id", "page_content"))


def _document_path(document: Any) -> tuple[str, str]:
    """``(path, metadata key it came from or "")``; ConfigError when the document names no file."""
    attribute = getattr(document, "image_path", None)
    if isinstance(attribute, str) and attribute:
        return attribute, ""
    for key in PATH_KEYS:
        value = document.metadata.get(key)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value), key
    raise ConfigError(f"document {_document_id(document)!r} names no image file; give it an image_path, or a "
                      f"{', '.join(repr(k) for k in PATH_KEYS)} metadata entry")


def _document_id(document: Any) -> str | None:
    for name in ("id_", "doc_id", "id"):
        value = getattr(document, name, None)
        if isinstance(value, str) and value:
            return value
    return None


def _json_metadata(document: Any, drop: str) -> dict[str, Any]:
    """The document's JSON-serialisable metadata without ``drop``; other values are left out (logged)."""
    kept = {}
    for key, value in document.metadata.items():
        if key == drop:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            logger.warning("document metadata %r is not JSON-serialisable; not stored", key)
            continue
        kept[str(key)] = value
    return kept


def documents_to_paths(source: Iterable[Any], metadata: Any) -> tuple[list[Any], Any]:
    """Split documents into paths and a metadata source that merges theirs under the caller's.

    Parameters
    ----------
    source : iterable
        Paths and/or documents (anything else is passed through for the caller to reject).
    metadata : mapping, callable or None
        The caller's ``metadata=`` argument of :meth:`HiMIRIndex.add`; its values win
        over the documents' metadata.

    Returns
    -------
    tuple
        ``(paths, metadata source)``; ``source`` unchanged when it holds no document.

    Raises
    ------
    ConfigError
        A document names no image file.
    """
    items = list(source)
    if not any(is_document(item) for item in items):
        return items, metadata
    paths: list[Any] = []
    from_documents: dict[str, dict[str, Any]] = {}
    for item in items:
        if not is_document(item):
            paths.append(item)
            continue
        path, path_key = _document_path(item)
        document_metadata = _json_metadata(item, path_key)
        document_metadata.pop("file_name", None)  # himir gives every photo its file_name
        doc_id = _document_id(item)
        if doc_id is not None:
            document_metadata[DOC_ID_KEY] = doc_id
        from_documents[str(Path(path).absolute())] = document_metadata
        paths.append(path)
    # the caller's own mapping resolves its keys as add() documents (absolute, relative, unique bare names)
    own = MetadataLookup.wrap(metadata, None, [(Path(p).absolute(), None) for p in paths])
    return paths, _merged(from_documents, own)


def _merged(from_documents: Mapping[str, Mapping[str, Any]], own: Any) -> Callable[[Path], dict[str, Any]]:
    """The documents' metadata under the caller's (the caller's keys win)."""
    def lookup(path: Path) -> dict[str, Any]:
        return {**from_documents.get(str(path), {}), **dict((own(path) if own is not None else None) or {})}

    return lookup
