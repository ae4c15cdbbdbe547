import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data import load_dataset
from finegrain.export import export_onnx
from finegrain.export.quantize import quantize_onnx
from finegrain.predict import Predictor


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_real_cub_images(tmp_path, cub10_checkpoint):
    """A head trained on 10 cub100 species; int8 vs fp32 top-1 on their real test photos."""
    ckpt = cub10_checkpoint
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    calib = Checkpoint.load(ckpt).calibration_samples(64)
    assert len(calib) == 64 and all(s.split == "train" for s in calib)
    int8 = quantize_onnx(fp32, calib)
    test = [s.path for s in load_dataset(ckpt.parent.parent / "cub10.csv", val_fraction=0.0).split("test")][:128]
    p32 = torch.cat([Predictor.load(fp32).probabilities_for(test[i : i + 32]) for i in range(0, len(test), 32)])
    p8 = torch.cat([Predictor.load(int8["path"]).probabilities_for(test[i : i + 32]) for i in range(0, len(test), 32)])
    agreement = (p32.argmax(1) == p8.argmax(1)).float().mean().item()
    assert agreement >= 0.98, f"int8 top-1 agrees with fp32 on only {agreement:.1%}"
    assert int8["megabytes"] < 0.5 * (tmp_path / "m.onnx").stat().st_size / 2**20
