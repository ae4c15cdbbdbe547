from pathlib import Path

import numpy as np
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

from .conftest import made_once, make_checkpoint, require_data

#: QEMU presenting an AVX2-only AMD Zen 3 (installs Debian's qemu-user on first use; see its header)
AS_AVX2 = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "as-avx2"


@pytest.fixture(scope="module")
def cub10_int8(tmp_path_factory, cub10_checkpoint) -> dict:
    """The fp32 ONNX file of a head trained on 10 cub100 species, the default int8 copy (what export --int8 writes,
    float stages and all) and 128 of their real test photos, preprocessed: made once for both CPUs' tests."""
    return made_once(tmp_path_factory, "cub10_int8", lambda work: _int8_files(cub10_checkpoint, work))


def _int8_files(ckpt: Path, work: Path) -> dict:
    fp32 = export_onnx(ckpt, work / "m.onnx")["path"]
    calib = Checkpoint.load(ckpt).calibration_samples(64)
    assert len(calib) == 64 and all(s.split == "train" for s in calib)
    int8 = int8_copy(ckpt, fp32, calib_images=64, check_images=128)
    test = load_dataset(ckpt.parent.parent / "cub10.csv", val_fraction=0.0).split("test")[:128]
    images = torch.cat([x for x, _ in calibration_loader(test, Checkpoint.load(ckpt).preprocess)]).numpy()
    return {"fp32": fp32, "int8": int8, "images": images}


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_real_cub_images(cub10_int8):
    """The default int8 file's top-1 against fp32's on 128 real test photos of the 10 species, natively."""
    fp32, int8, images = cub10_int8["fp32"], cub10_int8["int8"], cub10_int8["images"]
    native = predictions_under([], [fp32, int8["path"]], images)
    p32, p8 = native[fp32], native[int8["path"]]
    agreement = sum(a == b for a, b in zip(p32, p8, strict=True)) / len(images)
    assert len(images) == 128 and agreement >= 0.98, f"int8 top-1 agrees with fp32 on only {agreement:.1%}"
    assert int8["megabytes"] < 0.5 * Path(fp32).stat().st_size / 2**20


@pytest.mark.slow
@pytest.mark.emulated
def test_int8_answers_the_same_on_an_avx2_only_cpu(cub10_int8):
    """Under QEMU as an AVX2-only Zen 3, whose int8 kernels add pairs of products in saturating 16-bit sums (a
    full-range file lost 4 pt of top-1 there, changing 4-11% of predictions), the default int8 file's logits on 8
    real photos must be the ones it gives natively, to 2% of their range: a full-range file's moved 48% of it there,
    a saturation-free file's 0.0% (Intel Xeon family 6 model 167, 2026-12-03). Logits, not top-1s: saturation moves
    every photo's logits but flips few answers, and the float stages the default keeps run slowly under QEMU (~8 s
    a photo; 32 photos' top-1s took 6.5 min in CI)."""
    require_data(AS_AVX2)
    path, images = cub10_int8["int8"]["path"], cub10_int8["images"][:8]
    native, emulated = (np.array(predictions_under(p, [path], images, logits=True)[path]) for p in ([], [str(AS_AVX2)]))
    moved = np.abs(emulated - native).max() / np.abs(native).max()
    print(f"int8 logits on an AVX2-only CPU moved {moved:.2%} of their range")
    assert moved <= 0.02, f"the int8 file's logits move {moved:.1%} on an AVX2-only CPU (saturated int16 sums?)"
    assert (emulated.argmax(1) == native.argmax(1)).all()


@pytest.mark.slow
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


def test_the_float_stage_search_pairs_the_kept_stage_only_with_the_first_rounds_runners_up():
    """Later rounds try only ROUND_WIDTH stages, those that alone came nearest fp32 in the first round: a stage that
    alone moved int8 away from fp32 (f) or ranked below them (e) is not tried beside the kept one, even where that
    pair would have been nearest (the old search tried every pair: 20 quantizations for lite0 instead of 14)."""
    from finegrain.export.quantize import ROUND_WIDTH, _float_search

    assert ROUND_WIDTH == 3
    groups = {s: [f"{s}/conv1", f"{s}/conv2"] for s in "abcdef"}
    kl = {"none": 1.0, "a": 0.5, "b": 0.6, "c": 0.7, "d": 0.8, "e": 0.95, "f": 1.2,
          "ab": 0.3, "ac": 0.35, "ad": 0.45, "ae": 0.2, "af": 0.1}  # fmt: skip

    def quantized(names, file):
        return Path("".join(sorted({n.split("/")[0] for n in names})) or "none")

    kept, tried, file = _float_search(groups, quantized, lambda path: (kl[path.name], 1.0))
    assert list(tried) == ["none", *"abcdef", "a+b", "a+c", "a+d"]
    assert kept == ["a", "b"] and file == Path("ab")
