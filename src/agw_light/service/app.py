"""The HTTP face of a `GallerySearch`: a JSON API and one web page (FastAPI).

    GET    /                                the page: choose or drop a query image, see the ranked gallery
    GET    /health                          index size, dimension, kind, distance, checkpoint SHA-256
    POST   /search?k=10&max_distance=0.3    multipart field `image`: the top-k gallery items as JSON;
           &cameras=0&cameras=2             filters: only these cameras, not the query's own camera,
           &query_camera=1&since=..&until=..  only images taken in [since, until] (Milvus galleries)
    GET    /gallery/{position}/thumbnail    a gallery item's image, shrunk into `thumb_size`
    POST   /gallery?pid=&camera=&timestamp=  multipart field(s) `image`: added to a Milvus gallery (201, ids)
    DELETE /gallery/{id}                    removes an item of a Milvus gallery (404 if there is none)

Every GET route answers HEAD too. A thumbnail is addressed by the item's position in the index's gallery
list (its id in a Milvus collection), never by a path, so the service can only ever serve the gallery's own
images. Writes (POST and DELETE /gallery) need `Authorization: Bearer <write_token>`: refused with 401
without one, 403 with another, 403 when the service has no write token, 405 for a read-only index folder;
reads need none. Queries run in the
server's thread pool (decoding, embedding and searching block), so slow ones do not hold up the others.

What a client can make the server hold is bounded: a request body stops being read at `max_upload_bytes`
(declared or not: a chunked upload is counted as it arrives) and must arrive within `body_timeout_s`; an
upload is decoded only inside the `concurrent_queries` limit, at most `max_image_pixels` pixels, a JPEG at
the reduced scale the model needs; the Host header must name an allowed host (`allowed_hosts`), so a
web page of another site cannot reach a loopback service through DNS rebinding.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and they
# refer to create_app's arguments (max_k).
import asyncio
import hmac
import io
import socket
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib.resources import files
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from agw_light.images import FORMATS_TEXT, open_rgb
from agw_light.service.gallery import DEFAULT_MAX_IMAGE_PIXELS, GallerySearch, QueryImageError, hit_json

# Bytes a multipart request may carry beyond the image itself (boundaries, part headers).
MULTIPART_OVERHEAD = 64 * 1024
THUMBNAIL_CACHE_ITEMS = 4096
# Thumbnails decoded at once (each at most max_image_pixels): the page asks for ten after every query.
THUMBNAIL_DECODES = 4
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
# On a refused body: the server closes the connection after answering instead of reading the rest.
CLOSE = {"Connection": "close"}


def default_allowed_hosts(host: str) -> list[str]:
    """The Host header values a service bound to `host` answers: that host and the loopback names, plus this
    machine's names when it listens on every interface (0.0.0.0)."""
    names = [*LOOPBACK_NAMES]
    if host in WILDCARD_ADDRESSES:
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(host)
    return list(dict.fromkeys(names))


