"""The HTTP face of a `GallerySearch`: a JSON API and one web page (FastAPI).

    GET  /                                  the page: choose or drop a query image, see the ranked gallery
    GET  /health                            index size, dimension, kind, distance, checkpoint SHA-256
    POST /search?k=10&max_distance=0.3      multipart field `image`: the top-k gallery items as JSON
    GET  /gallery/{position}/thumbnail      a gallery item's image, shrunk into `thumb_size`

A thumbnail is addressed by the item's position in the index's gallery list, never by a path, so the
service can only ever serve the gallery's own images. Queries run in the server's thread pool (decoding,
embedding and searching block), so slow ones do not hold up the others.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and they
# refer to create_app's arguments (max_k).
import io
from functools import lru_cache
from importlib.resources import files
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from agw_light.service.gallery import GallerySearch, QueryImageError, decode_query, hit_json

# Bytes a multipart request may carry beyond the image itself (boundaries, part headers).
MULTIPART_OVERHEAD = 64 * 1024
THUMBNAIL_CACHE_ITEMS = 4096


def create_app(
    gallery: GallerySearch,
    *,
    max_upload_bytes: int = 10_000_000,
    max_k: int = 100,
    thumb_size: tuple[int, int] = (128, 64),
) -> FastAPI:
    """The service around `gallery`; `max_upload_bytes` bounds a query image, `max_k` the results asked for,
    `thumb_size` (height, width) the box thumbnails fit in."""
    app = FastAPI(title="agw_light gallery search", version="1")
    page = files("agw_light.service").joinpath("page.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def refuse_oversize_bodies(request: Request, call_next):
        """A body declared larger than any acceptable upload is refused before it is read (FastAPI would
        otherwise receive and spool the whole form before the endpoint sees it)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + MULTIPART_OVERHEAD:
            return JSONResponse({"detail": f"the upload exceeds the limit of {max_upload_bytes} bytes"}, 413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        return gallery.describe()

    @app.post("/search")
    async def search(
        image: Annotated[UploadFile, File(description="the query image: JPEG, PNG or BMP")],
        k: Annotated[int, Query(ge=1, le=max_k, description="gallery items to return")] = 10,
        max_distance: Annotated[float | None, Query(ge=0, description="drop items farther than this")] = None,
    ) -> dict[str, Any]:
        data = await image.read(max_upload_bytes + 1)
        try:
            hits = await run_in_threadpool(_search, gallery, data, max_upload_bytes, k, max_distance)
        except QueryImageError as error:
            raise HTTPException(error.status, f"{image.filename or 'upload'}: {error}") from error
        return {
            "k": k,
            "max_distance": max_distance,
            "distance": gallery.encoder.distance,
            "results": [{**hit_json(hit), "thumbnail": f"/gallery/{hit.position}/thumbnail"} for hit in hits],
        }

    @lru_cache(maxsize=THUMBNAIL_CACHE_ITEMS)
    def thumbnail_bytes(position: int) -> tuple[bytes, str]:
        from PIL import Image

        path = gallery.item_path(position)
        try:
            with Image.open(path) as picture:
                picture = picture.convert("RGB")
        except OSError as error:
            message = f"gallery item {position}: its image cannot be read ({error.__class__.__name__})"
            raise LookupError(message) from error
        picture.thumbnail((thumb_size[1], thumb_size[0]))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "image/jpeg"

    # Only digits route here (Starlette's int convertor): no sign, decimal point or anything path-like.
    @app.get("/gallery/{position:int}/thumbnail")
    def thumbnail(position: int) -> Response:
        try:
            content, media_type = thumbnail_bytes(position)
        except LookupError as error:
            raise HTTPException(404, str(error)) from error
        return Response(content, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return app


def _search(gallery: GallerySearch, data: bytes, max_bytes: int, k: int, max_distance: float | None) -> list:
    return gallery.search(decode_query(data, max_bytes), k, max_distance)
