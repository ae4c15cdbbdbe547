"""Load test of a real ``finegrain serve`` on 127.0.0.1: requests/s and p50/p99 latency, with and without
micro-batching, in ONE run on the same machine. Any error (socket, timeout, non-2xx) makes it exit 1.

The load comes from wrk (Debian package ``wrk``: C, one thread, so the client takes little of the 2 cores)
posting real test photos as multipart uploads to POST /v1/predict from ``--concurrency`` connections for
``--seconds`` (20 s at ~120 req/s is ~2,400 requests). Each configuration starts its own server process.

    python benchmarks/serve_load.py --models runs/default/best.int8.onnx runs/default/best.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["runs/default/best.int8.onnx"])
    p.add_argument("--images", default="../shared/data/cub100/images", help="folder of photos")
    p.add_argument("--num-images", type=int, default=64, help="distinct photos cycled through")
    p.add_argument("--seconds", type=int, default=20, help="load duration per configuration")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 8], help="configurations (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
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
                row = {"model": Path(model).name, "max_batch": max_batch}
                row |= wrk(url, file_list, args.seconds, args.concurrency)
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
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "concurrency": args.concurrency,
            "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(), "images": len(files), "client": "wrk"}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
