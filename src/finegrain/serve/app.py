"""The REST service: predictions and heat-maps over HTTP, micro-batched, with a web page at ``/``.

Every bad request gets a 4xx with a message that says what was wrong: no file, not an image, a truncated
image, too many pixels (decompression bombs), a body above the size limit, a wrong content type, a body that
stops arriving (408). Under overload it answers 503 with ``Retry-After`` at once instead of queueing without
bound. ``/v1/health`` says the process is alive, ``/v1/ready`` that it can take requests, ``/metrics`` has
Prometheus counters and latency histograms; ``/docs`` (Swagger UI) and ``/redoc`` are served from the package, so
they work offline. Every status the API answers is in its OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel

from finegrain import __version__
from finegrain.config import DEFAULT_BACKBONE
from finegrain.data.loading import MAX_ASPECT, decode_image
from finegrain.errors import BadImageError, ImageTooLargeError, NotAnImageError
from finegrain.explain import explain
from finegrain.explain.render import png_bytes
from finegrain.predict import Predictor
from finegrain.run_layout import RunDir
from finegrain.serve.batcher import MicroBatcher

Upload = Annotated[UploadFile, File(description="the image (JPEG, PNG, WebP ...), as multipart form field 'file'")]
TopK = Annotated[int, Query(ge=1, le=100, description="how many classes to return")]


class ErrorBody(BaseModel):
    detail: str


#: every error the upload endpoints answer, documented in the OpenAPI schema
UPLOAD_ERRORS = {
    400: {"model": ErrorBody, "description": "no file, not an image, a truncated image, or a bad parameter"},
    408: {"model": ErrorBody, "description": "the request body stopped arriving (slow client)"},
    411: {"model": ErrorBody, "description": "no Content-Length header (chunked uploads are refused)"},
    413: {"model": ErrorBody, "description": "body above the size limit, or an image with too many pixels"},
    415: {"model": ErrorBody, "description": "the body is not multipart/form-data"},
    503: {"model": ErrorBody, "description": "busy: too many requests in progress; retry after Retry-After s"},
}


@dataclass
class ServeSettings:
    max_batch: int = 4  # images per forward pass (1: no micro-batching); 4 measured best for int8 on 2 cores
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000
    max_aspect: float = MAX_ASPECT  # longest side over shortest (thin images cost gigabytes once resized)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: all cores)
    device: str = "auto"
    preprocess_threads: int = 2  # image decoding and resizing, first-come first-served
    max_inflight: int = 64  # upload requests in progress; past it: 503 + Retry-After, not an unbounded queue
    body_timeout_s: float = 30.0  # longest wait for the next chunk of a request body
    class_info: str | None = None  # also serve this class_info folder's new classes (textprior checkpoints)


def model_id(path: str | Path) -> str:
    """File name plus a content hash: two different models never report the same id."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.stem}-{digest.hexdigest()[:12]}"


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
LARGE_IMAGE_PIXELS = 4_000_000  # above it: a decode lane of its own, and the heap trimmed afterwards


def _pixels(source: bytes | Image.Image) -> int:
    """Pixels of an image, or of encoded bytes from their header alone (0 when the header is unreadable)."""
    if isinstance(source, Image.Image):
        return source.width * source.height
    try:
        with Image.open(io.BytesIO(source)) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - the decoder reports bad bytes properly later
        return 0


def release_memory() -> None:
    """Give freed heap back to the OS after a large image (glibc keeps it otherwise: the server's RSS went from
    0.8 to 2.7 GB after 26 uploads of 36-megapixel photos and stayed there)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def decode_upload(data: bytes, max_pixels: int, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Uploaded bytes -> RGB image (the same decoding as training data), or an HTTP 4xx that says why not."""
    if not data:
        raise HTTPException(400, "the uploaded file is empty: send an image file")
    try:
        return decode_image(io.BytesIO(data), "upload", max_pixels, max_aspect)
    except NotAnImageError as e:
        raise HTTPException(400, "the uploaded file is not an image PIL can read (JPEG, PNG, WebP ...)") from e
    except ImageTooLargeError as e:
        raise HTTPException(413, f"image too large or too thin ({e.reason}); the server's limits: {max_pixels:,} "
                                 f"pixels (--max-pixels), {max_aspect:g}:1 (--max-aspect)") from e  # fmt: skip
    except BadImageError as e:
        raise HTTPException(400, f"the image is truncated or corrupt: {e.reason}") from e


