"""What this machine's precisions and runtimes are worth, and whether finegrain's `auto` choices picked the fastest.

In ONE run, on lite0 at 224 px with a 100-class head (ImageNet weights, shipped offline):
- frozen-feature extraction (eager, channels-last, batch 32) in fp32 and in bf16 autocast,
- fine-tuning steps (batch 16, AdamW) in fp32 and in bf16 autocast,
- inference of the whole model (batch 32) in PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8 (the int8 file
  made for this CPU by `--int8-target auto`, calibrated on 32 cub100 training photos).
Each speed is also a ratio to the fp32 eager number of the same kind, measured in the same run. Then it resolves
`--amp auto` and `--engine auto` as finegrain does and checks that each picked the fastest option or one within
10% of it (int8 is outside `auto`: it changes the numbers, so it is asked for by name).

    python benchmarks/hardware.py --out benchmarks/results/hardware_<cpu>.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from finegrain.checkpoint import Checkpoint
from finegrain.data import load_dataset
from finegrain.data.calibration import evenly_spaced
from finegrain.env import configure_threads, machine_info, precision_name
from finegrain.export import OnnxRunner, export_onnx
from finegrain.export.quantize import quantize_onnx
from finegrain.models import create_model
from finegrain.predict import choose_engine, images_per_second

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402

CUB100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timing per measurement (after a warm-up)")
    parser.add_argument("--out", default="benchmarks/results/hardware.json")
    args = parser.parse_args()
    threads = configure_threads()
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model("baseline", num_classes=100).eval().to(memory_format=torch.channels_last)
    x32 = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    x16, y16 = x32[:16], torch.randint(0, 100, (16,))

    def features(dtype):
        @torch.inference_mode()
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                model.backbone_features(x)

        return run

    def finetune(dtype):
        net = create_model("baseline", num_classes=100, freeze_backbone=False).train()
        net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = torch.nn.functional.cross_entropy(net(x).float(), y16)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    rows = []

    def timed(fn, x: torch.Tensor) -> float:
        return images_per_second(fn, x, repeats=2, seconds=args.seconds)

    def add(task: str, variant: str, speed: float) -> None:
        rows.append({"task": task, "variant": variant, "img_s": round(speed, 2)})
        print(f"{task:20s} {variant:22s} {speed:8.1f} img/s", flush=True)

    for dtype in ("fp32", "bf16"):
        add("feature extraction", f"eager {dtype}", timed(features(dtype), x32))
    for dtype in ("fp32", "bf16"):
        add("fine-tuning", f"eager {dtype}", timed(finetune(dtype), x16))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "lite0.pt"
        Checkpoint.from_model(model, [f"c{i}" for i in range(100)]).save(ckpt)
        fp32 = export_onnx(ckpt, Path(tmp) / "lite0.onnx")["path"]
        calib = evenly_spaced(load_dataset(CUB100, val_fraction=0.0).split("train"), 32)
        int8 = quantize_onnx(fp32, calib, Path(tmp) / "lite0.int8.onnx", target="auto")
        x = x32.contiguous()
        for variant, runner in (("onnxruntime fp32", OnnxRunner(fp32)), (f"onnxruntime int8 ({int8['int8_target']})",
                                                                          OnnxRunner(int8["path"]))):  # fmt: skip
            add("inference", variant, timed(runner, x))

        def eager_inference(dtype):
            @torch.inference_mode()
            def run(x):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    model(x)

            return run

        for dtype in ("fp32", "bf16"):
            add("inference", f"eager {dtype}", timed(eager_inference(dtype), x32))
        engine = choose_engine(ckpt, amp="auto")

    speed = {(r["task"], r["variant"]): r["img_s"] for r in rows}
    for r in rows:
        r["x_eager_fp32"] = round(r["img_s"] / speed[(r["task"], "eager fp32")], 2)
    amp = precision_name("auto", cpu)
    eager_auto = f"eager {amp}"
    inference_auto = "onnxruntime fp32" if engine["engine"] == "onnx" else eager_auto
    checks = []
    for task, chosen, options in (
        ("feature extraction", eager_auto, ["eager fp32", "eager bf16"]),
        ("fine-tuning", eager_auto, ["eager fp32", "eager bf16"]),
        ("inference", inference_auto, ["eager fp32", "eager bf16", "onnxruntime fp32"]),
    ):
        best = max(options, key=lambda v, t=task: speed[(t, v)])
        ratio = speed[(task, chosen)] / speed[(task, best)]
        checks.append({"task": task, "auto": chosen, "fastest": best, "auto_vs_fastest": round(ratio, 3),
                       "ok": ratio >= 0.9})  # fmt: skip

    console = Console()
    table = Table("task", "variant", "img/s", "x eager fp32", title=f"lite0 224 px on {machine_info()['cpu_model']}")
    for r in rows:
        table.add_row(r["task"], r["variant"], f"{r['img_s']:.1f}", f"{r['x_eager_fp32']:.2f}")
    console.print(table)
    for c in checks:
        verdict = "OK" if c["ok"] else "NOT the fastest"
        console.print(f"{c['task']}: auto chose {c['auto']}, fastest {c['fastest']} ({c['auto_vs_fastest']:.0%}): "
                      f"{verdict}")  # fmt: skip
    write_json(args.out, {
        "machine": machine_info(), "threads": threads, "date": time.strftime("%Y-%m-%d"), "rows": rows,
        "auto_checks": checks, "engine_choice": {k: v for k, v in engine.items() if k != "onnx_path"},
        "int8_target": int8["int8_target"], "seconds_per_measurement": args.seconds,
    })  # fmt: skip


if __name__ == "__main__":
    main()
