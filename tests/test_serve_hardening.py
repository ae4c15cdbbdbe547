"""The service under careless and hostile clients: documented statuses, overload, slow clients, offline docs,
readiness and metrics, and a schemathesis run against the app's own OpenAPI schema."""

import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from finegrain.serve.app import ServeSettings, create_app

from .conftest import make_checkpoint, running_server
from .test_serve import jpeg, upload


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("harden") / "m.pt")


@pytest.fixture(scope="module")
def app(checkpoint):
    return create_app(checkpoint, ServeSettings(max_body_mb=1, max_pixels=1_000_000, device="cpu"))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def test_openapi_documents_every_status_and_requires_the_file(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/explain"):
        op = schema["paths"][path]["post"]
        assert {"200", "400", "408", "411", "413", "415", "503"} <= set(op["responses"])
        ref = op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
        assert schema["components"]["schemas"][ref]["required"] == ["file"]
        assert op["requestBody"]["required"] is True


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"files": {"file": (None, "null")}}, ("no file", "form field 'file'")),
        ({**upload(jpeg()), "params": {"k": "many"}}, ("k: ", "integer")),  # the field, then what it must be
    ],
)
def test_wrong_fields_get_400_in_plain_words_not_422(client, kwargs, words):
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == 400 and all(w in r.json()["detail"] for w in words), r.text


def test_docs_are_served_offline(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn" not in html.lower() and "https://" not in html
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_ready_and_metrics(client):
    assert client.get("/v1/ready").json()["status"] == "ready"
    assert client.post("/v1/predict", **upload(jpeg())).status_code == 200
    text = client.get("/metrics").text
    assert 'finegrain_requests_total{path="/v1/predict",status="200"}' in text
    assert "finegrain_request_seconds_bucket" in text and "finegrain_batch_size_count" in text


def test_thin_images_get_413_naming_the_limit_and_its_flag(client):
    from .test_bad_input import thin_png

    for size in ((400_000, 100), (40_000_000, 1)):  # before: 9 s and 1.3 GB; a 500 (OverflowError)
        r = client.post("/v1/predict", files={"file": ("thin.png", thin_png(*size), "image/png")})
        assert r.status_code == 413 and "--max-aspect" in r.json()["detail"], r.text
    r = client.post("/v1/explain", files={"file": ("thin.png", thin_png(400_000, 100), "image/png")})
    assert r.status_code == 413


def test_a_request_that_fails_is_counted_as_500_in_metrics(checkpoint, monkeypatch):
    import finegrain.serve.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "decode_upload", broken)
    with TestClient(create_app(checkpoint, ServeSettings(device="cpu")), raise_server_exceptions=False) as c:
        assert c.post("/v1/predict", **upload(jpeg())).status_code == 500
        assert 'finegrain_requests_total{path="/v1/predict",status="500"} 1.0' in c.get("/metrics").text


def test_overload_answers_503_with_retry_after_at_once(checkpoint):
    with TestClient(create_app(checkpoint, ServeSettings(device="cpu", max_inflight=0))) as c:
        r = c.post("/v1/predict", **upload(jpeg()))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        assert c.get("/v1/ready").status_code == 503
        assert c.get("/v1/health").status_code == 200  # alive, just full


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_normal_ones_served(checkpoint, tmp_path):
    """A real `finegrain serve`: connections that never finish their headers or stop sending their body are
    closed after the timeouts (a body that stops gets a 408 first), and meanwhile a normal client is answered."""
    options = ["--header-timeout", "1", "--body-timeout", "1"]
    with running_server([sys.executable, "-m", "finegrain", "serve", checkpoint, *options]) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = []
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(5)
            if i % 2:
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            else:
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 5000\r\n\r\n--b\r\n")  # fmt: skip  # body stops
            slow.append(s)
        assert httpx.post(f"{base}/v1/predict", files={"file": ("b.jpg", jpeg(), "image/jpeg")}).status_code == 200
        time.sleep(2.5)
        answers = [read_until_closed(s) for s in slow]
        heads = answers[1::2]
        assert all(a == b"" for a in heads), f"connections with unfinished headers must be closed: {heads[:2]}"
        bodies = answers[0::2]
        assert all(isinstance(a, bytes) and (a == b"" or a.startswith(b"HTTP/1.1 408")) for a in bodies), bodies[:2]
        assert httpx.get(f"{base}/v1/ready").status_code == 200


@pytest.mark.slow
def test_slow_clients_reopened_at_once_cannot_crowd_out_ordinary_requests(checkpoint):
    """More slow connections than --max-connections, each reopened the moment it is cut: before, every ordinary
    request got 503 (221 of 222 in the issue's run, 40 of 40 here); now the oldest waiting connection makes room.
    Every ordinary request is answered: when the caps also closed connections whose bytes were not yet read, an
    ordinary one accepted in a burst of slow ones was cut now and then (2 of 20 in CI; 5 of 8 runs on a busy
    machine)."""
    options = ["--max-connections", "48", "--max-waiting", "16", "--max-waiting-per-client", "8"]
    with running_server([sys.executable, "-m", "finegrain", "serve", checkpoint, *options]) as base:
        port, stop, cut = int(base.rsplit(":", 1)[1]), threading.Event(), [0]

        def attack() -> None:  # 64 connections that never finish their request line, kept at 64
            open_ = []
            while not stop.is_set():
                while len(open_) < 64:
                    s = socket.create_connection(("127.0.0.1", port))
                    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
                    s.setblocking(False)
                    open_.append(s)
                for s in list(open_):
                    try:
                        closed = s.recv(1) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed:
                        cut[0] += 1
                        open_.remove(s)
                        s.close()
                time.sleep(0.02)
            for s in open_:
                s.close()

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        time.sleep(1.0)
        codes = []
        for _ in range(20):
            try:
                codes.append(httpx.post(f"{base}/v1/predict", files={"file": ("b.jpg", jpeg(), "image/jpeg")},
                                        timeout=10).status_code)  # fmt: skip
            except httpx.HTTPError as e:
                codes.append(type(e).__name__)
        stop.set()
        attacker.join(5)
    assert codes == [200] * 20, codes
    assert cut[0] > 0  # the slow ones were the ones closed


def read_until_closed(s: socket.socket, wait: float = 3.0) -> bytes | str:
    """What the server sent before closing the connection; "still open" if it has not closed within ``wait`` s
    (a read that times out is not a closed connection)."""
    s.settimeout(wait)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        return "still open"
    except ConnectionError:  # reset by the server: closed
        pass
    finally:
        s.close()
    return got


with tempfile.TemporaryDirectory() as _tmp:  # the app loads its model when created: no file is left behind
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(make_checkpoint(Path(_tmp) / "m.pt"), ServeSettings(device="cpu"))
    )


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_own_schema(case):
    """Generated requests (bounded): no 5xx, every status and body as documented. (Schema-valid bytes need not be an
    image, so a documented 400 for them is right: that one check does not apply.)"""
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
