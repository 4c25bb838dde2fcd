"""The on-disk schema of an index: ``CURRENT``, ``manifest.json`` and what ``load`` trusts of them.

One place validates everything a load reads back before any of it is used: types, ranges,
nesting, file names and sizes, the config, the store's location, and (after the catalog is
read) the image records and ``next_image_id``. Any violation is one
:class:`~himir_rag.errors.IndexFormatError` naming the field; nothing else escapes.

Manifest fields (``save`` writes them all; ``?`` = optional, for older indexes)::

    format          "himir-rag index"
    format_version  int, 1 or 2 == FORMAT_VERSION (else IncompatibleIndexError); 2 = append-only files
    encoder         {name: str, dim: int 1..65536, spec?: str}
    config?         {HiMIRConfig field: value of that field's type}
    next_image_id?  int >= 1, > every image id of the catalog
    vectors?        {dtype?: str, shape?: [int >= 0, dim]}
    counts?         {name: int >= 0}; images / regions checked against the catalog
    files           {plain file name: exact size in bytes}; version 1: with vectors.npy and catalog.sqlite,
                    version 2: with skipped.json
    appended        version 2 only: {vectors.bin, region_image.i64, regions.i32, images.jsonl: bytes the
                    version reads}; each file at least that long, the three row files of one row count
                    (>= vectors.shape[0]: rows of deleted images stay until
                    compaction; see himir_rag.appendlog)
    chain           version 2 only: str of 1..64 hex digits naming the append-only files
    saved_at?       str
    store?          {kind: "faiss"} | {kind: "qdrant", collection: str, url?: str|null, path?: str|null}
    root?           absolute path of the collection folder | null (see himir_rag.paths)
    autoconfig?     {source: str, params: {scheduler parameter: value}, ...} (see himir_rag.autoconfig)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError, IncompatibleIndexError, IndexFormatError, UntrustedLocationError

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "FORMAT_NAME", "STORE_LOCATION_ENV", "current_version", "read_pointer", "read_manifest",
           "validate_manifest", "parse_config", "check_catalog", "store_location", "VECTORS", "REGION_IMAGE",
           "REGIONS", "RECORDS", "APPENDED_FILES", "REGION_COLUMNS", "row_file_sizes"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: one vectors.npy + catalog.sqlite per version, rewritten by every save
FORMAT_NAME = "himir-rag index"
STORE_LOCATION_ENV = "HIMIR_STORE_LOCATION"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KiB; anything this large is not one
MAX_DIM = 65_536
_MAX_DEPTH = 16  # the deepest legitimate value (config.scheduler.candidate_levels) is 3 levels down


def current_version(directory: Path) -> Path:
    """The live version directory that ``directory/CURRENT`` names.

    Raises
    ------
    IndexFormatError
        No such directory, no ``CURRENT``, or ``CURRENT`` names a missing or outside directory.
    """
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: no such index directory; build one with `himir index`")
    name = read_pointer(directory)
    if name is None:
        raise IndexFormatError(f"{directory}: not a himir index (no CURRENT file); build one with `himir index`")
    version_dir = directory / name
    if not name or not version_dir.is_dir() or version_dir.parent != directory:
        raise IndexFormatError(f"{directory}: CURRENT names {name!r:.80}, which is missing")
    return version_dir


def read_pointer(directory: Path) -> str | None:
    """What ``directory/CURRENT`` says (stripped), or None when there is no such file."""
    pointer = directory / "CURRENT"
    try:
        with open(pointer, "rb") as fh:  # a version name is ~30 bytes; never read a huge file whole
            return fh.read(4096).decode("utf-8").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{pointer}: unreadable ({exc}); rebuild the index") from exc


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """Read, parse and validate ``version_dir/manifest.json``, and check the files it lists.

    Raises
    ------
    IndexFormatError
        Missing, not JSON, too deep, against the schema, or a listed file missing or of another size.
    IncompatibleIndexError
        Another format version.
    """
    path = version_dir / "manifest.json"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise IndexFormatError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{version_dir}: manifest.json is missing; the index is incomplete") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise IndexFormatError(f"{path}: nested too deeply to be a manifest; rebuild the index") from None
    validate_manifest(manifest, where=str(path))
    for name, size in manifest["files"].items():
        actual = _file_size(version_dir, name)
        if actual != size:
            raise IndexFormatError(
                f"{version_dir}/{name}: expected {size} bytes, found {actual}; the index is truncated or damaged"
            )
    for name, size in manifest.get("appended", {}).items():  # append-only files: later saves may have grown them
        actual = _file_size(version_dir, name)
        if actual < size:
            raise IndexFormatError(f"{version_dir}/{name}: expected at least {size} bytes, found {actual}; the "
                                   "index is truncated or damaged")
    return manifest


def _file_size(version_dir: Path, name: str) -> int:
    if not (version_dir / name).is_file():
        raise IndexFormatError(f"{version_dir}/{name}: missing; the index is incomplete, rebuild it")
    return (version_dir / name).stat().st_size


def validate_manifest(manifest: Any, *, where: str) -> dict[str, Any]:
    """Check a parsed manifest against the schema of the module docstring; returns it unchanged."""
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{where}: not a himir-rag index manifest; rebuild the index")
    _check_depth(manifest, where)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise IncompatibleIndexError(
            f"{where}: index format version {version!r:.40}, this himir-rag reads versions "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; upgrade himir-rag or rebuild the index"
        )
    if manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{where}: not a himir-rag index manifest; rebuild the index")
    encoder = manifest.get("encoder")
    if not (isinstance(encoder, dict) and isinstance(encoder.get("name"), str) and encoder["name"]
            and _is_int(encoder.get("dim"), 1, MAX_DIM)):
        raise IndexFormatError(f"{where}: no encoder name and dim recorded; rebuild the index")
    if not isinstance(encoder.get("spec", ""), str):
        raise IndexFormatError(f"{where}: encoder.spec must be a string, got {_kind(encoder['spec'])}")
    _check_files(manifest.get("files"), where, version)
    _check_optional(manifest, where, int(encoder["dim"]))
    if version == 2:
        _check_appended(manifest, where, int(encoder["dim"]))
    _check_store(manifest.get("store", {"kind": "faiss"}), where)
    return manifest


def _check_files(files: Any, where: str, version: int) -> None:
    required = {"vectors.npy", "catalog.sqlite"} if version == 1 else {"skipped.json"}
    if not isinstance(files, dict) or not required <= set(files):
        raise IndexFormatError(f"{where}: does not list {' and '.join(sorted(required))}; rebuild the index")
    _check_sizes(files, where)


def _check_sizes(files: Mapping[str, Any], where: str) -> None:
    for name, size in files.items():
        if not name or Path(name).name != name or name in (".", ".."):
            raise IndexFormatError(f"{where}: file name {name!r:.60} points outside the index")
        if not _is_int(size, 0, None):
            raise IndexFormatError(f"{where}: size of {name!r:.60} must be an int >= 0, got {size!r:.40}")


# the append-only files of a version-2 index (written and read by himir_rag.appendlog; checked here)
VECTORS, REGION_IMAGE, REGIONS, RECORDS = "vectors.bin", "region_image.i64", "regions.i32", "images.jsonl"
APPENDED_FILES = (VECTORS, REGION_IMAGE, REGIONS, RECORDS)
REGION_COLUMNS = 6  # int32 columns of REGIONS: level, local parent, box (4)
_ITEMSIZES = {"float32": 4, "float16": 2}


def row_file_sizes(rows: int, itemsize: int, dim: int) -> dict[str, int]:
    """Bytes of the three row files (vectors, region image ids, region columns) holding ``rows`` rows."""
    return {VECTORS: rows * dim * itemsize, REGION_IMAGE: rows * 8, REGIONS: rows * 4 * REGION_COLUMNS}


def _check_appended(manifest: Mapping[str, Any], where: str, dim: int) -> None:
    """``appended`` and ``chain`` of a version-2 manifest: the four files, one row count for all three row files."""
    appended, chain = manifest.get("appended"), manifest.get("chain")
    if not (isinstance(chain, str) and 0 < len(chain) <= 64 and all(c in "0123456789abcdef" for c in chain)):
        raise IndexFormatError(f"{where}: chain must be 1 to 64 hex digits, got {chain!r:.80}")
    if not isinstance(appended, dict) or set(appended) != set(APPENDED_FILES):
        raise IndexFormatError(f"{where}: appended must list exactly {', '.join(APPENDED_FILES)}; rebuild the index")
    _check_sizes(appended, where)
    if set(appended) & set(manifest["files"]):
        raise IndexFormatError(f"{where}: a file is listed both in files and in appended")
    dtype = manifest.get("vectors", {}).get("dtype", "float32")
    rows = appended[REGION_IMAGE] // 8
    expected = row_file_sizes(rows, _ITEMSIZES.get(dtype, 0), dim)
    shape = manifest.get("vectors", {}).get("shape", [rows, dim])
    if any(appended[name] != size for name, size in expected.items()) or shape[0] > rows:
        raise IndexFormatError(f"{where}: appended sizes {appended!r:.160} do not hold one row count ({rows}) of "
                               f"{dtype} vectors of dim {dim}, at least vectors.shape's; the manifest is damaged")


def _check_optional(manifest: Mapping[str, Any], where: str, dim: int) -> None:
    """``config``, ``next_image_id``, ``vectors``, ``counts``, ``saved_at``: types and ranges."""
    if "config" in manifest and not isinstance(manifest["config"], dict):
        raise IndexFormatError(f"{where}: config must be a JSON object, got {_kind(manifest['config'])}")
    if "next_image_id" in manifest and not _is_int(manifest["next_image_id"], 1, None):
        raise IndexFormatError(f"{where}: next_image_id must be an int >= 1, got {manifest['next_image_id']!r:.40}")
    vectors = manifest.get("vectors", {})
    if not isinstance(vectors, dict) or not isinstance(vectors.get("dtype", "float32"), str):
        raise IndexFormatError(f"{where}: vectors must be {{dtype: str, shape: [n, dim]}}, got {vectors!r:.80}")
    shape = vectors.get("shape", [0, dim])
    if not (isinstance(shape, list) and len(shape) == 2 and _is_int(shape[0], 0, None) and shape[1] == dim
            and _is_int(shape[1], 1, None)):
        raise IndexFormatError(f"{where}: vectors.shape must be [n, {dim}], got {shape!r:.80}")
    counts = manifest.get("counts", {})
    if not isinstance(counts, dict) or not all(_is_int(v, 0, None) for v in counts.values()):
        raise IndexFormatError(f"{where}: counts must map names to ints >= 0, got {counts!r:.80}")
    if not isinstance(manifest.get("saved_at", ""), str):
        raise IndexFormatError(f"{where}: saved_at must be a string")
    root = manifest.get("root")
    if root is not None and not (isinstance(root, str) and os.path.isabs(root)):
        raise IndexFormatError(f"{where}: root must be an absolute path or null, got {root!r:.80}")
    record = manifest.get("autoconfig")
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("params"), dict)
                                   and isinstance(record.get("source"), str)):
        raise IndexFormatError(f"{where}: autoconfig must be a record with a source and params, got {record!r:.80}")


def _check_store(store: Any, where: str) -> None:
    if not isinstance(store, dict) or store.get("kind") not in ("faiss", "qdrant"):
        kind = store.get("kind") if isinstance(store, dict) else store
        raise IncompatibleIndexError(f"{where}: unknown store kind {kind!r:.40}; this himir-rag knows faiss and qdrant")
    if store["kind"] == "faiss":
        return
    if not (isinstance(store.get("collection"), str) and store["collection"]):
        raise IndexFormatError(f"{where}: the Qdrant store needs a collection name (a non-empty string)")
    url, path = store.get("url"), store.get("path")
    if not all(v is None or (isinstance(v, str) and v) for v in (url, path)) or (url is None) == (path is None):
        raise IndexFormatError(f"{where}: the Qdrant store needs exactly one of url or path (a non-empty string)")


def parse_config(manifest: Mapping[str, Any], *, where: str) -> HiMIRConfig:
    """The manifest's :class:`HiMIRConfig`; a field of the wrong type or range raises IndexFormatError."""
    from himir_rag.scheduler import SchedulerParams

    values = _checked_fields(manifest.get("config", {}), HiMIRConfig, "config", where)
    if isinstance(values.get("scheduler"), dict):  # unknown scheduler keys: ConfigError from SchedulerParams
        values["scheduler"] = _checked_fields(values["scheduler"], SchedulerParams, "config.scheduler", where)
    try:
        return HiMIRConfig.from_dict(values)
    except (ConfigError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{where}: config is invalid ({exc}); rebuild the index") from None


def _checked_fields(values: Mapping[str, Any], cls: type, prefix: str, where: str) -> dict[str, Any]:
    """A copy of ``values`` where each known field of the dataclass ``cls`` has the JSON type of its default
    (an integral float for an int field, e.g. ``5e7`` pixels, becomes that int)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = dict(values)
    for name, value in values.items():
        if name not in fields:
            continue  # HiMIRConfig ignores keys of newer versions; SchedulerParams refuses them itself
        default = fields[name].default if fields[name].default is not dataclasses.MISSING else {}
        if default is None and value is not None:  # an optional field ("float | None"): the kind it holds when set
            default = _optional_sample(str(fields[name].type))
        if _is_int(default, None, None) and isinstance(value, float) and value.is_integer():
            checked[name] = value = int(value)
        if not _same_kind(value, default):
            raise IndexFormatError(f"{where}: {prefix}.{name} must be {_kind(default)}, got {_kind(value)} "
                                   f"{value!r:.60}")
    return checked


def check_catalog(manifest: Mapping[str, Any], images: Mapping[int, Any], n_regions: int | None, *,
                  where: str) -> None:
    """The catalog read back agrees with the manifest (counts, ``next_image_id``) and holds sane records.

    ``n_regions`` is None when the regions live in an external store.
    """
    # exact types (SQLite hands back a text width as text); one set of type tuples is the fast check at 1M images
    if {_record_types(r) for r in images.values()} - {_RECORD_TYPES}:
        bad = next(r for r in images.values() if _record_types(r) != _RECORD_TYPES)
        raise IndexFormatError(f"{where}: catalog image {bad.image_id!r} has a malformed record (metadata must be "
                               "a JSON object, sizes integers); rebuild the index")
    top = max(images, default=0)
    next_id = manifest.get("next_image_id", top + 1)
    if next_id <= top:
        raise IndexFormatError(f"{where}: next_image_id={next_id} but the catalog holds image id {top}; "
                               "the manifest is damaged, rebuild the index")
    counts = manifest.get("counts", {})
    found = {"images": len(images), "regions": n_regions}
    for name, count in found.items():
        if count is not None and name in counts and counts[name] != count:
            raise IndexFormatError(f"{where}: counts.{name}={counts[name]} but the catalog holds {count}; "
                                   "the index is damaged, rebuild it")


_RECORD_TYPES = (str, dict, int, int, int, int)


def _record_types(record: Any) -> tuple[type, ...]:
    return (type(record.path), type(record.metadata), type(record.width), type(record.height), type(record.size),
            type(record.mtime_ns))


def store_location(info: Mapping[str, Any], *, index_dir: Path, given: str | os.PathLike[str] | None
                   ) -> tuple[str | None, str | None]:
    """``(url, path)`` of the Qdrant store to open, trusting the manifest only inside ``index_dir``.

    ``given`` (the caller's ``store_location``, else the ``HIMIR_STORE_LOCATION`` environment
    variable) replaces the recorded location: an ``http(s)://`` URL or a folder. Without it, only a
    local folder inside the index directory is opened; a URL or an outside folder raises.

    Raises
    ------
    UntrustedLocationError
        The manifest names a server or an outside folder and the caller did not name it.
    """
    given = given if given is not None else os.environ.get(STORE_LOCATION_ENV) or None
    if given is not None:
        text = str(given)
        return (text, None) if text.startswith(("http://", "https://")) else (None, str(Path(text).absolute()))
    recorded = info.get("url") or info.get("path")
    if info.get("url") is None:
        path = Path(info["path"])
        resolved = os.path.realpath(path if path.is_absolute() else index_dir / path)
        if Path(resolved).is_relative_to(os.path.realpath(index_dir)):
            return None, resolved
    raise UntrustedLocationError(
        f"{index_dir}: its manifest keeps the vectors in Qdrant at {recorded!r}, outside the index directory, "
        f"which is never opened on the manifest's word alone; name it again: HiMIRIndex.load(..., "
        f"store_location={recorded!r}) or {STORE_LOCATION_ENV}={recorded}"
    )


def _check_depth(value: Any, where: str) -> None:
    """No value nested deeper than ``_MAX_DEPTH`` (iterative: a deep value cannot overflow the stack)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise IndexFormatError(f"{where}: nested deeper than {_MAX_DEPTH} levels; not a manifest")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _is_int(value: Any, low: int | None, high: int | None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
            and (high is None or value <= high))


def _optional_sample(annotation: str) -> Any:
    """A value of the first plain JSON type named in an ``X | None`` annotation (None when there is none)."""
    samples = {"bool": False, "int": 0, "float": 0.0, "str": ""}
    return next((samples[part.strip()] for part in annotation.split("|") if part.strip() in samples), None)


def _same_kind(value: Any, default: Any) -> bool:
    """``value`` has the JSON type of a config field whose default is ``default``."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value, None, None)
    if isinstance(default, float):  # inf is legitimate (sparsity_margin), NaN never
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if isinstance(default, tuple):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, type(default))


def _kind(value: Any) -> str:
    return {dict: "a JSON object", list: "a list", tuple: "a list", str: "a string", bool: "a boolean", int: "an int",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
