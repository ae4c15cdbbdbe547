"""int8 recipes side by side, natively and on an emulated AVX2-only CPU: which file `finegrain export --int8` makes.

Each variant is one int8 file of the same fp32 ONNX export (target, calibration method, calibration images, layers
kept float). For each: top-1 agreement with fp32 on the choice set (the validation split plus training images
no variant calibrated on), test top-1 natively, test top-1 of the same file under ``--emulator`` (QEMU presenting
an AVX2-only Zen 3, whose int8 kernels saturate 16-bit sums), and batch-32 throughput natively as a ratio to ONNX
fp32 measured in the same run. Images are preprocessed once (the shared eval transform). Prints a table, writes
JSON.

    python benchmarks/int8.py --checkpoint runs/default/best.pt --emulated-images 600 \
        --out benchmarks/results/int8_<cpu>.json

Variants are ``default`` (what ``finegrain export --int8`` writes) or ``target:calibration:images[:float parts]``,
e.g. ``portable:percentile:256:stem+head``; target
``u8u8`` is full-range uint8 weights (ONNX Runtime's other saturation-free format), QAT checkpoints come in as
``--qat NAME=PATH``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json

from finegrain.checkpoint import Checkpoint
from finegrain.data.calibration import calibration_loader, evenly_spaced, held_out
from finegrain.export import OnnxRunner, export_onnx
from finegrain.export.ort_top1 import predictions_under
from finegrain.export.quantize import int8_copy, quantize_onnx

#: ``u8u8`` (full-range uint8 weights, also saturation-free) is left out of the default list: on AMD EPYC Zen 3
#: (2026-12-02) its file took ~5 min for 2,999 test photos where the others took ~15 s (a slow kernel path)
DEFAULT_VARIANTS = ["default", "vnni:minmax:256", "portable:minmax:256", "portable:minmax:1024",
                    "portable:percentile:256", "portable:entropy:256", "portable:minmax:256:stem+head"]  # fmt: skip


def images_of(samples, pre) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*calibration_loader(samples, pre, batch_size=64), strict=True)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def throughput(path: str, images: np.ndarray, repeats: int = 7) -> float:
    run = OnnxRunner(path)
    x = torch.from_numpy(images[:32])
    run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 32 / statistics.median(times)


def make_variant(spec: str, fp32: str, train, work: Path, checkpoint: str) -> dict:
    out = work / f"{spec.replace(':', '_')}.onnx"
    if out.is_file():  # --work of an earlier run: the same file again
        return {"variant": spec, "path": str(out), "megabytes": out.stat().st_size / 2**20}
    if spec == "default":  # what `finegrain export --int8` writes (its float-stage search included)
        started = time.perf_counter()
        made = int8_copy(checkpoint, fp32, out=out)
        return {"variant": spec, "path": made["path"], "megabytes": made["megabytes"],
                "quantize_s": time.perf_counter() - started, "float_stages": made["float_stages"],
                "float_search": made.get("float_search")}  # fmt: skip
    target, calibration, count, *rest = spec.split(":")
    keep = rest[0].split("+") if rest else []
    options = {}
    if target == "u8u8":
        from onnxruntime.quantization import QuantType

        target, options = "vnni", {"weight_type": QuantType.QUInt8}
    started = time.perf_counter()
    out = quantize_onnx(fp32, evenly_spaced(train, int(count)), out,
                        target=target, calibration=calibration, keep_float=keep, **options)  # fmt: skip
    return {"variant": spec, "path": out["path"], "megabytes": out["megabytes"],
            "quantize_s": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--qat", nargs="*", default=[], help="NAME=PATH of QAT checkpoints (finegrain qat) to add")
    p.add_argument("--choice-train-images", type=int, default=600, help="held-out training images in the choice set")
    p.add_argument("--test-images", type=int, default=0, help="0: the whole test split")
    p.add_argument("--emulated-images", type=int, default=500, help="test images run under --emulator (0: none)")
    p.add_argument(
        "--emulate",
        nargs="*",
        help="the variants run under --emulator (default: all int8 files); under "
        "QEMU an int8 file takes ~0.7 s per photo, fp32 ~4 s",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the throughput measurement (a busy machine)")
    p.add_argument("--work", help="folder of an earlier run's files to reuse (default: a new temporary folder)")
    p.add_argument("--emulator", default="../shared/tools/as-avx2")
    p.add_argument("--out", default="benchmarks/results/int8.json")
    args = p.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fg-int8-"))
    ckpt = Checkpoint.load(args.checkpoint)
    index = ckpt.dataset()
    train = ckpt.training_samples()
    fp32 = str(work / "fp32.onnx")
    if not Path(fp32).is_file():
        export_onnx(ckpt.path, fp32)
    rows = [{"variant": "fp32", "path": fp32, "megabytes": Path(fp32).stat().st_size / 2**20}]
    rows += [make_variant(spec, fp32, train, work, args.checkpoint) for spec in args.variants]
    for item in args.qat:
        name, path = item.split("=", 1)
        qfp32 = str(work / f"{name}.onnx")
        if not Path(qfp32).is_file():
            export_onnx(path, qfp32)
        (work / name).mkdir(exist_ok=True)
        row = make_variant("default", qfp32, train, work / name, path)
        rows.append({**row, "variant": f"{name} (QAT) default"})
    print(f"{len(rows)} files in {work}")

    choice = index.split("val") + held_out(train, evenly_spaced(train, 1024), args.choice_train_images)
    choice_x, _ = images_of(choice, ckpt.preprocess)
    test_x, test_y = images_of(index.split("test")[: args.test_images or None], ckpt.preprocess)
    paths = [r["path"] for r in rows]
    native_choice = predictions_under([], paths, choice_x)
    native_test = predictions_under([], paths, test_x)
    ref_choice = np.array(native_choice[fp32])
    n_emu = min(args.emulated_images, len(test_y))
    for r in rows:  # native numbers and speed first, while nothing else runs
        r["choice_agreement"] = float((np.array(native_choice[r["path"]]) == ref_choice).mean())
        r["test_top1"] = float((np.array(native_test[r["path"]]) == test_y).mean())
        first = np.array(native_test[r["path"]])[:n_emu]
        r["test_top1_native_first_emulated"] = float((first == test_y[:n_emu]).mean())
        r["throughput_img_s"] = float("nan") if args.no_speed else throughput(r["path"], test_x)
    if n_emu:
        started = time.perf_counter()
        chosen = [r["path"] for r in rows[1:] if args.emulate is None or r["variant"] in args.emulate]
        emulated = predictions_under([args.emulator], chosen, test_x[:n_emu])
        print(f"emulated pass: {time.perf_counter() - started:.0f} s")
        for r in rows:
            if r["path"] in emulated:
                e = np.array(emulated[r["path"]])
                r["emulated_test_top1"] = float((e == test_y[:n_emu]).mean())
                r["emulated_agreement_with_native"] = float((e == np.array(native_test[r["path"]])[:n_emu]).mean())
    base = rows[0]
    print(f"{'variant':40s} {'choice agr':>10s} {'test':>7s} {'d fp32':>7s} {'first N':>7s} {'emulated':>8s} "
          f"{'img/s':>7s} {'x fp32':>6s}")  # fmt: skip
    for r in rows:
        r["delta_pt"] = 100 * (r["test_top1"] - base["test_top1"])
        r["throughput_ratio"] = r["throughput_img_s"] / base["throughput_img_s"]
        emu = f"{100 * r['emulated_test_top1']:8.2f}" if "emulated_test_top1" in r else f"{'-':>8s}"
        print(f"{r['variant']:40s} {100 * r['choice_agreement']:10.2f} {100 * r['test_top1']:7.2f} "
              f"{r['delta_pt']:+7.2f} {100 * r['test_top1_native_first_emulated']:7.2f} {emu} "
              f"{r['throughput_img_s']:7.1f} {r['throughput_ratio']:6.2f}")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": args.checkpoint, "choice_images": len(choice),
            "test_images": len(test_y), "emulated_images": n_emu, "emulator": args.emulator,
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
