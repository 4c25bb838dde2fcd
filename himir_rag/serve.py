"""``himir serve``: one warm index behind an HTTP API and a web page (FastAPI + uvicorn).

The models are loaded once, at start-up; every request then costs one search. Endpoints:

=========================  ======================================================================
``GET /``                  the search page (``himir_rag/web/index.html``; ``/?q=TEXT`` runs a query)
``GET /api/health``        ``{"status": "ok", "images", "encoder", "dim", "layout", "default_mode",
                           "allow_writes"}``
``GET /api/search``        ``?q=TEXT&k=10&mode=himir``: the JSON object of ``himir search --json``
``POST /api/search``       multipart form: ``image`` (a photo file, required), ``q``, ``k``, ``mode``
``GET /api/photo/{id}``    an indexed photo, decoded and re-encoded as JPEG (``?size=`` longer side);
                           its thumbnail when the original is gone or has left the collection
                           folder (``X-Image-Source: original | thumbnail``)
``POST /api/index``        ``{"path": "/server/side/folder"}``: index new or changed photos and
                           save; only when started with ``allow_writes`` (else 403)
=========================  ======================================================================

Security defaults: the CLI binds 127.0.0.1; the API is read-only unless ``allow_writes``;
photos are served only when they are in the index and pass its containment check
(:meth:`HiMIRIndex.image_file`), and always re-encoded with Pillow (never the file's
bytes); uploads are capped (20 MB by default) and decoded with Pillow; bad input gets
one JSON line ``{"error": "..."}`` (HTTP 400; 404 unknown photo; 403 writes disabled;
413 upload too large).

Install with ``pip install 'himir-rag[serve]'``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import uvicorn
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("himir serve needs FastAPI, uvicorn and python-multipart; install them with: "
                      "pip install 'himir-rag[serve]'") from exc

from himir_rag.errors import EmptyIndexError, HiMIRError
from himir_rag.images import encode_image, load_image
from himir_rag.index import HiMIRIndex
from himir_rag.retriever import result_json

__all__ = ["create_app", "serve", "MAX_UPLOAD_BYTES", "MAX_K"]

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 1000
MAX_QUERY_CHARS = 2000
PHOTO_SIZE_RANGE = (16, 2048)
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small text fields around the photo


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _error(status: int, message: Any) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status)


def create_app(index: HiMIRIndex, *, index_dir: str | os.PathLike[str] | None = None, allow_writes: bool = False,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application over ``index`` (see the module docstring for the endpoints).

    Parameters
    ----------
    index : HiMIRIndex
        A loaded index (its encoder is loaded by the first search, or beforehand by :func:`serve`).
    index_dir : path-like, optional
        Where ``POST /api/index`` saves the index; required with ``allow_writes``.
    allow_writes : bool
        Enable ``POST /api/index``; otherwise the API is read-only.
    max_upload_bytes : int
        Largest photo accepted by ``POST /api/search``.

    Returns
    -------
    fastapi.FastAPI

    Raises
    ------
    ValueError
        ``allow_writes`` without ``index_dir``.

    Example
    -------
    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> TestClient(create_app(HiMIRIndex.load("photos.himir"))).get("/api/search?q=a+cat").json()  # doctest: +SKIP
    """
    if allow_writes and index_dir is None:
        raise ValueError("allow_writes needs index_dir: the folder the index is saved to")
    app = FastAPI(title="himir-rag", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index, app.state.allow_writes = index, allow_writes

    @app.exception_handler(EmptyIndexError)
    async def _empty(request: Any, exc: EmptyIndexError) -> Any:
        return _error(409, exc)

    @app.exception_handler(HiMIRError)
    async def _himir(request: Any, exc: HiMIRError) -> Any:
        return _error(400, exc)

    @app.exception_handler(ValueError)
    async def _value(request: Any, exc: ValueError) -> Any:
        return _error(400, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(400, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Any, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, exc.detail)

    _add_pages(app, index)
    _add_search(app, index, max_upload_bytes=max_upload_bytes)
    _add_writes(app, index, index_dir=index_dir, allow_writes=allow_writes)
    return app


def _add_pages(app: FastAPI, index: HiMIRIndex) -> None:
    """``GET /``, ``GET /api/health`` and ``GET /api/photo/{image_id}``."""
    page = resources.files("himir_rag").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> Any:
        return HTMLResponse(page)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": len(index), "encoder": index.encoder.name,
                "dim": index.snapshot.dim, "layout": index.config.layout, "default_mode": index.config.default_mode,
                "allow_writes": bool(app.state.allow_writes)}

    @app.get("/api/photo/{image_id:int}")
    def photo(image_id: int, size: int = Query(512, ge=PHOTO_SIZE_RANGE[0], le=PHOTO_SIZE_RANGE[1])) -> Any:
        if image_id not in index.snapshot.images:
            raise HTTPException(404, f"no photo with id {image_id} in the index")
        shown = index.image_file(image_id)  # containment-checked; the thumbnail when the original is gone
        if shown is None:
            raise HTTPException(404, f"photo {image_id} is in the index but cannot be shown any more "
                                     "(missing, or outside the collection folder, and no thumbnail)")
        try:
            image = load_image(shown[0], max_pixels=index.config.max_image_pixels)
        except HiMIRError as exc:  # changed or deleted since it was checked
            logger.warning("cannot serve photo %d: %s", image_id, exc)
            raise HTTPException(404, f"photo {image_id} is in the index but cannot be read any more") from exc
        data, mime = encode_image(image, max_side=size, fmt="JPEG", quality=85)
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=300", "X-Image-Source": shown[1]})


def _check_text(q: str | None) -> str | None:
    if q is not None and len(q) > MAX_QUERY_CHARS:
        raise ValueError(f"q is {len(q)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    return q


def _check_k(k: Any) -> int:
    try:
        value = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"k must be a positive integer, got {k!r}") from None
    if not 1 <= value <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {value}")
    return value


def _add_search(app: FastAPI, index: HiMIRIndex, *, max_upload_bytes: int) -> None:
    """``GET /api/search`` (text) and ``POST /api/search`` (a photo, with optional text)."""
    @app.get("/api/search")
    def search_text(q: str = Query(..., description="the query text"), k: int = 10,
                    mode: str | None = None) -> dict[str, Any]:
        return result_json(index.search(_check_text(q), k=_check_k(k), mode=mode or None), index=index)

    @app.post("/api/search")
    async def search_photo(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + _FORM_OVERHEAD:
            raise HTTPException(413, f"upload of {int(declared)} bytes; photos up to {max_upload_bytes} bytes "
                                     "are accepted")
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ValueError("POST /api/search needs a multipart form with the photo as the 'image' file field")
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"photo larger than {max_upload_bytes} bytes")
        text = _check_text(form.get("q") or None)
        k, mode = _check_k(form.get("k") or 10), form.get("mode") or None
        name = Path(upload.filename).name if upload.filename else "uploaded image"

        def answer() -> dict[str, Any]:  # the search and the per-hit file checks of result_json, off the event loop
            result = index.search(text, image=data, k=k, mode=mode)
            return result_json(dataclasses.replace(result, image=name), index=index)

        return await run_in_threadpool(answer)


def _add_writes(app: FastAPI, index: HiMIRIndex, *, index_dir: Any, allow_writes: bool) -> None:
    """``POST /api/index``: add photos from a server-side path, when writes are allowed."""
    lock = threading.Lock()

    @app.post("/api/index")
    def add_photos(path: str = Body(..., embed=True)) -> dict[str, Any]:
        if not allow_writes:
            raise HTTPException(403, "this server is read-only; restart it with `himir serve --allow-writes` "
                                     "to add photos")
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder on the server")
        with lock:  # one build at a time; searches go on, each on its own snapshot
            report = index.add(path, progress=False, checkpoint_dir=index_dir)
        return {**report.to_dict(), "images": len(index)}


def serve(index_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
          allow_writes: bool = False, device: str = "cpu", max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Load the index and its models once, then serve :func:`create_app` with uvicorn (blocks).

    Raises
    ------
    IndexFormatError
        If ``index_dir`` is not a readable index.
    """
    index = HiMIRIndex.load(index_dir, device=device)
    index.encoder.embed_texts(["warm-up"])  # load the models now, not on the first request
    app = create_app(index, index_dir=index_dir, allow_writes=allow_writes, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)  # says when it listens