class BodyTimeout:
    """ASGI middleware: a request body whose next chunk takes more than ``seconds`` ends with 408 (FastAPI re-raises
    an HTTPException from the body reader as it is) and ``Connection: close``, so the connection is closed at once:
    its unread body makes it unusable, and without the header uvicorn kept it open until keep-alive expired (5 s)."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def timed_receive():
            try:
                return await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                raise HTTPException(408, f"the request body stopped arriving for {self.seconds:g} s",
                                    headers={"Connection": "close"}) from None  # fmt: skip

        await self.app(scope, timed_receive, send)


def _card(predictor: Predictor) -> dict:
    """The short model card (inside an ONNX file, or beside a checkpoint): what the model is for, how accurate it
    was on the test split, and below which probability its answers are unsure; empty before ``evaluate``."""
    if isinstance(getattr(predictor.model, "meta", None), dict):
        return predictor.model.meta.get("model_card", {}) or {}
    card = Path(predictor.info["path"]).with_name(RunDir.SHORT_CARD)
    try:
        return json.loads(card.read_text()) if card.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _validation_message(request: Request, exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's 422 in finegrain's words: 415 for a body that is not a form, else 400 naming the field."""
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and not content_type.startswith("multipart/form-data"):
        return 415, (f"content type '{content_type or 'none'}' is not multipart/form-data: upload the image as the "
                     "form field 'file' (curl -F file=@bird.jpg ...)")  # fmt: skip
    parts = []
    for error in exc.errors():
        field = ".".join(str(x) for x in error.get("loc", ()) if x not in ("body", "query"))
        if field == "file":
            parts.append("no file: upload the image as the multipart form field 'file' (a file, not text)")
        else:
            parts.append(f"{field or 'request'}: {error.get('msg', 'invalid')}")
    return 400, "; ".join(dict.fromkeys(parts)) or "invalid request"


