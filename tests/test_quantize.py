from pathlib import Path

import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data import Sample, load_dataset
from finegrain.data.calibration import calibration_loader
from finegrain.errors import ExportError
from finegrain.export import export_onnx
from finegrain.export.ort_top1 import predictions_under
from finegrain.export.quantize import int8_copy, quantize_onnx
from finegrain.predict import Predictor

from .conftest import make_checkpoint, require_data

#: QEMU presenting an AVX2-only AMD Zen 3 (installs Debian's qemu-user on first use; see its header)
AS_AVX2 = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "as-avx2"


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["native", pytest.param("as-avx2", marks=pytest.mark.emulated)])
def test_int8_agrees_with_fp32_on_real_cub_images(tmp_path, cub10_checkpoint, cpu):
    """A head trained on 10 cub100 species; the default int8 file's top-1 against fp32's on 128 of their real test
    photos, natively; under QEMU as an AVX2-only Zen 3 (whose int8 kernels add pairs of products in saturating
    16-bit sums: a full-range file lost 4 pt of top-1 there, changing 4-11% of predictions), the same file's
    answers on the first 32 photos must also be the ones it gives natively. The float stages the default keeps
    run slowly under QEMU (~8 s a photo): 32 photos took ~5 min on a busy Intel Xeon (2026-12-02)."""
    ckpt = cub10_checkpoint
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    calib = Checkpoint.load(ckpt).calibration_samples(64)
    assert len(calib) == 64 and all(s.split == "train" for s in calib)
    int8 = int8_copy(ckpt, fp32, calib_images=64, check_images=128)  # what export --int8 writes, float stages and all
    test = load_dataset(ckpt.parent.parent / "cub10.csv", val_fraction=0.0).split("test")[:128]
    images = torch.cat([x for x, _ in calibration_loader(test, Checkpoint.load(ckpt).preprocess)]).numpy()
    if cpu == "as-avx2":
        require_data(AS_AVX2)
    native = predictions_under([], [fp32, int8["path"]], images)
    p32, p8 = native[fp32], native[int8["path"]]
    agreement = sum(a == b for a, b in zip(p32, p8, strict=True)) / len(test)
    assert len(test) == 128 and agreement >= 0.98, f"int8 top-1 agrees with fp32 on only {agreement:.1%}"
    assert int8["megabytes"] < 0.5 * (tmp_path / "m.onnx").stat().st_size / 2**20
    if cpu == "as-avx2":
        emulated = predictions_under([str(AS_AVX2)], [int8["path"]], images[:32])[int8["path"]]
        assert emulated == p8[:32], "the int8 file answers differently on an AVX2-only CPU (saturated int16 sums?)"


def test_the_float_stage_search_keeps_the_stages_nearest_fp32_and_only_those_float(tmp_path, cub):
    """keep_float='auto' (what export --int8 does): stages are tried in float greedily, a stage kept only where it
    brings int8 nearer fp32 by FLOAT_GAIN, at most MAX_FLOAT_STAGES; the file holds exactly that: the kept stages'
    convolutions read float weights, every other convolution int8 weights through a DequantizeLinear."""
    import onnx

    from finegrain.export.quantize import FLOAT_GAIN, MAX_FLOAT_STAGES, stages

    fp32 = export_onnx(make_checkpoint(tmp_path / "m.pt"), tmp_path / "m.onnx")["path"]
    samples = [Sample(p, 0, "train") for p in sorted(cub.rglob("*.jpg"))]
    made = quantize_onnx(fp32, samples[:8], tmp_path / "q.onnx", target="portable", check=samples[8:],
                         keep_float="auto", min_agreement=0)  # fmt: skip
    tried, kept, groups = made["float_search"], made["float_stages"], stages(fp32)
    assert len(groups) >= 3 and {k for k in tried if "+" not in k} == {"none", *groups}
    assert len(kept) <= MAX_FLOAT_STAGES
    for i in range(len(kept) + 1):  # each round's best, kept only where it gained enough
        prefix = "+".join(kept[:i])
        before = prefix or "none"
        options = {k: v["kl"] for k, v in tried.items() if k.count("+") == i and k.startswith(prefix) and k != before}
        if not options:
            break
        best = min(options, key=options.get)
        gained = options[best] <= (1 - FLOAT_GAIN) * tried[before]["kl"]
        assert gained == (i < len(kept)) and (not gained or best == "+".join(kept[: i + 1]))
    graph = onnx.load(made["path"]).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    float_convs = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                   and produced_by.get(n.input[1]) != "DequantizeLinear"}  # fmt: skip
    assert float_convs == {name for stage in kept for name in groups[stage]}
    assert Predictor.load(made["path"]).model.meta["float_stages"] == ",".join(kept)
    with pytest.raises(ExportError, match="chooses on images"):
        quantize_onnx(fp32, samples[:8], tmp_path / "r.onnx", keep_float="auto")
