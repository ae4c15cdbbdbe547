from pathlib import Path

import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data import load_dataset
from finegrain.data.calibration import calibration_loader
from finegrain.export import export_onnx
from finegrain.export.ort_top1 import predictions_under
from finegrain.export.quantize import quantize_onnx

from .conftest import require_data

#: QEMU presenting an AVX2-only AMD Zen 3 (installs Debian's qemu-user on first use; see its header)
AS_AVX2 = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "as-avx2"


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["native", pytest.param("as-avx2", marks=pytest.mark.emulated)])
def test_int8_agrees_with_fp32_on_real_cub_images(tmp_path, cub10_checkpoint, cpu):
    """A head trained on 10 cub100 species; the default int8 file's top-1 against fp32's on their real test photos,
    the int8 file run on this CPU or under QEMU as an AVX2-only Zen 3, whose int8 kernels add pairs of products in
    saturating 16-bit sums (a full-range file lost 4 pt of top-1 there). Under QEMU this test took 111 s on a busy
    2-core AMD EPYC Zen 3 (2026-12-02)."""
    ckpt = cub10_checkpoint
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    calib = Checkpoint.load(ckpt).calibration_samples(64)
    assert len(calib) == 64 and all(s.split == "train" for s in calib)
    int8 = quantize_onnx(fp32, calib)
    test = load_dataset(ckpt.parent.parent / "cub10.csv", val_fraction=0.0).split("test")[:128]
    images = torch.cat([x for x, _ in calibration_loader(test, Checkpoint.load(ckpt).preprocess)]).numpy()
    if cpu == "as-avx2":
        require_data(AS_AVX2)
    p32 = predictions_under([], [fp32], images)[fp32]
    p8 = predictions_under([] if cpu == "native" else [str(AS_AVX2)], [int8["path"]], images)[int8["path"]]
    agreement = sum(a == b for a, b in zip(p32, p8, strict=True)) / len(test)
    assert len(test) == 128 and agreement >= 0.98, f"int8 top-1 agrees with fp32 on only {agreement:.1%} ({cpu})"
    assert int8["megabytes"] < 0.5 * (tmp_path / "m.onnx").stat().st_size / 2**20
