"""Top-1 predictions of ONNX files on preprocessed images, with nothing imported but NumPy and ONNX Runtime.

Why a file of its own: it is run as a script under a command prefix, e.g. ``../shared/tools/as-avx2`` (QEMU
presenting an AVX2-only AMD Zen 3), where ONNX Runtime picks the int8 kernels such a CPU runs. Importing PyTorch
there would cost minutes; this file starts in ~5 s. So the int8 accuracy of an AVX2-only CPU is checked on any
x86 machine (tests/test_quantize.py, benchmarks/int8.py).

    python ort_top1.py [--logits] IMAGES.npy OUT.json MODEL.onnx [MODEL.onnx ...]

``--logits`` writes every image's logits instead of its top-1: a comparison of two CPUs' kernels then sees a
difference on every image, not only on the few whose top-1 it flips.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def predictions(model: str | Path, images: np.ndarray, batch_size: int = 32, logits: bool = False) -> list:
    """Each image's top-1 class index (``logits``: its logits) under ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out: list = []
    for start in range(0, len(images), batch_size):
        batch = session.run(None, {name: np.ascontiguousarray(images[start : start + batch_size])})[0]
        out += batch.tolist() if logits else [int(i) for i in batch.argmax(1)]
    return out


def predictions_under(
    prefix: Sequence[str], models: Sequence[str | Path], images: np.ndarray, logits: bool = False
) -> dict[str, list]:
    """:func:`predictions` of every model, computed in a child Python run under ``prefix`` (``[]``: natively).

    Raises ``RuntimeError`` with the child's error output when it fails."""
    with tempfile.TemporaryDirectory(prefix="fg-ort-") as tmp:
        np.save(Path(tmp) / "images.npy", np.asarray(images, dtype=np.float32))
        out = Path(tmp) / "out.json"
        flag = ["--logits"] if logits else []
        cmd = [*prefix, sys.executable, __file__, *flag, str(Path(tmp) / "images.npy"), str(out), *map(str, models)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {done.returncode}: {done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main(argv: Sequence[str]) -> None:
    logits = argv[:1] == ["--logits"]
    argv = argv[1:] if logits else argv
    images = np.load(argv[0], mmap_mode="r")
    Path(argv[1]).write_text(json.dumps({str(m): predictions(m, images, logits=logits) for m in argv[2:]}))


if __name__ == "__main__":
    main(sys.argv[1:])
