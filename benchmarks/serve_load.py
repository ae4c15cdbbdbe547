"""Load test of a real ``finegrain serve`` on 127.0.0.1: requests/s and p50/p99 latency, with and without
micro-batching, in ONE run on the same machine. Any error (socket, timeout, non-2xx) makes it exit 1.

The load comes from wrk (Debian package ``wrk``: C, one thread, so the client takes little of the 2 cores)
posting real test photos as multipart uploads to POST /v1/predict from ``--concurrency`` connections for
``--seconds`` (20 s at ~120 req/s is ~2,400 requests). Each configuration starts its own server process.

    python benchmarks/serve_load.py --models runs/default/best.int8.onnx runs/default/best.onnx

``--hostile`` adds, beside the same normal traffic and against the same server, clients that never finish their
headers (``--slow-clients`` connections, reopened as the server closes them), uploads of 36-megapixel photos
(within the default 40M-pixel limit) from 2 more clients, and thin images (400,000 x 100 and 40,000,000 x 1 PNGs of
a few KB) from one more. It reports the normal traffic's requests and p99, the
5xx answers of every client (must be 0), how many slow connections the server cut, and the server's peak and
final resident memory.

    python benchmarks/serve_load.py --models runs/default/best.int8.onnx --max-batch 4 --hostile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _results import write_json

SCRIPT = Path(__file__).with_name("wrk") / "post_images.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finegrain", "serve", model, "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not answer /v1/health within 120 s")


def wrk(url: str, file_list: Path, seconds: int, concurrency: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(SCRIPT), url]
    out = subprocess.run([*cmd, "--", str(file_list)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["errors"] = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    result["requests_per_s"] = result["requests"] / result["seconds"]
    return result


def server_statuses(port: int) -> dict[str, int]:
    """Every answer the server gave, by status, from its own /metrics (wrk only counts "not 2xx")."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("finegrain_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def memory_mb(pid: int) -> dict:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in MB (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": round(fields["VmHWM"], 1), "rss_mb": round(fields["VmRSS"], 1)}


def big_photo(side: int = 6000) -> bytes:
    """A ~36-megapixel JPEG of smooth gradients: small on the wire, 108 MB once decoded."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 128.0)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thin_png(width: int, height: int) -> bytes:
    """A few KB on the wire, a huge thin picture once decoded and resized (the hostile-files issue's class 1)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def hostile(port: int, stop: threading.Event, slow_clients: int, big: bytes) -> dict:
    """Slow clients, huge uploads and thin images until ``stop``; returns what the server answered them."""
    import httpx

    counts = {"slow_opened": 0, "slow_cut": 0, "big_sent": 0, "big_status": {}, "thin_sent": 0, "thin_status": {}}
    thin = [thin_png(400_000, 100), thin_png(40_000_000, 1)]
    lock = threading.Lock()

    def slow() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            while len(socks) < slow_clients:
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # the rest never comes
                s.setblocking(False)
                socks.append(s)
                counts["slow_opened"] += 1
            for s in list(socks):
                try:
                    if s.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    s.close()
                    socks.remove(s)
                    counts["slow_cut"] += 1
            time.sleep(0.2)
        for s in socks:
            s.close()

    def uploads() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("big.jpg", big, "image/jpeg")})
                with lock:
                    counts["big_sent"] += 1
                    counts["big_status"][r.status_code] = counts["big_status"].get(r.status_code, 0) + 1

    def thin_uploads() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                data = thin[counts["thin_sent"] % 2]
                r = http.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("thin.png", data, "image/png")})
                with lock:
                    counts["thin_sent"] += 1
                    counts["thin_status"][r.status_code] = counts["thin_status"].get(r.status_code, 0) + 1

    threads = [threading.Thread(target=slow), *(threading.Thread(target=uploads) for _ in range(2)),
               threading.Thread(target=thin_uploads)]  # fmt: skip
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(120)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["runs/default/best.int8.onnx"])
    p.add_argument("--images", default="../shared/data/cub100/images", help="folder of photos")
    p.add_argument("--num-images", type=int, default=64, help="distinct photos cycled through")
    p.add_argument("--seconds", type=int, default=20, help="load duration per configuration")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 8], help="configurations (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--hostile", action="store_true", help="add slow clients and 36-megapixel uploads (see above)")
    p.add_argument("--slow-clients", type=int, default=200, help="connections that never finish their headers")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 slow sockets need more than the usual 1,024
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")

    files = sorted(Path(args.images).rglob("*.jpg"))
    files = files[:: max(1, len(files) // args.num_images)][: args.num_images]
    file_list = Path(tempfile.mkdtemp(prefix="fg-load-")) / "files.txt"
    file_list.write_text("\n".join(str(f.resolve()) for f in files) + "\n")
    rows = []
    for model in args.models:
        for max_batch in args.max_batch:
            port = free_port()
            server = start_server(model, port, ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)])
            try:
                url = f"http://127.0.0.1:{port}/v1/predict"
                wrk(url, file_list, 3, args.concurrency)  # warm-up
                row = {"model": Path(model).name, "max_batch": max_batch, "hostile": args.hostile}
                stop, attack = threading.Event(), {}
                if args.hostile:
                    big = big_photo()
                    attacker = threading.Thread(
                        target=lambda a=attack, p=port, st=stop, b=big: a.update(hostile(p, st, args.slow_clients, b))
                    )
                    attacker.start()
                row |= wrk(url, file_list, args.seconds, args.concurrency)
                if args.hostile:
                    stop.set()
                    attacker.join()
                    time.sleep(2)  # let the last big image's memory go
                    row["server_statuses"] = server_statuses(port)
                    tried = row["requests"] + sum(row[k] for k in ("connect", "read", "write", "timeout"))
                    ok = (row["requests"] - row["status"]) / max(tried, 1)  # 2xx answers of all requests tried
                    server_5xx = sum(n for code, n in row["server_statuses"].items() if code.startswith("5"))
                    row |= {"attack": attack, "server_5xx": server_5xx, **memory_mb(server.pid),
                            "ordinary_success": round(ok, 4)}  # fmt: skip
            finally:
                server.terminate()
                server.wait(30)
            rows.append(row)
            print(f"{row['model']} max_batch {max_batch}: {row['requests']} requests, "
                  f"{row['requests_per_s']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                  f"{row['errors']} errors", flush=True)  # fmt: skip

    print(f"\n{'model':24s} {'max_batch':>9s} {'requests':>8s} {'req/s':>7s} {'x':>5s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'errors':>6s}")  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"])["requests_per_s"]
        print(f"{r['model']:24s} {r['max_batch']:9d} {r['requests']:8d} {r['requests_per_s']:7.1f} "
              f"{r['requests_per_s'] / base:5.2f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['errors']:6d}")  # fmt: skip
    for r in rows:
        if r.get("hostile"):
            a = r["attack"]
            print(f"hostile: {a['slow_opened']} slow connections opened, {a['slow_cut']} cut by the server; "
                  f"{a['big_sent']} 36-MP uploads answered {a['big_status']}; {a['thin_sent']} thin images answered "
                  f"{a['thin_status']}; server statuses {r['server_statuses']}; ordinary requests answered "
                  f"{100 * r['ordinary_success']:.1f}%, p99 "
                  f"{r['p99_ms']:.1f} ms; 5xx {r['server_5xx']}; RSS peak {r['peak_rss_mb']:.0f} MB, after "
                  f"{r['rss_mb']:.0f} MB")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "concurrency": args.concurrency,
            "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(), "images": len(files), "client": "wrk"}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})
    # under attack the bar: at least 95% of ordinary requests answered and no 5xx; otherwise no error at all
    if any(r.get("server_5xx") or (r["ordinary_success"] < 0.95 if r.get("hostile") else r["errors"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
