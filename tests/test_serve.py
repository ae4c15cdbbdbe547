import asyncio
import base64
import io
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from finegrain.export import export_onnx
from finegrain.serve.app import ServeSettings, create_app
from finegrain.serve.batcher import MicroBatcher

from .conftest import make_checkpoint, running_server, synthetic_image

CLASSES = ["a", "b", "c"]


def jpeg(size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    img = synthetic_image(0, np.random.default_rng(0))
    img.resize(size).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "m.pt", classes=CLASSES)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def client(request, checkpoint):
    model = checkpoint if request.param == "torch" else export_onnx(checkpoint)["path"]
    settings = ServeSettings(max_body_mb=1, max_pixels=1_000_000, device="cpu")
    with TestClient(create_app(model, settings)) as c:
        c.engine = request.param
        yield c


def upload(data: bytes, name="bird.jpg", ctype="image/jpeg"):
    return {"files": {"file": (name, data, ctype)}}


def test_predict_returns_topk_with_probabilities(client):
    r = client.post("/v1/predict?k=2", **upload(jpeg()))
    assert r.status_code == 200
    body = r.json()
    assert [t["class"] for t in body["top"]] and {t["class"] for t in body["top"]} <= set(CLASSES)
    assert len(body["top"]) == 2 and body["top"][0]["prob"] >= body["top"][1]["prob"]
    assert body["model"].startswith("m-") and body["inference_ms"] > 0 and body["batch_size"] >= 1


def by_hand(img: Image.Image, pre) -> torch.Tensor:
    """The preprocessing a checkpoint records, written out with PIL and numpy (not finegrain's transforms): the
    shorter side resized to input_size / crop_pct, the centre cropped, scaled to [0, 1] and normalised."""
    img, side = img.convert("RGB"), int(round(pre.input_size / pre.crop_pct))
    w, h = img.size
    img = img.resize((side, int(side * h / w)) if w <= h else (int(side * w / h), side), Image.BICUBIC)
    left, top = int(round((img.width - pre.input_size) / 2)), int(round((img.height - pre.input_size) / 2))
    img = img.crop((left, top, left + pre.input_size, top + pre.input_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]


def test_predict_matches_the_saved_model_by_hand(client, checkpoint):
    from finegrain.checkpoint import Checkpoint

    saved = Checkpoint.load(checkpoint)
    with torch.inference_mode():
        expected = saved.build_model()(by_hand(Image.open(io.BytesIO(jpeg())), saved.preprocess)[None]).softmax(1)[0]
    got = {t["class"]: t["prob"] for t in client.post("/v1/predict?k=3", **upload(jpeg())).json()["top"]}
    assert [got[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=2e-3)


def test_explain_png_and_json(client):
    r = client.post("/v1/explain", **upload(jpeg((120, 90))))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (120, 90)
    body = client.post("/v1/explain?format=json", **upload(jpeg())).json()
    assert body["method"] == ("grad-cam" if client.engine == "torch" else "occlusion")
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).format == "PNG"
    assert len(body["top"]) == 3


def test_health_model_docs_and_page(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["classes"] == CLASSES and info["method"] == "baseline" and info["input_size"] == 64
    assert info["backbone"] == "tf_efficientnet_lite0" and info["engine"] in ("torch", "onnxruntime")
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/").text
    assert '<input id="file"' in page and "http://" not in page and "https://" not in page  # no CDN


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"files": {"note": (None, "hello")}}, 400, "no file"),
        ({"content": jpeg(), "headers": {"content-type": "image/jpeg"}}, 415, "multipart/form-data"),
        ({"json": {"image": "x"}}, 415, "multipart/form-data"),
        (upload(b"this is not an image", "notes.txt", "text/plain"), 400, "not an image"),
        (upload(jpeg()[:300]), 400, "truncated"),
        (upload(b""), 400, "empty"),
        (upload(jpeg((1200, 1000))), 413, "pixels"),  # above the 1M-pixel limit of the fixture
        (upload(b"\xff" * (2 * 2**20)), 413, "above the limit"),  # above the 1 MB body limit
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
def test_bad_requests_get_4xx_with_a_message(client, endpoint, kwargs, status, words):
    r = client.post(endpoint, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/v1/health").status_code == 200  # and the server lives on


def test_decompression_bomb_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, format="PNG")  # 144M pixels in a few hundred KB
    r = client.post("/v1/predict", **upload(buf.getvalue(), "bomb.png", "image/png"))
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_micro_batcher_shares_forward_passes():
    calls = []

    def fn(x):
        calls.append(len(x))
        time.sleep(0.02)
        return x.sum((1, 2, 3))

    async def run():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=20)
        await batcher.start()
        xs = [torch.full((1, 2, 2), float(i)) for i in range(16)]
        results = await asyncio.gather(*(batcher.submit(x) for x in xs))
        await batcher.stop()
        return results

    results = asyncio.run(run())
    assert [float(out) for out, _ in results] == [4.0 * i for i in range(16)]  # each gets its own row
    assert sum(calls) == 16 and max(calls) == 8 and len(calls) <= 4


def test_micro_batcher_reports_model_errors_to_every_waiting_request():
    async def run():
        batcher = MicroBatcher(lambda x: 1 / 0, max_batch=4, max_wait_ms=10)
        await batcher.start()
        out = await asyncio.gather(*(batcher.submit(torch.zeros(1)) for _ in range(3)), return_exceptions=True)
        await batcher.stop()
        return out

    assert all(isinstance(e, ZeroDivisionError) for e in asyncio.run(run()))


@pytest.mark.slow
def test_real_server_under_concurrent_load_has_no_errors(checkpoint, tmp_path):
    """A real `finegrain serve` process on 127.0.0.1: 400 requests from 8 concurrent clients, zero errors,
    and the micro-batcher really batched (mean batch > 1)."""
    onnx = export_onnx(checkpoint, tmp_path / "m.onnx")["path"]
    with running_server([sys.executable, "-m", "finegrain", "serve", onnx]) as base:
        data = jpeg()

        async def load():
            statuses, batches = [], []
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:

                async def worker(n):
                    for _ in range(n):
                        r = await http.post("/v1/predict", files={"file": ("b.jpg", data, "image/jpeg")})
                        statuses.append(r.status_code)
                        batches.append(r.json().get("batch_size", 0))

                await asyncio.gather(*(worker(50) for _ in range(8)))
            return statuses, batches

        statuses, batches = asyncio.run(load())
        assert len(statuses) == 400 and set(statuses) == {200}
        assert sum(batches) / len(batches) > 1.0
