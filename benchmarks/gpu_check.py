"""The GPU path, run: a few epochs of fine-tuning under torchrun with nccl DDP, ``--amp auto`` (bf16 on a GPU
that has it), channels-last and torch.compile; then evaluation, ONNX export, and images/s. Writes
benchmarks/results/gpu_check.json with the GPU's name and the machine record, for docs/distributed.md.

    torchrun --standalone --nproc_per_node=gpu benchmarks/gpu_check.py --data ../shared/data/cub100
    # the same without torch.compile, to see what compiling buys:
    torchrun --standalone --nproc_per_node=gpu benchmarks/gpu_check.py --no-compile --out gpu_check_eager.json
    # the same path on CPU (gloo, fp32, no compile), to check the script itself:
    torchrun --standalone --nproc_per_node=2 benchmarks/gpu_check.py --device cpu --no-compile --epochs 1 \\
        --max-images 64 --input-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from finegrain.config import TrainConfig
from finegrain.engine.distributed import cleanup
from finegrain.engine.train import fit
from finegrain.env import default_workers, describe, physical_cores
from finegrain.export import export_onnx
from finegrain.report.evaluation import evaluate_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def small_copy(data: str, max_images: int, out: Path) -> str:
    """A manifest of the first ``max_images`` training and test images (a quick check of the path)."""
    from finegrain.data import load_dataset

    index = load_dataset(data, val_fraction=0.0)
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for s in index.split(split)[:max_images]:
            rows.append(f"{s.path.resolve()},{index.classes[s.label]},{split}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return str(out / "manifest.csv")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATASETS["cub100"]))
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per process (64)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--workers", type=int, help="loader workers per process (on a GPU: the cores less one, shared)")
    p.add_argument("--max-images", type=int, help="train and test on the first N images of each split only")
    p.add_argument("--run-dir", default=os.path.join(tempfile.gettempdir(), "fg-gpu-check"))
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here. On a CPU, check the script with --device cpu --no-compile.")
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = args.workers or (
        max(1, min(16, physical_cores() // local_world - 1)) if args.device == "cuda" else default_workers()
    )  # a GPU leaves the cores to decoding; finegrain's default (at most 4) is sized for CPU training
    data = small_copy(args.data, args.max_images, Path(args.run_dir) / "data") if args.max_images else args.data
    cfg = TrainConfig().replace(
        data=data, run_dir=str(Path(args.run_dir) / "run"), device=args.device, amp="auto", channels_last=True,
        compile=args.compile, freeze_backbone=False, epochs=args.epochs, batch_size=args.batch_size,
        input_size=args.input_size, lr=2e-4, workers=workers,
    )  # fmt: skip
    start = time.perf_counter()
    result = fit(cfg)
    train_s = time.perf_counter() - start
    cleanup()
    if rank != 0:
        return
    best = Path(cfg.run.run_dir) / "best.pt"
    start = time.perf_counter()
    metrics = evaluate_checkpoint(best, device=args.device, workers=workers)
    eval_s = time.perf_counter() - start
    onnx = export_onnx(best)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = json.loads((Path(cfg.run.run_dir) / "environment.json").read_text())
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "world_size": world,
        "compile": args.compile, "amp": cfg.speed.amp, "amp_used": env.get("amp_used"), "workers": workers,
        "batch_size_per_process": args.batch_size, "input_size": args.input_size, "epochs": [
            {k: row[k] for k in ("epoch", "samples_per_s", "epoch_seconds", "train_loss") if k in row}
            for row in result.history
        ], "train_s": train_s, "test_top1": metrics["top1"], "test_n": metrics["n"],
        "eval_s": eval_s, "eval_images_per_s": metrics["n"] / eval_s, "eval_amp_used": metrics.get("amp_used"),
        "onnx": {k: onnx[k] for k in onnx if isinstance(onnx[k], (int, float, str))}, "command": " ".join(sys.argv),
        "machine": describe(torch.device(args.device)),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