def create_app(model: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``model``: routes, limits, metrics and the micro-batcher.

    Why one long function: FastAPI routes are closures over the app's state (the predictor, the batcher, the
    in-flight counter, the metrics registry), the framework's own factory pattern; the pieces with a job of their
    own (decoding and limits, the batcher, the server) live in their own functions and modules."""
    settings = settings or ServeSettings()
    predictor = Predictor.load(model, settings.device, settings.threads, spinning=False)
    if settings.class_info:
        predictor.add_classes(settings.class_info)
    if predictor.info["engine"] == "onnxruntime":
        # torch only preprocesses here, one request per thread: its own thread pool would fight ONNX Runtime's
        torch.set_num_threads(1)
    source = Path(predictor.info["path"])
    card = _card(predictor)
    info = {
        "id": model_id(source),
        "classes": predictor.classes,
        "num_classes": len(predictor.classes),
        "method": predictor.info["method"],
        "backbone": predictor.info["model_kwargs"].get("backbone", DEFAULT_BACKBONE),
        "input_size": predictor.preprocess.input_size,
        "preprocess": predictor.preprocess.to_dict(),
        "engine": predictor.info["engine"],
        "explain": "grad-cam" if predictor.info["engine"] == "torch" else "occlusion",
        "description": card.get("description"),
        "test_top1": card.get("test_top1"),  # percent, on the test split (the model card says which CPU and data)
        "test_images": card.get("test_images"),
        "unsure_below": card.get("unsure_below"),  # answers with a lower top-1 probability come back "unsure"
        "max_batch": settings.max_batch,
        "max_wait_ms": settings.max_wait_ms,
    }

    def unsure(top: list[dict]) -> bool | None:
        """Whether the answer is below the validation split's unsure threshold (None: the model was not evaluated)."""
        return None if info["unsure_below"] is None else bool(top[0]["prob"] < info["unsure_below"])

    registry = CollectorRegistry()
    requests_total = Counter("finegrain_requests_total", "HTTP requests by path and status", ["path", "status"],
                             registry=registry)  # fmt: skip
    latency = Histogram("finegrain_request_seconds", "time to answer, by path", ["path"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
    batch_sizes = Histogram("finegrain_batch_size", "images per forward pass", registry=registry,
                            buckets=tuple(range(1, max(2, settings.max_batch) + 1)))  # fmt: skip
    inflight = {"n": 0}
    state = {"ready": False}

    def run_batch(x: torch.Tensor) -> torch.Tensor:
        batch_sizes.observe(len(x))
        return predictor.logits(x)

    batcher = MicroBatcher(run_batch, settings.max_batch, settings.max_wait_ms)
    # Decoding and preprocessing run first-come first-served on a few threads rather than on as many threads
    # as there are requests: on a small CPU that keeps the latency tail short.
    pool: dict[str, ThreadPoolExecutor] = {}  # made at startup, so the app can be started again after a stop

    async def cpu(fn, *args, lane: str = "preprocess"):
        return await asyncio.get_running_loop().run_in_executor(pool[lane], fn, *args)

    def lane_for(img_or_data) -> str:
        """Images above 4 megapixels decode and resize on a lane of their own, so they queue behind each other
        and not in front of ordinary photos (measured: two clients uploading 36-megapixel photos cut the
        ordinary traffic from 157 to 34 requests/s, p99 71 -> 518 ms, when they shared the two threads)."""
        return "large" if _pixels(img_or_data) > LARGE_IMAGE_PIXELS else "preprocess"

    max_body = int(settings.max_body_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        pool["preprocess"] = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="finegrain-preprocess")
        pool["large"] = ThreadPoolExecutor(1, thread_name_prefix="finegrain-large-images")
        await batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()
        for lane in list(pool):
            pool.pop(lane).shutdown(wait=False)

    app = FastAPIOffline(
        title="finegrain",
        version=__version__,
        summary="Fine-grained image classification: predictions and heat-maps of where the model looked.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(request, exc)
        return JSONResponse({"detail": message}, status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Size and concurrency limits before any work, and the metrics of every answer (a request that raised
        is counted as the 500 it becomes: those were missing from /metrics)."""
        start, path = time.perf_counter(), request.url.path
        route = path if path in known_paths else "other"
        try:
            response = await admit(request, call_next)
        except Exception:
            requests_total.labels(route, "500").inc()
            raise
        requests_total.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def admit(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                response = JSONResponse({"detail": "send a Content-Length header (no chunked uploads)"}, 411)
            elif not length.isdigit() or int(length) > max_body:
                detail = f"request body of {length} bytes is above the limit of {max_body:,} bytes"
                response = JSONResponse({"detail": detail}, 413)
            elif inflight["n"] >= settings.max_inflight:
                detail = f"busy: {inflight['n']} requests in progress; retry shortly"
                response = JSONResponse({"detail": detail}, 503, headers={"Retry-After": "1"})
            else:
                inflight["n"] += 1
                try:
                    response = await call_next(request)
                finally:
                    inflight["n"] -= 1
        else:
            response = await call_next(request)
        return response

    def decode(data: bytes, large: bool) -> Image.Image:
        try:
            return decode_upload(data, settings.max_pixels, settings.max_aspect)
        finally:
            if large:
                release_memory()  # the decoder's buffers, and the whole image when it failed

    async def read_image(file: UploadFile) -> Image.Image:
        data = await file.read()
        await file.close()
        lane = lane_for(data)
        return await cpu(decode, data, lane == "large", lane=lane)

    def preprocess(img: Image.Image) -> torch.Tensor:
        x = predictor.transform(img)
        if lane_for(img) == "large":
            img.close()
            release_memory()
        return x

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return resources.files("finegrain.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/v1/health")
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok", "model": info["id"], "batches": batcher.batches, "images": batcher.images}

    @app.get("/v1/ready", responses={503: {"model": ErrorBody, "description": "starting, stopping or saturated"}})
    async def ready():
        """Readiness: the model is loaded, its batcher runs, and there is room for another request."""
        if not state["ready"]:
            return JSONResponse({"detail": "not ready: the model is starting or stopping"}, 503)
        if inflight["n"] >= settings.max_inflight:
            return JSONResponse({"detail": "saturated: every request slot is taken"}, 503, {"Retry-After": "1"})
        return {"status": "ready", "model": info["id"], "inflight": inflight["n"]}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics() -> Response:
        """Prometheus text format: requests by path and status, latency histograms, batch sizes."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model_info() -> dict:
        return info

    @app.post("/v1/predict", responses=UPLOAD_ERRORS)
    async def predict(file: Upload, k: TopK = 5) -> dict:
        """Top-k classes of the uploaded image (multipart field ``file``)."""
        img = await read_image(file)
        start = time.perf_counter()
        x = await cpu(preprocess, img, lane=lane_for(img))
        logits, batch = await batcher.submit(x)
        top = predictor.topk(logits.softmax(-1)[None], k)[0]
        ms = (time.perf_counter() - start) * 1000
        return {"model": info["id"], "top": top, "unsure": unsure(top), "inference_ms": round(ms, 2),
                "batch_size": batch}  # fmt: skip

    @app.post("/v1/explain", responses={200: {"content": {"image/png": {}}}, **UPLOAD_ERRORS})
    async def explain_image(
        file: Upload,
        format: Annotated[str, Query(pattern="^(png|json)$")] = "png",
        k: TopK = 5,
    ):
        """Heat-map overlay of where the model looked: a PNG, or JSON with the PNG in base64 and the top-k."""
        img = await read_image(file)
        start = time.perf_counter()
        explanation = (await batcher.run(explain, predictor, [img], k))[0]
        png = await cpu(lambda: png_bytes(explanation.overlay(img, predictor)))
        if format == "png":
            return Response(png, media_type="image/png")
        return {
            "model": info["id"],
            "top": explanation.top,
            "unsure": unsure(explanation.top),
            "method": explanation.method,
            "overlay_png": base64.b64encode(png).decode(),
            "inference_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    known_paths = {r.path for r in app.routes}
    return app
