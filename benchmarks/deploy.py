"""Deployment benchmark, all variants in ONE run on the same machine: PyTorch eager fp32, ONNX Runtime fp32,
ONNX int8 (post-training static), a QAT checkpoint's int8 (from `finegrain qat`), and channel-pruned models
(optionally fine-tuned) with and without int8.

For each: test top-1, model size, batch-1 latency p50/p95, batch-32 throughput, and every speed as a ratio to
PyTorch eager fp32 (channels-last) measured in the same run. Test images are preprocessed once (the shared eval
transform), so the timings are inference only. Prints a table and writes JSON.

    finegrain qat runs/default --epochs 1 --run-dir runs/qat1
    python benchmarks/deploy.py --checkpoint runs/default/best.pt --qat runs/qat1/best.pt --finetune-epochs 1 \
        --out benchmarks/results/deploy_cub100.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import write_json

from finegrain.checkpoint import Checkpoint
from finegrain.compress.recipes import prune_and_finetune
from finegrain.data import ImageDataset
from finegrain.data.transforms import eval_transform
from finegrain.env import machine_info
from finegrain.export import OnnxRunner, export_onnx
from finegrain.export.quantize import quantize_onnx


def timed(fn, x: torch.Tensor, runs: int) -> list[float]:
    fn(x)  # warm-up
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - start) * 1000)
    return out


def measure(name: str, fn, images: torch.Tensor, labels: torch.Tensor, megabytes: float, runs: int) -> dict:
    correct = 0
    for i in range(0, len(images), 64):
        correct += (fn(images[i : i + 64]).argmax(1) == labels[i : i + 64]).sum().item()
    b1 = timed(fn, images[:1], runs)
    b32 = timed(fn, images[:32], max(3, runs // 10))
    return {
        "variant": name,
        "top1": correct / len(images),
        "megabytes": megabytes,
        "latency_p50_ms": statistics.median(b1),
        "latency_p95_ms": statistics.quantiles(b1, n=20)[-1],
        "throughput_img_s": 32 / (statistics.median(b32) / 1000),
    }


def torch_fn(model: torch.nn.Module, channels_last: bool = True):
    """Eager inference; channels-last memory is ~1.7x faster than PyTorch's default layout for this network on
    these CPUs, so it is the baseline the ratios use (the default layout is measured beside it)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(memory_format=fmt)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.contiguous(memory_format=fmt))

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.5])
    p.add_argument("--qat", help="a QAT checkpoint of the same model (finegrain qat) to measure beside PTQ")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model (0: prune only)")
    p.add_argument("--test-images", type=int, default=0, help="limit the test images (0: all)")
    p.add_argument("--runs", type=int, default=100, help="batch-1 timing repetitions")
    p.add_argument(
        "--int8-targets",
        nargs="+",
        default=["auto"],
        choices=["auto", "vnni", "portable"],
        help="int8 files to measure: for VNNI CPUs, portable (7-bit weights), or this CPU's (auto)",
    )
    p.add_argument("--out", default="benchmarks/results/deploy.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fg-deploy-"))
    ckpt = Checkpoint.load(args.checkpoint)
    test = ckpt.dataset().split("test")[: args.test_images or None]
    dataset = ImageDataset(test, eval_transform(ckpt.preprocess))
    images, labels = map(torch.cat, zip(*torch.utils.data.DataLoader(dataset, batch_size=64), strict=True))
    calib = ckpt.calibration_samples(256)

    def onnx_rows(label: str, source: str) -> list[dict]:
        fp32 = export_onnx(source, work / f"{label}.onnx")
        rows = [measure(f"{label} ONNX fp32", OnnxRunner(fp32["path"]), images, labels, fp32["megabytes"], args.runs)]
        for target in args.int8_targets:
            int8 = quantize_onnx(fp32["path"], calib, work / f"{label}.{target}.int8.onnx", target=target)
            name = f"{label} ONNX int8 ({int8['int8_target']})"
            rows.append(measure(name, OnnxRunner(int8["path"]), images, labels, int8["megabytes"], args.runs))
        return rows

    size_mb = sum(t.numel() * t.element_size() for t in ckpt.state_dict.values()) / 2**20
    rows = [measure("PyTorch eager fp32", torch_fn(ckpt.build_model()), images, labels, size_mb, args.runs)]
    nchw = torch_fn(ckpt.build_model(), channels_last=False)
    rows.append(measure("PyTorch eager fp32 NCHW", nchw, images, labels, size_mb, args.runs))
    rows += onnx_rows("full", ckpt.path)
    if args.qat:
        rows += onnx_rows("QAT", args.qat)
    for ratio in args.ratios:
        r = prune_and_finetune(ckpt.path, ratio, args.finetune_epochs, out=work / f"pruned{ratio}.pt",
                               run_dir=work / f"ft{ratio}")  # fmt: skip
        rows += onnx_rows(f"pruned {round(100 * ratio)}%", r.get("finetuned", r["path"]))

    base = rows[0]
    for r in rows:
        r["throughput_ratio"] = r["throughput_img_s"] / base["throughput_img_s"]
        r["latency_ratio"] = base["latency_p50_ms"] / r["latency_p50_ms"]
    heads = ["top-1", "MB", "p50 ms", "p95 ms", "img/s", "x thr", "x lat"]
    print(f"{'variant':24s} " + " ".join(f"{h:>7s}" for h in heads))
    for r in rows:
        values = [100 * r["top1"], r["megabytes"], r["latency_p50_ms"], r["latency_p95_ms"], r["throughput_img_s"]]
        values += [r["throughput_ratio"], r["latency_ratio"]]
        print(f"{r['variant']:24s} " + " ".join(f"{v:7.2f}" for v in values))
    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": str(args.checkpoint), "qat": args.qat,
            "machine": machine_info(), "int8_targets": args.int8_targets,
            "test_images": len(test),
            "finetune_epochs": args.finetune_epochs, "torch_threads": torch.get_num_threads()}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
