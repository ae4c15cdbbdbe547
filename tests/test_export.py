import json

import pytest
import torch

from finegrain.cli import main
from finegrain.errors import ConfigError
from finegrain.export import export_onnx, read_onnx_metadata
from finegrain.predict import Predictor

from .conftest import make_checkpoint

CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("baseline", {}),
        ("bcnn", {"reduce_dim": 16}),
        ("bcnn", {"reduce_dim": 16, "layers": [3, "final"]}),
        ("cbcnn", {"reduce_dim": 16, "sketch_dim": 256, "pooling": "rm"}),
        ("racnn", {"scales": 3}),
        ("racnn", {"scale_size": 32}),  # zooms crop the full-resolution 64-px input
        ("wsdan", {"num_maps": 4}),
        ("parts", {"part_groups": {"head": ["beak"], "body": ["tail"]}}),
    ],
)
def test_export_matches_pytorch_and_predicts_from_metadata_alone(tmp_path, cub, method, kwargs):
    ckpt = make_checkpoint(tmp_path / "m.pt", method, **kwargs)
    result = export_onnx(ckpt, tmp_path / "m.onnx")
    assert result["max_abs_diff"] < 1e-3
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["classes"] == CLASSES and meta["method"] == method and meta["preprocess"]["input_size"] == 64
    ckpt.unlink()  # the ONNX file alone must be enough
    images = sorted(cub.rglob("*.jpg"))[:4]
    onnx_preds = Predictor.load(tmp_path / "m.onnx").predict_files(images, k=3)
    make_checkpoint(ckpt, method, **kwargs)
    torch_preds = Predictor.load(ckpt, device="cpu").predict_files(images, k=3)
    for o, t in zip(onnx_preds, torch_preds, strict=True):
        assert [x["class"] for x in o["top"]] == [x["class"] for x in t["top"]]
        assert [x["prob"] for x in o["top"]] == pytest.approx([x["prob"] for x in t["top"]], abs=1e-4)


def test_tensor_sketch_refuses_to_export_and_names_the_alternative(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", "cbcnn", reduce_dim=8, sketch_dim=64)
    with pytest.raises(ConfigError, match="pooling=rm"):
        export_onnx(ckpt, tmp_path / "m.onnx")


def test_cli_export_and_predict_onnx(tmp_path, cub, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", "baseline")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 0
    assert "max |ONNX Runtime - PyTorch|" in capsys.readouterr().out
    image = sorted(cub.rglob("*.jpg"))[0]
    assert main(["predict", str(tmp_path / "model.onnx"), str(image), "--json", "--topk", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert preds[0]["top"][0]["class"] in CLASSES
    assert main(["predict", str(ckpt), str(image), "--engine", "onnx", "--json"]) == 0
    assert (tmp_path / "m.onnx").is_file()  # exported next to the checkpoint
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == preds[0]["top"][0]["class"]
    assert main(["predict", str(tmp_path / "nope.onnx"), str(image)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "broken.onnx"), str(image)]) == 2
    assert "cannot read ONNX file" in capsys.readouterr().err


def test_same_padding_is_constant_and_inside_the_convolutions(tmp_path):
    """tf_ EfficientNets pad 'same' from the input shape at run time; exported, that shape arithmetic would be
    quantized by int8 PTQ (wrong pads). The exported graph must carry constant pads, and inside the Conv nodes
    (ONNX pads each side separately): a separate Pad costs a dequantize/quantize pair in the int8 graph."""
    import onnx

    ckpt = make_checkpoint(tmp_path / "m.pt", "baseline")
    path = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    nodes = onnx.load(path).graph.node
    assert not {n.op_type for n in nodes} & {"Pad", "Shape", "Ceil"}
    pads = [list(a.ints) for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads  # a stride-2 3x3 'same' conv on an even size: nothing before, one after


def test_every_graph_optimisation_level_gives_the_same_logits(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", "baseline")
    path = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    x = torch.randn(2, 3, 64, 64)
    ref = Predictor.load(path).logits(x)
    for level in ("disable", "basic", "extended"):
        torch.testing.assert_close(Predictor.load(path, threads=1, graph_opt=level).logits(x), ref, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="optimisation level"):
        Predictor.load(path, graph_opt="max")
