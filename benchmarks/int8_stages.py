"""Which stages of a model to leave float in its int8 file: validation KL from fp32 (what export's search ranks by)
beside test top-1, test agreement with fp32 and speed, for hand-picked float sets. Prints one line per set, writes
JSON. The evidence behind ``finegrain.export.quantize.MAX_FLOAT_STAGES`` and the search's use of validation images.

    python benchmarks/int8_stages.py --checkpoint runs/default/best.pt --fp32 runs/default/best.onnx \
        --out benchmarks/results/int8_float_stages_<cpu>.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _results import write_json
from int8 import images_of, throughput
from scipy.special import log_softmax

from finegrain.checkpoint import Checkpoint
from finegrain.data.calibration import evenly_spaced
from finegrain.env import cpu_model
from finegrain.export import OnnxRunner, export_onnx
from finegrain.export.quantize import quantize_onnx

#: lite0's stages and parts of them (node-name substrings, as ``quantize_onnx(keep_float=...)`` takes them)
SETS = {"none": [], "blocks.0": ["blocks.0/"], "blocks.1": ["blocks.1/"], "b1.0": ["blocks.1.0/"],
        "b1.1": ["blocks.1.1/"], "b1_pw": ["blocks.1/blocks.1.0/conv_pw", "blocks.1/blocks.1.1/conv_pw"],
        "b1_dw": ["blocks.1/blocks.1.0/conv_dw", "blocks.1/blocks.1.1/conv_dw"],
        "b1_pwl": ["blocks.1/blocks.1.0/conv_pwl", "blocks.1/blocks.1.1/conv_pwl"],
        "b0_b1.0": ["blocks.0/", "blocks.1.0/"]}  # fmt: skip


def logits(path: str, x: np.ndarray) -> np.ndarray:
    run = OnnxRunner(path)
    return np.concatenate([np.asarray(run(torch.from_numpy(x[i : i + 64]))) for i in range(0, len(x), 64)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt")
    p.add_argument("--fp32", help="its fp32 ONNX file (default: exported to a temporary folder)")
    p.add_argument("--out", default="benchmarks/results/int8_float_stages.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fg-int8-stages-"))
    ckpt = Checkpoint.load(args.checkpoint)
    fp32 = args.fp32 or export_onnx(ckpt.path, work / "fp32.onnx")["path"]
    index, train = ckpt.dataset(), ckpt.training_samples()
    val_x, val_y = images_of(index.split("val"), ckpt.preprocess)
    test_x, test_y = images_of(index.split("test"), ckpt.preprocess)
    lv32, lt32 = logits(fp32, val_x), logits(fp32, test_x)
    log_p = log_softmax(lv32.astype(np.float64), axis=1)
    rows = {"fp32": {"val_top1": float((lv32.argmax(1) == val_y).mean()),
                     "test_top1": float((lt32.argmax(1) == test_y).mean()),
                     "img_s": throughput(fp32, test_x)}}  # fmt: skip
    for name, keep in SETS.items():
        path = str(work / f"{name}.onnx")
        quantize_onnx(fp32, evenly_spaced(train, 256), path, target="portable", keep_float=keep)
        lv, lt = logits(path, val_x), logits(path, test_x)
        log_q = log_softmax(lv.astype(np.float64), axis=1)
        rows[name] = {"val_kl": float((np.exp(log_p) * (log_p - log_q)).sum(1).mean()),
                      "val_agree": float((lv.argmax(1) == lv32.argmax(1)).mean()),
                      "val_top1": float((lv.argmax(1) == val_y).mean()),
                      "test_top1": float((lt.argmax(1) == test_y).mean()),
                      "test_agree": float((lt.argmax(1) == lt32.argmax(1)).mean()),
                      "img_s": throughput(path, test_x)}  # fmt: skip
        print(name, {k: round(v, 5) for k, v in rows[name].items()}, flush=True)
    write_json(args.out, {"meta": {"checkpoint": args.checkpoint, "cpu": cpu_model(), "val_images": len(val_y),
                                   "test_images": len(test_y)}, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