class BoundedBody:
    """ASGI middleware: a request body larger than an upload of `max_upload_bytes` (plus the multipart
    framing) is refused with 413, one slower than `timeout_s`
    with 408, and no byte past the limit or the deadline is read.

    A declared Content-Length over the limit is refused before the body is read; a body without one (chunked
    transfer) is counted as it arrives and refused at the message that passes the limit, so it is never stored
    whole (FastAPI would otherwise spool the whole form to disk before the endpoint sees it). The refusal
    closes the connection, so the rest of the body is not even received.
    """

    def __init__(self, app: Any, *, max_upload_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_bytes = max_upload_bytes + MULTIPART_OVERHEAD
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the upload exceeds the limit of {self.max_upload_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": too_large}, 413, headers=CLOSE)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, complete, started = 0, False, False

        async def bounded_receive() -> dict:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                detail = f"the request body did not arrive within {self.timeout_s:g} s (body_timeout_s)"
                raise HTTPException(408, detail, headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large, headers=CLOSE)
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except HTTPException as refused:  # raised where no exception handler turned it into a response
            if started:
                raise
            await JSONResponse({"detail": refused.detail}, refused.status_code, headers=CLOSE)(scope, receive, send)


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived `timeout_s` seconds
    after the connection opened or the previous response ended.

    uvicorn's keep-alive timer restarts at every byte received, so a client trickling a header a byte at a
    time would hold a connection (and a file descriptor) for as long as it likes; this deadline does not move.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(timeout_s, self._head_overdue)

        def _head_overdue(self) -> None:
            waiting_for_a_request = self.cycle is None or self.cycle.response_complete
            if waiting_for_a_request and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def create_app(
    gallery: GallerySearch,
    *,
    max_upload_bytes: int = 10_000_000,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_k: int = 100,
    thumb_size: tuple[int, int] = (128, 64),
    allowed_hosts: Sequence[str] | None = None,
    body_timeout_s: float = 60.0,
    write_token: str | None = None,
) -> FastAPI:
    """The service around `gallery`.

    Args:
        max_upload_bytes: the largest query image file.
        max_image_pixels: the most pixels a query image or a thumbnail's source is decoded to.
        max_k: the most results a query may ask for.
        thumb_size: (height, width) box the thumbnails fit in.
        allowed_hosts: Host header values answered (`default_allowed_hosts`); None answers any (tests).
        body_timeout_s: seconds a request's body may take to arrive.
        write_token: the bearer token POST and DELETE /gallery need; None refuses every write.
    """
    app = FastAPI(title="agw_light gallery search", version="1")
    page = files("agw_light.service").joinpath("page.html").read_text(encoding="utf-8")
    app.add_middleware(BoundedBody, max_upload_bytes=max_upload_bytes, timeout_s=body_timeout_s)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health() -> dict[str, Any]:
        return gallery.describe()

    @app.post("/search")
    async def search(
        image: Annotated[UploadFile, File(description=f"the query image: {FORMATS_TEXT}")],
        k: Annotated[int, Query(ge=1, le=max_k, description="gallery items to return")] = 10,
        max_distance: Annotated[float | None, Query(ge=0, description="drop items farther than this")] = None,
        cameras: Annotated[list[int] | None, Query(description="only gallery items of these cameras")] = None,
        query_camera: Annotated[int | None, Query(description="the query's camera: its items are left out")] = None,
        since: Annotated[float | None, Query(description="only items taken at or after (epoch seconds)")] = None,
        until: Annotated[float | None, Query(description="only items taken at or before (epoch seconds)")] = None,
    ) -> dict[str, Any]:
        data = await image.read(max_upload_bytes + 1)
        filters = {
            "cameras": cameras,
            "since": since,
            "until": until,
            "query_cameras": None if query_camera is None else [query_camera],
        }
        try:
            hits = await run_in_threadpool(
                gallery.search_upload,
                data,
                k,
                max_distance,
                max_bytes=max_upload_bytes,
                max_pixels=max_image_pixels,
                **filters,
            )
        except QueryImageError as error:
            raise HTTPException(error.status, f"{image.filename or 'upload'}: {error}") from error
        except ValueError as error:  # a filter this gallery cannot apply (a time window on an index folder)
            raise HTTPException(400, str(error)) from error
        return {
            "k": k,
            "max_distance": max_distance,
            "distance": gallery.encoder.distance,
            "results": [{**hit_json(hit), "thumbnail": f"/gallery/{hit.position}/thumbnail"} for hit in hits],
        }

    clear_thumbnails = _add_thumbnail_routes(app, gallery, max_image_pixels=max_image_pixels, thumb_size=thumb_size)
    _add_write_routes(
        app,
        gallery,
        write_token=write_token,
        max_upload_bytes=max_upload_bytes,
        max_image_pixels=max_image_pixels,
        on_delete=clear_thumbnails,
    )
    return app


def _add_thumbnail_routes(
    app: FastAPI, gallery: GallerySearch, *, max_image_pixels: int, thumb_size: tuple[int, int]
) -> Callable[[], None]:
    """GET /gallery/{position}/thumbnail: gallery images by position (or Milvus id), never by a path from the
    request, decoded a few at a time and cached; returns what clears that cache."""
    thumbnail_decodes = threading.BoundedSemaphore(THUMBNAIL_DECODES)

    @lru_cache(maxsize=THUMBNAIL_CACHE_ITEMS)
    def thumbnail_bytes(position: int) -> tuple[bytes, str]:
        path = gallery.item_path(position)
        try:
            with thumbnail_decodes:
                picture = open_rgb(path, max_pixels=max_image_pixels, draft_size=thumb_size)
        except OSError as error:  # missing, not an allowed format, truncated, too many pixels
            message = f"gallery item {position}: its image cannot be shown ({error.__class__.__name__})"
            raise LookupError(message) from error
        picture.thumbnail((thumb_size[1], thumb_size[0]))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "image/jpeg"

    # Only digits route here (Starlette's int convertor): no sign, decimal point or anything path-like.
    @app.api_route("/gallery/{position:int}/thumbnail", methods=["GET", "HEAD"])
    def thumbnail(position: int) -> Response:
        try:
            content, media_type = thumbnail_bytes(position)
        except LookupError as error:
            raise HTTPException(404, str(error)) from error
        return Response(content, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return thumbnail_bytes.cache_clear


def _add_write_routes(
    app: FastAPI,
    gallery: GallerySearch,
    *,
    write_token: str | None,
    max_upload_bytes: int,
    max_image_pixels: int,
    on_delete: Callable[[], None],
) -> None:
    """POST /gallery and DELETE /gallery/{id}, behind the bearer `write_token` (a Milvus gallery only)."""

    def may_write(authorization: Annotated[str | None, Header()] = None) -> None:
        """Refuses a write to a read-only gallery (405), without a bearer token (401) or with another (403)."""
        if not gallery.writable:
            raise HTTPException(405, "this gallery is an index folder, read-only: serve a Milvus collection to write")
        if write_token is None:
            raise HTTPException(403, "writes are disabled: start the service with write_token (or its env var)")
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(
                401, "writes need the header Authorization: Bearer <write token>", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(presented.encode(), write_token.encode()):
            raise HTTPException(403, "the write token is wrong")

    @app.post("/gallery", status_code=201, dependencies=[Depends(may_write)])
    async def add_images(
        image: Annotated[list[UploadFile], File(description=f"gallery images: {FORMATS_TEXT}")],
        pid: Annotated[int, Query(ge=-1, description="the person's id; -1: unknown")] = -1,
        camera: Annotated[int, Query(ge=-1, description="the camera; -1: unknown")] = -1,
        timestamp: Annotated[float | None, Query(description="when taken (epoch seconds); none: now")] = None,
    ) -> dict[str, Any]:
        uploads = [await upload.read(max_upload_bytes + 1) for upload in image]
        try:
            ids = await run_in_threadpool(
                gallery.add_uploads,
                uploads,
                max_bytes=max_upload_bytes,
                max_pixels=max_image_pixels,
                pid=pid,
                camera=camera,
                timestamp=timestamp,
            )
        except QueryImageError as error:
            raise HTTPException(error.status, str(error)) from error
        except (ValueError, RuntimeError) as error:  # refused by the collection: nothing was written
            raise HTTPException(503 if isinstance(error, RuntimeError) else 400, str(error)) from error
        return {"ids": ids, "thumbnails": [f"/gallery/{item}/thumbnail" for item in ids]}

    @app.delete("/gallery/{item_id:int}", dependencies=[Depends(may_write)])
    def delete_item(item_id: int) -> dict[str, Any]:
        try:
            gallery.delete(item_id)
        except LookupError as error:
            raise HTTPException(404, str(error)) from error
        on_delete()  # its thumbnail is no longer served
        return {"deleted": item_id}
