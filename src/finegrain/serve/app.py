"""The REST service: predictions and heat-maps over HTTP, micro-batched, with a web page at ``/``.

Every bad request gets a 4xx with a message that says what was wrong: no file, not an image, a truncated
image, too many pixels (decompression bombs), a body above the size limit, a wrong content type.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from finegrain import __version__
from finegrain.config import DEFAULT_BACKBONE
from finegrain.data.loading import decode_image
from finegrain.errors import BadImageError, ImageTooLargeError, NotAnImageError
from finegrain.explain import explain
from finegrain.explain.render import png_bytes
from finegrain.predict import Predictor
from finegrain.serve.batcher import MicroBatcher

Upload = Annotated[UploadFile | None, File(description="the image (JPEG, PNG, WebP ...)")]
TopK = Annotated[int, Query(ge=1, le=100, description="how many classes to return")]


@dataclass
class ServeSettings:
    max_batch: int = 4  # images per forward pass (1: no micro-batching); 4 measured best for int8 on 2 cores
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000
    threads: int | None = None  # ONNX Runtime intra-op threads (None: all cores)
    device: str = "auto"
    preprocess_threads: int = 2  # image decoding and resizing, first-come first-served


def model_id(path: str | Path) -> str:
    """File name plus a content hash: two different models never report the same id."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> RGB image (the same decoding as training data), or an HTTP 4xx that says why not."""
    if not data:
        raise HTTPException(400, "the uploaded file is empty: send an image file")
    try:
        return decode_image(io.BytesIO(data), "upload", max_pixels)
    except NotAnImageError as e:
        raise HTTPException(400, "the uploaded file is not an image PIL can read (JPEG, PNG, WebP ...)") from e
    except ImageTooLargeError as e:
        raise HTTPException(413, f"image has too many pixels ({e.reason}); the limit is {max_pixels:,}") from e
    except BadImageError as e:
        raise HTTPException(400, f"the image is truncated or corrupt: {e.reason}") from e


def create_app(model: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    predictor = Predictor.load(model, settings.device, settings.threads, spinning=False)
    if predictor.info["engine"] == "onnxruntime":
        # torch only preprocesses here, one request per thread: its own thread pool would fight ONNX Runtime's
        torch.set_num_threads(1)
    source = Path(predictor.info["path"])
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
        "max_batch": settings.max_batch,
        "max_wait_ms": settings.max_wait_ms,
    }
    batcher = MicroBatcher(predictor.logits, settings.max_batch, settings.max_wait_ms)
    # Decoding and preprocessing run first-come first-served on a few threads rather than on as many threads
    # as there are requests: on a small CPU that keeps the latency tail short.
    workers = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="finegrain-preprocess")

    async def cpu(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    max_body = int(settings.max_body_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        workers.shutdown(wait=False)

    app = FastAPI(
        title="finegrain",
        version=__version__,
        summary="Fine-grained image classification: predictions and heat-maps of where the model looked.",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "send a Content-Length header (no chunked uploads)"}, 411)
            if not length.isdigit() or int(length) > max_body:
                return JSONResponse(
                    {"detail": f"request body of {length} bytes is above the limit of {max_body:,} bytes"}, 413
                )
        return await call_next(request)

    async def read_image(request: Request, file: UploadFile | None) -> Image.Image:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(
                415, f"content type '{content_type or 'none'}' is not multipart/form-data: upload the image as "
                "the form field 'file' (curl -F file=@bird.jpg ...)"
            )  # fmt: skip
        if file is None:
            raise HTTPException(400, "no file: upload the image as the multipart form field 'file'")
        return await cpu(decode_upload, await file.read(), settings.max_pixels)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return resources.files("finegrain.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok", "model": info["id"], "batches": batcher.batches, "images": batcher.images}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return info

    @app.post("/v1/predict")
    async def predict(request: Request, file: Upload = None, k: TopK = 5) -> dict:
        """Top-k classes of the uploaded image (multipart field ``file``)."""
        img = await read_image(request, file)
        start = time.perf_counter()
        x = await cpu(predictor.transform, img)
        logits, batch = await batcher.submit(x)
        top = predictor.topk(logits.softmax(-1)[None], k)[0]
        ms = (time.perf_counter() - start) * 1000
        return {"model": info["id"], "top": top, "inference_ms": round(ms, 2), "batch_size": batch}

    @app.post("/v1/explain", responses={200: {"content": {"image/png": {}}}})
    async def explain_image(
        request: Request,
        file: Upload = None,
        format: Annotated[str, Query(pattern="^(png|json)$")] = "png",
        k: TopK = 5,
    ):
        """Heat-map overlay of where the model looked: a PNG, or JSON with the PNG in base64 and the top-k."""
        img = await read_image(request, file)
        start = time.perf_counter()
        explanation = (await batcher.run(explain, predictor, [img], k))[0]
        png = await cpu(lambda: png_bytes(explanation.overlay(img, predictor)))
        if format == "png":
            return Response(png, media_type="image/png")
        return {
            "model": info["id"],
            "top": explanation.top,
            "method": explanation.method,
            "overlay_png": base64.b64encode(png).decode(),
            "inference_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    return app
